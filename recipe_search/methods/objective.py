"""Score a schedule by what the pruned model answers on a search set, reusing work between schedules.

The metric is label-free by default: agreement of the pruned model's greedy answer with the
unpruned model's, with the KL divergence of their next-token distributions reported beside it
(and used only to break ties); `accuracy` needs answers. Both read only the next-token
distribution at the end of the prompt, so two schedules that agree on layers 0..l-1 share the
hidden states entering layer l: the scorer keeps those states (and the runtime's state) in an
LRU cache and reruns only the layers after the shared prefix. The vision tower and embeddings
run once per batch, in the unpruned reference pass.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..calibration.data import SampleSet, batches
from ..hooks import CallHook, HookSet
from ..runtime.applier import PrefillSnapshot, PruningHandle
from ..runtime.plan import PruningPlan
from ..runtime.selection import SelectionRule

METRICS = ("agreement", "accuracy")
KL_TIE_BREAK = 1e-3  # objective = metric - KL_TIE_BREAK * KL: KL only orders equal metrics


@dataclass(frozen=True)
class Evaluation:
    value: float                 # the metric: agreement or accuracy, in [0, 1]
    agreement: float             # share of greedy answers equal to the unpruned model's
    kl: float                    # mean KL(unpruned || pruned) of the next-token distribution
    accuracy: float | None       # when the search set has answers

    @property
    def objective(self) -> float:
        return self.value - KL_TIE_BREAK * self.kl


@dataclass
class _Batch:
    input_ids: torch.Tensor
    attn2d: torch.Tensor | None
    hidden0: torch.Tensor            # embeddings entering decoder layer 0 (vision already merged)
    layer_calls: list[tuple[tuple, dict]]  # each layer's call in the reference pass, full length
    decoder_call: tuple[tuple, dict]       # the decoder's own call, for family hooks that act on it
    ref_logp: torch.Tensor           # (B, V) unpruned next-token log-probabilities
    answers: list[str | None]


class ScheduleScorer:
    """Evaluates pruning schedules on a fixed search set with one selection rule."""

    def __init__(self, loaded: Any, data: SampleSet, rule: SelectionRule, score_layer: str = "previous", *,
                 metric: str = "agreement", batch_size: int = 16, cache_mb: float = 512.0,
                 images: str = "per-image", visual_tokens: int | None = None) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        if metric == "accuracy" and not data.has_answers:
            raise ValueError(f"--metric accuracy needs an answer for every sample of {data.source}")
        self.loaded, self.rule, self.score_layer, self.metric = loaded, rule, score_layer, metric
        self.images = images
        self.layers = list(loaded.adapter.decoder_layers())
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, PrefillSnapshot]] = OrderedDict()
        self._cached_bytes = 0
        self.evaluations = 0
        self.layers_run = 0
        self.batches = [self._reference(chunk) for chunk in batches(data.samples, batch_size)]
        # the N that schedules are written for: the calibration statistics' (one image), else the first prompt's
        self.visual_tokens = visual_tokens or int(loaded.adapter.visual_mask(self.batches[0].input_ids[:1]).sum())

    @torch.no_grad()
    def _reference(self, chunk: Any) -> _Batch:
        lm = self.loaded
        inputs = lm.adapter.inputs(lm.processor, [s.image for s in chunk], [s.prompt for s in chunk])
        calls: list[tuple[tuple, dict]] = []
        decoder_call: list[tuple[tuple, dict]] = []
        with HookSet() as hooks:
            hooks.add(lm.adapter.decoder(), CallHook(lambda module, args, kwargs: decoder_call.append((args, kwargs))))
            for layer in self.layers:
                hooks.add(layer, CallHook(lambda module, args, kwargs: calls.append((args, kwargs))))
            logits = lm.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
        # the reference forward ran with use_cache=False: no cache is kept alive in these calls
        hidden0 = lm.adapter.read_layer_call(*calls[0]).hidden
        return _Batch(inputs["input_ids"], inputs.get("attention_mask"), hidden0, calls, decoder_call[0],
                      torch.log_softmax(logits.float(), -1), [s.answer for s in chunk])

    def _store(self, key: tuple, value: tuple[torch.Tensor, PrefillSnapshot]) -> None:
        size = value[0].numel() * value[0].element_size()
        if key in self._cache or size > self.cache_bytes:
            return
        self._cache[key] = value
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, (old, _) = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()

    @torch.no_grad()
    def _logits(self, index: int, batch: _Batch, counts: tuple[int, ...]) -> torch.Tensor:
        adapter = self.loaded.adapter
        plan = PruningPlan(counts, self.visual_tokens, self.rule, self.score_layer, images=self.images)
        handle = PruningHandle(self.loaded.model, plan, adapter, score_ahead=True)
        try:
            handle.begin_prefill(batch.input_ids, batch.attn2d)
            handle.enter_decoder(*batch.decoder_call)
            start, hidden = 0, batch.hidden0
            for depth in range(len(counts) - 1, 0, -1):
                hit = self._cache.get((index, counts[:depth]))
                if hit is not None:
                    self._cache.move_to_end((index, counts[:depth]))
                    hidden, snap = hit
                    handle.resume(snap)
                    start = depth
                    break
            for idx in range(start, len(self.layers)):
                args, kwargs = adapter.with_hidden(*batch.layer_calls[idx], hidden)
                hidden = self.layers[idx](*args, **kwargs)
                self.layers_run += 1
                if idx + 1 < len(self.layers):
                    self._store((index, counts[: idx + 1]), (hidden, handle.snapshot()))
            return adapter.final_logits(hidden[:, -1:])[:, 0]
        finally:
            handle.exit_decoder()
            handle.remove()

    def evaluate(self, counts: tuple[int, ...] | list[int]) -> Evaluation:
        """Agreement, KL and (with answers) accuracy of the pruned model under `counts`."""
        counts = tuple(int(c) for c in counts)
        self.evaluations += 1
        agree, kl, correct, total = 0, 0.0, 0, 0
        tokenizer = self.loaded.processor.tokenizer
        for index, batch in enumerate(self.batches):
            logp = torch.log_softmax(self._logits(index, batch, counts).float(), -1)
            ref = batch.ref_logp
            agree += int((logp.argmax(-1) == ref.argmax(-1)).sum())
            kl += float((ref.exp() * (ref - logp)).sum(-1).sum())
            for token, answer in zip(logp.argmax(-1).tolist(), batch.answers):
                if answer is not None:
                    correct += tokenizer.decode([token]).strip().lower() == answer.strip().lower()
            total += len(batch.answers)
        accuracy = correct / total if all(a is not None for b in self.batches for a in b.answers) else None
        agreement = agree / total
        value = accuracy if self.metric == "accuracy" else agreement
        return Evaluation(value=float(value), agreement=agreement, kl=kl / total, accuracy=accuracy)

    def reference(self) -> Evaluation:
        """The unpruned model's own evaluation (agreement 1, KL 0)."""
        return self.evaluate((self.visual_tokens,) * len(self.layers))
