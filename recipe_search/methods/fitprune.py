"""FitPrune (arXiv 2409.10197): per-layer drop counts that keep attention mass under a budget.

Faithful to the method's fit (methods.md §1) with the reference code's faults removed:
* sizes and costs come from the model config and the calibration prompts (`CostModel`);
* the fit works on batch statistics and keeps one count per layer shared by every sample,
  which is what the runtime executes;
* fitting and inference rank tokens by the same score, c_j * v_j (FitPrune's inference
  product): at each layer the lowest-ranked live tokens are removed for as long as both the
  text->visual and the visual->visual attention mass stay >= (1 - alpha) of the unpruned mass;
* bisection keeps the last *feasible* alpha, and the written schedule is checked against the
  budget with the exact formula.
The fit runs on the unpruned model's statistics restricted to the surviving tokens (the reference
re-runs the model per alpha); this is what makes a search take milliseconds instead of minutes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..budget import Budget
from ..flops import CostModel
from ..stats import CalibrationStats
from .cuts import MIN_CUT, check_min_cut, worth_a_cut


class InfeasibleBudgetError(ValueError):
    pass


@dataclass(frozen=True)
class SearchResult:
    """A schedule and how it was found, ready to be written as a recipe."""

    counts: tuple[int, ...]
    method: str
    params: dict[str, Any]
    rule: str                       # the selection rule the runtime must use with these counts
    rule_params: dict[str, Any]
    score_layer: str
    result: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    vision_rule: str | None = None  # a pre-LLM stage keeps counts[0] in the vision tower (recipe/rules.py)
    merge_threshold: float | None = None  # near-duplicate drops merge into survivors (runtime/plan.py)


def _layer_costs(budget: Budget, costs: CostModel) -> np.ndarray:
    """cost[n] of one layer with n visual tokens, in the budget's own unit."""
    if budget.kind == "tokens":
        return np.arange(costs.visual_tokens + 1, dtype=np.float64)
    return costs.table(budget.formula)


def fit_schedule(stats: CalibrationStats, alpha: float, layer_cost: np.ndarray, limit: float,
                 start_layer: int = 0, min_cut: float = 0.0) -> tuple[int, ...]:
    """The schedule FitPrune's fit gives for one alpha; `limit` is the allowed total cost. A layer
    cuts only if the fit removes at least `min_cut` of its live visual tokens there; smaller drops
    wait (their tokens stay live) until the removable ones add up, at a later layer."""
    samples, layers, n_vis = stats.cross.shape
    w_cross = stats.cross_mass().astype(np.float64) * (1 - alpha)   # (S, L) mass that must survive
    w_self = stats.self_mass().astype(np.float64) * (1 - alpha)
    live = np.ones((samples, n_vis), dtype=bool)
    current, spent, counts = n_vis, 0.0, []
    for layer in range(layers):
        if spent + (layers - layer) * layer_cost[current] <= limit:
            counts += [current] * (layers - layer)
            break
        if layer >= start_layer and current > 0:
            c, v = stats.cross[:, layer].astype(np.float64), stats.selfv[:, layer].astype(np.float64)
            score = np.where(live, c * v, -np.inf)
            order = np.argsort(score, axis=1, kind="stable")
            c_sorted = np.take_along_axis(np.where(live, c, 0.0), order, 1)
            v_sorted = np.take_along_axis(np.where(live, v, 0.0), order, 1)
            dead = n_vis - current
            # remaining mass after removing the k lowest live tokens, k = 0..current
            rem_c = c_sorted.sum(1, keepdims=True) - np.concatenate(
                [np.zeros((samples, 1)), np.cumsum(c_sorted, 1)], 1)[:, dead:]
            rem_v = v_sorted.sum(1, keepdims=True) - np.concatenate(
                [np.zeros((samples, 1)), np.cumsum(v_sorted, 1)], 1)[:, dead:]
            slack = 1e-9  # float rounding of the cumulative sums must not block removing everything at alpha=1
            ok = (rem_c >= w_cross[:, layer, None] - slack) & (rem_v >= w_self[:, layer, None] - slack)
            removable = ok.cumprod(axis=1).sum(axis=1) - 1  # largest k that keeps both masses
            k = int(np.floor(np.mean(np.maximum(removable, 0))))
            if worth_a_cut(k, current, min_cut):
                drop = order[:, dead : dead + k]
                np.put_along_axis(live, drop, False, axis=1)
                current -= k
        counts.append(current)
        spent += layer_cost[current]
    return tuple(counts)


def search_fitprune(stats: CalibrationStats, budget: Budget, costs: CostModel, *, start_layer: int = 0,
                    tolerance: float = 0.01, min_cut: float = MIN_CUT) -> SearchResult:
    """Bisect alpha to the smallest feasible value; raises InfeasibleBudgetError if none is.
    `min_cut` (share of the live tokens a cut must remove, `fit_schedule`) is recorded in the params."""
    started = time.perf_counter()
    min_cut = check_min_cut(min_cut)
    layer_cost = _layer_costs(budget, costs)
    if budget.kind == "tokens":
        limit = budget.value * stats.num_layers
    else:
        limit = budget.value * costs.unpruned(budget.formula)
    params = {"start_layer": start_layer, "alpha_tolerance": tolerance, "fit_rule": "product-prefix",
              "min_cut": min_cut}
    feasible = lambda counts: budget.is_met(counts, costs)  # noqa: E731
    trace: list[dict[str, Any]] = []
    best = fit_schedule(stats, 1.0, layer_cost, limit, start_layer, min_cut)
    if not feasible(best):
        raise InfeasibleBudgetError(
            f"budget {budget.text or budget.describe()} cannot be met: dropping every visual token from layer "
            f"{start_layer} on still costs {budget.achieved(best, costs):.1%}"
            if budget.kind == "flops" else
            f"budget {budget.text} cannot be met with pruning from layer {start_layer} on"
        )
    best_alpha, lo, hi = 1.0, 0.0, 1.0
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        counts = fit_schedule(stats, mid, layer_cost, limit, start_layer, min_cut)
        ok = feasible(counts)
        trace.append({"alpha": mid, "achieved": budget.achieved(counts, costs), "feasible": ok})
        if ok:
            hi, best, best_alpha = mid, counts, mid
        else:
            lo = mid
    assert feasible(best), "FitPrune kept an infeasible schedule"
    return SearchResult(best, "fitprune", params, "fitprune", {"heads": "max"}, "same",
                        {"alpha": best_alpha, "iterations": len(trace), "trace": trace},
                        time.perf_counter() - started)
