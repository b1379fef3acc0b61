"""min_cut: schedules made from a curve cut only where a cut drops enough tokens to pay its selection pass."""
from dataclasses import replace

import numpy as np
import pytest

from recipe_search.budget import parse_budget
from recipe_search.flops import CostModel, ModelDims
from recipe_search.methods import auto, psigmoid
from recipe_search.methods.cuts import MIN_CUT, held_counts, worth_a_cut

DEEP = CostModel(ModelDims(num_layers=32, hidden_size=1024, intermediate_size=2752, num_heads=16, num_kv_heads=16,
                           head_dim=64), 576, (40,))  # LLaVA-1.5-7B's depth and token counts


def cut_shares(counts, visual_tokens):
    """The share of its live tokens each cut drops."""
    before = (visual_tokens, *counts[:-1])
    return [(b - c) / b for b, c in zip(before, counts) if c < b]


def scored(counts, visual_tokens):
    """Live tokens a rule scores over all cuts: what selecting costs grows with it."""
    before = (visual_tokens, *counts[:-1])
    return sum(b for b, c in zip(before, counts) if c < b)


def test_held_counts_waits_until_a_drop_is_worth_a_cut():
    ratios = [1.0, 0.95, 0.9, 0.85, 0.5, 0.49]
    assert held_counts(ratios, 100) == (100, 95, 90, 85, 50, 49)  # min_cut 0: every drop is a cut
    assert held_counts(ratios, 100, 0.1) == (100, 100, 90, 90, 50, 50)
    assert held_counts([0.5, 0.7, 0.2], 10, 0.1) == (5, 5, 2)  # never grows with depth
    assert not worth_a_cut(0, 10, 0.0) and worth_a_cut(1, 10, 0.1) and not worth_a_cut(1, 11, 0.1)


@pytest.mark.parametrize("seed", range(5))
def test_held_counts_keep_at_least_the_plain_counts(seed):
    ratios = np.sort(np.random.default_rng(seed).random(32))[::-1]
    plain, held = held_counts(ratios, 576), held_counts(ratios, 576, MIN_CUT)
    assert all(h >= p for h, p in zip(held, plain))
    assert min(cut_shares(held, 576)) >= MIN_CUT and min(cut_shares(plain, 576)) < MIN_CUT


@pytest.mark.parametrize("budget", ["50%", "25%"])
@pytest.mark.parametrize("slope,midpoint", [(0.3, 12.0), (0.5, 8.0), (1.0, 16.0)])
def test_a_sigmoid_on_a_deep_model_scores_fewer_tokens_within_budget(budget, slope, midpoint):
    b = parse_budget(budget)
    fitted = {m: psigmoid.fit_proposal(576, 32, 2, slope, midpoint, b, DEEP, min_cut=m) for m in (0.0, MIN_CUT)}
    plain, held = fitted[0.0][2], fitted[MIN_CUT][2]
    assert b.is_met(plain, DEEP) and b.is_met(held, DEEP)
    assert min(cut_shares(plain, 576)) < MIN_CUT and min(cut_shares(held, 576)) >= MIN_CUT
    assert len(cut_shares(held, 576)) < len(cut_shares(plain, 576)) and scored(held, 576) < scored(plain, 576)


@pytest.mark.parametrize("layers", [8, 32])
def test_leanest_held_sigmoid_is_still_the_closed_form_minimum(layers):
    costs = CostModel(replace(DEEP.dims, num_layers=layers), 144, (12,) * 4)
    budget = parse_budget("50%")
    for start in (0, 1, 2, layers // 2):
        lean = budget.achieved(psigmoid.leanest_schedule(144, layers, start, MIN_CUT), costs)
        grid = [budget.achieved(psigmoid.sigmoid_schedule(144, layers, start, floor, slope, mid, MIN_CUT), costs)
                for floor in (0.0, 0.1, 0.5) for slope in np.linspace(*psigmoid.SLOPE_RANGE, 7)
                for mid in np.linspace(start, layers - 1, 9)]
        assert min(grid) >= lean - 1e-12


@pytest.mark.parametrize("budget", ["50%", "25%", "12.5%"])
def test_scaled_curve_holds_small_drops_within_budget(budget):
    b = parse_budget(budget)
    shape = tuple(int(round(576 * (1 - 0.97 * layer / 31))) for layer in range(32))  # a drop at every layer
    got, plain = auto.scaled_schedule(shape, 576, b, DEEP, MIN_CUT), auto.scaled_schedule(shape, 576, b, DEEP)
    assert got is not None and b.is_met(got, DEEP)
    assert min(cut_shares(got, 576)) >= MIN_CUT > min(cut_shares(plain, 576))
    assert len(cut_shares(got, 576)) < len(cut_shares(plain, 576)) and scored(got, 576) < scored(plain, 576)
