"""The one-call Python API: `search(model, data, budget)` finds recipes, `apply_recipe` (in
runtime/apply.py) applies one. Both take what a user has at hand: a path, "demo", or a loaded model;
a data path, a `datasets.Dataset`, a `SampleSet` or any iterable of {"image", "prompt", "answer"?}.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from .budget import Budget, parse_budgets
from .calibration.data import DataError, Sample, SampleSet, load_samples, open_image
from .recipe.schema import Recipe

#: What `search` runs when no method is named.
DEFAULT_METHOD = "auto"


def checkpoint_path(model: str | Path) -> str:
    """The folder a model name stands for ("demo": the embedded checkpoint)."""
    if str(model) == "demo":
        from .demo import demo_checkpoint

        return str(demo_checkpoint())
    return str(model)


def load(model: Any, processor: Any = None, *, device: str = "cpu", dtype: str = "float32") -> Any:
    """A `LoadedModel` from "demo", a local checkpoint path (loaded on `device` in `dtype`), or a
    loaded transformers model (its processor given as `processor=`)."""
    from .models import get_adapter
    from .models.loading import load_model
    from .pipeline import LoadedModel

    if isinstance(model, (str, Path)):
        loaded, proc, adapter = load_model(checkpoint_path(model), dtype=dtype, device=device)
        return LoadedModel(loaded, processor or proc, adapter, str(model))
    if processor is None:
        raise ValueError("a loaded model needs its processor: search(model, data, processor=processor)")
    name = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "model")
    return LoadedModel(model, processor, get_adapter(model), name)


def samples(data: Any, n: int, *, split: str = "calib", seed: int = 0) -> SampleSet:
    """A `SampleSet` of at most `n` samples from a path or "demo", a `SampleSet`, a `datasets.Dataset`
    or an iterable of {"image": PIL image or path, "prompt": str, "answer": str?} records."""
    if isinstance(data, SampleSet):
        return data if len(data) <= n else SampleSet(data.samples[:n], data.source)
    if isinstance(data, (str, Path)):
        return load_samples(str(data), n, split=split, seed=seed)
    if not isinstance(data, Iterable):
        raise DataError(f"data of type {type(data).__name__} is not understood: give a path, 'demo', a "
                        "datasets.Dataset, a SampleSet or an iterable of {'image', 'prompt'} records")
    rows: list[Sample] = []
    for i, record in enumerate(data):
        if len(rows) == n:
            break
        rows.append(_sample(record, i))
    if not rows:
        raise DataError("data holds no samples")
    return SampleSet(tuple(rows), type(data).__name__)


def _sample(record: Any, index: int) -> Sample:
    if not isinstance(record, dict) or "image" not in record or "prompt" not in record:
        raise DataError(f"record {index}: needs 'image' and 'prompt' fields")
    images = record["image"] if isinstance(record["image"], (list, tuple)) else [record["image"]]
    opened = tuple(im.convert("RGB") if isinstance(im, Image.Image) else open_image(Path(im)) for im in images)
    answer = record.get("answer")
    if isinstance(answer, (list, tuple)):
        answer = answer[0] if answer else None
    return Sample(opened[0] if len(opened) == 1 else opened, str(record["prompt"]),
                  None if answer is None else str(answer), record.get("qtype"))


def _budgets(budget: str | float | Sequence[str | float] | None, formula: str) -> list[Budget]:
    if budget is None:
        return []
    if isinstance(budget, (list, tuple)):
        return [b for item in budget for b in _budgets(item, formula)]
    return parse_budgets(str(budget), formula)


def search(model: Any, data: Any, budget: str | float | Sequence[str | float] | None = "50%", *,
           method: str | None = None, processor: Any = None, rule: str | None = None, formula: str = "full",
           num_samples: int | None = None, cache_dir: str | Path | None = None, batch_size: int = 8,
           progress: bool = True, search_set: Any = None, device: str = "cpu", dtype: str = "float32",
           **options: Any) -> list[Recipe]:
    """Recipes for `model` meeting each `budget` ("50%", 0.5, "64tok", "50%,25%" or a list).

    A path or "demo" is loaded on `device` ("cpu", "cuda", "auto" for accelerate's device map) in
    `dtype`. `method` names a search (default: `DEFAULT_METHOD`, which tries every schedule and rule and
    picks on held-out samples); `rule` limits auto and P-Sigmoid to one selection rule, or puts it into
    another method's recipes; the remaining keyword options are those of the searches (`pipeline.SearchOptions`:
    start_layer, metric, tolerance, optimizer, n_trials, seed, storage, images, time_budget, ...).
    """
    from .methods import METHODS, check_run_options
    from .pipeline import SearchOptions, search_recipes

    method = method or DEFAULT_METHOD
    spec = METHODS.get(method)
    num_samples = spec.calibration_samples if num_samples is None else num_samples
    budgetless = spec.budgetless
    known = {f.name for f in dataclasses.fields(SearchOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown search option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    check_run_options(method, sorted(options))
    budgets = [] if budgetless else _budgets(budget, formula)
    if not budgets and not budgetless:
        raise ValueError("give a budget, e.g. budget='50%'")
    calib = samples(data, num_samples)
    searched = samples(search_set, num_samples) if search_set is not None else None
    loaded = load(model, processor, device=device, dtype=dtype)
    outcome = search_recipes(loaded, calib, budgets, method=method, options=SearchOptions(**options),
                             search_set=searched,
                             model_source=checkpoint_path(model) if isinstance(model, (str, Path)) else None,
                             cache_dir=Path(cache_dir) if cache_dir else None, batch_size=batch_size,
                             progress=progress, rule=rule)
    return outcome.recipes
