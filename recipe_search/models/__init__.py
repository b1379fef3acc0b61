"""Model adapters: the only code that knows a model family."""
from __future__ import annotations

from torch import nn

from .base import Architecture, ModelAdapter, ModelDims
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaAdapter, Qwen2VLAdapter)


class UnsupportedModelError(ValueError):
    pass


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`, or a one-line error naming the supported architectures."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    raise UnsupportedModelError(
        f"unsupported model type {model_type!r}; supported: {', '.join(supported_model_types())}"
    )


__all__ = ["ADAPTERS", "Architecture", "ModelAdapter", "ModelDims", "UnsupportedModelError", "get_adapter",
           "supported_model_types"]
