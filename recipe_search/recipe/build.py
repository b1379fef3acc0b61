"""Turn a search result into a recipe: model identity, budget achieved, schedule, provenance."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from typing import Sequence

from .. import __version__
from ..budget import Budget
from ..flops import FORMULAS, VISION_FORMULAS, CostModel, VisionCost
from ..methods import SearchResult
from .schema import (
    BudgetRecord,
    CalibrationRecord,
    MethodRecord,
    ModelIdentity,
    Recipe,
    Schedule,
    Selection,
)


def budget_record(budget: Budget | None, counts: tuple[int, ...], costs: CostModel) -> BudgetRecord:
    """Asked and achieved cost; `budget` None for methods that find their own cost (G-Search)."""
    if budget is None:
        asked, kind, value, formula = "none (least cost without loss)", "none", costs.fraction(counts, "full"), "full"
    else:
        asked, kind, value, formula = budget.text or budget.describe(), budget.kind, budget.value, budget.formula
    return BudgetRecord(
        asked=asked, kind=kind, value=value, formula=formula,
        achieved=lm_shares(counts, costs),
        formulas=dict(FORMULAS),
        text_tokens_mean=float(sum(costs.text_tokens) / len(costs.text_tokens)),
    )


def lm_shares(counts: Sequence[int], costs: CostModel) -> dict[str, float]:
    """LM prefill FLOPs under both formulas (shares of unpruned) and the mean visual tokens per layer."""
    return {"full": costs.fraction(counts, "full"), "visual": costs.fraction(counts, "visual"),
            "mean_visual_tokens": costs.mean_tokens(counts)}


def vision_shares(counts: Sequence[int], costs: CostModel, vision: VisionCost) -> dict[str, float]:
    """The vision encoder's share of its unpruned cost, and LM (full) + vision as a share of both unpruned."""
    kept = vision.total(counts[0])
    return {"vision_encoder": kept / vision.unpruned(),
            "full_with_vision": (costs.total(counts, "full") + kept) / (costs.unpruned("full") + vision.unpruned())}


def with_vision_costs(record: BudgetRecord, counts: Sequence[int], costs: CostModel, vision: VisionCost) -> BudgetRecord:
    """`record` achieved by `counts`, plus the vision encoder's cost (recipes with a pre-LLM stage state it)."""
    return replace(record, achieved={**record.achieved, **lm_shares(counts, costs), **vision_shares(counts, costs, vision)},
                   formulas={**record.formulas, **VISION_FORMULAS})


def make_recipe(result: SearchResult, budget: Budget | None, costs: CostModel, identity: ModelIdentity,
                calibration: CalibrationRecord, images: str = "per-image") -> Recipe:
    n = costs.visual_tokens
    return Recipe(
        model=identity,
        budget=budget_record(budget, result.counts, costs),
        schedule=Schedule(visual_tokens=n, counts=list(result.counts), fractions=[c / n for c in result.counts]),
        selection=Selection(rule=result.rule, params=dict(result.rule_params), score_layer=result.score_layer,
                            images=images, merge_threshold=result.merge_threshold),
        method=MethodRecord(name=result.method, params=dict(result.params),
                            result={**result.result, "search_seconds": round(result.seconds, 4)}),
        calibration=calibration,
        tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
