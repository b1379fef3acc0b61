"""Calibration statistics: the per-layer attention summaries every search method reads.

Stored as one .npz of plain arrays (loaded with allow_pickle=False) plus a JSON sidecar, never
pickle, so a cache folder handed over by someone else cannot execute code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATS_VERSION = 1


@dataclass
class CalibrationStats:
    """Per sample s, layer l and visual token j of the *unpruned* model (arrays are (S, L, N)).

    cross[s,l,j]  mean over post-image prompt tokens of head-max attention to visual token j
    selfv[s,l,j]  head-max attention visual token j receives from the visual tokens, / N
    last[s,l,j]   head-mean attention of the last prompt token to visual token j
    text_tokens   non-visual tokens per prompt (S,), for the full-sequence FLOPs formula
    kendall_tau   (L, L) mean over samples of Kendall's tau-b between layers' `last` rankings
    """

    cross: np.ndarray
    selfv: np.ndarray
    last: np.ndarray
    text_tokens: np.ndarray
    kendall_tau: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.cross.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.cross.shape[1])

    @property
    def visual_tokens(self) -> int:
        return int(self.cross.shape[2])

    def cross_mass(self) -> np.ndarray:
        """(S, L) text->visual attention mass W^c (FitPrune)."""
        return self.cross.sum(-1)

    def self_mass(self) -> np.ndarray:
        """(S, L) visual->visual attention mass W^v (FitPrune)."""
        return self.selfv.sum(-1)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "stats.npz", cross=self.cross, selfv=self.selfv, last=self.last,
                 text_tokens=self.text_tokens, kendall_tau=self.kendall_tau)
        (folder / "meta.json").write_text(json.dumps({"stats_version": STATS_VERSION, **self.meta}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "CalibrationStats":
        meta = json.loads((folder / "meta.json").read_text())
        if meta.pop("stats_version", None) != STATS_VERSION:
            raise ValueError(f"{folder}: statistics of another version")
        with np.load(folder / "stats.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("cross", "selfv", "last", "text_tokens", "kendall_tau")}
        return cls(**arrays, meta=meta)


def kendall_tau_layers(scores: np.ndarray) -> np.ndarray:
    """Kendall tau-b between every pair of layers' rankings of the same tokens.

    `scores` is (L, N) for one sample. With s_l the sign vector of all token pairs at layer l,
    tau_b(l, m) = <s_l, s_m> / sqrt(|s_l|_1 |s_m|_1), computed for all pairs by one matrix product.
    """
    n = scores.shape[1]
    i, j = np.triu_indices(n, k=1)
    signs = np.sign(scores[:, i] - scores[:, j]).astype(np.float32)
    concord = signs @ signs.T
    norms = np.sqrt(np.abs(signs).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = concord / np.outer(norms, norms)
    return np.nan_to_num(tau, nan=0.0)
