"""The search pipeline as one call: calibration -> statistics -> search -> recipe, per budget."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .budget import Budget
from .calibration import SampleSet, calibrate
from .flops import CostModel
from .models import ModelAdapter
from .recipe.build import make_recipe, model_identity
from .recipe.schema import CalibrationRecord, Recipe
from .search import METHODS
from .stats import CalibrationStats


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    adapter: ModelAdapter
    name_or_path: str


@dataclass(frozen=True)
class SearchOutcome:
    stats: CalibrationStats
    stats_cached: bool
    costs: CostModel
    recipes: list[Recipe]


def search_recipes(loaded: LoadedModel, data: SampleSet, budgets: Sequence[Budget], *, method: str = "fitprune",
                   start_layer: int = 0, cache_dir: Path | None = None, batch_size: int = 8,
                   progress: bool = True) -> SearchOutcome:
    """One calibration pass (or cache hit), then one search and one recipe per budget."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    stats, cached = calibrate(loaded.model, loaded.processor, loaded.adapter, data, cache_dir=cache_dir,
                              batch_size=batch_size, progress=progress)
    costs = CostModel(loaded.adapter.dims(), stats.visual_tokens, tuple(int(t) for t in stats.text_tokens))
    identity = model_identity(loaded.adapter, loaded.name_or_path)
    calib = CalibrationRecord(source=data.source, num_samples=len(data), data_hash=stats.meta["data_hash"],
                              description=f"{len(data)} samples from {data.source}, unpruned model, batch {batch_size}")
    recipes = []
    for budget in budgets:
        result = METHODS[method](stats, budget, costs, start_layer=start_layer)
        recipes.append(make_recipe(result, budget, costs, identity, calib))
    return SearchOutcome(stats, cached, costs, recipes)
