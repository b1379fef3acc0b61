"""Attach a pruning plan to an unmodified transformers model through one set of hooks.

Nothing in the model is patched. A hook on the top model notes each forward's visual tokens,
their images, padding and prompt; a hook on every decoder layer drops visual tokens at the
scheduled layers (merging rules, or a plan's merge threshold, also rewrite the survivors' hidden
states) and re-indexes what
the model loop keeps passing at full length (rotary tables, position ids, the layer's own mask).
Everything family-specific (how a layer is called, its score math, its window, extra prefill
hooks) comes from the model's adapter.

Rows of a batch may keep different numbers of tokens (images of other sizes, several images per
prompt): shorter rows are then left-padded with slots that no query attends to. Each image keeps
its own share of the schedule (`per-image`, the default) or all images of a prompt compete for
one pool (`pooled`). Survivors keep their original RoPE positions. Prefill masks are the model's
own masks gathered at the surviving positions, so causal, padding, sliding-window and
bidirectional-image structure carry over exactly; during cached decoding each layer's mask is
rebuilt for that layer's own KV layout (including a sliding-window cache's cropping). `remove()`
detaches every hook and leaves the model exactly as it was.

A plan with a merge threshold also tracks how many original tokens each slot stands for (its
mass); every mask from the first merge on is then an additive float mask carrying log(mass) on
each key (proportional attention), in prefill and in every cached decoding step.
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
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..hooks import CallHook, HookSet, ModelHook
from ..models import LayerCall, LiveTokens, ModelAdapter, get_adapter
from .plan import PruningPlan
from .selection import Choice, ProjectionReuse, ScoreContext, ScoringRule
from .vision import VisionStage


def attention_refusal(impl: str) -> str | None:
    """Why the runtime cannot prune under attention implementation `impl` (None: it can).

    Judged by the functions transformers runs for it, not by its name: an implementation registered
    under another name that runs the sdpa or eager attention with their tensor masks is accepted."""
    if impl == "eager":
        return None
    fn = ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS.valid_keys() else None
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[impl] if impl in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys() else None
    name = getattr(fn, "__name__", "")
    if fn is sdpa_attention_forward and mask_fn in (sdpa_mask, eager_mask):
        return None
    if impl.startswith("paged|") or "paged" in name:
        why = ("it is transformers' continuous-batching path (generate_batch over a paged KV cache), whose "
               "cache blocks and per-request lengths the runtime cannot re-index")
    elif name == "flex_attention_forward":
        why = ("each layer gets a compiled BlockMask the runtime cannot gather to the surviving tokens, and every "
               "pruned sequence length recompiles the kernel (25-40 s per shape on a CPU)")
    elif "flash" in name:
        why = ("flash-attn kernels run only on a CUDA GPU and take a 2-D padding mask (or none) instead of the "
               "per-layer 4-D mask the runtime gathers to the surviving tokens")
    else:
        why = (f"it runs {getattr(fn, '__module__', '?')}.{name or '?'}, not the sdpa or eager attention whose "
               "tensor masks the runtime re-indexes")
    return f"attention implementation {impl!r} cannot be pruned: {why}; load the model with 'sdpa' or 'eager'"


#: model -> its live handle: two plans on one model would prune twice.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, PruningHandle]" = weakref.WeakKeyDictionary()


class PruningError(RuntimeError):
    pass


@dataclass
class _Forward:
    """Per-prefill state, kept for the cached decode steps that follow it."""

    attn2d: torch.Tensor | None      # (B, T) original padding mask, extended as tokens arrive
    visual0: torch.Tensor            # (B, T0) visual-token mask of the prompt
    unit0: torch.Tensor              # (B, T0) selection unit (image, or the row's pool) of each visual token
    image0: torch.Tensor             # (B, T0) image of each visual token (-1 elsewhere), whatever the policy
    targets: dict[tuple[int, int], list[int]]   # (row, unit) -> visual tokens kept entering each layer
    prompt_end: int
    row_keys: list[int] | None       # per-row prompt hashes for seeded rules, computed when first needed
    input_ids: torch.Tensor | None = None
    cache: Any = None                # weakref to the KV cache this prefill filled
    prefill_len: int = 0
    total_len: int = 0               # original columns seen so far (prefill + decoded)
    cols: torch.Tensor | None = None     # (B, Lc) live original columns, -1 on padding slots
    visual: torch.Tensor | None = None   # (B, Lc) live visual-token mask
    unit: torch.Tensor | None = None     # (B, Lc) live unit ids, -1 off visual tokens
    layout: int = 0                  # bumped at every drop: keys the gathered tensors
    live: dict[tuple[int, int], int] = field(default_factory=dict)  # (row, unit) -> live visual tokens now
    next_active: int = 0             # first layer from here on that drops or scores (layers before it only pass)
    prefill_cols: dict[int, torch.Tensor | None] = field(default_factory=dict)  # cols each layer ran with
    layer_cols: dict[int, torch.Tensor] = field(default_factory=dict)  # each layer's KV slots
    step_kv: dict[int, torch.Tensor] = field(default_factory=dict)     # keys of the current decode step
    step: int = 0                    # decode steps begun
    kv_groups: dict[Any, "_KVGroup"] = field(default_factory=dict)    # layers sharing one KV layout
    layer_group: dict[int, "_KVGroup"] = field(default_factory=dict)
    pending_scores: torch.Tensor | None = None  # (B, Lc) previous-layer scores of the live slots
    mass: torch.Tensor | None = None     # (B, Lc) original tokens each live slot stands for; None: all 1
    prefill_mass: dict[int, torch.Tensor | None] = field(default_factory=dict)  # mass each layer's KV slots had
    counts: list[int] = field(default_factory=list)
    gathered: dict[Any, Any] = field(default_factory=dict)
    pruning_started: bool = False
    decode_q: int = 0                # tokens in the current cached step; 0 while prefilling


@dataclass
class _KVGroup:
    """Decoder layers whose KV caches hold the same slots (same prefill layout, same window): their
    decode masks are one mask, rebuilt once per step."""

    cols: torch.Tensor               # (B, Lk) original column of each cached slot, -1 on padding slots
    crop: int | None                 # a sliding-window cache keeps its last `crop` slots after storing
    window: int | None               # the layers' attention window
    step: int = -1
    kv: torch.Tensor | None = None   # slots attended in the current step (cached + new)
    new: torch.Tensor | None = None  # the current step's query columns
    masks: dict[Any, torch.Tensor] = field(default_factory=dict)   # per mask dtype, current step
    mass: torch.Tensor | None = None     # (B, Lk) original tokens each cached slot stands for; None: all 1
    kv_mass: torch.Tensor | None = None  # the same for the slots attended in the current step


@dataclass(frozen=True)
class PrefillSnapshot:
    """Runtime state between two layers of a pruned prefill (see `PruningHandle.snapshot`)."""

    cols: torch.Tensor
    visual: torch.Tensor
    unit: torch.Tensor
    layout: int
    counts: tuple[int, ...]
    pending_scores: torch.Tensor | None
    pruning_started: bool
    mass: torch.Tensor | None = None


class PruningHandle:
    """Live hooks of one applied plan. Use as a context manager or call `remove()`."""

    def __init__(self, model: nn.Module, plan: PruningPlan, adapter: ModelAdapter | None = None,
                 score_ahead: bool = False) -> None:
        if model in _ATTACHED:
            raise PruningError("a pruning plan is already applied to this model; remove() it (or leave its "
                               "`with` block) before applying another")
        self.model = model
        self.removed = False
        #: With a "previous"-layer rule, score at every layer even when the next one keeps all, so a
        #: snapshot between any two layers can resume under another schedule (used by searches).
        self.score_ahead = score_ahead
        self.plan = plan
        self.adapter = adapter or get_adapter(model)
        impl = getattr(self.adapter.text_config, "_attn_implementation", None) or "eager"
        refusal = attention_refusal(impl)
        if refusal is not None:
            raise PruningError(refusal)
        # the mask format the layers take: boolean for sdpa's mask function, additive float for eager's
        masks = ALL_MASK_ATTENTION_FUNCTIONS[impl] if impl in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys() else None
        self.attn_impl = "sdpa" if masks is sdpa_mask else "eager"
        layers = list(self.adapter.decoder_layers())
        if len(plan.counts) != len(layers):
            raise PruningError(f"plan has {len(plan.counts)} layers, the model has {len(layers)}")
        #: Columns >= prompt_len are treated as generated, not prompt (None = the whole input).
        #: Set it when re-forwarding prompt + generated tokens so scores match the cached run.
        self.prompt_len: int | None = None
        #: Visual tokens entering each layer in the last pruned prefill (summed over the batch's
        #: first row: its images, or its pool).
        self.last_counts: list[int] = []
        self._state: _Forward | None = None
        self._vision: VisionStage | None = None
        self._cache_arg = cache_argument(model)
        self._prefill_hooks: list[tuple[nn.Module, ModelHook]] = []
        self._layers = len(layers)
        self._reuse = ProjectionReuse()  # a cut layer's q/k projections: computed for scoring, reused by the layer
        #: A plan that keeps every token of every image (and scores nothing ahead) never touches a
        #: layer: only the top hook runs, to refuse what pruning refuses and to report the counts.
        self._keeps_all = (plan.vision is None and not score_ahead
                           and all(c == plan.visual_tokens for c in plan.counts))
        self.hooks = HookSet()
        _ATTACHED[model] = self
        try:
            self.hooks.add(model, CallHook(self._top_hook))
            for idx, layer in enumerate(layers if not self._keeps_all else ()):
                self.hooks.add(layer, CallHook(self._layer_hook(idx)))
            self._prefill_hooks = self.adapter.prefill_hooks(self._live)
            for module, hook in self._prefill_hooks:
                self.hooks.add(module, hook)
            if plan.vision is not None:
                self._vision = VisionStage(self.adapter, plan.vision, plan.vision_layer,
                                           lambda n: plan.counts_for(n)[0], self.hooks)
        except BaseException:
            self.remove()  # nothing half-attached stays behind
            raise

    # -- lifecycle -------------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach every hook; the model is exactly as before. Removing twice is harmless."""
        self.hooks.remove()
        self._reuse.disarm()
        self._state = None
        self.removed = True
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]

    def _check_live(self) -> None:
        if self.removed:
            raise PruningError("this pruning handle was removed; apply the plan again to prune")

    def __enter__(self) -> "PruningHandle":
        self._check_live()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _live(self) -> LiveTokens | None:
        state = self._state
        if state is None or state.decode_q or state.cols is None:
            return None
        return LiveTokens(state.cols, state.visual0)

    # -- top-level hook --------------------------------------------------------------------------
    def _top_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._reuse.armed:
            self._reuse.disarm()  # left over from a forward that failed
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        has_image = input_ids is not None and bool(self.adapter.visual_mask(input_ids).any())
        if self._vision is not None and kwargs.get("pixel_values") is not None:
            self._vision.forget()  # this forward encodes its images itself
        if past == 0:
            self._state = None
            if has_image and input_ids.shape[1] > 1:
                if self._keeps_all:
                    self._keep_all_prefill(input_ids, kwargs)
                    return None
                kwargs = self._start_prefill(input_ids, kwargs)
            return args, kwargs
        state = self._state
        if state is None or state.cache is None or state.cache() is not cache:
            if state is not None and cache is not None:
                raise PruningError("this KV cache was not filled by the current pruned prefill; re-run the prompt")
            return args, kwargs
        if any(v is not None for k, v in kwargs.items() if k.startswith("pixel_values")):
            raise PruningError("continuing a pruned KV cache with a new image is not supported")
        return args, self._start_decode(input_ids, kwargs)

    def _keep_all_prefill(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        """A prefill under a plan that drops nothing: the model runs untouched; only the counts are noted."""
        self._check_live()
        if kwargs.get("labels") is not None:
            raise PruningError("labels are not supported while pruning: the sequence gets shorter")
        prompt_end = min(self.prompt_len or input_ids.shape[1], input_ids.shape[1])
        self.last_counts = [int(self.adapter.visual_mask(input_ids[:1, :prompt_end]).sum())] * self._layers

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
        self._check_live()
        if attn2d is not None and attn2d.ndim != 2:
            raise PruningError("the pruning runtime needs a 2-D attention mask (or none)")
        length = input_ids.shape[1]
        prompt_end = min(self.prompt_len or length, length)
        in_prompt = torch.arange(length, device=input_ids.device)[None, :] < prompt_end
        visual = self.adapter.visual_mask(input_ids) & in_prompt  # a generated id is never a placeholder
        image = torch.where(visual, self.adapter.visual_groups(input_ids), -1)
        unit = image if self.plan.images == "per-image" else torch.where(visual, 0, -1)
        live = _unit_sizes(unit)
        targets = {key: self.plan.counts_for(n) for key, n in live.items()}
        batch = input_ids.shape[0]
        state = _Forward(attn2d=attn2d, visual0=visual, unit0=unit, image0=image, targets=targets,
                         prompt_end=prompt_end, row_keys=None, input_ids=input_ids, prefill_len=length,
                         total_len=length,
                         cols=torch.arange(length, device=input_ids.device).expand(batch, -1),
                         visual=visual, unit=unit, live=live)
        self._state = state
        state.next_active = self._next_active(0)
        return state

    def _row_keys(self, state: _Forward) -> list[int]:
        """A stable identity of each row's prompt (its non-padding ids), for seeded rules."""
        if state.row_keys is None:
            assert state.input_ids is not None
            ids = state.input_ids[:, :state.prompt_end]
            valid = (state.attn2d.bool() if state.attn2d is not None else torch.ones_like(ids, dtype=torch.bool))
            state.row_keys = [
                int.from_bytes(hashlib.sha256(row[ok[:state.prompt_end]].cpu().numpy().tobytes()).digest()[:8],
                               "little")
                for row, ok in zip(ids, valid[:, :state.prompt_end])
            ]
        return state.row_keys

    def _drops_at(self, state: _Forward, idx: int) -> bool:
        """Whether some unit's target entering layer `idx` is below its live count now."""
        return any(t[idx] < state.live.get(key, 0) for key, t in state.targets.items())

    def _next_active(self, start: int) -> int:
        """The first layer >= `start` that has work: a drop, a score for the next layer's drop, the vision
        stage's survivors at layer 0, or (score_ahead) any scoring. Valid until the next drop."""
        state = self._state
        assert state is not None
        for idx in range(start, self._layers):
            if self.score_ahead or (idx == 0 and self._vision is not None) or self._drops_at(state, idx):
                return idx
            if self.plan.score_layer == "previous" and idx + 1 < self._layers and self._drops_at(state, idx + 1):
                return idx
        return self._layers

    def enter_decoder(self, args: tuple, kwargs: dict) -> None:
        """Run the family's decoder-level prefill hooks on a recorded decoder call, for callers that
        then run the decoder layers one by one (the schedule scorer) instead of the decoder itself."""
        decoder = self.adapter.decoder()
        for module, hook in self._prefill_hooks:
            if module is decoder:
                hook.pre_forward(decoder, args, kwargs)

    def exit_decoder(self) -> None:
        """Counterpart of `enter_decoder`, once the layers have run."""
        decoder = self.adapter.decoder()
        for module, hook in self._prefill_hooks:
            if module is decoder:
                hook.post_forward(decoder, (), {}, None)

    def snapshot(self) -> PrefillSnapshot:
        """The prefill state after the layers run so far, to resume a schedule that shares them."""
        self._check_live()
        state = self._state
        assert state is not None and state.cols is not None and state.visual is not None and state.unit is not None
        return PrefillSnapshot(state.cols, state.visual, state.unit, state.layout, tuple(state.counts),
                               state.pending_scores, state.pruning_started, state.mass)

    def resume(self, snap: PrefillSnapshot) -> None:
        """Continue a prefill begun with `begin_prefill` from the layer after `snap` was taken."""
        state = self._state
        assert state is not None
        expected = [sum(t[i] for (r, _), t in state.targets.items() if r == 0) for i in range(len(snap.counts))]
        if expected != list(snap.counts):
            raise PruningError("snapshot was taken under a schedule with another prefix")
        state.cols, state.visual, state.unit, state.counts = snap.cols, snap.visual, snap.unit, list(snap.counts)
        state.layout = snap.layout + 1_000_000  # gathered tensors of another handle are not ours
        state.pending_scores, state.pruning_started, state.mass = snap.pending_scores, snap.pruning_started, snap.mass
        state.gathered.clear()
        state.live = _unit_sizes(state.unit)
        state.next_active = self._next_active(len(snap.counts))

    def _start_decode(self, input_ids: torch.Tensor | None, kwargs: dict) -> dict:
        state = self._state
        assert state is not None
        q = input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1]
        attn2d = kwargs.get("attention_mask")
        if attn2d is None:
            attn2d = torch.ones(state.visual0.shape[0], state.total_len + q, dtype=torch.long,
                                device=state.visual0.device)
        if attn2d.ndim != 2 or attn2d.shape[1] != state.total_len + q:
            raise PruningError(
                f"attention mask covers {attn2d.shape[-1]} tokens, expected {state.total_len + q} "
                "(prompt + generated so far)"
            )
        state.attn2d = attn2d
        if kwargs.get("position_ids") is None:
            # The model would count positions from the cache length of layer 0, which pruning shortened.
            text_pos = (attn2d.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
            kwargs = {**kwargs, "position_ids": self.adapter.decode_position_ids(text_pos)}
        state.decode_q = q
        state.total_len += q
        state.step += 1
        return kwargs

    # -- per-layer hook --------------------------------------------------------------------------
    def _layer_hook(self, idx: int):
        last = self._layers - 1

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self._state
            if state is None:
                return None
            if self._reuse.armed:
                self._reuse.disarm()  # the previous layer did not call its projections as expected
            if state.decode_q:
                return self._decode_layer(idx, args, kwargs)
            if idx >= state.next_active:
                return self._prefill_layer(idx, module, args, kwargs)
            # nothing drops or scores here: note what the layer sees, re-index its call if needed
            state.counts.append(sum(n for (r, _), n in state.live.items() if r == 0))
            self._note_kv_slots(state, idx)
            if idx == last:
                self.last_counts = list(state.counts)
            if not state.pruning_started:
                return None
            call = self.adapter.read_layer_call(args, kwargs)
            return self.adapter.write_layer_call(args, kwargs, self._gathered_call(call, call.hidden))

        return hook

    def _prefill_layer(self, idx: int, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state = self._state
        assert state is not None
        call = self.adapter.read_layer_call(args, kwargs)
        hidden = call.hidden
        keep = self._keep(idx, layer, call)
        if keep is not None:
            hidden, order, rewritten = self._compact(hidden, *keep)
            state.pruning_started = True
            state.live = _unit_sizes(state.unit)
            if self._reuse.noted and not rewritten:
                self._reuse.arm(order)  # merged survivors have new states: nothing to reuse then
        self._reuse.noted.clear()
        state.pending_scores = None
        state.counts.append(sum(n for (r, _), n in state.live.items() if r == 0))
        live_call = self._gathered_call(call, hidden) if state.pruning_started else None
        nxt = idx + 1
        if self.plan.score_layer == "previous" and nxt < self._layers and self._scores_next(nxt):
            score_call = live_call if live_call is not None else self._unpruned_call(call)
            with self._reuse.noting(layer):
                state.pending_scores = self._score_slots(self._context(idx, layer, score_call))
            self._reuse.arm(None)  # the layer runs on exactly these slots
        if nxt == self._layers:
            self.last_counts = list(state.counts)
        self._note_kv_slots(state, idx)
        state.next_active = self._next_active(nxt)
        if live_call is None:
            return args, kwargs
        return self.adapter.write_layer_call(args, kwargs, live_call)

    @staticmethod
    def _note_kv_slots(state: _Forward, idx: int) -> None:
        """Remember which slots (and their mass) layer `idx` stores in its KV cache, for decoding."""
        state.prefill_cols[idx] = state.cols if state.pruning_started else None
        state.prefill_mass[idx] = state.mass if state.pruning_started else None

    def _unpruned_call(self, call: LayerCall) -> LayerCall:
        """`call` as the scoring context reads it before anything was dropped: the model's own tensors,
        broadcast to the batch (the live slots are the original columns, so nothing is gathered)."""
        batch = call.hidden.shape[0]
        rope = None if call.rope is None else tuple(t.expand(batch, -1, -1) for t in call.rope)
        mask = None if call.mask is None else call.mask.expand(batch, -1, -1, -1)
        return LayerCall(call.hidden, rope, call.position_ids, mask)

    def _scores_next(self, nxt: int) -> bool:
        state = self._state
        assert state is not None and state.unit is not None
        if self.score_ahead and any(state.live.values()):
            return True
        return self._drops_at(state, nxt)

    def _unit_live(self, row: int, unit: int) -> int:
        state = self._state
        assert state is not None
        return state.live.get((row, unit), 0)

    def _keep(self, idx: int, layer: nn.Module, call: LayerCall) -> tuple[torch.Tensor, list | None] | None:
        """(B, Lc) slots that survive entering layer `idx` and the rule's merges to apply (None: the
        dropped slots hold nothing to merge), or None if nothing drops."""
        state = self._state
        assert state is not None and state.unit is not None and state.visual is not None
        if self._vision is not None and idx == 0:
            kept = self._vision.take()
            if kept is not None:
                return self._vision_keep(kept)
            if any(t[0] < self._unit_live(r, u) for (r, u), t in state.targets.items()):
                raise PruningError("the vision stage did not run for this prefill: pass the image's pixel_values")
        todo = [(r, u, t[idx]) for (r, u), t in state.targets.items() if t[idx] < self._unit_live(r, u)]
        if not todo:
            return None
        keep = state.cols >= 0
        merges: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        if state.pending_scores is not None:
            for r, u, k in todo:
                slots = (state.unit[r] == u).nonzero()[:, 0]
                self._drop(keep, r, slots, Choice.top(state.pending_scores[r, slots][None], k))
            return keep, merges
        live_call = self._gathered_call(call, call.hidden) if state.pruning_started else self._unpruned_call(call)
        ctx = self._context(idx, layer, live_call)
        rows_units = {r for r, _, _ in todo}
        with self._reuse.noting(layer):
            if len(todo) == ctx.hidden.shape[0] == len(rows_units) and len({k for *_, k in todo}) == 1 \
                    and len(state.targets) == len(todo) and len({self._unit_live(r, u) for r, u, _ in todo}) == 1:
                # every row is one unit with the same live count and target: one batched call
                choice = self.plan.rule.select(ctx, todo[0][2])
                for r, _, _ in todo:
                    slots = state.visual[r].nonzero()[:, 0]
                    self._drop(keep, r, slots, _row(choice, r), merges)
                return keep, merges
            for r, u, k in todo:
                sub = ctx.unit_context(r, state.unit[r:r + 1] == u)
                slots = (state.unit[r] == u).nonzero()[:, 0]
                self._drop(keep, r, slots, self.plan.rule.select(sub, k), merges)
        return keep, merges

    def _vision_keep(self, kept: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Layer-0 survivors from the vision stage's patch choice (one row of `kept` per image, in
        prompt order, whatever the policy: the tower sees each image alone)."""
        state = self._state
        assert state is not None and state.cols is not None
        image = torch.where(state.cols >= 0, state.image0.gather(1, state.cols.clamp(min=0)), -1)
        images = [(r, int(g)) for r in range(image.shape[0]) for g in image[r][image[r] >= 0].unique().tolist()]
        if kept.shape[0] != len(images):
            if not images or len(images) % kept.shape[0]:
                raise PruningError("the vision stage saw a batch that does not match this prefill")
            kept = kept.repeat_interleave(len(images) // kept.shape[0], dim=0)
        keep = state.cols >= 0
        for i, (r, g) in enumerate(images):
            slots = (image[r] == g).nonzero()[:, 0]
            if slots.numel() != self._vision.layout.patches:
                raise PruningError("vision-side selection needs every image to give the tower's patch count")
            self._drop(keep, r, slots, Choice(kept[i:i + 1]))
        return keep, None  # the tower never encoded the others: nothing to merge

    @staticmethod
    def _drop(keep: torch.Tensor, row: int, slots: torch.Tensor, choice: Choice,
              merges: list | None = None) -> None:
        """Mark the unit's `slots` of `row` dropped except the chosen ones; queue the merge if any."""
        keep[row, slots] = False
        survivors = slots[choice.keep[0]]
        keep[row, survivors] = True
        if choice.merge is not None and merges is not None:
            merges.append((row, survivors, slots, choice.merge[0]))

    def _compact(self, hidden: torch.Tensor, keep: torch.Tensor,
                 merges: list | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Keep the surviving slots of every row in order, left-padding shorter rows; apply merges.
        Returns the new hidden states, for each new slot the old slot it came from, and whether any
        survivor's state was rewritten (by the rule's merges or the plan's merge threshold)."""
        state = self._state
        assert state is not None and state.cols is not None and state.visual is not None and state.unit is not None
        given = hidden
        if merges:
            hidden = hidden.clone()
            for row, survivors, slots, weights in merges:
                hidden[row, survivors] = (weights @ hidden[row, slots].float()).to(hidden.dtype)
        elif merges is not None and self.plan.merge_threshold is not None:
            hidden = self._merge_similar(hidden, keep, self.plan.merge_threshold)
        width = int(keep.sum(dim=1).max())
        order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, -width:]
        real = keep.gather(1, order)
        state.cols = torch.where(real, state.cols.gather(1, order), -1)
        state.visual = state.visual.gather(1, order) & real
        state.unit = torch.where(real, state.unit.gather(1, order), -1)
        if state.mass is not None:
            state.mass = torch.where(real, state.mass.gather(1, order), 1.0)
        state.layout += 1
        state.gathered.clear()
        return hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1])), order, hidden is not given

    def _merge_similar(self, hidden: torch.Tensor, keep: torch.Tensor, threshold: float) -> torch.Tensor:
        """Merge each dropped visual slot into the most similar survivor of its unit when their cosine
        similarity reaches `threshold`: the survivor becomes the mass-weighted mean and adds the mass.
        Returns `hidden` itself when nothing merged, else a rewritten copy."""
        state = self._state
        assert state is not None and state.visual is not None and state.unit is not None
        mass = state.mass if state.mass is not None else torch.ones(keep.shape, device=hidden.device)
        out, new_mass, merged = hidden, mass.clone(), False
        for r in range(hidden.shape[0]):
            dropped = (state.visual[r] & ~keep[r]).nonzero()[:, 0]
            kept = (state.visual[r] & keep[r]).nonzero()[:, 0]
            if not len(dropped) or not len(kept):
                continue
            states = hidden[r].float()
            unit_hat = nn.functional.normalize(states, dim=-1)
            sim = unit_hat[dropped] @ unit_hat[kept].T
            sim.masked_fill_(state.unit[r, dropped][:, None] != state.unit[r, kept][None, :], float("-inf"))
            best, target = sim.max(dim=1)
            ok = best >= threshold
            if not bool(ok.any()):
                continue
            sources, target = dropped[ok], target[ok]
            total = states[kept] * mass[r, kept, None]
            total.index_add_(0, target, states[sources] * mass[r, sources, None])
            weight = mass[r, kept].index_add(0, target, mass[r, sources])
            if not merged:
                out, merged = hidden.clone(), True
            out[r, kept] = (total / weight[:, None]).to(hidden.dtype)
            new_mass[r, kept] = weight
        if merged:
            state.mass = new_mass
        return out

    # -- what the layer sees ---------------------------------------------------------------------
    def _gathered_call(self, call: LayerCall, hidden: torch.Tensor) -> LayerCall:
        """`call` with rotary tables, position ids and mask re-indexed to the live slots."""
        state = self._state
        assert state is not None and state.cols is not None
        sources = (call.rope[0] if call.rope is not None else None, call.position_ids, call.mask)
        key = ("call", *(id(t) for t in sources))
        hit = state.gathered.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], sources)):
            return LayerCall(hidden, *hit[1])  # layers between two drops share the model's tensors
        idx = state.cols.clamp(min=0)
        rope = None
        if call.rope is not None:
            index = idx[..., None].expand(-1, -1, call.rope[0].shape[-1])
            rope = tuple(t.expand(idx.shape[0], -1, -1).gather(1, index) for t in call.rope)
        positions = None
        if call.position_ids is not None:
            lead = call.position_ids.shape[:-2]
            expanded = call.position_ids.expand(*lead, idx.shape[0], call.position_ids.shape[-1])
            positions = expanded.gather(-1, idx.expand(*lead, *idx.shape))
        mask = self._prefill_mask(call.mask)
        # the sources are held with the result, so their ids cannot be reused while it is cached
        state.gathered[key] = (sources, (rope, positions, mask))
        return LayerCall(hidden, rope, positions, mask)

    def _prefill_mask(self, like: torch.Tensor | None) -> torch.Tensor | None:
        """The layer's own mask at the live slots; padding slots attend only to themselves."""
        state = self._state
        assert state is not None and state.cols is not None
        pads = state.cols < 0
        if like is None and state.mass is None and not bool(pads.any()):
            return None  # the backend's causal kernel is exact on an order-preserving subsequence
        key = ("mask", id(like))
        hit = state.gathered.get(key)
        if hit is not None and hit[0] is like:
            return hit[1]
        idx = state.cols.clamp(min=0)
        batch, width = idx.shape
        if like is None:
            allowed = self._allowed(state, idx, idx)[:, None]
            dtype = None
        else:
            m = like.expand(batch, -1, -1, -1)
            m = m.gather(2, idx[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
            m = m.gather(3, idx[:, None, None, :].expand(-1, m.shape[1], width, -1))
            allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
            dtype = like.dtype
        eye = torch.eye(width, dtype=torch.bool, device=idx.device)
        allowed = (allowed & ~pads[:, None, None, :]) | (eye & pads[:, None, :, None])
        mask = self._format(allowed, dtype, state.mass)
        state.gathered[key] = (like, mask)
        return mask

    def _allowed(self, state: _Forward, q_cols: torch.Tensor, kv_cols: torch.Tensor,
                 window: int | None = None) -> torch.Tensor:
        """(B, q, kv) causal, padding and window structure over original columns (-1: padding slot)."""
        kv = kv_cols.clamp(min=0)
        pad_ok = state.attn2d.bool().gather(1, kv) if state.attn2d is not None else torch.ones_like(kv, dtype=torch.bool)
        pad_ok = pad_ok & (kv_cols >= 0)
        allowed = pad_ok[:, None, :] & (kv_cols[:, None, :] <= q_cols[:, :, None])
        if window is not None:
            allowed = allowed & (q_cols[:, :, None] - kv_cols[:, None, :] < window)
        return allowed

    def _format(self, allowed: torch.Tensor, dtype: torch.dtype | None,
                mass: torch.Tensor | None = None) -> torch.Tensor:
        """A boolean (B, 1, q, kv) mask in the format of the model's own (bool, or additive float);
        with `mass` (B, kv), an additive float mask carrying log(mass) on every allowed key."""
        if mass is None and (dtype == torch.bool or (dtype is None and self.attn_impl == "sdpa")):
            return allowed
        if dtype is None or dtype == torch.bool:
            dtype = self.adapter.decoder().dtype
        bias = (torch.zeros((), dtype=dtype, device=allowed.device) if mass is None
                else mass.log().to(dtype)[:, None, None, :])
        return torch.where(allowed, bias, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device))

    def _context(self, idx: int, layer: nn.Module, call: LayerCall) -> ScoreContext:
        state = self._state
        assert state is not None and state.cols is not None and state.visual is not None
        kv = state.cols.clamp(min=0)
        key_ok = (state.attn2d.bool().gather(1, kv) if state.attn2d is not None
                  else torch.ones_like(state.visual)) & (state.cols >= 0)
        return ScoreContext(
            adapter=self.adapter, layer=layer, layer_idx=idx, hidden=call.hidden, rope=call.rope,
            cols=state.cols, visual=state.visual, all_visual=state.visual, key_ok=key_ok,
            prompt_end=state.prompt_end, row_keys=_LazyRowKeys(lambda: self._row_keys(state), state.cols.shape[0]),
            mask=call.mask, key_bias=None if state.mass is None else state.mass.log(),
        )

    def _score_slots(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, Lc) scores of every live visual slot by the plan's rule, per unit (-inf elsewhere)."""
        state = self._state
        assert state is not None and state.unit is not None
        rule = self.plan.rule
        assert isinstance(rule, ScoringRule)
        out = torch.full(state.cols.shape, float("-inf"), device=state.cols.device)
        per_row = state.visual.sum(dim=1)
        if bool((per_row == per_row[0]).all()) and per_row[0] > 0 and all(
                int(state.unit[r][state.visual[r]].unique().numel()) == 1 for r in range(out.shape[0])):
            return out.masked_scatter(state.visual, rule.score(ctx).float())
        for (r, u) in state.targets:
            unit = state.unit[r:r + 1] == u
            if bool(unit.any()):
                out[r:r + 1] = out[r:r + 1].masked_scatter(unit, rule.score(ctx.unit_context(r, unit)).float())
        return out

    # -- decoding --------------------------------------------------------------------------------
    def _decode_layer(self, idx: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._state
        assert state is not None
        if not state.pruning_started:
            return None
        group = state.layer_group.get(idx) or self._kv_group(idx)
        if group.step != state.step:  # first layer of this layout in this step: extend its slots once
            q = state.decode_q
            new = torch.arange(state.total_len - q, state.total_len, device=group.cols.device)
            new = new.expand(group.cols.shape[0], -1)
            group.kv = torch.cat([group.cols, new], dim=1)
            group.cols = group.kv if group.crop is None else group.kv[:, -group.crop:]
            if group.mass is not None:
                group.kv_mass = torch.cat([group.mass, torch.ones(new.shape, device=new.device)], dim=1)
                group.mass = group.kv_mass if group.crop is None else group.kv_mass[:, -group.crop:]
            group.step, group.new, group.masks = state.step, new, {}
        state.step_kv[idx] = group.kv
        state.layer_cols[idx] = group.cols
        call = self.adapter.read_layer_call(args, kwargs)
        like = call.mask
        dtype = like.dtype if like is not None else None
        mask = group.masks.get(dtype)
        if mask is None:
            allowed = self._allowed(state, group.new, group.kv, group.window)[:, None]
            mask = group.masks[dtype] = self._format(allowed, dtype, group.kv_mass)
        return self.adapter.write_layer_call(args, kwargs, LayerCall(call.hidden, call.rope, call.position_ids, mask))

    def _kv_group(self, idx: int) -> _KVGroup:
        """The KV group of layer `idx`, from the slots it stored at prefill (made at the first decode step)."""
        state = self._state
        assert state is not None
        cols = state.prefill_cols.get(idx)
        if cols is None:
            cols = torch.arange(state.prefill_len, device=state.visual0.device).expand(state.visual0.shape[0], -1)
        cache = state.cache() if state.cache is not None else None
        layers = getattr(cache, "layers", None)
        crop = None
        if layers is not None and idx < len(layers) and getattr(layers[idx], "is_sliding", False):
            crop = int(layers[idx].sliding_window) - 1
        window = self.adapter.layer_window(idx)
        key = (id(state.prefill_cols.get(idx)), crop, window)
        group = state.kv_groups.get(key)
        if group is None:
            mass = state.prefill_mass.get(idx)
            if mass is not None and crop is not None:
                mass = mass[:, -crop:]
            group = state.kv_groups[key] = _KVGroup(cols if crop is None else cols[:, -crop:], crop, window, mass=mass)
        state.layer_group[idx] = group
        return group


def _unit_sizes(unit: torch.Tensor) -> dict[tuple[int, int], int]:
    """(row, unit) -> number of slots of that unit in `unit` (B, L) (-1: not a visual token), row-major."""
    on = unit >= 0
    if not bool(on.any()):
        return {}
    width = int(unit.max()) + 1
    key = torch.arange(unit.shape[0], device=unit.device)[:, None] * width + unit
    sizes = torch.bincount(key[on], minlength=unit.shape[0] * width)
    found = sizes.nonzero()[:, 0]
    return {(int(k) // width, int(k) % width): int(n) for k, n in zip(found.tolist(), sizes[found].tolist())}


class _LazyRowKeys(list):
    """`ScoreContext.row_keys`, hashed on first read: only seeded rules read them. Its length (the
    batch) is known up front; a slice is lazy too."""

    def __init__(self, compute: Any, size: int) -> None:
        super().__init__()
        self._compute, self._size, self._done = compute, size, False

    def _filled(self) -> "_LazyRowKeys":
        if not self._done:
            self._done = True
            self.extend(self._compute())
        return self

    def __iter__(self):  # type: ignore[override]
        return list.__iter__(self._filled())

    def __getitem__(self, item):  # type: ignore[override]
        if isinstance(item, slice):
            return _LazyRowKeys(lambda: list.__getitem__(self._filled(), item), len(range(self._size)[item]))
        return list.__getitem__(self._filled(), item)

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __eq__(self, other: object) -> bool:
        return list(self) == other


def _row(choice: Choice, row: int) -> Choice:
    return Choice(choice.keep[row:row + 1], None if choice.merge is None else choice.merge[row:row + 1])


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


__all__ = ["ModelHook", "PrefillSnapshot", "PruningError", "PruningHandle", "cache_argument"]
