"""Fault injection: whatever goes wrong inside a pruned forward, the model is left as it was."""
import pytest
import torch

from recipe_search.hooks import CallHook, HookSet
from recipe_search.runtime import PruningError, PruningHandle, PruningPlan, make_rule
from tiny_models import llava_inputs

PLAN = ((64, 40, 40, 20, 10, 10), 64)


def _plan():
    return PruningPlan(PLAN[0], PLAN[1], make_rule("fitprune"))


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


class Boom(RuntimeError):
    pass


def test_exception_inside_generation_leaves_no_hooks(llava_sdpa):
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    base, before = llava_sdpa(**inputs).logits, _hook_count(llava_sdpa)

    def fail(module, args, kwargs):
        raise Boom("injected at layer 3")

    with HookSet() as faults:
        faults.add(llava_sdpa.model.language_model.layers[3], CallHook(fail))
        with pytest.raises(Boom):
            with PruningHandle(llava_sdpa, _plan()):
                llava_sdpa.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert _hook_count(llava_sdpa) == before
    assert torch.equal(llava_sdpa(**inputs).logits, base)


def test_handle_recovers_after_a_failed_prefill(llava_sdpa):
    """A prefill that failed half-way leaves no state that changes the next one."""
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    with PruningHandle(llava_sdpa, _plan()):
        fresh = llava_sdpa.generate(**inputs, max_new_tokens=3, do_sample=False)
    with PruningHandle(llava_sdpa, _plan()) as handle:
        with HookSet() as faults:
            faults.add(llava_sdpa.model.language_model.layers[4], CallHook(lambda m, a, k: (_ for _ in ()).throw(Boom())))
            with pytest.raises(Boom):
                llava_sdpa.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(llava_sdpa.generate(**inputs, max_new_tokens=3, do_sample=False), fresh)
        assert handle.last_counts == list(PLAN[0])


def test_two_handles_on_one_model_are_refused(llava_sdpa):
    with PruningHandle(llava_sdpa, _plan()):
        with pytest.raises(PruningError, match="already applied to this model"):
            PruningHandle(llava_sdpa, _plan())
    PruningHandle(llava_sdpa, _plan()).remove()  # once the first is gone, a new one attaches


def test_handle_used_after_remove_says_so(llava_sdpa):
    handle = PruningHandle(llava_sdpa, _plan())
    handle.remove()
    handle.remove()  # twice is harmless
    with pytest.raises(PruningError, match="was removed"):
        with handle:
            pass
    with pytest.raises(PruningError, match="was removed"):
        handle.begin_prefill(llava_inputs([[11]])["input_ids"], None)


def test_failed_attach_leaves_nothing(llava_sdpa):
    before = _hook_count(llava_sdpa)
    plan = PruningPlan(PLAN[0], PLAN[1], make_rule("fitprune"), vision=make_rule("freepruner"), vision_layer=7)
    with pytest.raises(ValueError, match="encoder_layer"):
        PruningHandle(llava_sdpa, plan)
    assert _hook_count(llava_sdpa) == before
    PruningHandle(llava_sdpa, _plan()).remove()
