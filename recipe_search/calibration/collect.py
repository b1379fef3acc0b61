"""Run calibration samples through the unpruned model and reduce attention inside layer hooks.

Only the attention rows the statistics need are recomputed (post-image prompt rows, visual rows,
the last prompt token), with the same `ScoreContext` code the runtime selection rules use, so
calibration and inference score tokens identically. SDPA stays on; no attention map is stored.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import ModelAdapter
from ..runtime.selection import AttentionRule, FitPruneRule, ScoreContext
from ..stats import CalibrationStats, kendall_tau_layers
from .data import DataError, SampleSet, batches


class _StatsHooks:
    """Pre-hooks on every decoder layer that record per-token scores for one batch."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.fitprune = FitPruneRule(heads="max")
        self.last_rule = AttentionRule(query="last", heads="mean")
        self.visual: torch.Tensor | None = None
        self.key_ok: torch.Tensor | None = None
        self.records: dict[str, list[torch.Tensor]] = {}
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(adapter.decoder_layers())
        ]

    def _hook(self, idx: int):
        def hook(layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            batch, length = hidden.shape[:2]
            ctx = ScoreContext(
                adapter=self.adapter, layer=layer, layer_idx=idx, hidden=hidden,
                cos=cos.expand(batch, -1, -1), sin=sin.expand(batch, -1, -1),
                cols=torch.arange(length, device=hidden.device).expand(batch, -1),
                visual=self.visual, key_ok=self.key_ok, prompt_end=length, row_keys=[],
            )
            cross, selfv = self.fitprune.components(ctx)
            last = self.last_rule.score(ctx)
            for name, value in (("cross", cross), ("selfv", selfv), ("last", last)):
                self.records.setdefault(name, []).append(value.float().cpu())

        return hook

    def take(self) -> dict[str, np.ndarray]:
        """(B, L, N) arrays for the batch just run."""
        out = {k: torch.stack(v, dim=1).numpy() for k, v in self.records.items()}
        self.records = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def collect_stats(model: Any, processor: Any, adapter: ModelAdapter, data: SampleSet,
                  batch_size: int = 8, progress: bool = True) -> CalibrationStats:
    """Calibrate on `data`; raises DataError when a prompt has no image token."""
    hooks = _StatsHooks(adapter)
    parts: dict[str, list[np.ndarray]] = {"cross": [], "selfv": [], "last": []}
    text_tokens: list[int] = []
    try:
        bar = tqdm(total=len(data), desc="calibration", unit="sample", disable=not progress)
        for chunk in batches(data.samples, batch_size):
            inputs = adapter.build_inputs(processor, [s.image for s in chunk], [s.prompt for s in chunk])
            visual = inputs["input_ids"] == adapter.image_token_id
            counts = visual.sum(dim=1)
            if bool((counts == 0).any()):
                raise DataError("a calibration prompt has no image token after processing; check the chat template")
            if parts["cross"] and int(counts[0]) != parts["cross"][0].shape[-1] or bool((counts != counts[0]).any()):
                raise DataError("calibration images give different visual-token counts; resize them to one size")
            mask = inputs.get("attention_mask")
            hooks.visual = visual
            hooks.key_ok = mask.bool() if mask is not None else torch.ones_like(visual)
            model(**inputs, use_cache=False)
            for name, value in hooks.take().items():
                parts[name].append(value)
            text_tokens += (hooks.key_ok & ~visual).sum(dim=1).tolist()
            bar.update(len(chunk))
        bar.close()
    finally:
        hooks.remove()
    arrays = {k: np.concatenate(v, axis=0).astype(np.float32) for k, v in parts.items()}
    tau = np.mean([kendall_tau_layers(sample) for sample in arrays["last"]], axis=0)
    return CalibrationStats(**arrays, text_tokens=np.asarray(text_tokens, dtype=np.int64),
                            kendall_tau=tau.astype(np.float32))
