"""Model adapters: the only code that knows a model family.

Each family module registers its adapter with `register_family` when imported; importing this
package imports every module in it, so adding a family is adding one module, and the registry is
complete wherever an adapter is looked up.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (Architecture, LayerCall, LiveTokens, ModelAdapter, ModelDims, UnsupportedModelError,
                   VisionLayout, adapter_class, families, get_adapter, register_family, supported_model_types)

_CONTRACT = {"base", "loading"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _CONTRACT:
        importlib.import_module(f"{__name__}.{_module}")  # the family registers itself

__all__ = ["Architecture", "LayerCall", "LiveTokens", "ModelAdapter", "ModelDims", "UnsupportedModelError",
           "VisionLayout", "adapter_class", "families", "get_adapter", "register_family", "supported_model_types"]
