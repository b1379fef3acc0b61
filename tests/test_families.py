"""The family registry and the boundary around models/."""
import re
from pathlib import Path

import pytest

from recipe_search.models import ModelAdapter, families, register_family, supported_model_types

PACKAGE = Path(__file__).resolve().parents[1] / "recipe_search"
#: Names only a family adapter may use: layer internals, layer keyword arguments, tower attributes.
FAMILY_NAMES = re.compile(r"\b(self_attn|input_layernorm|layer_norm1|q_proj|k_proj|position_embeddings|"
                          r"hidden_states|vision_tower|language_model|multi_modal_projector|image_token_id|"
                          r"model\.model)\b")


def test_duplicate_model_types_are_refused():
    class Twin(ModelAdapter):
        family, model_types, model_class = "twin", ("llava",), "LlavaForConditionalGeneration"

        def visual_tokens_per_image(self):
            return 1

    with pytest.raises(ValueError, match="model type 'llava' is already handled by LlavaAdapter"):
        register_family(Twin)
    assert families()["llava"].__name__ == "LlavaAdapter"


def test_incomplete_adapter_is_refused():
    class Nameless(ModelAdapter):
        def visual_tokens_per_image(self):
            return 1

    with pytest.raises(ValueError, match="must set family, model_types and model_class"):
        register_family(Nameless)


def test_every_registered_family_names_a_loadable_class():
    import transformers

    assert len(supported_model_types()) >= 2
    for model_type, adapter in families().items():
        assert hasattr(transformers, adapter.model_class), (model_type, adapter.model_class)


def test_no_family_knowledge_outside_models():
    """Calibration, search, recipe and runtime reach a model only through its adapter (the demo
    package builds and trains the demo LLaVA, so it is the one other place that may name it)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("models", "demo"):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if FAMILY_NAMES.search(line.split("#")[0]):
                offenders.append(f"{rel}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
