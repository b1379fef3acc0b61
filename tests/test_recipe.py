import json
from pathlib import Path

import pytest
import torch

from recipe_search import RecipeError, apply_recipe, load_recipe, save_recipe
from recipe_search.budget import parse_budget
from recipe_search.flops import CostModel
from recipe_search.models import get_adapter
from recipe_search.recipe import CalibrationRecord
from recipe_search.recipe.build import make_recipe, model_identity
from recipe_search.search import SearchResult
from tiny_models import llava_inputs, tiny_llava

COUNTS = (64, 64, 40, 20, 20, 10)


def _recipe(model, counts=COUNTS):
    adapter = get_adapter(model)
    costs = CostModel(adapter.dims(), 64, (12, 14))
    result = SearchResult(counts, "fitprune", {"start_layer": 0}, "fitprune", {"heads": "max"}, "same",
                          {"alpha": 0.5})
    calib = CalibrationRecord("test", 2, "abc")
    return make_recipe(result, parse_budget("50%"), costs, model_identity(adapter, "tiny"), calib)


@pytest.fixture
def recipe_file(tmp_path, llava_sdpa):
    return save_recipe(_recipe(llava_sdpa), tmp_path / "r.json")


def test_round_trip(recipe_file, llava_sdpa):
    loaded = load_recipe(recipe_file)
    assert loaded.to_dict() == json.loads(recipe_file.read_text())
    assert loaded.model == _recipe(llava_sdpa).model
    assert loaded.schedule.counts == list(COUNTS)
    assert loaded.schedule.fractions[2] == pytest.approx(40 / 64)
    assert loaded.budget.achieved["full"] < 1 and "visual" in loaded.budget.formulas
    assert not list(Path(recipe_file).parent.glob(".*"))  # no temporary file left behind


def _edit(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format_version=99), "format_version: 99 is not supported"),
    (lambda d: d["schedule"]["counts"].__setitem__(3, 50), r"schedule.counts\[3\]: 50 > 40; the schedule must never increase"),
    (lambda d: d["schedule"]["counts"].__setitem__(0, 65), r"schedule.counts\[0\]: 65 is outside \[0, 64\]"),
    (lambda d: d["schedule"].pop("counts"), "schedule.counts: missing field"),
    (lambda d: d["model"].update(num_layers="six"), "model.num_layers: expected an integer"),
    (lambda d: d["selection"].update(score_layer="next"), "selection.score_layer"),
    (lambda d: d.update(extra=1), "extra: unknown field"),
    (lambda d: d.update(format="something-else"), "format: expected 'recipe-search/recipe'"),
])
def test_bad_recipes_name_the_field(recipe_file, change, message):
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(_edit(recipe_file, change))
    assert "\n" not in str(info.value)


def test_malformed_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "recipe-search/recipe",\n "format_version": 1,,}')
    with pytest.raises(RecipeError, match="malformed JSON at line 2 column"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "absent.json")


def test_save_refuses_invalid_and_keeps_old_file(recipe_file, llava_sdpa):
    before = recipe_file.read_text()
    bad = _recipe(llava_sdpa, counts=(64, 10, 20, 20, 20, 10))
    with pytest.raises(RecipeError, match="never increase"):
        save_recipe(bad, recipe_file)
    assert recipe_file.read_text() == before


def test_apply_recipe_checks_model(recipe_file, llava_sdpa):
    recipe = load_recipe(recipe_file)
    inputs = llava_inputs([[11, 12]])
    base = llava_sdpa(**inputs).logits
    with apply_recipe(llava_sdpa, recipe) as handle:
        llava_sdpa(**inputs)
        assert handle.last_counts == list(COUNTS)
    other_weights = tiny_llava("sdpa", seed=1)
    with pytest.raises(RecipeError, match="allow_other_checkpoint"):
        apply_recipe(other_weights, recipe)
    apply_recipe(other_weights, recipe, allow_other_checkpoint=True).remove()
    deeper = tiny_llava("sdpa", layers=4)
    with pytest.raises(RecipeError, match="recipe is for a llava model with 6 layers"):
        apply_recipe(deeper, recipe, allow_other_checkpoint=True)
    assert torch.equal(llava_sdpa(**inputs).logits, base)
