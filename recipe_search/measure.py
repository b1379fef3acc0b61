"""`measure(model, recipe, data)`: what a recipe does to a model's answers and its prefill time.

The one place that measures a recipe, used by `search-recipe` reports, `search-recipe eval`,
`search-recipe compare` and `scripts/bench_quality.py`, so every figure is measured the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .calibration.data import MAX_SAMPLES
from .eval import Accuracy, accuracy, agreement, greedy_answers, prefill_seconds
from .recipe.schema import Recipe
from .runtime.plan import PruningPlan


@dataclass(frozen=True)
class Measurement:
    """Answers on the data (first greedy word), their accuracy when the data has answers, their
    agreement with a reference measurement (e.g. the unpruned model), and prefill wall-clock."""

    answers: tuple[str, ...]
    accuracy: Accuracy | None
    agreement: float | None
    prefill_seconds: float | None


def _plan(recipe: Recipe | PruningPlan | str | os.PathLike | None) -> PruningPlan | None:
    from .recipe import load_recipe
    from .runtime.apply import plan_from_recipe

    if recipe is None or isinstance(recipe, PruningPlan):
        return recipe
    return plan_from_recipe(recipe if isinstance(recipe, Recipe) else load_recipe(recipe))


def measure(model: Any, recipe: Recipe | PruningPlan | str | os.PathLike | None, data: Any = None, *,
            processor: Any = None, timing: Any = None, reference: Measurement | None = None,
            batch_size: int = 16, progress: bool = False, desc: str = "eval") -> Measurement:
    """Measure `recipe` (a Recipe, a recipe file, a PruningPlan, or None for the unpruned model).

    `model` is a loaded model with `processor=`, or anything `search()` takes (a path, "demo", or
    the `LoadedModel` a search used); `data` is held-out data (anything `search()` takes) whose
    answers give accuracy; `timing` is the batch whose prefill is timed (none: no timing).
    """
    from .api import load, samples
    from .pipeline import LoadedModel

    loaded = model if isinstance(model, LoadedModel) else load(model, processor)
    plan = _plan(recipe)
    answers: tuple[str, ...] = ()
    acc = agree = None
    if data is not None:
        held_out = samples(data, MAX_SAMPLES, split="eval")
        answers = tuple(greedy_answers(loaded.model, loaded.processor, loaded.adapter, held_out, plan,
                                       batch_size=batch_size, progress=progress, desc=desc))
        acc = accuracy(list(answers), held_out) if held_out.has_answers else None
        if reference is not None and reference.answers:
            agree = agreement(list(answers), list(reference.answers))
    seconds = None
    if timing is not None:
        seconds = prefill_seconds(loaded.model, loaded.processor, loaded.adapter, timing, plan)
    return Measurement(answers, acc, agree, seconds)
