"""Merging near-duplicate drops into survivors under proportional attention (PruningPlan.merge_threshold).

Cached decoding and padded batches under merging plans are checked with every other plan in
test_runtime_equivalence.py; here: what a merge does to the states, the masses and the masks, and
how the threshold travels through recipes, the default search and the command line.
"""
import argparse
import dataclasses
import json
import math

import pytest
import torch

from recipe_search import RecipeError, apply_recipe, load_recipe, save_recipe
from recipe_search.hooks import CallHook, HookSet
from recipe_search.models import get_adapter
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule
from test_recipe import _recipe
from tiny_models import llava_inputs

COUNTS = (64, 40, 40, 20, 10, 10)


def _plan(threshold, counts=COUNTS, rule="fitprune"):
    return PruningPlan(counts, 64, make_rule(rule), merge_threshold=threshold)


def _layer_inputs(model, plan, inputs):
    """The (hidden, mask) each decoder layer is called with under `plan`, and the handle's last state."""
    adapter = get_adapter(model)
    seen = {}
    with PruningHandle(model, plan) as handle:
        with HookSet() as hooks:
            for i, layer in enumerate(adapter.decoder_layers()):
                hooks.add(layer, CallHook(lambda m, a, k, i=i: seen.__setitem__(
                    i, (adapter.read_layer_call(a, k), handle._state.mass, handle._state.cols))))
            logits = model(**inputs).logits
    return seen, logits


@pytest.fixture(params=["sdpa", "eager"])
def model(request, llava_sdpa, llava_eager):
    return llava_sdpa if request.param == "sdpa" else llava_eager


def test_every_dropped_token_merges_its_mass_and_masks_carry_its_log(model):
    """A threshold every pair passes: each cut keeps the image's whole mass (64 per row) on its
    survivors, and every later layer's mask adds log(mass) on exactly the allowed keys."""
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    # the hooks run after the runtime's: the call they see is the one the layer runs
    seen, _ = _layer_inputs(model, _plan(1e-6), inputs)
    for idx in (1, 3, 4):  # cuts enter layers 1, 3 and 4
        call, mass, cols = seen[idx]
        assert mass is not None
        visual = get_adapter(model).visual_mask(inputs["input_ids"]).gather(1, cols.clamp(min=0)) & (cols >= 0)
        assert torch.equal(visual.sum(1), torch.tensor([COUNTS[idx]] * 2))
        assert torch.allclose(mass[visual].view(2, -1).sum(1), torch.tensor([64.0, 64.0]))
        assert bool((mass[visual] > 1).any()) and bool((mass[~visual] == 1).all())
        mask = call.mask
        assert mask is not None and mask.dtype.is_floating_point
        allowed = mask > torch.finfo(mask.dtype).min / 2
        bias = mass.log()[:, None, None, :].expand_as(mask)
        assert torch.allclose(mask[allowed], bias[allowed].to(mask.dtype))


def test_merged_survivor_is_the_mass_weighted_mean_of_its_sources(llava_sdpa):
    """One cut, every drop merged: the sum over survivors of mass x state equals the sum of every
    visual state entering the cut (nothing lost, nothing counted twice)."""
    inputs = llava_inputs([[11, 12, 13]])
    counts = (64, 16, 16, 16, 16, 16)
    seen, _ = _layer_inputs(llava_sdpa, _plan(1e-6, counts), inputs)
    after, mass, cols1 = seen[1]
    adapter = get_adapter(llava_sdpa)
    # the state entering layer 1 before the cut: layer 0's output, re-run unpruned
    out = {}
    with HookSet() as hooks:
        hooks.add(list(adapter.decoder_layers())[1], CallHook(lambda m, a, k: out.__setitem__(
            "h", adapter.read_layer_call(a, k).hidden)))
        llava_sdpa(**inputs)
    vis0 = adapter.visual_mask(inputs["input_ids"])[0]
    vis1 = vis0[cols1[0]]
    total_before = out["h"][0, vis0].double().sum(0)
    total_after = (after.hidden[0, vis1].double() * mass[0, vis1, None].double()).sum(0)
    assert torch.allclose(total_after, total_before, atol=1e-4)


def test_unreachable_threshold_is_plain_dropping(model):
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    with PruningHandle(model, _plan(None)):
        plain = model(**inputs).logits
    seen, merged = _layer_inputs(model, _plan(1.0), inputs)
    assert all(mass is None for _, mass, _ in seen.values())  # random states are never exactly parallel
    assert torch.equal(merged, plain)


def test_merging_changes_what_a_cut_passes_on(llava_sdpa):
    inputs = llava_inputs([[11, 12, 13]])
    with PruningHandle(llava_sdpa, _plan(None)):
        plain = llava_sdpa(**inputs).logits[:, -1]
    with PruningHandle(llava_sdpa, _plan(0.05)):
        merged = llava_sdpa(**inputs).logits[:, -1]
    assert not torch.allclose(plain, merged)


@pytest.mark.parametrize("threshold", [0, -0.5, 1.5, True, "0.9", math.nan])
def test_bad_thresholds_are_refused(threshold):
    with pytest.raises(ValueError, match="merge_threshold: must be a cosine similarity in"):
        _plan(threshold)


def test_a_rule_that_merges_by_itself_takes_no_threshold():
    with pytest.raises(ValueError, match="'ficoco-l' merges by its own weights"):
        _plan(0.9, rule="ficoco-l")


def test_recipe_round_trip_and_apply(tmp_path, llava_sdpa):
    recipe = _recipe(llava_sdpa)
    recipe = dataclasses.replace(recipe, selection=dataclasses.replace(recipe.selection, merge_threshold=0.05))
    path = save_recipe(recipe, tmp_path / "m.json")
    data = json.loads(path.read_text())
    assert data["format_version"] == 3 and data["selection"]["merge_threshold"] == 0.05
    loaded = load_recipe(path)
    assert loaded == recipe
    inputs = llava_inputs([[11, 12, 13]])
    plan = PruningPlan(tuple(recipe.schedule.counts), 64, make_rule("fitprune", {"heads": "max"}),
                       merge_threshold=0.05)
    with PruningHandle(llava_sdpa, plan):
        expected = llava_sdpa(**inputs).logits
    with apply_recipe(llava_sdpa, loaded):
        assert torch.equal(llava_sdpa(**inputs).logits, expected)


@pytest.mark.parametrize("change,message", [
    (lambda d: d["selection"].update(merge_threshold=1.5), "selection.merge_threshold: must be a cosine similarity"),
    (lambda d: d["selection"].update(merge_threshold="high"), "selection.merge_threshold: unexpected value"),
    (lambda d: d.update(format_version=2), "selection.merge_threshold: unknown field in format_version 2"),
    (lambda d: d["selection"].update(rule="ficoco-l", params={}), "selection.merge_threshold: rule 'ficoco-l' merges"),
])
def test_bad_merge_fields_are_one_line(tmp_path, llava_sdpa, change, message):
    recipe = _recipe(llava_sdpa)
    recipe = dataclasses.replace(recipe, selection=dataclasses.replace(recipe.selection, merge_threshold=0.9))
    path = save_recipe(recipe, tmp_path / "m.json")
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(path)
    assert "\n" not in str(err.value)


def test_format_2_recipes_load_without_merging(tmp_path, llava_sdpa):
    path = save_recipe(_recipe(llava_sdpa), tmp_path / "r.json")
    data = json.loads(path.read_text())
    del data["selection"]["merge_threshold"]
    data["format_version"] = 2
    path.write_text(json.dumps(data))
    assert load_recipe(path).selection.merge_threshold is None


def test_command_line_threshold():
    from recipe_search.cli import _merge_threshold

    assert _merge_threshold("off") == "off" and _merge_threshold("0.8") == 0.8
    for bad in ("0", "2", "most"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a cosine similarity in"):
            _merge_threshold(bad)
