"""Search methods: turn calibration statistics into a per-layer schedule under a budget.

Every method has the signature ``(stats, budget, costs, *, start_layer) -> SearchResult``.
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
DEFAULT_START_LAYER = {"fitprune": 0, "fastv": 2, "uniform": 0}

__all__ = ["DEFAULT_START_LAYER", "METHODS", "InfeasibleBudgetError", "SearchResult", "fit_schedule",
           "search_fastv", "search_fitprune", "search_uniform"]
