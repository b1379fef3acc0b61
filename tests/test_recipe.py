import json
import os
import stat
from pathlib import Path

import pytest
import torch

from recipe_search import RecipeError, apply_recipe, load_recipe, save_recipe
from recipe_search.budget import parse_budget
from recipe_search.flops import CostModel
from recipe_search.models import get_adapter
from recipe_search.recipe import CalibrationRecord
from recipe_search.recipe.build import make_recipe
from recipe_search.recipe.identity import model_identity
from recipe_search.methods import SearchResult
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


# -- hostile recipes: every problem is one short RecipeError line that names the field ---------------
def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert type(err.value) is RecipeError and len(message) <= 500 and message.isprintable(), message[:300]
    return message


def _text(path: Path, change) -> Path:
    """Edit the file as text: for what json.dumps cannot write (duplicate keys, Infinity, huge digits)."""
    path.write_text(change(path.read_text()))
    return path


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("change,message", [
    (lambda t: t.replace('"params": {\n      "heads": "max"\n    }', '"params": {"seed": Infinity}')
     .replace('"rule": "fitprune"', '"rule": "random"', 1), r"selection.params.seed: inf is not a finite number"),
    (lambda t: t.replace('"value": 0.5', '"value": NaN'), "budget.value: nan is not a finite number"),
    (lambda t: t.replace('"num_samples": 2', '"num_samples": ' + "9" * 5000),
     "calibration.num_samples: an integer of 5000 digits is out of range"),
    (lambda t: t.replace('"start_layer": 0', '"start_layer": ' + _nested(1500)),
     r"method.params.start_layer\[0\]\[0\].*: nested deeper than 32 levels"),
    (lambda t: t.replace('"start_layer": 0', '"start_layer": ' + _nested(990)), "nested deeper than 32 levels"),
    (lambda t: t.replace('"schedule": {', '"schedule": {"visual_tokens": 32, '),
     "schedule.visual_tokens: duplicate key"),
    (lambda t: t.replace('"format_version": 3', '"format_version": 3.0'), "format_version: 3.0 is not supported"),
    (lambda t: t[:len(t) // 2], "malformed JSON at line"),
])
def test_what_json_lets_through_is_a_recipe_error(recipe_file, change, message):
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(_text(recipe_file, change))
    assert str(err.value).startswith(f"{recipe_file}: ")
    _one_line(err)


def test_a_byte_order_mark_is_accepted(recipe_file):
    original = load_recipe(recipe_file)
    recipe_file.write_bytes(b"\xef\xbb\xbf" + recipe_file.read_bytes())
    assert load_recipe(recipe_file) == original


def _counts(d, counts, n=64):
    d["schedule"].update(visual_tokens=n, counts=counts, fractions=[c / n for c in counts])


@pytest.mark.parametrize("change,message", [
    # the pruning plan's constraints, across fields
    (lambda d: d.update(vision=None) or d["selection"].update(score_layer="previous"),
     r"selection.score_layer: 'previous' cannot drop at layer 0 \(schedule.counts\[0\] is 32 < 64\)"),
    (lambda d: (_counts(d, [64, 64, 40, 20, 20, 10]), d["selection"].update(rule="dart", params={},
                                                                             score_layer="previous")),
     "selection.score_layer: 'previous' needs a rule that ranks tokens; 'dart' does not"),
    (lambda d: _counts(d, [c * 2 for c in d["schedule"]["counts"]], 128),
     "schedule.visual_tokens: 128, but model.visual_tokens_per_image is 64"),
    # rule parameters: declared types, known names, ranges, and the vision stage's layers
    (lambda d: d["selection"].update(rule="random", params={"seed": "12"}),
     "selection.params.seed: expected an integer, got '12'"),
    (lambda d: d["selection"].update(rule="random", params={"seed": 1.5}),
     "selection.params.seed: expected an integer"),
    (lambda d: d["selection"]["params"].update(bogus=1),
     "selection.params.bogus: not a parameter of the fitprune rule"),
    (lambda d: d["selection"].update(rule="dart", params={"image_pivots": 0, "text_pivots": 0}),
     "selection.params: dart rule: needs at least one pivot"),
    (lambda d: d["selection"].update(rule="ficoco-l", params={"quantile": 1.5}),
     r"selection.params.quantile: ficoco-l rule: quantile must be a number in \[0, 1\]"),
    (lambda d: d["vision"].update(params={"shallow_layer": 2}),
     "vision.params: freepruner rule: shallow_layer 2 is deeper than the stage layer 1"),
    (lambda d: d["vision"].update(encoder_layer=-1), "vision.encoder_layer: -1 must not be negative"),
    # sizes and amounts in their valid ranges
    (lambda d: d["model"].update(num_heads=0), "model.num_heads: 0 must be positive"),
    (lambda d: d["model"].update(num_kv_heads=3), r"model.num_kv_heads: 3 does not divide model.num_heads \(4\)"),
    (lambda d: d["model"].update(head_dim=-8), "model.head_dim: -8 must be positive"),
    (lambda d: d["model"].update(visual_tokens_per_image=0), "model.visual_tokens_per_image: 0 must be positive"),
    (lambda d: d["calibration"].update(num_samples=0), "calibration.num_samples: 0 must be positive"),
    (lambda d: d["budget"].update(value=1.5), r"budget.value: 1.5 is outside \(0, 1\]"),
    (lambda d: d["budget"].update(value=0), r"budget.value: 0 is outside \(0, 1\]"),
    (lambda d: d["budget"].update(kind="tokens", value=-3.0), "budget.value: -3.0 must be positive"),
    (lambda d: d["budget"].update(formula="wall-clock"), "budget.formula: 'wall-clock' is not one of full, visual"),
    (lambda d: d["budget"]["achieved"].update(full=-0.1), "budget.achieved.full: -0.1 is negative"),
])
def test_recipes_that_cannot_apply_do_not_load(tmp_path, llava_sdpa, change, message):
    from test_recipe_rules import _selected

    path = save_recipe(_selected(llava_sdpa, "freepruner", (32, 32, 20, 20, 10, 10)), tmp_path / "r.json")
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(_edit(path, change))
    _one_line(err)


def test_apply_refuses_what_only_the_model_can_tell(tmp_path, llava_sdpa):
    from dataclasses import replace

    from test_recipe_rules import _selected

    staged = _selected(llava_sdpa, "freepruner")
    path = _edit(save_recipe(staged, tmp_path / "v.json"), lambda d: d["vision"].update(encoder_layer=10**9))
    deep = load_recipe(path)  # the recipe cannot know the tower's depth
    with pytest.raises(RecipeError, match=r"vision.encoder_layer: .*must be in \[0, 1\].*not 1000000000") as err:
        apply_recipe(llava_sdpa, deep)
    _one_line(err)
    with pytest.raises(RecipeError, match="model.num_layers: recipe is for a llava model with 6 layers") as err:
        apply_recipe(tiny_llava("sdpa", layers=4), staged, allow_other_checkpoint=True)
    _one_line(err)
    # a recipe built or edited in Python gets the loader's checks, not the runtime's ValueError
    built = replace(staged, vision=None, selection=replace(staged.selection, score_layer="previous"))
    with pytest.raises(RecipeError, match="selection.score_layer: 'previous' cannot drop at layer 0") as err:
        apply_recipe(llava_sdpa, built)
    _one_line(err)
    inputs = llava_inputs([[11, 12]])
    assert torch.equal(llava_sdpa(**inputs).logits, llava_sdpa(**inputs).logits)  # nothing left attached


def test_apply_refuses_a_vision_stage_the_family_lacks():
    from dataclasses import replace

    from recipe_search.recipe import VisionSelection
    from tiny_models import tiny_qwen2_vl

    qwen = tiny_qwen2_vl()
    recipe = replace(_recipe(qwen, counts=(64, 64, 40, 20)), vision=VisionSelection("freepruner", {}, 0))
    with pytest.raises(RecipeError, match="vision.rule: vision-side selection rules are not supported for the "
                                          "qwen2_vl family") as err:
        apply_recipe(qwen, recipe)
    _one_line(err)


def test_save_refuses_what_load_would_refuse(tmp_path, llava_sdpa):
    from dataclasses import replace

    recipe = _recipe(llava_sdpa)
    deep: list = []
    for _ in range(990):
        deep = [deep]
    for bad, message in [({"deep": deep}, r"method.params.deep\[0\].*: nested deeper than 32 levels"),
                         ({"x": float("nan")}, "method.params.x: nan is not a finite number"),
                         ({"x": {1, 2}}, "method.params.x: a set is not a JSON value"),
                         ({"x": 2**64}, r"method.params.x: 18446744073709551616 is out of range")]:
        with pytest.raises(RecipeError, match=message) as err:
            save_recipe(replace(recipe, method=replace(recipe.method, params=bad)), tmp_path / "r.json")
        _one_line(err)
    assert not list(tmp_path.iterdir())


def test_error_messages_are_short_escaped_single_lines(recipe_file, llava_sdpa):
    huge, original = "x" * 5_000_000, recipe_file.read_text()
    for change, field in [
        (lambda d: d["selection"].update(rule=huge), "selection.rule: unknown selection rule 'xxx"),
        (lambda d: d["selection"].update(rule="\x1b[2J\nfake: ok"), r"selection.rule: .*'\\x1b\[2J\\nfake"),
        (lambda d: d["model"].update({"\x1b[31mkey\n": 1}), r"model\['\\x1b\[31mkey\\n'\]: unknown field"),
        (lambda d: d["model"].update(num_layers=[huge] * 3), "model.num_layers: expected an integer"),
    ]:
        recipe_file.write_text(original)
        with pytest.raises(RecipeError, match=field) as err:
            load_recipe(_edit(recipe_file, change))
        _one_line(err)
    recipe_file.write_text(original.replace('"tiny"', json.dumps("\x1b[31mevil\nname" + huge)))
    with pytest.raises(RecipeError, match=r"model.fingerprint: .*\(\\x1b\[31mevil\\nname") as err:
        apply_recipe(tiny_llava("sdpa", seed=1), load_recipe(recipe_file))
    _one_line(err)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_written_files_get_the_mode_a_plain_open_gives(tmp_path, llava_sdpa, umask):
    old = os.umask(umask)
    try:
        path = save_recipe(_recipe(llava_sdpa), tmp_path / "new.json")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        path.chmod(0o640)
        save_recipe(_recipe(llava_sdpa), path)  # an existing file keeps its own mode, as with open()
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["new.json"]  # no temporary file left
