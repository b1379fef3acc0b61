"""Search methods: turn calibration statistics or model outputs into a per-layer schedule.

Each method is one `Method` record in the `METHODS` registry: statistics-based ones carry their
`run(stats, budget, costs, *, start_layer, **run_options) -> SearchResult`; the output-scoring ones (G-Search,
P-Sigmoid) score schedules with a `ScheduleScorer` and are driven by `recipe_search.pipeline`.
The command line's choices and help come from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from ..registry import Registry
from .baselines import search_fastv, search_uniform
from .fitprune import InfeasibleBudgetError, SearchResult, fit_schedule, search_fitprune


@dataclass(frozen=True)
class Method:
    """What the pipeline and the command line need to know about a search method."""

    name: str
    summary: str                   # one phrase for --help
    start_layer: int               # first layer that may drop when the user does not say
    run: Callable[..., SearchResult] | None = None  # statistics-based methods only
    run_options: tuple[str, ...] = ()  # `SearchOptions` fields it reads besides the common ones (`run` gets them as keywords)
    on_outputs: bool = False       # scores schedules on what the model answers (needs a scorer)
    budgetless: bool = False       # finds its own cost: takes no budget
    calibration_samples: int = 64  # default --num-samples
    validation_share: float = 0.5  # on_outputs: share of the calibration samples that only pick, never search


METHODS: Registry[Method] = Registry("search method")


def check_run_options(method: str, given: Iterable[str], spell: Callable[[str], str] = str) -> None:
    """One line when an option only some methods read (a `run_options` name) is given for a method that
    would silently ignore it; `spell` names it as the caller's user wrote it (e.g. "--min-cut")."""
    for option in given:
        takers = [name for name, m in METHODS.items() if option in m.run_options]
        if takers and option not in METHODS.get(method).run_options:
            listed = " or ".join(filter(None, (", ".join(takers[:-1]), takers[-1])))
            raise ValueError(f"{spell(option)} is read by --method {listed} only, not by {method}")


def register_method(method: Method) -> Method:
    """Make `method` available to `search()`, the pipeline and `--method` (a name only once)."""
    return METHODS.register(method.name, method)


register_method(Method("auto", "the default; every schedule and rule below, scored on the model's answers and "
                       "picked on held-out samples (--time-budget)", 0, on_outputs=True,
                       calibration_samples=256, validation_share=0.75, run_options=("min_cut",)))
# auto: 64 samples shortlist 8 of some 70 candidates (a coarse cut: most candidates are far apart), 192 pick
# among the 8, which are often a point apart (docs/rules.md, "A larger validation part")
register_method(Method("fitprune", "FitPrune (attention statistics, bisection to the budget)", 0,
                       run=search_fitprune, run_options=("min_cut",)))
register_method(Method("gsearch", "G-Search (greedy, least cost without loss on model outputs; no budget)", 2,
                       on_outputs=True, budgetless=True, run_options=("min_cut",)))
register_method(Method("psigmoid", "P-Sigmoid (sigmoid schedule tuned by Bayesian optimisation to the budget)", 2,
                       on_outputs=True, run_options=("min_cut",)))
register_method(Method("fastv", "baseline FastV (one drop at layer 2)", 2, run=search_fastv))
register_method(Method("uniform", "baseline uniform (the same count at every layer)", 0, run=search_uniform))

__all__ = ["METHODS", "InfeasibleBudgetError", "Method", "SearchResult", "check_run_options", "fit_schedule",
           "register_method", "search_fastv", "search_fitprune", "search_uniform"]
