"""Equivalence first: keep-all is the bare model, cached decoding equals a pruned re-forward."""
import pytest
import torch

from recipe_search.runtime import PruningError, PruningHandle, PruningPlan, make_rule
from checks import (
    assert_cached_decode_equals_reforward,
    assert_manual_continuation_matches_generate,
    assert_padded_batch_equals_rows_alone,
    cache_arg,
)
from tiny_models import llava_inputs, tiny_llava

PLANS = {
    "fitprune-same": ((64, 40, 40, 20, 10, 10), "fitprune", {}, "same"),
    "attention-prev": ((64, 64, 32, 32, 8, 8), "attention", {}, "previous"),
    "attention-text-layer0": ((48, 48, 16, 16, 16, 0), "attention", {"query": "text"}, "same"),
    "random": ((64, 30, 30, 30, 5, 5), "random", {"seed": 3}, "same"),
    # random-weight states are far from parallel: a low threshold makes most drops merge
    "fitprune-merge": ((64, 40, 40, 20, 10, 10), "fitprune", {}, "same", 0.05),
    "attention-prev-merge": ((64, 64, 32, 32, 8, 8), "attention", {}, "previous", 0.05),
}


def _plan(name):
    counts, rule, params, where, *merge = PLANS[name]
    return PruningPlan(counts, 64, make_rule(rule, params), where, merge_threshold=merge[0] if merge else None)


@pytest.fixture(params=["sdpa", "eager"])
def model(request, llava_sdpa, llava_eager):
    return llava_sdpa if request.param == "sdpa" else llava_eager


def test_keep_all_is_identical_and_removal_restores(model):
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    base = model(**inputs).logits
    with PruningHandle(model, PruningPlan.keep_all(6, 64, make_rule("attention"))):
        kept = model(**inputs).logits
    assert torch.equal(kept, base)
    with PruningHandle(model, _plan("fitprune-same")):
        pruned = model(**inputs).logits
    assert pruned.shape[1] < base.shape[1]
    assert torch.equal(model(**inputs).logits, base)


def test_keep_all_generate_is_identical(model):
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    base = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with PruningHandle(model, PruningPlan.keep_all(6, 64, make_rule("fitprune"))):
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), base)


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_cached_decode_equals_pruned_reforward(model, plan_name):
    assert_cached_decode_equals_reforward(model, _plan(plan_name))


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_padded_batch_equals_rows_alone(model, plan_name):
    assert_padded_batch_equals_rows_alone(model, _plan(plan_name))


def test_manual_cached_continuation_matches_generate(llava_sdpa):
    assert_manual_continuation_matches_generate(llava_sdpa, llava_inputs([[11, 12, 13]]), _plan("attention-text-layer0"))


def test_sampling_and_beam_search_run(llava_sdpa):
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    with PruningHandle(llava_sdpa, _plan("fitprune-same")):
        torch.manual_seed(0)
        sampled = llava_sdpa.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
        beams = llava_sdpa.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2)
    assert sampled.shape[0] == 2 and beams.shape[0] == 4


def test_prompt_without_image_passes_through(llava_sdpa):
    ids = torch.tensor([[1, 11, 12, 13, 14]])
    base = llava_sdpa(input_ids=ids).logits
    with PruningHandle(llava_sdpa, _plan("fitprune-same")) as handle:
        assert torch.equal(llava_sdpa(input_ids=ids).logits, base)
        assert handle.last_counts == []


def test_foreign_cache_is_refused(llava_sdpa):
    inputs = llava_inputs([[11, 12, 13]])
    unpruned = llava_sdpa(**inputs)
    with PruningHandle(llava_sdpa, _plan("fitprune-same")):
        llava_sdpa(**inputs)
        with pytest.raises(PruningError, match="not filled by the current pruned prefill"):
            llava_sdpa(input_ids=torch.tensor([[12]]), **cache_arg(llava_sdpa, unpruned.past_key_values))


def test_plan_and_model_mismatch_errors(llava_sdpa):
    with pytest.raises(PruningError, match="plan has 4 layers, the model has 6"):
        PruningHandle(llava_sdpa, PruningPlan((64, 32, 16, 8), 64, make_rule("attention")))
    with pytest.raises(ValueError, match="increases"):
        PruningPlan((64, 32, 40, 8, 8, 8), 64, make_rule("attention"))
    with pytest.raises(ValueError, match="unknown selection rule 'nope'"):
        make_rule("nope")


def test_images_of_another_size_use_fractions():
    model = tiny_llava("sdpa", layers=4)
    plan = PruningPlan((64, 32, 16, 16), 64, make_rule("attention"))
    assert plan.counts_for(128) == [128, 64, 32, 32]
    assert plan.counts_for(10) == [10, 5, 2, 2]
    with PruningHandle(model, plan) as handle:
        model(**llava_inputs([[11, 12]]))
        assert handle.last_counts == [64, 32, 16, 16]
