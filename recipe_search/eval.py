"""Held-out accuracy and prefill wall-clock of a model, bare or under a pruning plan."""
from __future__ import annotations

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


@torch.no_grad()
def prefill_seconds(model: Any, processor: Any, adapter: ModelAdapter, data: SampleSet,
                    plan: PruningPlan | None = None, repeats: int = 5) -> float:
    """Best-of-`repeats` wall time of one prefill forward over all of `data` as a single batch."""
    inputs = adapter.inputs(processor, [s.image for s in data.samples], [s.prompt for s in data.samples])
    best = float("inf")
    with _context(model, plan, adapter):
        model(**inputs, use_cache=False, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
    return best
