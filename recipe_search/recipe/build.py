"""Turn a search result into a recipe: model identity, budget achieved, schedule, provenance."""
from __future__ import annotations

from datetime import datetime, timezone

from .. import __version__
from ..budget import Budget
from ..flops import FORMULAS, CostModel
from ..models import ModelAdapter
from ..search import SearchResult
from .schema import (
    BudgetRecord,
    CalibrationRecord,
    MethodRecord,
    ModelIdentity,
    Recipe,
    Schedule,
    Selection,
)


def model_identity(adapter: ModelAdapter, name_or_path: str) -> ModelIdentity:
    arch = adapter.architecture()
    d = arch.dims
    return ModelIdentity(
        name_or_path=name_or_path, family=arch.family, model_type=arch.model_type, num_layers=d.num_layers,
        hidden_size=d.hidden_size, intermediate_size=d.intermediate_size, num_heads=d.num_heads,
        num_kv_heads=d.num_kv_heads, head_dim=d.head_dim, visual_tokens_per_image=arch.visual_tokens_per_image,
        fingerprint=adapter.fingerprint(),
    )


def budget_record(budget: Budget | None, counts: tuple[int, ...], costs: CostModel) -> BudgetRecord:
    """Asked and achieved cost; `budget` None for methods that find their own cost (G-Search)."""
    if budget is None:
        asked, kind, value, formula = "none (least cost without loss)", "none", costs.fraction(counts, "full"), "full"
    else:
        asked, kind, value, formula = budget.text or budget.describe(), budget.kind, budget.value, budget.formula
    return BudgetRecord(
        asked=asked, kind=kind, value=value, formula=formula,
        achieved={
            "full": costs.fraction(counts, "full"),
            "visual": costs.fraction(counts, "visual"),
            "mean_visual_tokens": costs.mean_tokens(counts),
        },
        formulas=dict(FORMULAS),
        text_tokens_mean=float(sum(costs.text_tokens) / len(costs.text_tokens)),
    )


def make_recipe(result: SearchResult, budget: Budget | None, costs: CostModel, identity: ModelIdentity,
                calibration: CalibrationRecord) -> Recipe:
    n = costs.visual_tokens
    return Recipe(
        model=identity,
        budget=budget_record(budget, result.counts, costs),
        schedule=Schedule(visual_tokens=n, counts=list(result.counts), fractions=[c / n for c in result.counts]),
        selection=Selection(rule=result.rule, params=dict(result.rule_params), score_layer=result.score_layer),
        method=MethodRecord(name=result.method, params=dict(result.params),
                            result={**result.result, "search_seconds": round(result.seconds, 4)}),
        calibration=calibration,
        tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
