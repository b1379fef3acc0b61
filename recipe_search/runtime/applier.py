"""Attach a pruning plan to an unmodified transformers model with forward pre-hooks.

Nothing in the model is patched: a pre-hook on the top model notes each forward's image mask,
padding and prompt, and a pre-hook on every decoder layer drops visual tokens at the scheduled
layers (merging rules also rewrite the survivors' hidden states) and re-indexes what the model
loop keeps passing at full length (RoPE cos/sin, position ids, attention mask). A plan with a
vision stage (vision.py) selects patches in the vision tower first; layer 0 then drops the other
placeholders. Survivors keep their original RoPE positions. During cached decoding each
layer's attention mask is rebuilt for that layer's own KV layout, since layers may hold different
numbers of keys. `remove()` detaches every hook and leaves the model exactly as it was.
"""
from __future__ import annotations

import hashlib
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..models import ModelAdapter, get_adapter
from .plan import PruningPlan
from .selection import Choice, ScoreContext, ScoringRule
from .vision import VisionStage

SUPPORTED_ATTENTION = ("sdpa", "eager")


class PruningError(RuntimeError):
    pass


@dataclass
class _Forward:
    """Per-prefill state, kept for the cached decode steps that follow it."""

    attn2d: torch.Tensor | None      # (B, T) original padding mask, extended as tokens arrive
    visual0: torch.Tensor            # (B, T0) image-token mask of the prompt
    prompt_end: int
    row_keys: list[int]
    targets: list[int]               # visual tokens kept entering each layer
    cache: Any = None                # weakref to the KV cache this prefill filled
    prefill_len: int = 0
    total_len: int = 0               # original columns seen so far (prefill + decoded)
    cols: torch.Tensor | None = None     # (B, Lc) live original columns during prefill
    visual: torch.Tensor | None = None   # (B, Lc) live image-token mask during prefill
    layer_cols: dict[int, torch.Tensor] = field(default_factory=dict)  # KV layout of pruned layers
    pending_scores: torch.Tensor | None = None
    counts: list[int] = field(default_factory=list)
    gathered: dict[str, Any] = field(default_factory=dict)
    pruning_started: bool = False
    decode_q: int = 0                # tokens in the current cached step; 0 while prefilling


@dataclass(frozen=True)
class PrefillSnapshot:
    """Runtime state between two layers of a pruned prefill (see `PruningHandle.snapshot`)."""

    cols: torch.Tensor
    visual: torch.Tensor
    counts: tuple[int, ...]
    pending_scores: torch.Tensor | None
    pruning_started: bool


class PruningHandle:
    """Live hooks of one applied plan. Use as a context manager or call `remove()`."""

    def __init__(self, model: nn.Module, plan: PruningPlan, adapter: ModelAdapter | None = None,
                 score_ahead: bool = False) -> None:
        self.model = model
        #: With a "previous"-layer rule, score at every layer even when the next one keeps all, so a
        #: snapshot between any two layers can resume under another schedule (used by searches).
        self.score_ahead = score_ahead
        self.plan = plan
        self.adapter = adapter or get_adapter(model)
        impl = getattr(self.adapter.text_config, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise PruningError(
                f"attention implementation {impl!r} is not supported by the pruning runtime; "
                f"use one of {', '.join(SUPPORTED_ATTENTION)}"
            )
        self.attn_impl = impl
        layers = list(self.adapter.decoder_layers())
        if len(plan.counts) != len(layers):
            raise PruningError(f"plan has {len(plan.counts)} layers, the model has {len(layers)}")
        #: Columns >= prompt_len are treated as generated, not prompt (None = the whole input).
        #: Set it when re-forwarding prompt + generated tokens so scores match the cached run.
        self.prompt_len: int | None = None
        #: Visual tokens entering each layer in the last pruned prefill.
        self.last_counts: list[int] = []
        self._state: _Forward | None = None
        self._vision: VisionStage | None = None
        self._cache_arg = cache_argument(model)
        self._hooks = [model.register_forward_pre_hook(self._top_hook, with_kwargs=True)]
        for idx, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(idx), with_kwargs=True))
        if plan.vision is not None:
            try:
                self._vision = VisionStage(self.adapter, plan.vision, plan.vision_layer,
                                           lambda n: plan.counts_for(n)[0])
            except ValueError:
                self.remove()
                raise

    # -- lifecycle -------------------------------------------------------------------------------
    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._vision is not None:
            self._vision.remove()
        self._state = None

    def __enter__(self) -> "PruningHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- top-level hook --------------------------------------------------------------------------
    def _top_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        has_image = input_ids is not None and bool((input_ids == self.adapter.image_token_id).any())
        if self._vision is not None and kwargs.get("pixel_values") is not None:
            self._vision.forget()  # this forward encodes its images itself
        if past == 0:
            self._state = None
            if has_image and input_ids.shape[1] > 1:
                kwargs = self._start_prefill(input_ids, kwargs)
            return args, kwargs
        state = self._state
        if state is None or state.cache is None or state.cache() is not cache:
            if state is not None and cache is not None:
                raise PruningError("this KV cache was not filled by the current pruned prefill; re-run the prompt")
            return args, kwargs
        if has_image:
            raise PruningError("continuing a pruned KV cache with a new image is not supported")
        return args, self._start_decode(input_ids, kwargs)

    def _start_prefill(self, input_ids: torch.Tensor, kwargs: dict) -> dict:
        if kwargs.get("labels") is not None:
            raise PruningError("labels are not supported while pruning: the sequence gets shorter")
        state = self.begin_prefill(input_ids, kwargs.get("attention_mask"))
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.adapter.text_config, "use_cache", True)
        cache = _cache_of(kwargs)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.adapter.text_config)
            kwargs = {**kwargs, self._cache_arg: cache}
        if cache is not None:
            state.cache = weakref.ref(cache)
        return kwargs

    def begin_prefill(self, input_ids: torch.Tensor, attn2d: torch.Tensor | None) -> _Forward:
        """Set up the state for a prefill of `input_ids`; the layer hooks then prune as they run."""
        if attn2d is not None and attn2d.ndim != 2:
            raise PruningError("the pruning runtime needs a 2-D attention mask (or none)")
        visual = input_ids == self.adapter.image_token_id
        per_row = visual.sum(dim=1)
        if bool((per_row != per_row[0]).any()):
            raise PruningError("all rows of a batch must have the same number of image tokens; batch them separately")
        length = input_ids.shape[1]
        prompt_end = min(self.prompt_len or length, length)
        valid = attn2d.bool() if attn2d is not None else torch.ones_like(visual)
        row_keys = [
            int.from_bytes(hashlib.sha256(ids[ok[:prompt_end]].cpu().numpy().tobytes()).digest()[:8], "little")
            for ids, ok in zip(input_ids[:, :prompt_end], valid[:, :prompt_end])
        ]
        self._state = _Forward(
            attn2d=attn2d,
            visual0=visual,
            prompt_end=prompt_end,
            row_keys=row_keys,
            targets=self.plan.counts_for(int(per_row[0])),
            prefill_len=length,
            total_len=length,
        )
        return self._state

    def snapshot(self) -> PrefillSnapshot:
        """The prefill state after the layers run so far, to resume a schedule that shares them."""
        state = self._state
        assert state is not None and state.cols is not None and state.visual is not None
        return PrefillSnapshot(state.cols, state.visual, tuple(state.counts), state.pending_scores,
                               state.pruning_started)

    def resume(self, snap: PrefillSnapshot) -> None:
        """Continue a prefill begun with `begin_prefill` from the layer after `snap` was taken."""
        state = self._state
        assert state is not None
        if tuple(state.targets[: len(snap.counts)]) != snap.counts:
            raise PruningError("snapshot was taken under a schedule with another prefix")
        state.cols, state.visual, state.counts = snap.cols, snap.visual, list(snap.counts)
        state.pending_scores, state.pruning_started = snap.pending_scores, snap.pruning_started
        state.gathered.clear()

    def _start_decode(self, input_ids: torch.Tensor | None, kwargs: dict) -> dict:
        state = self._state
        assert state is not None
        q = input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1]
        attn2d = kwargs.get("attention_mask")
        if attn2d is None:
            attn2d = torch.ones(state.visual0.shape[0], state.total_len + q, dtype=torch.long,
                                device=state.visual0.device)
        if attn2d.shape[1] != state.total_len + q:
            raise PruningError(
                f"attention mask covers {attn2d.shape[1]} tokens, expected {state.total_len + q} "
                "(prompt + generated so far)"
            )
        state.attn2d = attn2d
        if kwargs.get("position_ids") is None:
            # The model would count positions from the cache length of layer 0, which pruning shortened.
            text_pos = (attn2d.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
            kwargs = {**kwargs, "position_ids": self.adapter.decode_position_ids(text_pos)}
        state.decode_q = q
        state.total_len += q
        return kwargs

    # -- per-layer hook --------------------------------------------------------------------------
    def _layer_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self._state
            if state is None:
                return None
            if state.decode_q:
                return self._decode_layer(idx, args, kwargs)
            return self._prefill_layer(idx, module, args, kwargs)

        return hook

    def _prefill_layer(self, idx: int, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state = self._state
        assert state is not None
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, length = hidden.shape[:2]
        if state.cols is None:
            state.cols = torch.arange(length, device=hidden.device).expand(batch, -1)
            state.visual = state.visual0
        cos, sin = self._gathered_rope(kwargs["position_embeddings"], state, batch)
        target = state.targets[idx]
        live = int(state.visual[0].sum())
        choice = self._choice(idx, layer, hidden, cos, sin, target, live)
        if choice is not None:
            hidden = self._apply(hidden, choice)
            state.gathered.clear()
            cos, sin = self._gathered_rope(kwargs["position_embeddings"], state, batch)
            state.pruning_started = True
        state.pending_scores = None
        live = int(state.visual[0].sum())
        state.counts.append(live)
        nxt = idx + 1
        if (
            self.plan.score_layer == "previous"
            and nxt < len(state.targets)
            and (state.targets[nxt] < live or (self.score_ahead and live > 0))
        ):
            assert isinstance(self.plan.rule, ScoringRule)
            state.pending_scores = self.plan.rule.score(self._context(idx, layer, hidden, cos, sin))
        if nxt == len(state.targets):
            self.last_counts = list(state.counts)
        if not state.pruning_started:
            return args, kwargs
        state.layer_cols[idx] = state.cols
        kwargs = dict(kwargs)
        kwargs["position_embeddings"] = (cos, sin)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = self._gather_positions(kwargs["position_ids"], state)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = self._mask(kwargs["attention_mask"], state, state.cols, state.cols)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _choice(self, idx: int, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                target: int, live: int) -> Choice | None:
        """What survives entering layer `idx`: the vision stage's pick at layer 0, else the rule's, if any drop."""
        state = self._state
        assert state is not None
        if self._vision is not None and idx == 0:
            kept = self._vision.take()
            if kept is None and target < live:
                raise PruningError("the vision stage did not run for this prefill: pass the image's pixel_values")
            if kept is not None:
                if hidden.shape[0] % kept.shape[0]:
                    raise PruningError("the vision stage saw a batch that does not match this prefill")
                return Choice(kept.repeat_interleave(hidden.shape[0] // kept.shape[0], dim=0))
        if target >= live:
            return None
        if state.pending_scores is not None:
            return Choice.top(state.pending_scores, target)
        return self.plan.rule.select(self._context(idx, layer, hidden, cos, sin), target)

    def _context(self, idx: int, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> ScoreContext:
        state = self._state
        assert state is not None and state.cols is not None and state.visual is not None
        key_ok = (
            state.attn2d.bool().gather(1, state.cols) if state.attn2d is not None
            else torch.ones_like(state.visual)
        )
        return ScoreContext(
            adapter=self.adapter, layer=layer, layer_idx=idx, hidden=hidden, cos=cos, sin=sin,
            cols=state.cols, visual=state.visual, key_ok=key_ok, prompt_end=state.prompt_end,
            row_keys=state.row_keys,
        )

    def _apply(self, hidden: torch.Tensor, choice: Choice) -> torch.Tensor:
        """Keep text and the chosen visual tokens of every row in their original order; merge if asked."""
        state = self._state
        assert state is not None and state.cols is not None and state.visual is not None
        visual = state.visual
        width = hidden.shape[-1]
        vis_pos = visual.nonzero()[:, 1].view(visual.shape[0], -1)
        keep = (~visual).scatter(1, vis_pos.gather(1, choice.keep), True)
        positions = keep.nonzero()[:, 1].view(keep.shape[0], -1)
        state.cols = state.cols.gather(1, positions)
        state.visual = visual.gather(1, positions)
        out = hidden.gather(1, positions[..., None].expand(-1, -1, width))
        if choice.merge is None:
            return out
        merged = choice.merge @ hidden.gather(1, vis_pos[..., None].expand(-1, -1, width)).float()
        new_pos = state.visual.nonzero()[:, 1].view(visual.shape[0], -1)
        return out.scatter(1, new_pos[..., None].expand(-1, -1, width), merged.to(hidden.dtype))

    def _gathered_rope(self, rope: tuple[torch.Tensor, torch.Tensor], state: _Forward,
                       batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if "rope" not in state.gathered:
            assert state.cols is not None
            cos, sin = rope
            index = state.cols[..., None].expand(-1, -1, cos.shape[-1])
            state.gathered["rope"] = tuple(t.expand(batch, -1, -1).gather(1, index) for t in (cos, sin))
        return state.gathered["rope"]

    @staticmethod
    def _gather_positions(position_ids: torch.Tensor, state: _Forward) -> torch.Tensor:
        assert state.cols is not None
        lead = position_ids.shape[:-2]
        expanded = position_ids.expand(*lead, state.cols.shape[0], position_ids.shape[-1])
        return expanded.gather(-1, state.cols.expand(*lead, *state.cols.shape))

    def _mask(self, like: torch.Tensor | None, state: _Forward, q_cols: torch.Tensor,
              kv_cols: torch.Tensor) -> torch.Tensor:
        """The 4-D mask for queries at `q_cols` over keys at `kv_cols`, in the backend's format."""
        batch = q_cols.shape[0]
        pad_ok = (
            state.attn2d.bool().gather(1, kv_cols) if state.attn2d is not None
            else torch.ones_like(kv_cols, dtype=torch.bool)
        )
        allowed = pad_ok[:, None, :] & (kv_cols[:, None, :] <= q_cols[:, :, None])
        allowed = allowed[:, None].expand(batch, 1, q_cols.shape[1], kv_cols.shape[1])
        bool_mask = like.dtype == torch.bool if like is not None else self.attn_impl == "sdpa"
        if bool_mask:
            return allowed
        dtype = like.dtype if like is not None else self.adapter.decoder().dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def _decode_layer(self, idx: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._state
        assert state is not None
        kept = state.layer_cols.get(idx)
        q = state.decode_q
        like = kwargs.get("attention_mask")
        if kept is None or (like is None and q == 1):
            return None
        batch = kept.shape[0]
        new = torch.arange(state.prefill_len, state.total_len, device=kept.device).expand(batch, -1)
        q_cols = new[:, -q:]
        return args, {**kwargs, "attention_mask": self._mask(like, state, q_cols, torch.cat([kept, new], dim=1))}


def cache_argument(model: nn.Module) -> str:
    """Name of the KV-cache argument of `model.forward()`.

    transformers 5.24 renamed it from `past_key_values` to `cache` (the old name still works there,
    with a warning); the runtime reads either and passes the model's own.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(kwargs: dict) -> Any:
    """The KV cache a forward() call was given, under its transformers >= 5.24 or older name."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")
