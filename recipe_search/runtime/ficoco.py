"""FiCoCo (arXiv 2411.17686), filter-correlate-compress, in the LLM (`ficoco-l`) and the vision tower (`ficoco-v`).

Both steps follow methods.md section 3 with the reference code's faults fixed: the image span
comes from the image-token mask, survivors keep their original positions, nothing is global,
every batch row is handled on its own, and the compress step is normalised by default:

    x_j <- (x_j + sum_i w_ij x_i) / (1 + sum_i w_ij)      ("normalised", the paper's self-preserving form)
    x_j <- x_j + sum_i w_ij x_i                           ("additive", the reference code)

Each discarded token i spreads weights w_ij (softmax over its top-k correlated kept tokens,
summing to 1) over the kept tokens; with "normalised" every survivor becomes a convex
combination (its merge row sums to 1). The choice is recorded in the recipe as `merge`.
"""
from __future__ import annotations

from typing import Any

import torch

from .selection import Choice, ScoreContext, SelectionRule, check_fraction, register
from .vision import VisionContext, VisionRule

MERGES = ("normalised", "additive")


def _check_merge(rule: str, merge: str) -> str:
    if merge not in MERGES:
        raise ValueError(f"{rule} rule: merge must be one of {', '.join(MERGES)}, not {merge!r}")
    return merge


def split(keep_scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, discarded) ascending token indices: the k highest `keep_scores` of every row, and the rest."""
    order = keep_scores.argsort(dim=1, descending=True, stable=True)
    return order[:, :k].sort(dim=1).values, order[:, k:].sort(dim=1).values


def correlate(corr: torch.Tensor, quantile: float) -> torch.Tensor:
    """Weights (B, S, K) from each discarded token to the kept ones, given correlations (B, S, K).

    FiCoCo's rule: k = the largest number, over a row's discarded tokens, of kept tokens whose
    correlation exceeds that token's `quantile` (at least 1), shared by the row's discarded
    tokens; each spreads a softmax over its top-k correlations, so its weights sum to 1.
    """
    batch, _, width = corr.shape
    if corr.shape[1] == 0 or width == 0:  # nothing discarded, or nothing kept to merge into
        return corr
    # per batch row: torch.quantile refuses inputs above 2**24 elements (e.g. 64 images x 576 x 288)
    above = corr > torch.stack([torch.quantile(row, quantile, dim=-1, keepdim=True) for row in corr])
    k_row = above.sum(dim=-1).amax(dim=-1).clamp(min=1)             # (B,)
    top = corr.topk(int(k_row.max()), dim=-1)
    valid = torch.arange(top.values.shape[-1], device=corr.device) < k_row[:, None, None]
    weights = torch.softmax(top.values.masked_fill(~valid, float("-inf")), dim=-1)
    return corr.new_zeros(batch, corr.shape[1], width).scatter(-1, top.indices, weights)


def compress(weights: torch.Tensor, kept: torch.Tensor, discarded: torch.Tensor, n: int, merge: str) -> torch.Tensor:
    """Merge matrix (B, K, n): survivor j = its own state plus sum_i w_ij x_i, normalised or not."""
    batch, width = kept.shape
    matrix = weights.new_zeros(batch, width, n).scatter(2, kept[..., None], 1.0)
    matrix = matrix.scatter_add(2, discarded[:, None, :].expand(-1, width, -1), weights.transpose(1, 2))
    return matrix / matrix.sum(dim=-1, keepdim=True) if merge == "normalised" else matrix


def _merge_choice(keep_scores: torch.Tensor, corr: torch.Tensor, k: int, quantile: float, merge: str) -> Choice:
    """Filter by `keep_scores`, correlate discarded to kept through `corr` (B, n, n), compress."""
    kept, discarded = split(keep_scores, k)
    rows = corr.gather(1, discarded[..., None].expand(-1, -1, corr.shape[-1]))
    weights = correlate(rows.gather(2, kept[:, None, :].expand(-1, discarded.shape[1], -1)), quantile)
    return Choice(kept, compress(weights, kept, discarded, corr.shape[-1], merge))


class _FiCoCo:
    """Parameters shared by both placements."""

    def _init_common(self, name: str, quantile: float, merge: str) -> None:
        self.quantile = check_fraction(name, "quantile", quantile)
        self.merge = _check_merge(name, merge)


@register
class FiCoCoLRule(_FiCoCo, SelectionRule):
    """FiCoCo-L: at a decoder layer's input, from head-mean pre-softmax logits 𝓛 (before the causal mask).

    Filter: redundancy R_i = gamma * sum_{j in V} 𝓛[i, j] - (1 - gamma) * mean_{t in T} 𝓛[i, t]
    (V = live visual tokens, T = prompt text after the image); the highest R are discarded.
    Correlate: C = beta * 𝓛_VV + (1 - beta) * 𝓛_VT 𝓛_TV / |T| (indirect, through the text; the
    1/|T| keeps it on one logit-product's scale whatever the prompt length), then `correlate`.

    As in the reference, the visual term is a sum over n tokens and the text term a mean, so the
    text term weighs about 1/n as much; and sum_j 𝓛[i, j] = n q_i . mean_j(k_j) / sqrt(d) is token
    i's own query against the mean key, not its similarity to other tokens: whether it tracks
    redundancy depends on the model (docs/rules.md, "Why rules fall below random").
    """

    name = "ficoco-l"
    merges = True

    def __init__(self, gamma: float = 0.6, beta: float = 0.6, quantile: float = 0.998,
                 merge: str = "normalised") -> None:
        self._init_common(self.name, quantile, merge)
        self.gamma = check_fraction(self.name, "gamma", gamma)
        self.beta = check_fraction(self.name, "beta", beta)

    def params(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "beta": self.beta, "quantile": self.quantile, "merge": self.merge}

    def select(self, ctx: ScoreContext, k: int) -> Choice:
        vis = ctx.visual_positions()
        text, valid = ctx.text_rows()
        n, count = vis.shape[1], valid.sum(dim=1).clamp(min=1).float()
        from_vis = ctx.logits(vis)                                          # (B, n, Lc)
        l_vv = from_vis.gather(2, vis[:, None, :].expand(-1, n, -1))
        l_vt = from_vis.gather(2, text[:, None, :].expand(-1, n, -1)) * valid[:, None, :]
        l_tv = ctx.logits(text).gather(2, vis[:, None, :].expand(-1, text.shape[1], -1)) * valid[..., None]
        redundancy = self.gamma * l_vv.sum(-1) - (1 - self.gamma) * l_vt.sum(-1) / count[:, None]
        corr = self.beta * l_vv + (1 - self.beta) * (l_vt @ l_tv) / count[:, None, None]
        return _merge_choice(-redundancy, corr, k, self.quantile, self.merge)


@register
class FiCoCoVRule(_FiCoCo, VisionRule):
    """FiCoCo-V: in the vision tower, from head-mean pre-softmax logits 𝓛 over CLS + patches.

    Filter: a_j = 𝓛[CLS, j] (without CLS: the mean query's logits, i.e. the column mean over
    patches), p_i = mean_j 𝓛[i, j] over patches; both L2-normalised over patches;
    R_i = lam * a_i - (1 - lam) * p_i, the lowest R discarded. With `local_penalty`, the minimum
    of every 2x2 window of the patch grid is pushed down (R/2 if R > 0, 2R otherwise), spreading
    the discards. Correlate: 𝓛 between patches, then `correlate`. CLS is never discarded or merged.

    Both terms are logits, not similarities: p_i is patch i's query against the mean patch key, and
    a needs a CLS that the tower was trained to use. On the demo tower (CLS without a training
    signal) both point at the background, so the filter discards the objects (docs/rules.md).
    """

    name = "ficoco-v"

    def __init__(self, lam: float = 0.35, quantile: float = 0.998, merge: str = "normalised",
                 local_penalty: bool = True) -> None:
        self._init_common(self.name, quantile, merge)
        self.lam = check_fraction(self.name, "lam", lam)
        if not isinstance(local_penalty, bool):
            raise ValueError(f"ficoco-v rule: local_penalty must be true or false, not {local_penalty!r}")
        self.local_penalty = local_penalty

    def params(self) -> dict[str, Any]:
        return {"lam": self.lam, "quantile": self.quantile, "merge": self.merge, "local_penalty": self.local_penalty}

    def select(self, ctx: VisionContext, k: int) -> Choice:
        logits = ctx.logits()
        off = ctx.offset
        patches = logits[:, off:, off:]
        cls_row = logits[:, 0, off:] if off else patches.mean(dim=1)
        a = torch.nn.functional.normalize(cls_row, dim=-1)
        p = torch.nn.functional.normalize(patches.mean(dim=-1), dim=-1)
        relevance = self.lam * a - (1 - self.lam) * p
        if self.local_penalty:
            relevance = window_penalty(relevance)
        return _merge_choice(relevance, patches, k, self.quantile, self.merge)


def window_penalty(score: torch.Tensor) -> torch.Tensor:
    """Lower the minimum of each 2x2 window of a square, even-sided grid (B, side*side); else unchanged."""
    n = score.shape[1]
    side = int(round(n ** 0.5))
    if side * side != n or side % 2:
        return score
    half = side // 2
    windows = score.view(-1, half, 2, half, 2).permute(0, 1, 3, 2, 4).reshape(-1, half * half, 4)
    low = windows.argmin(dim=-1, keepdim=True)
    worst = windows.gather(-1, low)
    windows = windows.scatter(-1, low, torch.where(worst > 0, worst / 2, worst * 2))
    return windows.view(-1, half, half, 2, 2).permute(0, 1, 3, 2, 4).reshape(score.shape)
