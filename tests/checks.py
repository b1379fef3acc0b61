"""Runtime properties every family and every plan must have, shared by the test modules.

Each check takes a model and ready inputs (a dict for `model(**inputs)`), so a family's test module
only builds its tiny model and inputs and calls these.
"""
from __future__ import annotations

import torch

from recipe_search.hooks import CallHook, HookSet, ModelHook
from recipe_search.models import get_adapter
from recipe_search.runtime import PruningHandle, PruningPlan
from recipe_search.runtime.applier import cache_argument
from recipe_search.runtime.selection import ScoreContext
from tiny_models import llava_inputs


def cache_arg(model, cache) -> dict:
    """`{name: cache}` under the name this transformers' forward() takes (`cache` from 5.24 on)."""
    return {cache_argument(model): cache}


def extend_inputs(inputs: dict, sequences: torch.Tensor) -> dict:
    """`inputs` for a no-cache re-forward of `sequences` (prompt + generated): ids replaced, the
    attention mask and any other per-token tensor (token type ids) extended with text entries."""
    prompt = inputs["input_ids"].shape[1]
    extra = sequences.shape[1] - prompt
    out = dict(inputs, input_ids=sequences)
    for name, value in inputs.items():
        if name != "input_ids" and torch.is_tensor(value) and value.shape == inputs["input_ids"].shape:
            fill = 1 if name == "attention_mask" else 0
            out[name] = torch.cat([value, torch.full((value.shape[0], extra), fill, dtype=value.dtype)], dim=1)
    return out


def assert_keep_all_identical(model, inputs: dict, plan: PruningPlan) -> None:
    """A plan that keeps every token gives bit-identical logits and generate(); removal restores."""
    base = model(**inputs).logits
    base_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with PruningHandle(model, plan):
        assert torch.equal(model(**inputs).logits, base)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), base_gen)
    assert torch.equal(model(**inputs).logits, base)


def layer_contexts(model, inputs: dict, **forward) -> tuple[list[ScoreContext], object]:
    """The ScoreContext of every decoder layer's input in one unpruned forward, and its output."""
    adapter = get_adapter(model)
    contexts: list[ScoreContext] = []
    visual = adapter.visual_mask(inputs["input_ids"])
    key_ok = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(visual)

    def record(idx):
        def hook(layer, args, kwargs):
            call = adapter.read_layer_call(args, kwargs)
            batch, length = call.hidden.shape[:2]
            rope = None if call.rope is None else tuple(t.expand(batch, -1, -1) for t in call.rope)
            contexts.append(ScoreContext(
                adapter=adapter, layer=layer, layer_idx=idx, hidden=call.hidden, rope=rope,
                cols=torch.arange(length).expand(batch, -1), visual=visual, all_visual=visual, key_ok=key_ok,
                prompt_end=length, row_keys=[0] * batch, mask=call.mask))
        return hook

    with HookSet() as hooks:
        for i, layer in enumerate(adapter.decoder_layers()):
            hooks.add(layer, CallHook(record(i)))
        out = model(**inputs, **forward)
    return contexts, out


def assert_score_rows_match_eager(model_eager, inputs: dict, tol: float = 1e-5) -> None:
    """Attention rows recomputed by the adapter equal the eager model's own attention weights at
    every layer (q/k norms, rotary variant, scaling, soft-capping and the layer's mask), and the key
    norms read without queries or rotary equal those of the keys."""
    contexts, out = layer_contexts(model_eager, inputs, output_attentions=True)
    ids = inputs["input_ids"]
    key_ok = contexts[0].key_ok
    assert len(out.attentions) == len(contexts) == len(get_adapter(model_eager).decoder_layers())
    for ctx, weights in zip(contexts, out.attentions):
        norms = ctx.adapter.key_norms(ctx.layer, ctx.hidden)  # before the keys exist: the projection-only path
        ours = ctx.attention(torch.arange(ids.shape[1]).expand(ids.shape[0], -1))
        keys = ctx.query_key()[1].float()
        assert torch.allclose(norms, keys.square().sum(dim=(1, 3)), rtol=1e-5, atol=1e-6), \
            f"layer {ctx.layer_idx}: key norms without queries and rotary differ from the keys' own"
        valid = key_ok[:, None, :, None]  # padding queries are not compared (no key to attend to)
        diff = ((ours - weights.float()).abs() * valid).max().item()
        assert diff <= tol, f"layer {ctx.layer_idx}: score rows differ from eager attention by {diff}"


def assert_cached_decode_equals_reforward(model, plan: PruningPlan, inputs: dict | None = None,
                                          steps: int = 5) -> None:
    """Every cached generate() step equals a pruned no-cache re-forward of prompt + generated (<= 1e-5),
    and the counts entering each layer are the plan's."""
    inputs = inputs if inputs is not None else llava_inputs([[11, 12, 13], [14, 15]], seed=1)
    prompt = inputs["input_ids"].shape[1]
    with PruningHandle(model, plan) as handle:
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        targets = handle._state.targets  # (row, unit) -> counts: row 0's units add up to last_counts
        expected = [sum(t[i] for (row, _), t in targets.items() if row == 0) for i in range(len(plan.counts))]
        assert handle.last_counts == expected
        handle.prompt_len = prompt
        for t in range(steps):
            ref = model(**extend_inputs(inputs, out.sequences[:, : prompt + t]), use_cache=False).logits[:, -1]
            diff = (ref - out.logits[t]).abs().max().item()
            assert diff <= 1e-5, f"decode step {t}: cached logits differ from a pruned re-forward by {diff}"


def assert_decode_masks_equal_model_masks(model, plan: PruningPlan, inputs: dict, steps: int = 3) -> None:
    """Every mask the runtime rebuilds for a cached decode step equals the model's own mask of the
    unpruned full sequence, read at the step's query and at the keys that layer's cache holds."""
    adapter = get_adapter(model)
    layers = list(adapter.decoder_layers())
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer, kv slots, mask passed)
    with PruningHandle(model, plan) as handle:
        def watch(idx):
            def post(layer, args, kwargs, output):
                state = handle._state
                if state is not None and state.decode_q and state.pruning_started:
                    seen.append((idx, state.step_kv[idx], adapter.read_layer_call(args, kwargs).mask))
            return post

        with HookSet() as hooks:
            for i, layer in enumerate(layers):
                hooks.add(layer, _PostHook(watch(i)))
            out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                 return_dict_in_generate=True)
    full = extend_inputs(inputs, out.sequences[:, :-1])
    own: dict[int, torch.Tensor | None] = {}
    with HookSet() as hooks:
        for i, layer in enumerate(layers):
            hooks.add(layer, CallHook(lambda m, a, k, i=i: own.__setitem__(i, adapter.read_layer_call(a, k).mask)))
        model(**full, use_cache=False)
    assert seen, "no decode step ran with a rebuilt mask"
    length = full["input_ids"].shape[1]
    for idx, kv_cols, mask in seen:
        q = mask.shape[-2]
        q_cols = kv_cols[0, -q:]
        ref = own[idx]
        if ref is None:
            ref = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        ref = ref if ref.dtype == torch.bool else ref > torch.finfo(ref.dtype).min / 2
        ref = ref.expand(kv_cols.shape[0], -1, -1, -1)[:, :, q_cols]
        expected = ref.gather(3, kv_cols.clamp(min=0)[:, None, None, :].expand(-1, ref.shape[1], q, -1))
        expected = expected & (kv_cols >= 0)[:, None, None, :]
        ours = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        assert torch.equal(ours, expected), f"layer {idx}, query {q_cols.tolist()}: rebuilt mask differs"


class _PostHook(ModelHook):
    """A post-forward observer `fn(module, args, kwargs, output)`."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def post_forward(self, module, args, kwargs, output):
        self.fn(module, args, kwargs, output)
        return None


def assert_rows_alone(model, plan: PruningPlan, batch: dict, alone: list[dict], tol: float = 1e-5) -> None:
    """Each row of a (padded, possibly mixed-size) batch gives the logits it gives when run alone."""
    with PruningHandle(model, plan):
        together = model(**batch).logits[:, -1]
        for i, single in enumerate(alone):
            diff = (model(**single).logits[:, -1] - together[i]).abs().max().item()
            assert diff <= tol, f"row {i}: batched logits differ from the row alone by {diff}"


def assert_padded_batch_equals_rows_alone(model, plan: PruningPlan) -> None:
    """A left-padded LLaVA batch of 2 gives each row's logits as when it runs alone (<= 1e-5)."""
    prompts = [[11, 12, 13, 16, 17], [14, 15]]
    batch = llava_inputs(prompts, seed=2)
    alone = []
    for i, p in enumerate(prompts):
        single = llava_inputs([p], seed=2)
        single["pixel_values"] = batch["pixel_values"][i : i + 1]
        alone.append(single)
    assert_rows_alone(model, plan, batch, alone)


def assert_manual_continuation_matches_generate(model, inputs: dict, plan: PruningPlan) -> None:
    """A hand-rolled decode step (no position ids given) must not inherit layer 0's pruned cache length."""
    prompt = inputs["input_ids"].shape[1]
    with PruningHandle(model, plan):
        gen = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        first = model(**inputs)
        token = first.logits[:, -1].argmax(-1, keepdim=True)
        second = model(input_ids=token, **cache_arg(model, first.past_key_values))
        assert torch.equal(token[:, 0], gen.sequences[:, prompt])
        assert (second.logits[:, -1] - gen.logits[1]).abs().max().item() <= 1e-5
