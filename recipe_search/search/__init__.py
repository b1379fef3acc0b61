"""Search methods: turn calibration statistics into a per-layer schedule under a budget."""
from .fitprune import InfeasibleBudgetError, SearchResult, fit_schedule, search_fitprune

METHODS = {"fitprune": search_fitprune}

__all__ = ["METHODS", "InfeasibleBudgetError", "SearchResult", "fit_schedule", "search_fitprune"]
