"""Load a checkpoint from a local folder (or the local hub cache) with its processor and adapter."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig

from .base import ModelAdapter, UnsupportedModelError, adapter_class


class ModelLoadError(RuntimeError):
    pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelLoadError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(device: str) -> str:
    """`device` if torch can place tensors there ('auto': accelerate spreads the layers)."""
    if device == "auto":
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ModelLoadError("--device auto needs accelerate: pip install accelerate") from None
        return device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ModelLoadError(f"device {device!r} is not usable here ({_first_line(exc)})") from None
    return device


def load_model(name_or_path: str | Path, attn_implementation: str = "sdpa",
               dtype: torch.dtype | str = torch.float32, device: str = "cpu") -> tuple[Any, Any, ModelAdapter]:
    """(model, processor, adapter) in eval mode. Never downloads: only local files are read.

    `device` is a torch device ("cpu", "cuda", "cuda:1", "mps") or "auto": accelerate's
    `device_map="auto"` spreads the layers over the accelerators and offloads what does not fit.
    """
    dtype, device = parse_dtype(dtype), check_device(device)
    source = str(name_or_path)
    if (source.startswith(("/", ".", "~")) or source.count("/") > 1) and not Path(source).expanduser().exists():
        # a path (a hub id is "org/name"): say so rather than relay the hub's repo-id syntax error
        raise ModelLoadError(f"model {source!r} not found locally: no such folder")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {source!r} not found locally (nothing is downloaded): {_first_line(exc)}") from None
    try:
        family = adapter_class(config.model_type)
    except UnsupportedModelError as exc:
        raise ModelLoadError(str(exc)) from None
    cls = getattr(transformers, family.model_class)
    try:
        placement = {"device_map": "auto"} if device == "auto" else {}
        model = cls.from_pretrained(source, local_files_only=True, attn_implementation=attn_implementation,
                                    dtype=dtype, **placement)
        if device != "auto":
            model.to(device)
    except Exception as exc:  # noqa: BLE001  (missing, truncated or foreign weight files raise many types)
        raise ModelLoadError(f"model {source!r}: cannot load its weights ({_first_line(exc)})") from None
    model.eval()
    try:
        processor = family.load_processor(source)
    except ImportError as exc:
        raise ModelLoadError(f"model {source!r}: its processor needs a package that is not installed "
                             f"({_first_line(exc)})") from None
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ModelLoadError(f"model {source!r}: cannot load its processor ({_first_line(exc)})") from None
    return model, processor, family(model)
