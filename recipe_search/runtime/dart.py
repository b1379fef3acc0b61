"""DART-style duplication-based selection (arXiv 2502.11494; methods.md section 5), no attention map.

Pivots: the `image_pivots` visual tokens and `text_pivots` prompt text tokens with the largest
key norm. Deviations: the keys are the layer's own (the reference reads layer K-1's cache), so the
rule needs nothing from an earlier layer; and the norm is L2, not L1, because RoPE rotations keep
the L2 norm, so a row's pivots do not move with its left padding (absolute positions). The pivots
take turns, each adding its share of the remaining budget: the live visual tokens least
cosine-similar to it (hidden states at the layer's input), i.e. the least duplicated ones. Kept: image pivots plus the picks. Text pivots come from
the prompt only, so a cached decode and a re-forward pick alike.
"""
from __future__ import annotations

from typing import Any

import torch

from .selection import Choice, ScoreContext, SelectionRule, register


@register
class DartRule(SelectionRule):
    name = "dart"

    def __init__(self, image_pivots: int = 4, text_pivots: int = 4) -> None:
        for what, value in (("image_pivots", image_pivots), ("text_pivots", text_pivots)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"dart rule: {what} must be a non-negative integer, not {value!r}")
        if image_pivots + text_pivots == 0:
            raise ValueError("dart rule: needs at least one pivot")
        self.image_pivots, self.text_pivots = image_pivots, text_pivots

    def params(self) -> dict[str, Any]:
        return {"image_pivots": self.image_pivots, "text_pivots": self.text_pivots}

    def select(self, ctx: ScoreContext, k: int) -> Choice:
        norms = ctx.key_norms()                                               # (B, Lc) squared key L2 norm
        vis = ctx.visual_positions()
        batch, n = vis.shape
        image_pivots = min(self.image_pivots, k)
        taken = torch.zeros(batch, n, dtype=torch.bool, device=vis.device)
        pivots_img = norms.gather(1, vis).topk(image_pivots, dim=1).indices   # (B, p) among visual tokens
        taken.scatter_(1, pivots_img, True)
        text = ctx.text_mask()
        per_row = text.sum(dim=1).clamp(max=self.text_pivots)                # (B,)
        width = int(per_row.max()) if batch else 0
        pivots_txt = norms.masked_fill(~text, float("-inf")).topk(width, dim=1).indices   # (B, t) sequence positions
        pivot_pos = torch.cat([vis.gather(1, pivots_img), pivots_txt], dim=1)
        live = torch.cat([torch.ones_like(pivots_img, dtype=torch.bool),
                          torch.arange(width, device=vis.device)[None, :] < per_row[:, None]], dim=1)
        hidden = torch.nn.functional.normalize(ctx.hidden.float(), dim=-1)
        candidates = hidden.gather(1, vis[..., None].expand(-1, -1, hidden.shape[-1]))          # (B, n, d)
        anchors = hidden.gather(1, pivot_pos[..., None].expand(-1, -1, hidden.shape[-1]))      # (B, P, d)
        similarity = anchors @ candidates.transpose(1, 2)                                      # (B, P, n)
        quota = _quotas(k - image_pivots, live)
        for slot in range(pivot_pos.shape[1]):
            need = quota[:, slot]
            if int(need.max()) == 0:
                continue
            picks = similarity[:, slot].masked_fill(taken, float("inf")).topk(int(need.max()), dim=1,
                                                                               largest=False).indices
            use = torch.arange(picks.shape[1], device=vis.device)[None, :] < need[:, None]
            taken.scatter_(1, picks, use | taken.gather(1, picks))
        return Choice(taken.nonzero()[:, 1].view(batch, k))


def _quotas(total: int, live: torch.Tensor) -> torch.Tensor:
    """Split `total` picks over each row's live pivots (B, P) as evenly as possible, earlier ones first."""
    count = live.sum(dim=1, keepdim=True).clamp(min=1)
    rank = live.long().cumsum(dim=1) - 1
    share = total // count + (rank < total % count).long()
    return share * live.long()
