"""Which model a recipe is for: read from the model's adapter (used when writing and applying a
recipe, so applying never needs the search code)."""
from __future__ import annotations

from ..models import ModelAdapter
from .schema import ModelIdentity


def model_identity(adapter: ModelAdapter, name_or_path: str) -> ModelIdentity:
    arch = adapter.architecture()
    d = arch.dims
    return ModelIdentity(
        name_or_path=name_or_path, family=arch.family, model_type=arch.model_type, num_layers=d.num_layers,
        hidden_size=d.hidden_size, intermediate_size=d.intermediate_size, num_heads=d.num_heads,
        num_kv_heads=d.num_kv_heads, head_dim=d.head_dim, visual_tokens_per_image=arch.visual_tokens_per_image,
        fingerprint=adapter.fingerprint(),
    )
