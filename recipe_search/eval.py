"""Held-out accuracy and prefill wall-clock of a model, bare or under a pruning plan."""
from __future__ import annotations

import gc
import statistics
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .calibration.data import SampleSet, batches
from .models import ModelAdapter
from .runtime import PruningHandle, PruningPlan


@dataclass(frozen=True)
class Accuracy:
    overall: float
    per_type: dict[str, float]
    correct: int
    total: int


def _context(model: Any, plan: PruningPlan | None, adapter: ModelAdapter):
    return PruningHandle(model, plan, adapter) if plan is not None else nullcontext()


@torch.no_grad()
def greedy_answers(model: Any, processor: Any, adapter: ModelAdapter, data: SampleSet,
                   plan: PruningPlan | None = None, batch_size: int = 32, progress: bool = False,
                   desc: str = "eval") -> list[str]:
    """First greedy answer word per sample: the argmax of the next-token logits, as generate() picks it."""
    answers: list[str] = []
    with _context(model, plan, adapter):
        bar = tqdm(total=len(data), desc=desc, unit="q", disable=not progress)
        for chunk in batches(data.samples, batch_size):
            inputs = adapter.inputs(processor, [s.image for s in chunk], [s.prompt for s in chunk])
            logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
            answers += [processor.tokenizer.decode([int(t)]).strip() for t in logits.argmax(-1)]
            bar.update(len(chunk))
        bar.close()
    return answers


def accuracy(answers: list[str], data: SampleSet) -> Accuracy:
    if not data.has_answers:
        raise ValueError(f"{data.source}: accuracy needs an answer for every sample")
    hits: dict[str, list[bool]] = defaultdict(list)
    for got, sample in zip(answers, data.samples):
        hits[sample.qtype or "all"].append(got.lower() == str(sample.answer).strip().lower())
    flat = [h for v in hits.values() for h in v]
    return Accuracy(sum(flat) / len(flat), {k: sum(v) / len(v) for k, v in sorted(hits.items())}, sum(flat), len(flat))


def agreement(answers: list[str], reference: list[str]) -> float:
    """Share of samples whose answer equals the reference (e.g. unpruned) answer."""
    return sum(a == b for a, b in zip(answers, reference)) / max(1, len(reference))


@dataclass(frozen=True)
class PrefillTiming:
    """Wall-clock seconds of interleaved prefills of one batch: round i ran `bare[i]` and `pruned[i]`
    back to back (bare first in even rounds, pruned first in odd ones, so drift cancels)."""

    bare: tuple[float, ...]
    pruned: tuple[float, ...]

    @property
    def bare_median(self) -> float:
        return statistics.median(self.bare)

    @property
    def pruned_median(self) -> float:
        return statistics.median(self.pruned)

    @property
    def ratios(self) -> tuple[float, ...]:
        """Speed-up of each round (its bare time over its pruned time)."""
        return tuple(b / p for b, p in zip(self.bare, self.pruned))

    @property
    def speedup(self) -> float:
        """Median of the per-round speed-ups: a round's two runs saw the same machine load."""
        return statistics.median(self.ratios)

    def describe(self) -> str:
        """E.g. 'unpruned 157.4 ms -> pruned 104.9 ms (1.50x, 1.41x-1.58x over 5 interleaved rounds)'."""
        low, high = min(self.ratios), max(self.ratios)
        return (f"unpruned {self.bare_median * 1000:.1f} ms -> pruned {self.pruned_median * 1000:.1f} ms "
                f"({self.speedup:.2f}x, {low:.2f}x-{high:.2f}x over {len(self.ratios)} interleaved rounds; medians)")


def _timed_forward(model: Any, inputs: dict[str, torch.Tensor]) -> float:
    """Seconds of one prefill forward; as timeit does, the garbage collector is paused during the call
    (a full collection, ~0.2 s with transformers loaded, would otherwise land in one run only)."""
    gc.disable()
    try:
        start = time.perf_counter()
        model(**inputs, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - start
    finally:
        gc.enable()


@torch.no_grad()
def prefill_timing(model: Any, processor: Any, adapter: ModelAdapter, data: SampleSet, plan: PruningPlan,
                   repeats: int = 5) -> PrefillTiming:
    """Interleaved prefill timing of all of `data` as one batch, bare and under `plan` (one warm-up
    each, then `repeats` rounds of one bare and one pruned forward). Interleaving makes the two see
    the same machine: on a shared CPU, timing them minutes apart moved the same speed-up by +-25 %."""
    inputs = adapter.inputs(processor, [s.image for s in data.samples], [s.prompt for s in data.samples])

    def pruned() -> float:
        with _context(model, plan, adapter):
            return _timed_forward(model, inputs)

    def bare() -> float:
        return _timed_forward(model, inputs)

    bare(), pruned()  # warm-up
    bare_s: list[float] = []
    pruned_s: list[float] = []
    for r in range(repeats):
        if r % 2 == 0:
            bare_s.append(bare())
            pruned_s.append(pruned())
        else:
            pruned_s.append(pruned())
            bare_s.append(bare())
    return PrefillTiming(tuple(bare_s), tuple(pruned_s))


@torch.no_grad()
def prefill_seconds(model: Any, processor: Any, adapter: ModelAdapter, data: SampleSet,
                    plan: PruningPlan | None = None, repeats: int = 5) -> float:
    """Median wall time of `repeats` prefill forwards over all of `data` as a single batch, after one
    warm-up. To compare bare and pruned, prefer `prefill_timing`, which interleaves them."""
    inputs = adapter.inputs(processor, [s.image for s in data.samples], [s.prompt for s in data.samples])
    with _context(model, plan, adapter):
        model(**inputs, use_cache=False, logits_to_keep=1)  # warm-up
        return statistics.median(_timed_forward(model, inputs) for _ in range(repeats))
