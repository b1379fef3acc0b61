"""Search methods: turn calibration statistics or model outputs into a per-layer schedule.

Statistics-based methods (`METHODS`) have the signature ``(stats, budget, costs, *, start_layer)
-> SearchResult``; the output-scoring ones (gsearch.py, psigmoid.py) take a `ScheduleScorer` and
are driven by `recipe_search.pipeline`.
"""
from typing import Callable

from .baselines import search_fastv, search_uniform
from .fitprune import InfeasibleBudgetError, SearchResult, fit_schedule, search_fitprune

METHODS: dict[str, Callable[..., SearchResult]] = {
    "fitprune": search_fitprune,
    "fastv": search_fastv,
    "uniform": search_uniform,
}

#: The layer a method starts pruning at when the user does not say.
DEFAULT_START_LAYER = {"fitprune": 0, "fastv": 2, "uniform": 0, "gsearch": 2, "psigmoid": 2}

__all__ = ["DEFAULT_START_LAYER", "METHODS", "InfeasibleBudgetError", "SearchResult", "fit_schedule",
           "search_fastv", "search_fitprune", "search_uniform"]
