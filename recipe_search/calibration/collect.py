"""Run calibration samples through the unpruned model and reduce attention inside layer hooks.

Only the attention rows the statistics need are recomputed (post-image prompt rows, visual rows,
the last prompt token), with the same `ScoreContext` code the runtime selection rules use, so
calibration and inference score tokens identically. SDPA stays on; no attention map is stored.
Each layer projects its queries and keys once: the statistics share one `ScoreContext` (one q/k
projection, the post-image text rows' softmax once for both the cross and the last-token statistic,
the visual rows in cache-sized chunks), and the layer itself is handed the projections the
statistics computed (`ProjectionReuse`) instead of projecting again, so its output is unchanged.

Samples may give different numbers of visual tokens (other image sizes, several images): each
sample's per-token statistics are then resampled to the tokens of one image (the model's fixed
count per image, else the most common count), preserving every
layer's attention mass and the tokens' order (token i of N covers the share [i/N, (i+1)/N) of the
sample's own tokens), so the statistics are normalised per sample.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..hooks import CallHook, HookSet
from ..models import ModelAdapter
from ..runtime.selection import AttentionRule, FitPruneRule, ProjectionReuse, ScoreContext
from ..stats import CalibrationStats, kendall_tau_layers
from .data import DataError, SampleSet, batches

STATISTICS = ("cross", "selfv", "last")


class _StatsRecorder:
    """Pre-hooks on every decoder layer that record per-token scores of each sample of a batch."""

    def __init__(self, adapter: ModelAdapter, hooks: HookSet) -> None:
        self.adapter = adapter
        self.fitprune = FitPruneRule(heads="max")
        self.last_rule = AttentionRule(query="last", heads="mean")
        self.visual: torch.Tensor | None = None
        self.key_ok: torch.Tensor | None = None
        self.records: list[dict[str, list[np.ndarray]]] = []
        self.reuse = ProjectionReuse()
        for i, layer in enumerate(adapter.decoder_layers()):
            hooks.add(layer, CallHook(self._hook(i)))

    def start(self, visual: torch.Tensor, key_ok: torch.Tensor) -> None:
        self.visual, self.key_ok = visual, key_ok
        self.records = [{name: [] for name in STATISTICS} for _ in range(visual.shape[0])]

    def _hook(self, idx: int):
        def hook(layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            assert self.visual is not None and self.key_ok is not None
            call = self.adapter.read_layer_call(args, kwargs)
            batch, length = call.hidden.shape[:2]
            rope = None if call.rope is None else tuple(t.expand(batch, -1, -1) for t in call.rope)
            ctx = ScoreContext(
                adapter=self.adapter, layer=layer, layer_idx=idx, hidden=call.hidden, rope=rope,
                cols=torch.arange(length, device=call.hidden.device).expand(batch, -1), visual=self.visual,
                all_visual=self.visual, key_ok=self.key_ok, prompt_end=length, row_keys=[], mask=call.mask,
            )
            per_row = self.visual.sum(dim=1)
            self.reuse.disarm()
            with self.reuse.noting(layer):
                if bool((per_row == per_row[0]).all()):
                    parts = [(slice(None), ctx)]
                else:
                    parts = [(slice(r, r + 1), ctx.unit_context(r, self.visual[r:r + 1])) for r in range(batch)]
                for rows, sub in parts:
                    cross, selfv = self.fitprune.components(sub)  # the text rows' softmax, kept in `sub`...
                    values = {"cross": cross, "selfv": selfv, "last": self.last_rule.score(sub)}  # ...read again
                    for name, value in values.items():
                        for record, row in zip(self.records[rows], value.float().cpu().numpy()):
                            record[name].append(row)
            self.reuse.arm()  # the layer runs on exactly this input: its q/k projections are the ones above

        return hook


def resample_tokens(values: np.ndarray, n: int) -> np.ndarray:
    """(L, m) per-token values -> (L, n), each new token holding the mass of its share of the old ones."""
    m = values.shape[-1]
    if m == n:
        return values
    cum = np.concatenate([np.zeros((values.shape[0], 1)), np.cumsum(values.astype(np.float64), axis=-1)], axis=-1)
    edges = np.linspace(0.0, m, n + 1)
    at_edges = np.stack([np.interp(edges, np.arange(m + 1), row) for row in cum])
    return np.diff(at_edges, axis=-1)


@torch.no_grad()
def collect_stats(model: Any, processor: Any, adapter: ModelAdapter, data: SampleSet,
                  batch_size: int = 8, progress: bool = True) -> CalibrationStats:
    """Calibrate on `data`; raises DataError when a prompt has no image token."""
    samples: list[dict[str, np.ndarray]] = []
    text_tokens: list[int] = []
    with HookSet() as hooks:
        recorder = _StatsRecorder(adapter, hooks)
        bar = tqdm(total=len(data), desc="calibration", unit="sample", disable=not progress)
        for chunk in batches(data.samples, batch_size):
            inputs = adapter.inputs(processor, [s.image for s in chunk], [s.prompt for s in chunk])
            visual = adapter.visual_mask(inputs["input_ids"])
            if bool((visual.sum(dim=1) == 0).any()):
                raise DataError("a calibration prompt has no image token after processing; check the chat template")
            mask = inputs.get("attention_mask")
            recorder.start(visual, mask.bool() if mask is not None else torch.ones_like(visual))
            try:
                model(**inputs, use_cache=False)
            finally:
                recorder.reuse.disarm()
            samples += [{k: np.stack(v) for k, v in record.items()} for record in recorder.records]
            text_tokens += (recorder.key_ok & ~visual).sum(dim=1).tolist()
            bar.update(len(chunk))
        bar.close()
    sizes = Counter(s["cross"].shape[-1] for s in samples)
    # a recipe's counts are for one image: the model's fixed per-image count, else the commonest count
    reference = adapter.visual_tokens_per_image() or max(sizes, key=lambda n: (sizes[n], -n))
    arrays = {k: np.stack([resample_tokens(s[k], reference) for s in samples]).astype(np.float32)
              for k in STATISTICS}
    tau = np.mean([kendall_tau_layers(s["last"]) for s in samples], axis=0)
    meta = {"visual_token_counts": {str(n): c for n, c in sorted(sizes.items())}} if len(sizes) > 1 else {}
    return CalibrationStats(**arrays, text_tokens=np.asarray(text_tokens, dtype=np.int64),
                            kendall_tau=tau.astype(np.float32), meta=meta)
