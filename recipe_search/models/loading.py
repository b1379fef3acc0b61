"""Load a checkpoint from a local folder (or the local hub cache) with its processor and adapter."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

from . import get_adapter, supported_model_types
from .base import ModelAdapter

_MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}


class ModelLoadError(RuntimeError):
    pass


def load_model(name_or_path: str | Path, attn_implementation: str = "sdpa",
               dtype: torch.dtype = torch.float32) -> tuple[Any, Any, ModelAdapter]:
    """(model, processor, adapter) in eval mode. Never downloads: only local files are read."""
    source = str(name_or_path)
    if (source.startswith(("/", ".", "~")) or source.count("/") > 1) and not Path(source).expanduser().exists():
        # a path (a hub id is "org/name"): say so rather than relay the hub's repo-id syntax error
        raise ModelLoadError(f"model {source!r} not found locally: no such folder")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model {source!r} not found locally (nothing is downloaded): {first}") from None
    cls = _MODEL_CLASSES.get(config.model_type)
    if cls is None:
        raise ModelLoadError(
            f"unsupported model type {config.model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    model = cls.from_pretrained(source, local_files_only=True, attn_implementation=attn_implementation, dtype=dtype)
    model.eval()
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"model {source!r}: cannot load its processor ({exc})") from None
    return model, processor, get_adapter(model)
