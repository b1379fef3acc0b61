"""`measure(model, recipe, data)`: what a recipe does to a model's answers and its prefill time.

The one place that measures a recipe, used by `search-recipe` reports, `search-recipe eval`,
`search-recipe compare` and `scripts/bench_quality.py`, so every figure is measured the same way.
"""
from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from .calibration.data import MAX_SAMPLES
from .eval import Accuracy, PrefillTiming, accuracy, agreement, greedy_answers, prefill_seconds, prefill_timing
from .recipe.schema import Recipe
from .runtime.plan import PruningPlan


@dataclass(frozen=True)
class Measurement:
    """Answers on the data (first greedy word), their accuracy when the data has answers, their
    agreement with a reference measurement (e.g. the unpruned model), and prefill wall-clock."""

    answers: tuple[str, ...]
    accuracy: Accuracy | None
    agreement: float | None
    prefill_seconds: float | None          # median prefill wall-clock
    kv_cache_bytes: int | None = None      # keys and values the prefill leaves in the cache
    peak_bytes: int | None = None          # memory above the loaded model's during one prefill
    timing: PrefillTiming | None = None    # bare and pruned prefills interleaved round by round


def _kv_bytes(cache: Any) -> int:
    """Bytes of every key and value tensor a transformers cache holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if torch.is_tensor(tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _filled_cache(output: Any) -> Any:
    """The KV cache a forward returned: `cache` from transformers 5.24 on, `past_key_values` before."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


def _release_freed() -> None:
    """Hand the memory earlier work freed back to the OS (glibc's malloc_trim), so the resident set
    grows again when a prefill allocates: otherwise a prefill measured after a bigger one reuses
    its freed pages unseen and reports no growth at all. A no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def prefill_memory(loaded: Any, data: Any, plan: PruningPlan | None) -> tuple[int, int | None]:
    """(KV-cache bytes, peak bytes above the start) of one cached prefill of `data` as one batch.

    The peak is the CUDA allocator's on a GPU; on a CPU it is the resident set sampled every
    millisecond by a thread (Linux /proc), which sees what the allocator really asked of the OS,
    after freed memory was handed back (`_release_freed`).
    """
    from .runtime import PruningHandle

    inputs = loaded.adapter.inputs(loaded.processor, [s.image for s in data.samples], [s.prompt for s in data.samples])
    device = next(loaded.model.parameters()).device
    handle = PruningHandle(loaded.model, plan, loaded.adapter) if plan is not None else None
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            out = loaded.model(**inputs, use_cache=True, logits_to_keep=1)
            return _kv_bytes(_filled_cache(out)), torch.cuda.max_memory_allocated(device) - start
        if not os.path.exists("/proc/self/statm"):
            return _kv_bytes(_filled_cache(loaded.model(**inputs, use_cache=True, logits_to_keep=1))), None
        _release_freed()
        start, peak, done = _rss(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                done.wait(0.001)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        try:
            out = loaded.model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            done.set()
            watcher.join()
        return _kv_bytes(_filled_cache(out)), max(0, max(peak[0], _rss()) - start)
    finally:
        if handle is not None:
            handle.remove()


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
    seconds = kv = peak = paired = None
    if timing is not None:
        if plan is None:
            seconds = prefill_seconds(loaded.model, loaded.processor, loaded.adapter, timing)
        else:  # interleaved with the bare model, so both see the same machine load
            paired = prefill_timing(loaded.model, loaded.processor, loaded.adapter, timing, plan)
            seconds = paired.pruned_median
        kv, peak = prefill_memory(loaded, timing, plan)
    return Measurement(answers, acc, agree, seconds, kv, peak, paired)
