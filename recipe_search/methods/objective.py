"""Score a schedule by what the pruned model answers on a search set, reusing work between schedules.

The metric is label-free by default: agreement of the pruned model's greedy answer with the
unpruned model's, with the KL divergence of their next-token distributions reported beside it
(and used only to break ties); `accuracy` needs answers. Both read only the next-token
distribution at the end of the prompt, so two schedules that agree on layers 0..l-1 share the
hidden states entering layer l: the scorer keeps those states (and the runtime's state) in an
LRU cache and reruns only the layers after the shared prefix. The vision tower and embeddings
run once per batch, in the unpruned reference pass. Any registered rule can be scored: LLM-side
rules through the layer-by-layer path above; a vision-side rule changes what enters layer 0, so
its plans run the whole model on the batch's stored inputs instead (no prefix to share).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..calibration.data import SampleSet, batches
from ..hooks import CallHook, HookSet
from ..runtime.applier import PrefillSnapshot, PruningHandle
from ..runtime.plan import PruningPlan, pre_llm_counts
from ..runtime.selection import RULES, SelectionRule, make_rule

METRICS = ("agreement", "accuracy")
KL_TIE_BREAK = 1e-3  # objective = metric - KL_TIE_BREAK * KL: KL only orders equal metrics
#: Scores within this many standard errors of the best one cannot be told apart (95 %): `merit_keys`.
TIE_Z = 1.96

#: Rules the searches also try under a name of their own: a registered rule with other parameters.
#: The attention rule reading the question's tokens instead of the last prompt token (docs/rules.md).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"attention-text": ("attention", {"query": "text"})}


def candidate_rule(name: str) -> SelectionRule:
    """A registered rule, or a variant of one (`VARIANTS`)."""
    base, params = VARIANTS.get(name, (name, {}))
    return make_rule(base, params)


def candidate_plan(counts: Sequence[int], name: str, visual_tokens: int, images: str = "per-image",
                   merge_threshold: float | None = None) -> PruningPlan:
    """`counts` selected by the rule or variant `name` where that rule reads: the attention rule the
    layer before the cut (FastV) when layer 0 keeps everything, other LLM-side rules the layer that
    cuts; a vision-side rule makes the first cut in the vision tower (`pre_llm_counts`), FitPrune's
    rule the later ones. The one place the searches turn a (schedule, rule) candidate into a plan."""
    counts = tuple(int(c) for c in counts)
    rule = candidate_rule(name)
    if rule.stage == "vision":
        return PruningPlan(pre_llm_counts(counts, visual_tokens), visual_tokens, make_rule("fitprune"), "same",
                           vision=rule, images=images, merge_threshold=merge_threshold)
    previous = rule.name == "attention" and bool(counts) and counts[0] == visual_tokens
    return PruningPlan(counts, visual_tokens, rule, "previous" if previous else "same", images=images,
                       merge_threshold=merge_threshold)


@dataclass(frozen=True)
class Evaluation:
    value: float                 # the metric: agreement or accuracy, in [0, 1]
    agreement: float             # share of greedy answers equal to the unpruned model's
    kl: float                    # mean KL(unpruned || pruned) of the next-token distribution
    accuracy: float | None       # when the search set has answers

    @property
    def objective(self) -> float:
        return self.value - KL_TIE_BREAK * self.kl


def merit_keys(evaluations: Sequence[Evaluation], samples: int) -> list[tuple[float, ...]]:
    """Sort keys, smaller = better, for choosing among candidates scored on the same `samples`.

    A metric read from a few dozen answers is coarse: on 64 samples one answer is 1.6 points, and the
    candidates worth choosing between differ by less. Scores within `TIE_Z` standard errors of the
    best (sqrt(p(1-p)/n), at least one answer) are therefore ties, and among them the lower KL
    divergence from the unpruned model's next-token distribution (continuous, so it separates what a
    count of answers cannot) decides; the rest follow by score (docs/rules.md, measured with
    scripts/shortlist_heldout.py: on the demo at 12.5 % two candidates tied at 0.953 were 96.3 % and
    94.7 % held-out, and the lower KL was the better one)."""
    best = max(e.value for e in evaluations)
    margin = max(TIE_Z * math.sqrt(max(best * (1 - best), 0.0) / samples), 1 / samples)
    return [(0.0, e.kl) if e.value >= best - margin - 1e-12 else (1.0, -e.value, e.kl) for e in evaluations]


@dataclass
class _Batch:
    input_ids: torch.Tensor
    attn2d: torch.Tensor | None
    hidden0: torch.Tensor            # embeddings entering decoder layer 0 (vision already merged)
    layer_calls: list[tuple[tuple, dict]]  # each layer's call in the reference pass, full length
    decoder_call: tuple[tuple, dict]       # the decoder's own call, for family hooks that act on it
    ref_logp: torch.Tensor           # (B, V) unpruned next-token log-probabilities
    answers: list[str | None]
    inputs: dict[str, torch.Tensor]  # the processor's batch, for plans with a pre-LLM stage


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
        self.data = data
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
                      torch.log_softmax(logits.float(), -1), [s.answer for s in chunk], dict(inputs))

    def _store(self, key: tuple, value: tuple[torch.Tensor, PrefillSnapshot]) -> None:
        size = value[0].numel() * value[0].element_size()
        if key in self._cache or size > self.cache_bytes:
            return
        self._cache[key] = value
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, (old, _) = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()

    def plan(self, counts: tuple[int, ...], rule: SelectionRule | None = None,
             score_layer: str | None = None) -> PruningPlan:
        """The runtime plan of `counts` under a rule (default: the scorer's own, at its score layer; another
        rule scores at the same layer unless told); `rule_plan` for a rule or variant by name."""
        own = rule is None
        return PruningPlan(counts, self.visual_tokens, rule or self.rule,
                           score_layer or (self.score_layer if own else "same"), images=self.images)

    def rule_plan(self, counts: tuple[int, ...] | list[int], name: str) -> PruningPlan:
        """`candidate_plan` for this scorer's token count and image policy."""
        return candidate_plan(counts, name, self.visual_tokens, self.images)

    def rule_names(self) -> tuple[str, ...]:
        """Every registered rule this model can run (vision-side ones need a vision tower layout)."""
        try:
            self.loaded.adapter.vision_layout()
            vision = True
        except ValueError:
            vision = False
        names = [n for n in RULES.names() if vision or RULES[n].stage != "vision"]
        return tuple(names + [v for v, (base, _) in VARIANTS.items() if base in names])

    @torch.no_grad()
    def _logits(self, index: int, batch: _Batch, plan: PruningPlan) -> torch.Tensor:
        if plan.vision is not None:
            return self._whole_model_logits(batch, plan)
        adapter = self.loaded.adapter
        counts = plan.counts
        rule_key = (plan.rule.name, repr(sorted(plan.rule.params().items())), plan.score_layer, plan.merge_threshold)
        handle = PruningHandle(self.loaded.model, plan, adapter, score_ahead=True)
        try:
            handle.begin_prefill(batch.input_ids, batch.attn2d)
            handle.enter_decoder(*batch.decoder_call)
            start, hidden = 0, batch.hidden0
            for depth in range(len(counts) - 1, 0, -1):
                hit = self._cache.get((index, rule_key, counts[:depth]))
                if hit is not None:
                    self._cache.move_to_end((index, rule_key, counts[:depth]))
                    hidden, snap = hit
                    handle.resume(snap)
                    start = depth
                    break
            for idx in range(start, len(self.layers)):
                args, kwargs = adapter.with_hidden(*batch.layer_calls[idx], hidden)
                hidden = self.layers[idx](*args, **kwargs)
                self.layers_run += 1
                if idx + 1 < len(self.layers):
                    self._store((index, rule_key, counts[: idx + 1]), (hidden, handle.snapshot()))
            return adapter.final_logits(hidden[:, -1:])[:, 0]
        finally:
            handle.exit_decoder()
            handle.remove()

    def _whole_model_logits(self, batch: _Batch, plan: PruningPlan) -> torch.Tensor:
        """Next-token logits of the model with `plan` attached, run from the processor's inputs."""
        handle = PruningHandle(self.loaded.model, plan, self.loaded.adapter)
        try:
            self.layers_run += len(self.layers)
            return self.loaded.model(**batch.inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
        finally:
            handle.remove()

    def evaluate(self, counts: tuple[int, ...] | list[int]) -> Evaluation:
        """Agreement, KL and (with answers) accuracy of the pruned model under `counts`, selected by the
        scorer's own rule (`evaluate_plan` for any other plan)."""
        return self.evaluate_plan(self.plan(tuple(int(c) for c in counts)))

    def evaluate_plan(self, plan: PruningPlan) -> Evaluation:
        """`evaluate` for a ready plan."""
        self.evaluations += 1
        agree, kl, correct, total = 0, 0.0, 0, 0
        tokenizer = self.loaded.processor.tokenizer
        for index, batch in enumerate(self.batches):
            logp = torch.log_softmax(self._logits(index, batch, plan).float(), -1)
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
