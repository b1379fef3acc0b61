"""Rules in recipes: format 2's vision section, strict loading, vision FLOPs, applying the result."""
import json

import pytest

from recipe_search import RecipeError, apply_recipe, load_recipe, save_recipe
from recipe_search.flops import CostModel, VisionCost
from recipe_search.models import get_adapter
from recipe_search.models.base import VisionLayout
from recipe_search.recipe.rules import with_rule
from test_recipe import _recipe
from tiny_models import llava_inputs, tiny_qwen2_vl

COUNTS = (32, 32, 20, 20, 10, 10)


def _costs(model):
    return CostModel(get_adapter(model).dims(), 64, (12, 14))


def _selected(model, name, counts=COUNTS):
    return with_rule(_recipe(model, counts), get_adapter(model), _costs(model), name)


def test_llm_rule_replaces_the_rule_and_records_the_search_rule(llava_sdpa):
    recipe = _selected(llava_sdpa, "ficoco-l")
    assert recipe.selection.rule == "ficoco-l" and recipe.selection.params["merge"] == "normalised"
    assert recipe.method.result["searched_with_rule"] == "fitprune"
    assert recipe.vision is None and "vision_encoder" not in recipe.budget.achieved


def test_vision_rule_round_trips_and_applies(tmp_path, llava_sdpa):
    recipe = _selected(llava_sdpa, "ficoco-v")
    assert recipe.vision.rule == "ficoco-v" and recipe.vision.encoder_layer == 1
    assert recipe.selection.rule == "fitprune"  # later drops keep the method's rule
    achieved = recipe.budget.achieved
    assert 0 < achieved["vision_encoder"] < 1 and "vision_encoder" in recipe.budget.formulas
    path = save_recipe(recipe, tmp_path / "v.json")
    data = json.loads(path.read_text())
    assert data["format_version"] == 3 and data["vision"]["rule"] == "ficoco-v"
    loaded = load_recipe(path)
    assert loaded == recipe
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    with apply_recipe(llava_sdpa, loaded) as handle:
        llava_sdpa(**inputs)
        assert handle.last_counts == list(COUNTS)


def test_vision_flops_by_hand():
    """CLIP-L/14-336 as LLaVA-1.5 uses it: 24 layers, 577 tokens, 190.6 G MACs (MAC = 1)."""
    layout = VisionLayout(num_layers=24, hidden_size=1024, intermediate_size=4096, feature_index=23, has_cls=True,
                          patches=576, projector_macs_per_token=1024 * 4096 + 4096 * 4096)
    per_layer = 4 * 577 * 1024**2 + 2 * 577**2 * 1024 + 2 * 577 * 1024 * 4096
    full = VisionCost(layout)
    assert full.unpruned() == full.total(10) == 24 * per_layer + 576 * layout.projector_macs_per_token
    assert 24 * per_layer == pytest.approx(190.6e9, rel=1e-3)
    staged = VisionCost(layout, stage_layer=22)
    kept = 22 * per_layer + 2 * full.layer(145) + 144 * layout.projector_macs_per_token
    assert staged.total(144) == kept


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change,message", [
    (lambda d: d["selection"].update(rule="nope"), "selection.rule: unknown selection rule 'nope'"),
    (lambda d: d["selection"].update(rule="freepruner"), "selection.rule: 'freepruner' runs in the vision tower"),
    (lambda d: d["selection"].update(params={"heads": "median"}), "selection.params.heads: fitprune rule: heads"),
    (lambda d: d["vision"].update(rule="dart"), "vision.rule: 'dart' runs in the LLM"),
    (lambda d: d["vision"].update(params={"merge": "sum"}), "vision.params.merge: ficoco-v rule: merge must be"),
    (lambda d: d["vision"].update(encoder_layer="last"), "vision.encoder_layer: expected an integer"),
    (lambda d: d["vision"].pop("encoder_layer"), "vision.encoder_layer: missing field"),
    (lambda d: d.update(format_version=1), "vision: unknown field in format_version 1"),
])
def test_bad_rule_fields_are_one_line(tmp_path, llava_sdpa, change, message):
    path = _edit(save_recipe(_selected(llava_sdpa, "ficoco-v"), tmp_path / "v.json"), change)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")) as err:
        load_recipe(path)
    assert "\n" not in str(err.value)


def test_format_1_recipes_still_load(tmp_path, llava_sdpa):
    def as_version_1(data):
        assert data.pop("vision") is None and data["selection"].pop("merge_threshold") is None
        data["format_version"] = 1

    path = _edit(save_recipe(_recipe(llava_sdpa), tmp_path / "r.json"), as_version_1)
    recipe = load_recipe(path)
    assert recipe.vision is None and recipe.format_version == 3  # upgraded when saved again


def test_unknown_rule_and_unsupported_tower_are_one_line(llava_sdpa):
    with pytest.raises(ValueError, match="unknown selection rule 'fastest'; known: attention, dart"):
        _selected(llava_sdpa, "fastest")
    qwen = get_adapter(tiny_qwen2_vl())
    with pytest.raises(ValueError, match="not supported for the qwen2_vl family"):
        with_rule(_recipe(llava_sdpa), qwen, CostModel(qwen.dims(), 16, (5,)), "ficoco-v")


def test_earlier_encoder_layer_saves_more_vision_flops(llava_sdpa):
    adapter, costs = get_adapter(llava_sdpa), _costs(llava_sdpa)
    late = with_rule(_recipe(llava_sdpa, COUNTS), adapter, costs, "freepruner")
    early = with_rule(_recipe(llava_sdpa, COUNTS), adapter, costs, "freepruner", encoder_layer=0)
    assert early.vision.encoder_layer == 0 and late.vision.encoder_layer == 1
    assert early.budget.achieved["vision_encoder"] < late.budget.achieved["vision_encoder"] < 1
    with apply_recipe(llava_sdpa, early) as handle:
        llava_sdpa(**llava_inputs([[11, 12]]))
        assert handle.last_counts == list(COUNTS)
    with pytest.raises(ValueError, match=r"vision encoder_layer must be in \[0, 1\]"):
        with_rule(_recipe(llava_sdpa, COUNTS), adapter, costs, "freepruner", encoder_layer=2)


def test_vision_rule_moves_a_later_first_cut_before_the_llm(llava_sdpa):
    """A schedule that keeps all at layer 0 (FastV-like) gets its first cut in the tower: cheaper, same later counts."""
    recipe = _recipe(llava_sdpa, (64, 64, 40, 20, 20, 10))
    moved = with_rule(recipe, get_adapter(llava_sdpa), _costs(llava_sdpa), "ficoco-v")
    assert moved.schedule.counts == [40, 40, 40, 20, 20, 10] and moved.schedule.fractions[0] == 40 / 64
    assert moved.method.result["pre_llm_cut_from_layer"] == 2
    assert moved.budget.achieved["full"] < recipe.budget.achieved["full"]
    assert moved.budget.achieved["mean_visual_tokens"] == pytest.approx(170 / 6)
