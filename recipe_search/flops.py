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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .models.base import ModelDims

FORMULAS: dict[str, str] = {
    "full": "full-sequence LM prefill: sum over layers of F(text + visual kept), F per flops.py, MAC=1",
    "visual": "visual-only LM prefill (FitPrune): sum over layers of F(visual kept), F per flops.py, MAC=1",
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
