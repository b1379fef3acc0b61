"""Qwen2-VL (M-RoPE, dynamic token counts) through the same runtime, from a tiny random config."""
import pytest
import torch

from recipe_search.models import UnsupportedModelError, get_adapter, supported_model_types
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule
from checks import assert_manual_continuation_matches_generate
from tiny_models import qwen_inputs, tiny_qwen2_vl


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_vl()


def test_adapter_reads_sizes_from_config(qwen):
    adapter = get_adapter(qwen)
    dims = adapter.dims()
    assert (adapter.family, dims.num_layers, dims.hidden_size, dims.num_kv_heads) == ("qwen2_vl", 4, 64, 2)
    assert adapter.visual_tokens_per_image() is None


def test_keep_all_identical(qwen):
    inputs = qwen_inputs([[11, 12, 13], [14]])
    base = qwen(**inputs).logits
    with PruningHandle(qwen, PruningPlan.keep_all(4, 16, make_rule("attention"))):
        assert torch.equal(qwen(**inputs).logits, base)


def test_cached_decode_equals_reforward_and_counts(qwen):
    inputs = qwen_inputs([[11, 12, 13], [14]], seed=1)
    prompt = inputs["input_ids"].shape[1]
    with PruningHandle(qwen, PruningPlan((16, 10, 10, 4), 16, make_rule("fitprune"))) as handle:
        out = qwen.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
        assert handle.last_counts == [16, 10, 10, 4]
        handle.prompt_len = prompt
        for t in range(4):
            ids = out.sequences[:, : prompt + t]
            extra = torch.ones(2, t, dtype=torch.long)
            ref = qwen(input_ids=ids, attention_mask=torch.cat([inputs["attention_mask"], extra], 1),
                       pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                       mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], 0 * extra], 1),
                       use_cache=False).logits[:, -1]
            assert (ref - out.logits[t]).abs().max().item() <= 1e-5


def test_padded_batch_equals_rows_alone(qwen):
    prompts = [[11, 12, 13, 17], [14]]
    batch = qwen_inputs(prompts, seed=2)
    plan = PruningPlan((12, 12, 6, 2), 16, make_rule("attention"), "same")
    with PruningHandle(qwen, plan):
        together = qwen(**batch).logits[:, -1]
        for i, p in enumerate(prompts):
            alone = qwen_inputs([p], seed=2)
            alone["pixel_values"] = batch["pixel_values"][i * 64 : (i + 1) * 64]
            assert (qwen(**alone).logits[:, -1] - together[i]).abs().max().item() <= 1e-5


def test_unsupported_architecture_is_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(UnsupportedModelError) as caught:
        get_adapter(llama)
    assert str(caught.value) == f"unsupported model type 'llama'; supported: {', '.join(supported_model_types())}"
    assert {"llava", "qwen2_vl"} <= set(supported_model_types())


def test_manual_continuation_uses_rope_deltas(qwen):
    plan = PruningPlan((8, 8, 4, 4), 16, make_rule("attention"))
    assert_manual_continuation_matches_generate(qwen, qwen_inputs([[11, 12, 13]]), plan)
