import numpy as np
import pytest

from recipe_search.budget import parse_budget
from recipe_search.flops import CostModel
from recipe_search.models import ModelDims
from recipe_search.methods import InfeasibleBudgetError, fit_schedule, search_fitprune
from recipe_search.methods.cuts import MIN_CUT
from recipe_search.stats import CalibrationStats

DIMS = ModelDims(num_layers=8, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32)


def _stats(seed=0, samples=16, layers=8, n=144):
    """Attention that concentrates with depth, as in real MLLMs: deep layers need few tokens."""
    rng = np.random.default_rng(seed)
    sharp = np.linspace(0.5, 4.0, layers)[None, :, None]
    logits = rng.normal(size=(samples, layers, n)) * sharp
    cross = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    selfv = rng.dirichlet(np.ones(n), size=(samples, layers))
    return CalibrationStats(cross=cross.astype(np.float32), selfv=selfv.astype(np.float32), last=cross.astype(np.float32),
                            text_tokens=np.full(samples, 12), kendall_tau=np.eye(layers, dtype=np.float32))


@pytest.fixture(scope="module")
def setup():
    stats = _stats()
    return stats, CostModel(DIMS, 144, tuple(stats.text_tokens.tolist()))


@pytest.mark.parametrize("budget", ["90%", "50%", "25%", "12.5%", "64tok", "10tok"])
@pytest.mark.parametrize("formula", ["full", "visual"])
@pytest.mark.parametrize("min_cut", [0.0, MIN_CUT])
def test_written_schedule_meets_budget(setup, budget, formula, min_cut):
    stats, costs = setup
    b = parse_budget(budget, formula)
    result = search_fitprune(stats, b, costs, min_cut=min_cut)
    assert result.params["min_cut"] == min_cut
    counts = result.counts
    assert b.is_met(counts, costs)
    assert all(x >= y for x, y in zip(counts, counts[1:])) and counts[0] <= 144
    assert result.result["alpha"] <= 1 and result.seconds < 1.0


def test_bisection_keeps_last_feasible_alpha(setup):
    stats, costs = setup
    b = parse_budget("40%")
    result = search_fitprune(stats, b, costs, tolerance=0.001)
    trace = result.result["trace"]
    feasible = [t["alpha"] for t in trace if t["feasible"]]
    infeasible = [t["alpha"] for t in trace if not t["feasible"]]
    assert result.result["alpha"] == min(feasible)
    assert max(infeasible) < result.result["alpha"] <= max(infeasible) + 0.002
    # the kept schedule is the fit at the kept alpha, not the last iterate
    limit = 0.4 * costs.unpruned("full")
    assert fit_schedule(stats, result.result["alpha"], costs.table("full"), limit,
                        min_cut=result.params["min_cut"]) == result.counts


def test_smaller_alpha_keeps_more_tokens(setup):
    stats, costs = setup
    table, limit = costs.table("full"), 0.0  # limit 0: never stop early
    totals = [sum(fit_schedule(stats, a, table, limit)) for a in (0.0, 0.05, 0.2, 0.5, 1.0)]
    assert totals == sorted(totals, reverse=True)
    assert totals[0] == 144 * 8 and totals[-1] == 0


def test_start_layer_and_concentration(setup):
    stats, costs = setup
    counts = search_fitprune(stats, parse_budget("50%"), costs, start_layer=2).counts
    assert counts[:2] == (144, 144) and counts[2] < 144


def test_infeasible_budget_is_explained(setup):
    stats, costs = setup
    with pytest.raises(InfeasibleBudgetError, match="cannot be met: dropping every visual token from layer 3"):
        search_fitprune(stats, parse_budget("30%"), costs, start_layer=3)


def _cuts(counts, n=144):
    """(live before, live after) at every layer where the count drops."""
    return [(before, c) for before, c in zip((n, *counts), counts) if c < before]


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_min_cut_waits_for_drops_worth_a_cut(setup, alpha):
    stats, costs = setup
    table = costs.table("full")
    fit = fit_schedule(stats, alpha, table, 0.0)
    held = fit_schedule(stats, alpha, table, 0.0, min_cut=0.2)
    assert any(before - after < 0.2 * before for before, after in _cuts(fit))  # the plain fit has small cuts
    assert all(before - after >= 0.2 * before for before, after in _cuts(held))
    assert len(_cuts(held)) < len(_cuts(fit))
    assert held[0] >= fit[0]  # a drop too small for a cut waits: layer 0 keeps at least the fit's count


def test_min_cut_out_of_range_is_one_line(setup):
    stats, costs = setup
    with pytest.raises(ValueError, match=r"min_cut must be a share of the live tokens in \[0, 1\), not 1.5"):
        search_fitprune(stats, parse_budget("50%"), costs, min_cut=1.5)
