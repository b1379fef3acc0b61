"""FLOPs formulas for the language model's prefill, stated exactly so every figure can name its own.

Convention: one multiply-add = 1 FLOP (MAC = 1); profilers that count 2 per MAC report twice these
numbers. Per decoder layer, for n query tokens attending to n keys:

    F(n) = n·d·(H·dh)         Q projection
         + 2·n·d·(kvH·dh)     K and V projections (GQA-aware)
         + n·(H·dh)·d         output projection
         + 2·n²·(H·dh)        QKᵀ and A·V (the full square, as FastV/FitPrune count it)
         + g·n·d·m            MLP, g = 3 for gated (SwiGLU) MLPs, 2 otherwise

For a multi-head model (kvH = H, H·dh = d) this is FitPrune's 4nd² + 2n²d + 3ndm.

* ``full``   (default): n = every token in the layer (text + visual kept); the budget is a fraction
  of the unpruned model's prefill FLOPs over the full sequence.
* ``visual``: n = visual tokens only, FitPrune's accounting; text tokens are ignored.

The vision encoder (stated separately, per image, same convention): per ViT layer for n tokens
(patches + CLS) ``4·n·dv² + 2·n²·dv + 2·n·dv·mv`` (Q, K, V, O; QKᵀ and A·V; a two-matrix MLP),
every encoder layer counted (transformers runs them all even when the LLM reads an earlier one),
plus the projector's MACs for each patch it projects. A pre-LLM selection stage at the input of
encoder layer s runs layers >= s and the projector on the kept patches only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .models.base import ModelDims, VisionLayout

FORMULAS: dict[str, str] = {
    "full": "full-sequence LM prefill: sum over layers of F(text + visual kept), F per flops.py, MAC=1",
    "visual": "visual-only LM prefill (FitPrune): sum over layers of F(visual kept), F per flops.py, MAC=1",
}
VISION_FORMULAS: dict[str, str] = {
    "vision_encoder": "vision encoder + projector per image: sum over ViT layers of 4n·dv² + 2n²·dv + 2n·dv·mv "
                      "(n = patches + CLS in the layer) + projector MACs per patch kept, MAC=1",
    "full_with_vision": "full-sequence LM prefill plus vision encoder + projector, as a share of the unpruned sum",
}


def layer_flops(n: np.ndarray | float, dims: ModelDims) -> np.ndarray | float:
    """F(n) for one decoder layer (see module docstring)."""
    d, attn, kv = dims.hidden_size, dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    mlp = 3 if dims.gated_mlp else 2
    return n * d * attn + 2 * n * d * kv + n * attn * d + 2 * n * n * attn + mlp * n * d * dims.intermediate_size


@dataclass(frozen=True)
class CostModel:
    """Prefill cost of a visual-token schedule on a set of prompts, under both formulas."""

    dims: ModelDims
    visual_tokens: int          # N: visual tokens entering layer 0 when nothing is pruned
    text_tokens: tuple[int, ...]  # non-visual tokens of each calibration prompt

    def table(self, formula: str) -> np.ndarray:
        """cost[n] for n = 0..N visual tokens in one layer, averaged over the prompts."""
        n = np.arange(self.visual_tokens + 1, dtype=np.float64)
        if formula == "visual":
            return np.asarray(layer_flops(n, self.dims), dtype=np.float64)
        if formula == "full":
            text = np.asarray(self.text_tokens, dtype=np.float64)
            return np.asarray(layer_flops(n[:, None] + text[None, :], self.dims)).mean(axis=1)
        raise ValueError(f"unknown FLOPs formula {formula!r}; choose from {', '.join(FORMULAS)}")

    def total(self, schedule: Sequence[int], formula: str) -> float:
        return float(self.table(formula)[np.asarray(schedule, dtype=np.int64)].sum())

    def unpruned(self, formula: str) -> float:
        return self.total([self.visual_tokens] * self.dims.num_layers, formula)

    def fraction(self, schedule: Sequence[int], formula: str) -> float:
        """Prefill FLOPs of `schedule` as a fraction of the unpruned model's, under `formula`."""
        return self.total(schedule, formula) / self.unpruned(formula)

    def mean_tokens(self, schedule: Sequence[int]) -> float:
        return float(np.mean(schedule))


@dataclass(frozen=True)
class VisionCost:
    """Vision-encoder + projector MACs per image, with an optional pre-LLM stage at `stage_layer`."""

    layout: VisionLayout
    stage_layer: int | None = None   # encoder layer whose input the stage reduces; None = no stage

    def layer(self, n: int) -> float:
        v, m = self.layout.hidden_size, self.layout.intermediate_size
        return float(4 * n * v * v + 2 * n * n * v + 2 * n * v * m)

    def total(self, kept: int) -> float:
        """MACs when `kept` patches survive the stage (all of them without a stage)."""
        lay = self.layout
        kept = lay.patches if self.stage_layer is None else kept
        cls = int(lay.has_cls)
        start = lay.num_layers if self.stage_layer is None else self.stage_layer
        return (start * self.layer(lay.tokens) + (lay.num_layers - start) * self.layer(kept + cls)
                + kept * lay.projector_macs_per_token)

    def unpruned(self) -> float:
        return VisionCost(self.layout).total(self.layout.patches)
