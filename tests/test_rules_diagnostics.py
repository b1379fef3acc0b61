"""Issue 9 item 5: the checks that would catch the bugs suspected when a rule fell below random.

Hand-built queries and keys where the right tokens are known (which row is read, CLS offset, sign
of each term, padding in the softmax), and the norm of merged states through the real applier.
docs/rules.md says what these rule out and what was measured instead.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import llava_inputs

from recipe_search.models import get_adapter
from recipe_search.models.base import VisionLayout
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule
from recipe_search.runtime.selection import Choice, ScoreContext
from recipe_search.runtime.vision import VisionContext, VisionRule


class _FixedQK:
    """Adapter stand-in: the rule sees exactly the queries and keys a test hands it (scale 1)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor) -> None:
        self.q, self.k = q, k

    # LLM side
    def query_key(self, layer, hidden, rope):
        return self.q, self.k

    def attention_logits(self, layer, q, k):
        return q.float() @ k.float().transpose(-1, -2)

    # vision side
    def vision_layers(self):
        return [None, None]

    def vision_query_key(self, layer, hidden):
        return self.q, self.k, 1.0


def _vision_ctx(q: torch.Tensor, k: torch.Tensor, has_cls: bool = True) -> VisionContext:
    patches = q.shape[2] - int(has_cls)
    layout = VisionLayout(num_layers=2, hidden_size=q.shape[-1], intermediate_size=1, feature_index=2,
                          has_cls=has_cls, patches=patches, projector_macs_per_token=1)
    return VisionContext(_FixedQK(q, k), layout, 1, torch.zeros(q.shape[0], q.shape[2], q.shape[-1]))


def _cls_pattern() -> tuple[torch.Tensor, torch.Tensor]:
    """CLS + 16 patches (4x4), one head, d = 4. The CLS *query* favours patches 5 and 10; the CLS
    *key* is favoured by patch 3's query, so reading the CLS column instead of its row, or taking
    the token index instead of the patch index, picks other patches."""
    q = torch.zeros(1, 1, 17, 4)
    k = torch.zeros(1, 1, 17, 4)
    q[0, 0, 0, 0] = 1.0                 # CLS query along e0
    k[0, 0, 1 + 5, 0] = 10.0            # patch 5's key answers it most
    k[0, 0, 1 + 10, 0] = 9.0            # then patch 10
    k[0, 0, 0, 1] = 1.0                 # CLS key along e1 ...
    q[0, 0, 1 + 3, 1] = 10.0            # ... which patch 3's query favours
    return q, k


def test_ficoco_v_reads_the_cls_row_and_returns_patch_indices():
    q, k = _cls_pattern()
    choice = make_rule("ficoco-v", {"lam": 1.0, "local_penalty": False}).select(_vision_ctx(q, k), 2)
    assert choice.keep.tolist() == [[5, 10]]          # not [6, 11] (CLS counted) nor patch 3 (CLS column)
    assert choice.merge is not None and choice.merge.shape == (1, 2, 16)   # CLS is never merged
    assert torch.allclose(choice.merge.sum(-1), torch.ones(1, 2))


def test_ficoco_v_discards_the_highest_patch_row_mean():
    """lam = 0: R = -p, the lowest R (highest mean logit of a patch's query over patch keys) goes."""
    q = torch.zeros(1, 1, 17, 2)
    k = torch.zeros(1, 1, 17, 2)
    k[0, 0, 1:, 0] = 1.0                # every patch key along e0: p_i = q_i . e0
    q[0, 0, 1:, 0] = torch.arange(16, dtype=torch.float32)   # patch i's row mean grows with i
    q[0, 0, 0, 0] = 100.0               # the CLS row must not count as a patch
    keep = make_rule("ficoco-v", {"lam": 0.0, "local_penalty": False}).select(_vision_ctx(q, k), 3).keep
    assert keep.tolist() == [[0, 1, 2]]


class _KeepPatches(VisionRule):
    name = "test-keep-patches"

    def __init__(self, patches: list[int]) -> None:
        self.patches = patches

    def select(self, ctx, k):
        assert k == len(self.patches)
        return Choice(torch.tensor(self.patches).expand(ctx.hidden.shape[0], -1))


def test_vision_stage_keeps_cls_and_puts_each_patch_at_its_own_placeholder(llava_sdpa):
    """The tower's stage layer sees [CLS, patches S] (CLS first, patch i at token i + 1), and the
    decoder's first layer sees the projected survivors where the image was, in the order of S."""
    model, adapter = llava_sdpa, get_adapter(llava_sdpa)
    kept = [0, 9, 17, 40, 63]
    inputs = llava_inputs([[11, 12, 13]])
    stage = adapter.vision_layout().feature_index - 1
    unpruned = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[stage]
    seen: dict[str, torch.Tensor] = {}
    plan = PruningPlan((len(kept),) * 6, 64, make_rule("random"), vision=_KeepPatches(kept))
    with PruningHandle(model, plan):
        hooks = [  # registered after the runtime's hooks: they see what the runtime hands on
            adapter.vision_layers()[stage].register_forward_pre_hook(
                lambda m, a, kw: seen.__setitem__("tower", adapter.vision_hidden(a, kw)), with_kwargs=True),
            adapter.projector().register_forward_hook(lambda m, a, out: seen.__setitem__("projected", out)),
            adapter.decoder_layers()[0].register_forward_pre_hook(
                lambda m, a, kw: seen.__setitem__("decoder", a[0] if a else kw["hidden_states"]), with_kwargs=True),
        ]
        try:
            model(**inputs)
        finally:
            for h in hooks:
                h.remove()
    index = torch.tensor([0] + [p + 1 for p in kept])
    assert torch.equal(seen["tower"], unpruned[:, index])
    projected = seen["projected"]
    assert projected.shape[1] == 64 and bool((projected[0, kept].abs().sum(-1) > 0).all())
    others = [i for i in range(64) if i not in kept]
    assert torch.count_nonzero(projected[0, others]) == 0
    # the decoder input: [bos, 7, 8] + the kept image features + [11, 12, 13]
    assert seen["decoder"].shape[1] == 3 + len(kept) + 3
    assert torch.allclose(seen["decoder"][0, 3:3 + len(kept)], projected[0, kept].to(seen["decoder"].dtype))


def _llm_ctx(q: torch.Tensor, k: torch.Tensor, visual: list[int], pad: int = 0) -> ScoreContext:
    """One row of L slots, the first `pad` of them left padding (column -1), visual slots `visual`."""
    length = q.shape[2]
    cols = torch.arange(length)[None] - pad
    cols[:, :pad] = -1
    vis = torch.zeros(1, length, dtype=torch.bool)
    vis[0, visual] = True
    return ScoreContext(adapter=_FixedQK(q, k), layer=None, layer_idx=2, hidden=torch.zeros(1, length, q.shape[-1]),
                        rope=None, cols=cols, visual=vis, all_visual=vis, key_ok=cols >= 0,
                        prompt_end=length - pad, row_keys=[0])


def test_attention_rule_reads_the_last_prompt_row_and_masks_padding():
    """Slots: [pad, bos, v0..v7, t0, t1(last)]. Head 0: the last token prefers v2 (then v6);
    head 1: it prefers v6 but a padding key has a huge logit. With padding masked, the head mean
    keeps v6 (head 1 puts ~all its mass there); a softmax over the padding would keep v2. Other
    rows point elsewhere, so reading a wrong row keeps other tokens."""
    length, visual = 12, list(range(2, 10))
    q = torch.zeros(1, 2, length, length)
    k = torch.eye(length)[None, None].repeat(1, 2, 1, 1)      # key of slot j = e_j: logit[i, j] = q_i[j]
    last = length - 1
    q[0, 0, last, 2 + 2], q[0, 0, last, 2 + 6] = 5.0, 3.0
    q[0, 1, last, 2 + 6], q[0, 1, last, 0] = 8.0, 20.0       # slot 0 is padding
    q[0, :, last - 1, 2 + 4] = 9.0                           # the other text row prefers v4
    q[0, :, 1, 2 + 7] = 9.0                                  # BOS row (a wrong argmax fallback) prefers v7
    ctx = _llm_ctx(q, k, visual, pad=1)
    assert make_rule("attention").select(ctx, 1).keep.tolist() == [[6]]
    assert make_rule("attention").select(ctx, 2).keep.tolist() == [[2, 6]]
    assert make_rule("attention", {"heads": "max"}).select(ctx, 1).keep.tolist() == [[6]]
    # query "text": both post-image text rows; t0 puts ~all of its mass on v4 in both heads
    assert 4 in make_rule("attention", {"query": "text"}).select(ctx, 2).keep[0].tolist()


@pytest.mark.parametrize("merge", ["normalised", "additive"])
def test_ficoco_l_merged_states_keep_the_norm_scale_of_their_sources(llava_sdpa, merge):
    """Through the applier, on the hidden states the decoder layer receives: with the default
    (normalised) merge every survivor is a convex combination of its sources, so its norm never
    exceeds theirs; the reference's additive merge is the one that inflates (recorded as such)."""
    model, adapter = llava_sdpa, get_adapter(llava_sdpa)
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    layer = 2
    seen: dict[str, torch.Tensor] = {}
    counts = (64, 64, 8, 8, 8, 8)
    plan = PruningPlan(counts, 64, make_rule("ficoco-l", {"merge": merge}))
    with PruningHandle(model, plan):
        target = adapter.decoder_layers()[layer]
        before = target.register_forward_pre_hook(   # after the runtime's hook: sees the merged survivors
            lambda m, a, kw: seen.__setitem__("after", a[0] if a else kw["hidden_states"]), with_kwargs=True)
        previous = adapter.decoder_layers()[layer - 1].register_forward_hook(
            lambda m, a, out: seen.__setitem__("before", out[0] if isinstance(out, tuple) else out))
        try:
            model(**inputs)
        finally:
            before.remove()
            previous.remove()
    image = inputs["input_ids"] == 5
    source_norm = torch.stack([seen["before"][r][image[r]].norm(dim=-1).max() for r in range(2)])
    # survivors: the last 8 + 3 (or 8 + 2) slots before the suffix; take the 8 slots after "7, 8"
    after = seen["after"]
    suffix = [3, 2]
    merged_norm = torch.stack([after[r, -(suffix[r] + 8):-suffix[r]].norm(dim=-1).max() for r in range(2)])
    if merge == "normalised":
        assert bool((merged_norm <= source_norm * (1 + 1e-5)).all())
    else:
        assert bool((merged_norm > source_norm).any())


def test_ficoco_l_discards_the_highest_visual_logit_sum_and_reads_visual_to_text():
    """Slots [bos, v0..v5, t0, t1]. Visual keys along e0, so sum_j L[i, j] grows with q_i[0] = i:
    gamma = 1 keeps the lowest sums. The text term (gamma = 0) is the visual query against the text
    keys (e1, as the reference computes it); the text queries against visual keys (e2) point the
    other way, so reading the transposed direction keeps other tokens."""
    length, visual = 9, list(range(1, 7))
    q = torch.zeros(1, 1, length, 3)
    k = torch.zeros(1, 1, length, 3)
    k[0, 0, visual, 0] = 1.0
    q[0, 0, visual, 0] = torch.arange(6, dtype=torch.float32)
    k[0, 0, 7:, 1] = 1.0                                                   # text keys along e1
    q[0, 0, visual, 1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 4.0])      # v4, v5 query the text most
    k[0, 0, visual, 2] = torch.tensor([5.0, 4.0, 0.0, 0.0, 0.0, 0.0])      # text queries favour v0, v1
    q[0, 0, 7:, 2] = 1.0
    ctx = _llm_ctx(q, k, visual)
    assert make_rule("ficoco-l", {"gamma": 1.0}).select(ctx, 2).keep.tolist() == [[0, 1]]
    assert make_rule("ficoco-l", {"gamma": 0.0}).select(ctx, 2).keep.tolist() == [[4, 5]]
