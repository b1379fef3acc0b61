"""P-Sigmoid (arXiv 2412.00556, our design in methods.md §2): a sigmoid schedule tuned by BO.

    r(l) = 1                                        for l < s (start layer)
    r(l) = r_min + (1 - r_min) / (1 + exp(k (l - m)))  otherwise
    n_l  = round(N r(l)), then forced non-increasing, drops under `min_cut` held back (cuts.py)

For every proposal (k, m) the floor r_min is bisected so the schedule meets the budget exactly
(the largest floor that fits; if none fits, the midpoint is first moved earlier until one does),
and the optimiser searches (k, m) to maximise the metric on the search set. When there is a
choice, the selection rule and the start layer s are categorical parameters of the same search
(the rule is part of what makes a schedule good: the best one changes from model to model).
Every trial is recorded; the best one becomes the recipe.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..budget import Budget
from ..flops import CostModel
from .cuts import held_counts
from .fitprune import InfeasibleBudgetError, SearchResult
from .gsearch import RULE
from .objective import Evaluation, ScheduleScorer, merit_keys
from .optimizers import Backend, Space, TrialLost

SLOPE_RANGE = (0.1, 3.0)
INFEASIBLE = -1.0  # told to the optimiser when no floor meets the budget for (k, m)


def sigmoid_schedule(visual_tokens: int, layers: int, start: int, floor: float, slope: float,
                     midpoint: float, min_cut: float = 0.0) -> tuple[int, ...]:
    def ratio(layer: int) -> float:
        if layer < start:
            return 1.0
        z = min(60.0, max(-60.0, slope * (layer - midpoint)))
        return floor + (1 - floor) / (1 + math.exp(z))

    return held_counts(map(ratio, range(layers)), visual_tokens, min_cut)


def fit_floor(visual_tokens: int, layers: int, start: int, slope: float, midpoint: float, budget: Budget,
              costs: CostModel, iterations: int = 40, min_cut: float = 0.0) -> tuple[float, tuple[int, ...]] | None:
    """The largest floor r_min in [0, 1] whose schedule meets the budget, or None if none does."""
    make = lambda f: sigmoid_schedule(visual_tokens, layers, start, f, slope, midpoint, min_cut)  # noqa: E731
    if not budget.is_met(make(0.0), costs):
        return None
    if budget.is_met(make(1.0), costs):
        return 1.0, make(1.0)
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if budget.is_met(make(mid), costs) else (lo, mid)
    return lo, make(lo)


def fit_proposal(visual_tokens: int, layers: int, start: int, slope: float, midpoint: float, budget: Budget,
                 costs: CostModel, min_cut: float = 0.0) -> tuple[float, float, tuple[int, ...]] | None:
    """(midpoint used, floor, schedule) for a proposal, repairing an over-budget midpoint.

    When no floor makes (slope, midpoint) meet the budget, the sigmoid still keeps too many tokens
    before its midpoint; the midpoint is then moved to the latest one (bisected) at which a floor
    does fit, so that most proposals still teach the optimiser something. None if even the start
    layer is too late.
    """
    def fit(at: float) -> tuple[float, tuple[int, ...]] | None:
        return fit_floor(visual_tokens, layers, start, slope, at, budget, costs, min_cut=min_cut)

    fitted = fit(midpoint)
    if fitted is not None:
        return (midpoint, *fitted)
    if fit(float(start)) is None:
        return None
    lo, hi = float(start), midpoint
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fit(mid) else (lo, mid)
    floor, counts = fit(lo)  # type: ignore[misc]
    return lo, floor, counts


def fit_to_curve(counts: Sequence[int], visual_tokens: int, start: int) -> dict[str, float]:
    """(k, m) of the least-squares sigmoid through a schedule, e.g. G-Search's, for a warm start.

    The floor is fitted too but not returned: each trial re-fits it to the budget."""
    layers = len(counts)
    target = np.asarray(counts, dtype=float) / visual_tokens
    best, best_err = {"slope": 1.0, "midpoint": float(start)}, float("inf")
    for slope in np.linspace(*SLOPE_RANGE, 30):
        for midpoint in np.linspace(start, layers - 1, 4 * (layers - start) + 1):
            for floor in np.linspace(0, 1, 21):
                sched = np.asarray(sigmoid_schedule(visual_tokens, layers, start, floor, slope, midpoint)) / visual_tokens
                err = float(((sched - target) ** 2).sum())
                if err < best_err:
                    best, best_err = {"slope": float(slope), "midpoint": float(midpoint)}, err
    return best


def leanest_schedule(visual_tokens: int, layers: int, start: int, min_cut: float = 0.0) -> tuple[int, ...]:
    """The cheapest schedule a P-Sigmoid from `start` can propose: floor 0, the steepest slope and
    the earliest midpoint (the search space's bounds), so half the tokens still enter `start`."""
    return sigmoid_schedule(visual_tokens, layers, start, 0.0, SLOPE_RANGE[1], float(start), min_cut)


def check_feasible(visual_tokens: int, layers: int, start: int, budget: Budget, costs: CostModel,
                   min_cut: float = 0.0) -> None:
    """Fail before any trial when no proposal from `start` can meet the budget (closed form: the
    leanest sigmoid), instead of spending every trial on proposals that cannot."""
    lean = leanest_schedule(visual_tokens, layers, start, min_cut)
    if not budget.is_met(lean, costs):
        raise InfeasibleBudgetError(
            f"budget {budget.text} cannot be met by a P-Sigmoid from layer {start}: its leanest schedule costs "
            f"{budget.achieved(lean, costs):.1%}; lower --start-layer or raise the budget"
        )


def feasible_start(visual_tokens: int, layers: int, preferred: int, budget: Budget, costs: CostModel,
                   min_cut: float = 0.0) -> int:
    """`preferred`, or the latest earlier start layer whose leanest sigmoid meets the budget; a
    one-line error naming the smallest budget any start can meet when none does."""
    for start in range(min(preferred, layers - 1), -1, -1):
        if budget.is_met(leanest_schedule(visual_tokens, layers, start, min_cut), costs):
            return start
    smallest = budget.achieved(leanest_schedule(visual_tokens, layers, 0, min_cut), costs)
    raise InfeasibleBudgetError(
        f"budget {budget.text} cannot be met by a P-Sigmoid on this model: the smallest it can reach "
        f"(from layer 0) is {smallest:.1%}" + (" of the FLOPs" if budget.kind == "flops" else ""))


def search_space(layers: int, start: int, rules: Sequence[str] = (), starts: Sequence[int] = ()) -> Space:
    """(slope, midpoint), plus the rule and the start layer as categorical parameters when there is a
    choice; the midpoint may then lie before a later start (the sigmoid is past its middle there)."""
    low = min(starts) if starts else start
    choices: dict[str, tuple[Any, ...]] = {}
    if len(rules) > 1:
        choices["rule"] = tuple(rules)
    if len(starts) > 1:
        choices["start"] = tuple(int(s) for s in starts)
    return Space({"slope": SLOPE_RANGE, "midpoint": (float(low), float(layers - 1))}, choices)


def feasible_starts(visual_tokens: int, layers: int, latest: int, budget: Budget, costs: CostModel,
                    min_cut: float = 0.0) -> tuple[int, ...]:
    """Start layers 0..`latest` from which some sigmoid meets the budget (closed form)."""
    return tuple(s for s in range(min(latest, layers - 1) + 1)
                 if budget.is_met(leanest_schedule(visual_tokens, layers, s, min_cut), costs))


@dataclass
class PSigmoidRun:
    scorer: ScheduleScorer
    budget: Budget
    costs: CostModel
    backend: Backend
    start_layer: int = 2
    n_trials: int = 48
    progress: Callable[[int, dict[str, Any]], None] | None = None
    worker: str = "main"
    rule: str = RULE  # when the space has no "rule" choice
    deadline: float | None = None  # time.monotonic() after which no new trial starts
    min_cut: float = 0.0  # cuts.py: drops smaller than this share of the live tokens wait

    def trial(self) -> bool:
        """Ask, fit the floor, score, tell; True if a trial was recorded.

        A trial beyond --n-trials (another worker took the last free slot meanwhile) is failed at
        once. An interrupted trial is failed, never half-recorded, so a resumed run replaces it.
        """
        n, layers = self.scorer.visual_tokens, len(self.scorer.layers)
        trial = self.backend.ask()
        try:
            if self.backend.rank(trial) > self.n_trials:
                self.backend.fail(trial)
                return False
            start = int(trial.params.get("start", self.start_layer))
            fitted = fit_proposal(n, layers, start, trial.params["slope"], trial.params["midpoint"],
                                  self.budget, self.costs, self.min_cut)
            # user attributes: what optuna-dashboard shows for each trial
            attrs: dict[str, Any] = {"feasible": fitted is not None, "worker": self.worker, "start": start,
                                     "rule": trial.params.get("rule", self.rule)}
            value = INFEASIBLE
            if fitted is not None:
                midpoint, floor, counts = fitted
                plan = self.scorer.rule_plan(counts, attrs["rule"])
                ev = self.scorer.evaluate_plan(plan)
                value = ev.objective
                attrs.update(score_layer=plan.score_layer, rule_base=plan.rule.name, rule_params=plan.rule.params(),
                             vision_rule=plan.vision.name if plan.vision else None,
                             midpoint_used=midpoint, floor=floor, counts=list(plan.counts), value=ev.value,
                             agreement=ev.agreement, kl=ev.kl, accuracy=ev.accuracy,
                             flops_full=self.costs.fraction(plan.counts, "full"),
                             flops_visual=self.costs.fraction(plan.counts, "visual"))
        except BaseException:
            self.backend.fail(trial)
            raise
        try:
            self.backend.tell(trial, value, attrs)
        except TrialLost as exc:  # its retry counts instead
            print(f"search-recipe: warning: {exc}", file=sys.stderr)
            return False
        if self.progress:
            self.progress(trial.number, attrs)
        return True

    def run(self) -> None:
        """Trials until the (possibly shared) study holds n_trials finished ones.

        Only finished trials count. While running trials of other workers hold the remaining slots,
        wait: they either finish, or their worker died and the trial is failed once its heartbeat is
        stale (and re-queued), which frees the slot for this worker.
        """
        while self.deadline is None or time.monotonic() < self.deadline:
            self.backend.reap()
            state = self.backend.progress()
            if state.finished >= self.n_trials:
                return
            if state.claimed >= self.n_trials and not state.waiting:
                time.sleep(self.backend.poll_seconds)
                continue
            self.trial()


#: Trials re-scored on the validation samples: the best by search score seldom stays best on new samples.
VALIDATED_TRIALS = 5


def best_result(run: PSigmoidRun, seconds: float, params: dict[str, Any],
                validation: ScheduleScorer | None = None) -> SearchResult:
    """The best feasible finished trial as a search result. With `validation`, the best
    `VALIDATED_TRIALS` distinct schedules by search score are re-scored there and the best validation
    score wins (`objective.merit_keys`: scores the samples cannot tell apart go to the lower KL),
    then the search score, then fewer full-sequence FLOPs."""
    # a trial told by an older version, or under other costs, is not trusted to meet the budget
    trials = [t for t in run.backend.finished() if t.attrs.get("feasible") and "rule_base" in t.attrs
              and run.budget.is_met(tuple(t.attrs["counts"]), run.costs)]
    if not trials:
        raise ValueError(f"no P-Sigmoid trial met the budget {run.budget.text}; widen the budget or lower --start-layer")
    def key(t: Any) -> tuple:
        return tuple(t.attrs["counts"]), t.attrs["rule"]

    ranked = sorted(trials, key=lambda t: (t.value, -t.attrs["flops_full"]), reverse=True)
    checked: dict[tuple, Evaluation] = {}
    if validation is not None:
        for t in ranked:
            if key(t) not in checked:
                checked[key(t)] = validation.evaluate_plan(run.scorer.rule_plan(t.attrs["counts"], t.attrs["rule"]))
            if len(checked) == VALIDATED_TRIALS:
                break
        merit = dict(zip(checked, merit_keys(list(checked.values()), len(validation.data))))
        ranked = sorted(ranked, key=lambda t: (key(t) not in checked, merit.get(key(t), ()), -t.value,
                                               t.attrs["flops_full"]))
    best = ranked[0]
    counts = tuple(best.attrs["counts"])
    assert run.budget.is_met(counts, run.costs), "P-Sigmoid kept a schedule over budget"
    picked: dict[str, Any] = {}
    if validation is not None:
        ev = checked[key(best)]
        picked = {"validation_value": ev.value, "validation_agreement": ev.agreement,
                  "validation_samples": len(validation.data), "validated_trials": len(checked)}
    vision = best.attrs.get("vision_rule")
    rule = "fitprune" if vision else best.attrs["rule_base"]  # a registered rule (attrs["rule"] may be a variant)
    return SearchResult(
        counts, "psigmoid", {**params, "start_layer": best.attrs["start"], "metric": run.scorer.metric},
        rule, dict(best.attrs["rule_params"]), best.attrs["score_layer"],
        {"best_trial": best.number, "rule": best.attrs["rule"], "slope": best.params["slope"],
         "midpoint": best.attrs["midpoint_used"], "floor": best.attrs["floor"], "value": best.attrs["value"],
         "agreement": best.attrs["agreement"], "kl": best.attrs["kl"], "accuracy": best.attrs["accuracy"], **picked,
         "trials": len(run.backend.finished()), "feasible_trials": len(trials),
         "history": [{"trial": t.number, "objective": t.value, "feasible": bool(t.attrs.get("feasible")),
                      "worker": t.attrs.get("worker", "")} for t in sorted(run.backend.finished(),
                                                                           key=lambda t: t.number)]},
        seconds, vision_rule=vision,
    )
