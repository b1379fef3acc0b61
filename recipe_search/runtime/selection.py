"""Selection rules: which visual tokens survive at a layer, given how many may.

A rule returns a `Choice`: the live visual tokens that survive and, for merging rules (FiCoCo),
merge weights that rewrite the survivors' hidden states from the discarded ones; the applier
executes it. Most rules only score tokens (`ScoringRule`, higher = keep) and the top-k survive.
Rules read attention through `ScoreContext`, which recomputes just the rows they need from the
layer's own projections, so the model keeps running SDPA. Rules are registered by name (LLM-side
here and in dart.py / ficoco.py, vision-side in vision.py) and recorded with their parameters in
every recipe.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..models.base import ModelAdapter
from ..registry import Registry


@dataclass
class ScoreContext:
    """What a rule may look at: one layer's input for the live tokens of a batch (all (B, Lc, ...)).

    `visual` marks the tokens the rule chooses among (one image, or a prompt's pool, with the same
    count in every row); `all_visual` marks every live visual token, so "text" never includes
    another image. `mask` is the layer's own attention mask at the live tokens (None: causal).
    """

    adapter: ModelAdapter
    layer: nn.Module
    layer_idx: int
    hidden: torch.Tensor      # (B, Lc, d) input of `layer`
    rope: tuple[torch.Tensor, torch.Tensor] | None   # the layer's (cos, sin) at the live tokens
    cols: torch.Tensor        # (B, Lc) original column of each live token (-1: padding slot)
    visual: torch.Tensor      # (B, Lc) bool, same count per row: the candidates
    all_visual: torch.Tensor  # (B, Lc) bool: every live visual token
    key_ok: torch.Tensor      # (B, Lc) bool, False on padding
    prompt_end: int           # columns >= prompt_end are not part of the prompt (generated tokens)
    row_keys: list[int]       # a stable per-row identity (prompt content), for seeded rules
    mask: torch.Tensor | None = None
    _qk: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_visual(self) -> int:
        return int(self.visual[0].sum())

    def unit_context(self, row: int, candidates: torch.Tensor) -> "ScoreContext":
        """The context of one row restricted to `candidates` (1, Lc): one image of a multi-image prompt."""
        q, k = self.query_key()
        s = slice(row, row + 1)
        return ScoreContext(
            adapter=self.adapter, layer=self.layer, layer_idx=self.layer_idx, hidden=self.hidden[s],
            rope=None if self.rope is None else (self.rope[0][s], self.rope[1][s]), cols=self.cols[s],
            visual=candidates, all_visual=self.all_visual[s], key_ok=self.key_ok[s], prompt_end=self.prompt_end,
            row_keys=self.row_keys[s] if self.row_keys else [], mask=None if self.mask is None else self.mask[s],
            _qk=(q[s], k[s]),
        )

    def visual_positions(self) -> torch.Tensor:
        """(B, n_vis) indices of the candidate visual tokens in the current sequence, in order."""
        return self.visual.nonzero()[:, 1].view(self.visual.shape[0], -1)

    def text_mask(self) -> torch.Tensor:
        """(B, Lc) prompt tokens that are neither visual nor padding."""
        return ~self.all_visual & self.key_ok & (self.cols < self.prompt_end)

    def query_key(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._qk is None:
            self._qk = self.adapter.query_key(self.layer, self.hidden, self.rope)
        return self._qk

    def _row_logits(self, rows: torch.Tensor) -> torch.Tensor:
        q, k = self.query_key()
        q_rows = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        return self.adapter.attention_logits(self.layer, q_rows, k)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Head-mean pre-softmax logits (B, R, Lc) of query rows `rows` (B, R), before any mask."""
        return self._row_logits(rows).mean(dim=1)

    def allowed(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, R, Lc) keys each query row may attend to: the layer's own mask, else causal + padding."""
        if self.mask is not None:
            m = self.mask[:, 0].gather(1, rows[..., None].expand(-1, -1, self.mask.shape[-1]))
            ok = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
            return ok & self.key_ok[:, None, :]
        row_cols = self.cols.gather(1, rows)
        return self.key_ok[:, None, :] & (self.cols[:, None, :] <= row_cols[:, :, None])

    def attention(self, rows: torch.Tensor) -> torch.Tensor:
        """Softmax attention (B, H, R, Lc) of query rows `rows` (B, R), masked as the layer masks."""
        logits = self._row_logits(rows).masked_fill(~self.allowed(rows)[:, None], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)

    def last_prompt_row(self) -> torch.Tensor:
        """(B, 1) index of the last prompt token (the query FastV and G-Search rank by)."""
        return (self.cols == self.prompt_end - 1).float().argmax(dim=1, keepdim=True)

    def text_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, T) of the prompt tokens after the candidates, and a validity mask (B, T)."""
        vis_cols = self.cols.masked_fill(~self.visual, -1)
        last_visual = vis_cols.max(dim=1, keepdim=True).values
        after = (self.cols > last_visual) & self.text_mask()
        count = after.sum(dim=1)
        width = int(count.max())
        order = torch.sort((~after).to(torch.int8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=count.device)[None, :] < count[:, None]
        return order, valid


@dataclass(frozen=True)
class Choice:
    """What survives a pruning step, per row: `keep` (B, k) ascending indices among the live visual
    tokens; `merge` (B, k, n_vis) or None: survivor j's new state is sum_i merge[j, i] * state_i."""

    keep: torch.Tensor
    merge: torch.Tensor | None = None

    @classmethod
    def top(cls, scores: torch.Tensor, k: int) -> "Choice":
        """The k highest scores of every row, in their original order."""
        return cls(scores.topk(k, dim=1).indices.sort(dim=1).values)


class SelectionRule(ABC):
    """Picks the surviving visual tokens; registered by `name`, parameters recorded in the recipe.

    `stage` says where it runs: "llm" (a decoder layer's input, `ScoreContext`) or "vision"
    (inside the vision tower before the projector, `vision.VisionContext`).
    """

    name: ClassVar[str]
    stage: ClassVar[str] = "llm"

    def params(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def select(self, ctx: Any, k: int) -> Choice:
        """Keep `k` of the live visual tokens of every row (k < live)."""


RULES: Registry[type[SelectionRule]] = Registry("selection rule")


def register(rule: type[SelectionRule]) -> type[SelectionRule]:
    """Class decorator: make a rule available by its name to recipes and the command line
    (a name registered twice is refused)."""
    return RULES.register(rule.name, rule)


class ScoringRule(SelectionRule):
    """A rule that ranks tokens (higher = keep); only such rules can score at the previous layer."""

    @abstractmethod
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, n_vis) scores of the live visual tokens, in sequence order; higher means keep."""

    def select(self, ctx: ScoreContext, k: int) -> Choice:
        return Choice.top(self.score(ctx), k)


def _reduce_heads(probs: torch.Tensor, how: str) -> torch.Tensor:
    return probs.amax(dim=1) if how == "max" else probs.mean(dim=1)


@register
class AttentionRule(ScoringRule):
    """FastV-style: head-mean attention that the last prompt token (or all post-image text) pays."""

    name = "attention"

    def __init__(self, query: str = "last", heads: str = "mean") -> None:
        if query not in ("last", "text"):
            raise ValueError(f"attention rule: query must be 'last' or 'text', not {query!r}")
        if heads not in ("mean", "max"):
            raise ValueError(f"attention rule: heads must be 'mean' or 'max', not {heads!r}")
        self.query, self.heads = query, heads

    def params(self) -> dict[str, Any]:
        return {"query": self.query, "heads": self.heads}

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        vis = ctx.visual_positions()
        if self.query == "last":
            probs = _reduce_heads(ctx.attention(ctx.last_prompt_row()), self.heads)[:, 0]
        else:
            rows, valid = ctx.text_rows()
            per_row = _reduce_heads(ctx.attention(rows), self.heads) * valid[..., None]
            probs = per_row.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        return probs.gather(1, vis)


@register
class FitPruneRule(ScoringRule):
    """FitPrune's inference score: text->visual mass times visual->visual mass (head-max maps)."""

    name = "fitprune"

    def __init__(self, heads: str = "max") -> None:
        if heads not in ("mean", "max"):
            raise ValueError(f"fitprune rule: heads must be 'mean' or 'max', not {heads!r}")
        self.heads = heads

    def params(self) -> dict[str, Any]:
        return {"heads": self.heads}

    def components(self, ctx: ScoreContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross, self), each (B, n_vis): mean attention from post-image prompt text to each visual
        token, and the attention each visual token receives from the visual tokens, over n_vis."""
        vis = ctx.visual_positions()
        rows, valid = ctx.text_rows()
        text = _reduce_heads(ctx.attention(rows), self.heads) * valid[..., None]
        cross = text.sum(1).gather(1, vis) / valid.sum(1, keepdim=True).clamp(min=1)
        selfv = _reduce_heads(ctx.attention(vis), self.heads).sum(1).gather(1, vis) / vis.shape[1]
        return cross, selfv

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        cross, selfv = self.components(ctx)
        return cross * selfv


@register
class RandomRule(ScoringRule):
    """Uniform draws, seeded per (seed, sample, layer): the baseline every rule must beat."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def params(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        rows = []
        for key in ctx.row_keys:
            digest = hashlib.sha256(f"{self.seed}:{key}:{ctx.layer_idx}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            rows.append(torch.rand(ctx.num_visual, generator=gen))
        return torch.stack(rows).to(ctx.hidden.device)


def make_rule(name: str, params: dict[str, Any] | None = None) -> SelectionRule:
    """Build a registered rule; a one-line error names the known ones or the bad parameter."""
    try:
        return RULES.get(name)(**(params or {}))
    except TypeError as exc:
        raise ValueError(f"selection rule {name!r}: bad parameters {params!r} ({exc})") from None


def check_fraction(rule: str, name: str, value: float) -> float:
    """A parameter that must lie in [0, 1], as a float; one-line error otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{rule} rule: {name} must be a number in [0, 1], not {value!r}")
    return float(value)


from . import dart, ficoco, vision  # noqa: E402,F401  (their rules register themselves)
