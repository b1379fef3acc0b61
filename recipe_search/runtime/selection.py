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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

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
    key_bias: torch.Tensor | None = None   # (B, Lc) log of the tokens each slot stands for (merged), or None
    _qk: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    _memo: dict[str, Any] = field(default_factory=dict, repr=False)  # rows and attention computed once per context

    #: `head_reduced_sum` works on chunks of about this many attention entries (rows x heads x keys, one
    #: batch row at a time), so a chunk's logits, mask and softmax stay in cache: 32-96 query rows of 616
    #: keys and 16 heads measured best on a 2 MB L2. Smaller problems run as one chunk of the whole batch.
    CHUNK_ELEMENTS: ClassVar[int] = 1 << 19
    ONE_SHOT_ELEMENTS: ClassVar[int] = 1 << 21

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
            key_bias=None if self.key_bias is None else self.key_bias[s], _qk=(q[s], k[s]),
        )

    def visual_positions(self) -> torch.Tensor:
        """(B, n_vis) indices of the candidate visual tokens in the current sequence, in order."""
        if "visual_positions" not in self._memo:
            self._memo["visual_positions"] = self.visual.nonzero()[:, 1].view(self.visual.shape[0], -1)
        return self._memo["visual_positions"]

    def text_mask(self) -> torch.Tensor:
        """(B, Lc) prompt tokens that are neither visual nor padding."""
        return ~self.all_visual & self.key_ok & (self.cols < self.prompt_end)

    def query_key(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys (B, H, Lc, dh), made contiguous once: the rules slice them chunk by chunk, and
        strided slices made every chunk's matrix product copy its operands first."""
        if self._qk is None:
            q, k = self.adapter.query_key(self.layer, self.hidden, self.rope)
            self._qk = (q.contiguous(), k.contiguous())
        return self._qk

    def key_norms(self) -> torch.Tensor:
        """(B, Lc) squared key L2 norm of every live token, summed over heads; from the keys if a rule
        already made them, else from the key projection alone (`ModelAdapter.key_norms`)."""
        if self._qk is not None:
            return self._qk[1].float().square().sum(dim=(1, 3))
        if "key_norms" not in self._memo:
            self._memo["key_norms"] = self.adapter.key_norms(self.layer, self.hidden)
        return self._memo["key_norms"]

    def _row_logits(self, rows: torch.Tensor, keys: int | None = None) -> torch.Tensor:
        """Logits (B, H, R, keys) of query rows `rows` against the first `keys` keys (all by default)."""
        q, k = self.query_key()
        start = rows[:1, :1]
        if rows.numel() and bool((rows == start + torch.arange(rows.shape[1], device=rows.device)).all()):
            q_rows = q.narrow(2, int(start), rows.shape[1])  # one run of rows, the same in every batch row: a view
        else:
            q_rows = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        if keys is not None and keys < k.shape[2]:
            k = k[:, :, :keys]
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

    def _softmax_rows(self, rows: torch.Tensor, truncate: bool) -> tuple[torch.Tensor, int]:
        """Softmax attention (B, H, R, K) of query rows `rows`, masked as the layer masks, over the first K
        keys: every key when `truncate` is False, else up to the last key any of the rows may attend to
        (the rest would be exact zeros)."""
        ok = self.allowed(rows)
        keys = ok.shape[-1]
        if truncate:
            any_key = ok.any(dim=1).any(dim=0)
            keys = int(any_key.nonzero()[-1, 0]) + 1 if bool(any_key.any()) else 1
            ok = ok[..., :keys]
        logits = self._row_logits(rows, keys)
        # adding a 0 / -inf bias is exact and, broadcast over heads, far faster than masked_fill on a CPU
        bias = torch.zeros(ok.shape, dtype=logits.dtype, device=logits.device).masked_fill_(~ok, float("-inf"))
        if self.key_bias is not None:  # merged slots weigh as the tokens they stand for, as the layer sees them
            bias += self.key_bias[:, None, :keys].to(bias.dtype)
        probs = torch.softmax(logits.add_(bias[:, None]), dim=-1)
        if not bool(ok.any(dim=-1).all()):
            probs = probs.nan_to_num_(0.0)  # a row with no key to attend to (a padding query)
        return probs, keys

    def attention(self, rows: torch.Tensor) -> torch.Tensor:
        """Softmax attention (B, H, R, Lc) of query rows `rows` (B, R), masked as the layer masks."""
        return self._softmax_rows(rows, truncate=False)[0]

    def head_reduced_sum(self, rows: torch.Tensor, heads: str, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Lc): sum over the query rows `rows` (B, R) of their head-reduced ("max" or "mean") attention,
        each row weighted by `weights` (B, R) if given. Computed in chunks of rows, each over the keys its
        rows can reach only, so the (B, H, R, Lc) attention is never built."""
        batch, count = rows.shape
        per_row = self.query_key()[0].shape[1] * self.cols.shape[1]  # heads x keys
        if batch * count * per_row <= self.ONE_SHOT_ELEMENTS:
            step = max(1, count)
        elif batch > 1:  # one batch row at a time keeps a chunk in cache and its matrix products large
            return torch.cat([
                self.unit_context(b, self.visual[b:b + 1]).head_reduced_sum(
                    rows[b:b + 1], heads, None if weights is None else weights[b:b + 1])
                for b in range(batch)])
        else:
            step = max(16, self.CHUNK_ELEMENTS // per_row)
        out = torch.zeros(batch, self.cols.shape[1], dtype=torch.float32, device=rows.device)
        for start in range(0, count, step):
            chunk = rows[:, start:start + step]
            probs, keys = self._softmax_rows(chunk, truncate=True)
            reduced = _reduce_heads(probs, heads)
            if weights is not None:
                reduced = reduced * weights[:, start:start + step, None].to(reduced.dtype)
            out[:, :keys] += reduced.sum(dim=1)
        return out

    def last_prompt_row(self) -> torch.Tensor:
        """(B, 1) index of the last prompt token (the query FastV and G-Search rank by)."""
        if "last_prompt_row" not in self._memo:
            self._memo["last_prompt_row"] = (self.cols == self.prompt_end - 1).float().argmax(dim=1, keepdim=True)
        return self._memo["last_prompt_row"]

    def text_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, T) of the prompt tokens after the candidates, and a validity mask (B, T)."""
        if "text_rows" not in self._memo:
            vis_cols = self.cols.masked_fill(~self.visual, -1)
            last_visual = vis_cols.max(dim=1, keepdim=True).values
            after = (self.cols > last_visual) & self.text_mask()
            count = after.sum(dim=1)
            width = int(count.max())
            order = torch.sort((~after).to(torch.int8), dim=1, stable=True).indices[:, :width]
            valid = torch.arange(width, device=count.device)[None, :] < count[:, None]
            self._memo["text_rows"] = (order, valid)
        return self._memo["text_rows"]

    def text_attention(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`text_rows()` and their softmax attention (B, H, T, Lc), computed once per context (the text
        rows are few; FitPrune's cross term, the text query and, when it is among them, the last prompt
        token all read it)."""
        if "text_attention" not in self._memo:
            rows, valid = self.text_rows()
            self._memo["text_attention"] = (rows, valid, self.attention(rows))
        return self._memo["text_attention"]

    def last_row_attention(self) -> torch.Tensor:
        """(B, H, Lc) attention of the last prompt token: read from `text_attention()` when that was
        already computed and holds the row, else computed for that one row."""
        last = self.last_prompt_row()
        memo = self._memo.get("text_attention")
        if memo is not None:
            rows, valid, probs = memo
            hit = (rows == last) & valid
            if bool(hit.any(dim=1).all()):
                at = hit.to(torch.int8).argmax(dim=1)
                return probs[torch.arange(rows.shape[0], device=rows.device), :, at]
        return self.attention(last)[:, :, 0]


class ProjectionReuse:
    """Queries and keys projected for scoring, handed to the layer's own attention instead of projected twice.

    A rule scoring at layer l recomputes the layer's query and key projections for every live token
    (`ScoreContext.query_key`, through the adapter); the layer then projects its own input again.
    While the rule scores, `noting(layer)` records the input and output of each of the layer's linear
    modules that the adapter calls once (by the adapter contract, the projections the layer's attention
    calls too); `arm(order)` then gives the next call of each such module the recorded rows (`order`
    (B, W): the slots that survive, in the layer's order; None: all, unchanged) in place of computing
    them: the call's input is swapped for an empty one and its output for those rows. The layer's
    actual input is first compared exactly with the recorded input at each batch row's last slot; on
    any difference, or if the module is not called next as expected, it computes as usual. Merged
    survivors (rewritten hidden states) must not be armed.
    """

    def __init__(self) -> None:
        self.noted: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.armed: list[Any] = []

    @contextmanager
    def noting(self, layer: nn.Module) -> Iterator[None]:
        self.noted.clear()
        calls: dict[nn.Module, int] = {}

        def note(module: nn.Module, args: tuple, output: Any) -> None:
            calls[module] = calls.get(module, 0) + 1
            if args and torch.is_tensor(args[0]) and torch.is_tensor(output):
                self.noted[module] = (args[0], output)

        # plain linear modules only: a quantised or otherwise special projection computes as usual
        handles = [m.register_forward_hook(note) for m in layer.modules() if type(m) is nn.Linear]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for module, n in calls.items():
                if n != 1:
                    self.noted.pop(module, None)  # called more than once: which call would the layer repeat?

    def arm(self, order: torch.Tensor | None = None) -> None:
        self.disarm()
        for module, (x, out) in self.noted.items():
            if x.ndim != 3 or out.ndim != 3:
                continue
            if order is None:
                last = x[:, -1:]
            else:
                last = x.gather(1, order[:, -1:, None].expand(-1, -1, x.shape[-1]))
                out = out.gather(1, order[..., None].expand(-1, -1, out.shape[-1]))
            self._arm_one(module, last, out)
        self.noted.clear()

    def _arm_one(self, module: nn.Module, last: torch.Tensor, out: torch.Tensor) -> None:
        handed = [False]
        own: list[Any] = []

        def release() -> None:
            for h in own:
                h.remove()
                if h in self.armed:
                    self.armed.remove(h)

        def pre(mod: nn.Module, args: tuple) -> tuple | None:
            x = args[0] if args else None
            if (torch.is_tensor(x) and x.shape[:-1] == out.shape[:-1] and x.dtype == last.dtype
                    and torch.equal(x[:, -1:], last)):
                handed[0] = True
                return (x[:, :0], *args[1:])
            release()
            return None

        def post(mod: nn.Module, args: tuple, output: Any) -> Any:
            release()
            return out if handed[0] else None

        own += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self.armed += own

    def disarm(self) -> None:
        for h in self.armed:
            h.remove()
        self.armed.clear()


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
    #: Whether its `Choice` carries merge weights of its own (then a plan's merge_threshold is refused).
    merges: ClassVar[bool] = False

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
    """FastV-style: head-mean attention that the last prompt token (or all post-image text) pays.

    FastV ranks at layer K-1 >= 1 (K = 2). Scored at layer 0, the last token's query is its own
    embedding, blind to the question; at layers 0-1 it favours fixed positions (the image's last row,
    attention sinks) and can fall below random; `query="text"` reads the question's own tokens
    (measured in docs/rules.md).
    """

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
            probs = _reduce_heads(ctx.last_row_attention()[:, :, None], self.heads)[:, 0]
        else:
            _, valid, attention = ctx.text_attention()
            per_row = _reduce_heads(attention, self.heads) * valid[..., None]
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
        _, valid, attention = ctx.text_attention()
        text = _reduce_heads(attention, self.heads) * valid[..., None]
        cross = text.sum(1).gather(1, vis) / valid.sum(1, keepdim=True).clamp(min=1)
        selfv = ctx.head_reduced_sum(vis, self.heads).gather(1, vis) / vis.shape[1]
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
