"""Which attention implementations the pruning runtime takes: judged by what transformers runs for them."""
import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from recipe_search.runtime import PruningError, PruningHandle, PruningPlan, make_rule
from recipe_search.runtime.applier import attention_refusal
from tiny_models import llava_inputs, tiny_llava

PLAN = PruningPlan((64, 32, 32, 16, 16, 16), 64, make_rule("fitprune"))


def _with_impl(model, impl: str):
    """`model` as transformers would mark it for `impl` (the kernels themselves are not loaded)."""
    model.config.get_text_config()._attn_implementation = impl
    return model


@pytest.mark.parametrize("impl, why", [
    ("flex_attention", "BlockMask"),
    ("flash_attention_2", "CUDA"),
    ("flash_attention_3", "CUDA"),
    ("paged|sdpa", "paged KV cache"),
    ("paged|flash_attention_2", "paged KV cache"),
])
def test_unsupported_implementations_are_refused_in_one_line_that_says_why(impl, why):
    model = _with_impl(tiny_llava("sdpa"), impl)
    with pytest.raises(PruningError) as err:
        PruningHandle(model, PLAN)
    message = str(err.value)
    assert "\n" not in message and impl in message and why in message
    assert "load the model with 'sdpa' or 'eager'" in message


def test_a_flex_attention_model_is_refused_before_any_compile():
    model = tiny_llava("flex_attention")
    with pytest.raises(PruningError, match="recompiles"):
        PruningHandle(model, PLAN)


def test_sdpa_and_eager_are_accepted():
    assert attention_refusal("sdpa") is None and attention_refusal("eager") is None


def test_an_sdpa_alias_under_another_name_is_accepted_and_prunes_like_sdpa():
    """Not refused by name: a registered implementation that runs sdpa with sdpa's masks works."""
    AttentionInterface.register("bench_sdpa_alias", sdpa_attention_forward)
    AttentionMaskInterface.register("bench_sdpa_alias", sdpa_mask)
    assert attention_refusal("bench_sdpa_alias") is None
    inputs = llava_inputs([[9, 10, 11], [12, 13]])
    reference, alias = tiny_llava("sdpa"), tiny_llava("sdpa")
    alias.set_attn_implementation("bench_sdpa_alias")
    with torch.no_grad(), PruningHandle(reference, PLAN):
        want = reference(**inputs).logits
    with torch.no_grad(), PruningHandle(alias, PLAN):
        got = alias(**inputs).logits
    torch.testing.assert_close(got, want)
