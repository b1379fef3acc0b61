"""Baseline schedules every method is compared against, searched to the same budget.

* ``fastv``: one drop at layer K (default 2), ranked by the last prompt token's head-mean
  attention at layer K-1 (FastV, arXiv 2403.06764), keeping as many tokens as the budget allows.
* ``uniform``: the same count at every layer from `start_layer` on, ranked like FitPrune, so that
  comparing it with FitPrune isolates the value of a per-layer schedule.
"""
from __future__ import annotations

import time
from typing import Callable

from ..budget import Budget
from ..flops import CostModel
from ..runtime.plan import schedule_from_drops
from ..stats import CalibrationStats
from .fitprune import InfeasibleBudgetError, SearchResult


def largest_feasible(make: Callable[[int], tuple[int, ...]], budget: Budget, costs: CostModel,
                     what: str) -> tuple[int, ...]:
    """The schedule make(k) with the largest k in [0, N] that meets the budget (make is monotone in k)."""
    lo, hi = 0, costs.visual_tokens
    if not budget.is_met(make(lo), costs):
        raise InfeasibleBudgetError(f"budget {budget.text or budget.describe()} cannot be met by {what}, "
                                    f"even keeping no visual token")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if budget.is_met(make(mid), costs) else (lo, mid - 1)
    return make(lo)


def _single_drop(stats: CalibrationStats, budget: Budget, costs: CostModel, layer: int, method: str,
                 rule: str, rule_params: dict, score_layer: str) -> SearchResult:
    started = time.perf_counter()
    layers, n = stats.num_layers, stats.visual_tokens
    counts = largest_feasible(lambda k: schedule_from_drops(layers, n, {layer: k}), budget, costs,
                               f"{method}: one drop at layer {layer}")
    return SearchResult(counts, method, {"drop_layer": layer}, rule, rule_params, score_layer,
                        {"kept": counts[-1]}, time.perf_counter() - started)


def search_fastv(stats: CalibrationStats, budget: Budget, costs: CostModel, *, start_layer: int = 2) -> SearchResult:
    """FastV-style single drop at layer `start_layer` (K), sized to the budget."""
    if start_layer < 1:
        raise ValueError("fastv ranks by the previous layer's attention: --start-layer must be at least 1")
    return _single_drop(stats, budget, costs, start_layer, "fastv", "attention", {"query": "last", "heads": "mean"},
                        "previous")


def search_uniform(stats: CalibrationStats, budget: Budget, costs: CostModel, *, start_layer: int = 0) -> SearchResult:
    """The same number of visual tokens at every layer from `start_layer` on."""
    return _single_drop(stats, budget, costs, start_layer, "uniform", "fitprune", {"heads": "max"}, "same")
