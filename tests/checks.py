"""Runtime properties every plan must have, shared by the per-rule test files."""
from __future__ import annotations

import torch

from recipe_search.runtime import PruningHandle, PruningPlan
from recipe_search.runtime.applier import cache_argument
from tiny_models import llava_inputs


def cache_arg(model, cache) -> dict:
    """`{name: cache}` under the name this transformers' forward() takes (`cache` from 5.24 on)."""
    return {cache_argument(model): cache}


def assert_cached_decode_equals_reforward(model, plan: PruningPlan, steps: int = 5) -> None:
    """Every cached generate() step equals a pruned no-cache re-forward of prompt + generated (<= 1e-5)."""
    inputs = llava_inputs([[11, 12, 13], [14, 15]], seed=1)
    prompt = inputs["input_ids"].shape[1]
    with PruningHandle(model, plan) as handle:
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        assert handle.last_counts == list(plan.counts)
        handle.prompt_len = prompt
        for t in range(steps):
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, t, dtype=torch.long)], dim=1)
            ref = model(input_ids=out.sequences[:, : prompt + t], attention_mask=mask,
                        pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
            assert (ref - out.logits[t]).abs().max().item() <= 1e-5


def assert_padded_batch_equals_rows_alone(model, plan: PruningPlan) -> None:
    """A left-padded batch of 2 gives each row's logits as when it runs alone (<= 1e-5)."""
    prompts = [[11, 12, 13, 16, 17], [14, 15]]
    batch = llava_inputs(prompts, seed=2)
    with PruningHandle(model, plan):
        together = model(**batch).logits[:, -1]
        for i, p in enumerate(prompts):
            alone = llava_inputs([p], seed=2)
            alone["pixel_values"] = batch["pixel_values"][i : i + 1]
            assert (model(**alone).logits[:, -1] - together[i]).abs().max().item() <= 1e-5


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
