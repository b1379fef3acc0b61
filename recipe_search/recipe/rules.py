"""`--rule`: put any registered selection rule into a searched recipe, in the LLM or before it.

A method searches a schedule with its own rule; the rule then decides which tokens survive.
An LLM-side rule replaces the recipe's `selection` (rules that do not rank tokens score at the
same layer). A vision-side rule becomes the pre-LLM stage: it keeps `counts[0]` patches in the
vision tower, later drops stay with the method's rule. When the schedule keeps every token at
layer 0 (FastV, G-Search, P-Sigmoid start later), its first cut moves before the LLM: the layers
before it get the first reduced count too, which only lowers the cost, so the budget still holds
(the recipe records `pre_llm_cut_from_layer`). Either way the recipe records the rule the
schedule was searched with.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..flops import CostModel, VisionCost
from ..models import ModelAdapter
from .build import with_vision_costs
from .schema import Recipe, Schedule, VisionSelection
from ..runtime.plan import check_merge_threshold, pre_llm_counts
from ..runtime.selection import ScoringRule, make_rule
from ..runtime.vision import resolve_encoder_layer


def with_rule(recipe: Recipe, adapter: ModelAdapter, costs: CostModel, name: str,
                   params: dict[str, Any] | None = None, encoder_layer: int | None = None) -> Recipe:
    """`recipe` with selection rule `name` (one-line ValueError for unknown rules or bad parameters)."""
    rule = make_rule(name, params)
    method = replace(recipe.method, result={**recipe.method.result, "searched_with_rule": recipe.selection.rule})
    if rule.stage == "llm":
        score_layer = recipe.selection.score_layer if isinstance(rule, ScoringRule) else "same"
        return replace(recipe, selection=replace(recipe.selection, rule=rule.name, params=rule.params(),
                                                  score_layer=score_layer), method=method)
    layout = adapter.vision_layout()
    layer = resolve_encoder_layer(layout, encoder_layer)
    n, counts = recipe.schedule.visual_tokens, list(recipe.schedule.counts)
    first = next((i for i, c in enumerate(counts) if c < n), None)
    if first is not None and first > 0:
        counts = list(pre_llm_counts(counts, n))
        method = replace(method, result={**method.result, "pre_llm_cut_from_layer": first})
    return replace(recipe, vision=VisionSelection(rule.name, rule.params(), layer), method=method,
                   schedule=Schedule(n, counts, [c / n for c in counts]),
                   budget=with_vision_costs(recipe.budget, counts, costs, VisionCost(layout, layer)))


def with_merge_threshold(recipe: Recipe, threshold: float) -> Recipe:
    """`recipe` with near-duplicate drops merged into survivors at `threshold` (runtime/plan.py); one-line
    ValueError for a threshold outside (0, 1] or a rule that merges by its own weights."""
    check_merge_threshold(threshold)
    if make_rule(recipe.selection.rule, recipe.selection.params).merges:
        raise ValueError(f"--merge-threshold: rule {recipe.selection.rule!r} merges by its own weights; "
                         "use another rule or drop the threshold")
    return replace(recipe, selection=replace(recipe.selection, merge_threshold=float(threshold)))
