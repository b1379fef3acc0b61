"""The default search: many candidate recipes scored on the model's own answers; held-out samples pick.

No method and no rule is best on every model (issue 9 measured FitPrune, DART, FiCoCo-V and
P-Sigmoid each winning somewhere and FiCoCo-V last elsewhere), so the default tries them all:

1. schedules: FitPrune's fit, a uniform count from layer 0, 1 and 2 (the last two are FastV-style
   single drops), a uniform count that stops at one of the last two layers (none from there on),
   G-Search's lossless curve scaled to the budget, and P-Sigmoid tuned by BO with the rule and the
   start layer as categorical parameters;
2. every registered rule on every fixed schedule (the seeded random rule is the baseline the
   tables compare against, not a candidate);
3. every schedule under the first three rules, and the best few other candidates, again with
   near-duplicate drops merged into survivors under proportional
   attention (`PruningPlan.merge_threshold`), which keeps the softmax mass a dropped background
   carried;
4. all of it scored on the search part of the calibration data (agreement with the unpruned model,
   or accuracy when every sample has an answer), the best few re-scored on a validation part that
   no search saw; the best validation score wins, scores that the samples cannot tell apart going
   to the lower KL divergence from the unpruned model (`objective.merit_keys`), then fewer FLOPs.

Candidates are tried in order of how often they won before (FitPrune's own pair first), so a
short `time_budget` still ends with a sound recipe; the table of runners-up goes into the recipe.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..budget import Budget
from ..flops import CostModel
from ..runtime.plan import PruningPlan, schedule_from_drops
from ..stats import CalibrationStats
from .baselines import largest_feasible, search_uniform
from .cuts import MIN_CUT, held_counts
from .fitprune import InfeasibleBudgetError, SearchResult, search_fitprune
from .objective import Evaluation, ScheduleScorer, merit_keys

#: Rules tried first on every schedule: the ones that won somewhere in issue 9's tables.
PREFERRED_RULES = ("fitprune", "dart", "attention-text", "ficoco-v", "freepruner", "attention", "ficoco-l")
BASELINE_RULES = ("random",)  # never candidates: what every candidate must beat
SHORTLIST = 8                 # candidates re-scored on the validation samples
MERGE_THRESHOLD = 0.9         # cosine similarity from which a dropped token merges (tried beside plain dropping)
MERGED_RULES = 3              # the first preferred rules are tried merged on every schedule


@dataclass(frozen=True)
class Candidate:
    """One schedule with one rule, as the runtime runs it, and its scores."""

    schedule: str                # how the counts were made
    plan: PruningPlan
    rule: str                    # the rule asked for (a vision-side one is plan.vision)
    search: Evaluation
    flops: float                 # LM full-sequence FLOPs share of the plan's counts
    validation: Evaluation | None = None

    def row(self) -> dict[str, Any]:
        """What the recipe and the report show of a candidate."""
        out: dict[str, Any] = {"schedule": self.schedule, "rule": self.rule, "counts": list(self.plan.counts),
                               "merge_threshold": self.plan.merge_threshold, "flops_full": round(self.flops, 4),
                               "search_agreement": round(self.search.agreement, 4),
                               "search_value": round(self.search.value, 4), "search_kl": round(self.search.kl, 6)}
        if self.validation is not None:
            out.update(validation_agreement=round(self.validation.agreement, 4),
                       validation_value=round(self.validation.value, 4), validation_kl=round(self.validation.kl, 6))
        return out


def scaled_schedule(shape: Sequence[int], visual_tokens: int, budget: Budget, costs: CostModel,
                    min_cut: float = 0.0) -> tuple[int, ...] | None:
    """`shape`'s per-layer fractions times the largest factor in [0, 1/min share] that meets the
    budget (bisection), so a lossless curve found without a budget is carried to any budget; drops
    smaller than `min_cut` of the live tokens wait for a later layer (`cuts.held_counts`)."""
    fractions = [c / visual_tokens for c in shape]

    def make(scale: float) -> tuple[int, ...]:
        return held_counts((min(1.0, f * scale) for f in fractions), visual_tokens, min_cut)

    if not budget.is_met(make(0.0), costs):
        return None
    lo, hi = 0.0, 1.0 / max(min((f for f in fractions if f > 0), default=1.0), 1e-6)
    if budget.is_met(make(hi), costs):
        return make(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if budget.is_met(make(mid), costs) else (lo, mid)
    return make(lo)


def fixed_schedules(stats: CalibrationStats, budget: Budget, costs: CostModel,
                    gsearch_shape: Sequence[int] | None, min_cut: float = MIN_CUT) -> list[tuple[str, tuple[int, ...]]]:
    """The schedules that need no scoring to make, each meeting the budget (infeasible ones left out);
    `min_cut` (`cuts.py`) holds back FitPrune's and the scaled G-Search curve's small drops."""
    out: list[tuple[str, tuple[int, ...]]] = []
    try:
        out.append(("fitprune", search_fitprune(stats, budget, costs, start_layer=0, min_cut=min_cut).counts))
    except InfeasibleBudgetError:
        pass
    for start in (0, 1, 2):
        if start >= stats.num_layers:
            break
        try:
            out.append((f"uniform from layer {start}", search_uniform(stats, budget, costs, start_layer=start).counts))
        except InfeasibleBudgetError:
            pass
    # late layers often no longer read the image (G-Search finds the last ones lossless at 0): the
    # same count from layer 0, none from layer d on, spends their share on the early layers
    for last in range(max(1, stats.num_layers - 2), stats.num_layers):
        name = f"uniform, none from layer {last}"
        try:
            out.append((name, largest_feasible(lambda k, d=last: schedule_from_drops(
                stats.num_layers, costs.visual_tokens, {0: k, d: 0}), budget, costs, name)))
        except InfeasibleBudgetError:
            pass
    if gsearch_shape is not None:
        scaled = scaled_schedule(gsearch_shape, costs.visual_tokens, budget, costs, min_cut)
        if scaled is not None:
            out.append(("G-Search curve scaled", scaled))
    seen: set[tuple[int, ...]] = set()
    unique = []
    for name, counts in out:
        if counts not in seen and budget.is_met(counts, costs):
            seen.add(counts)
            unique.append((name, counts))
    return unique


def rule_order(names: Sequence[str]) -> list[str]:
    """Candidate rules: the preferred ones first, any other registered rule after, baselines never."""
    ordered = [r for r in PREFERRED_RULES if r in names]
    return ordered + [r for r in names if r not in ordered and r not in BASELINE_RULES]


def score_grid(scorer: ScheduleScorer, schedules: Sequence[tuple[str, tuple[int, ...]]], rules: Sequence[str],
               costs: CostModel, deadline: float) -> list[Candidate]:
    """Every (schedule, rule) pair scored on the search set, rule-major so each schedule gets its
    best-known rules before the clock runs out; the first pair always runs."""
    out: list[Candidate] = []
    for rule in rules:
        for name, counts in schedules:
            if out and time.monotonic() > deadline:
                return out
            plan = scorer.rule_plan(counts, rule)
            out.append(Candidate(name, plan, rule, scorer.evaluate_plan(plan), costs.fraction(plan.counts, "full")))
    return out


def with_merging(scorer: ScheduleScorer, candidates: Sequence[Candidate], threshold: float, deadline: float,
                 shortlist: int = SHORTLIST) -> list[Candidate]:
    """Candidates scored again with near-duplicate drops merged at `threshold` (until `deadline`): every
    schedule under the first `MERGED_RULES` preferred rules, then the best `shortlist` others by search
    score. Merging can lift a candidate that ranked low without it (on the demo at 12.5 %, FitPrune's
    rule on the uniform schedule: 85.7 % of unpruned accuracy dropping, 99.7 % merging), so the ones
    most likely to gain all get their turn, not only the best unmerged."""
    mergeable = [c for c in candidates if not c.plan.rule.merges and c.plan.merge_threshold is None]
    ranked = best_first(mergeable, "search", len(scorer.data))
    first = [c for c in ranked if c.rule in PREFERRED_RULES[:MERGED_RULES]]
    order = first + [c for c in ranked if c.rule not in PREFERRED_RULES[:MERGED_RULES]][:shortlist]
    out: list[Candidate] = []
    for cand in order:
        if time.monotonic() > deadline:
            break
        plan = replace(cand.plan, merge_threshold=threshold)
        out.append(Candidate(cand.schedule, plan, cand.rule, scorer.evaluate_plan(plan), cand.flops))
    return out


def best_first(candidates: Sequence[Candidate], part: str, samples: int) -> list[Candidate]:
    """`candidates` by their `part` ("search" or "validation") evaluation on `samples` samples, best
    first (`objective.merit_keys`: statistical ties go to the lower KL), then fewer FLOPs."""
    if not candidates:
        return []
    keys = merit_keys([getattr(c, part) for c in candidates], samples)
    order = sorted(range(len(candidates)), key=lambda i: (keys[i], candidates[i].flops))
    return [candidates[i] for i in order]


def pick(candidates: Sequence[Candidate], search_samples: int, validation: ScheduleScorer,
         shortlist: int = SHORTLIST) -> list[Candidate]:
    """The best `shortlist` distinct plans on the search samples, re-scored on the validation samples,
    sorted best first there (the winner is element 0)."""
    ranked = best_first(candidates, "search", search_samples)
    chosen: list[Candidate] = []
    seen: set[tuple] = set()
    for cand in ranked:
        ident = (cand.plan.counts, cand.rule, cand.plan.score_layer, cand.plan.merge_threshold)
        if ident in seen:
            continue
        seen.add(ident)
        chosen.append(Candidate(cand.schedule, cand.plan, cand.rule, cand.search, cand.flops,
                                validation.evaluate_plan(cand.plan)))
        if len(chosen) == shortlist:
            break
    return best_first(chosen, "validation", len(validation.data))


def as_result(ranked: Sequence[Candidate], unranked: int, params: dict[str, Any], seconds: float,
              runners_up: int = 10) -> SearchResult:
    """The winner as a search result; the recipe records it with the table of runners-up."""
    win = ranked[0]
    assert win.validation is not None
    vision = win.plan.vision.name if win.plan.vision is not None else None
    # a vision-side winner: the recipe keeps the searched counts, recipe/rules.py moves the first cut
    return SearchResult(
        tuple(win.plan.counts), "auto", params, win.plan.rule.name, win.plan.rule.params(), win.plan.score_layer,
        {"winner": win.row(), "runners_up": [c.row() for c in ranked[1:1 + runners_up]],
         "candidates_scored": unranked, "value": win.search.value, "agreement": win.search.agreement,
         "validation_value": win.validation.value, "validation_agreement": win.validation.agreement,
         "flops_full": win.flops},
        seconds, vision_rule=vision, merge_threshold=win.plan.merge_threshold,
    )


def check_feasible(budget: Budget, costs: CostModel, layers: int) -> None:
    """One line naming the smallest budget that can be met when even dropping every visual token at
    layer 0 misses this one (the text alone costs more): rounded up, so the named budget is met."""
    leanest = schedule_from_drops(layers, costs.visual_tokens, {0: 0})
    if not budget.is_met(leanest, costs):
        floor = budget.achieved(leanest, costs)
        raise InfeasibleBudgetError(
            f"budget {budget.text or budget.describe()} cannot be met: the text tokens alone cost {floor:.2%} of "
            f"the LM prefill FLOPs ({budget.formula}); the smallest budget these prompts can meet is "
            f"{math.ceil(floor * 1000) / 10:g}% (every visual token dropped at layer 0)")
