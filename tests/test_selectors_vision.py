"""The pre-LLM stage: FiCoCo-V and freePruner-style selection inside the vision tower."""
import pytest
import torch

from checks import assert_cached_decode_equals_reforward, assert_padded_batch_equals_rows_alone
from recipe_search.models import get_adapter
from recipe_search.runtime import PruningError, PruningHandle, PruningPlan, make_rule
from recipe_search.runtime.ficoco import window_penalty
from recipe_search.runtime.vision import VisionContext
from tiny_models import llava_inputs, multi_image_inputs, tiny_llava, tiny_qwen2_vl

COUNTS = (24, 24, 16, 16, 8, 8)
RULES = {"ficoco-v": {}, "ficoco-v-additive": {"merge": "additive"}, "freepruner": {}}


def _rule(name):
    return make_rule(name.replace("-additive", ""), RULES[name])


def _plan(name, counts=COUNTS):
    return PruningPlan(counts, 64, make_rule("attention"), vision=_rule(name))


@pytest.fixture(scope="module")
def siglip():
    return tiny_llava("sdpa", tower="siglip")


@pytest.fixture(params=["clip", "siglip"])
def model(request, llava_sdpa, siglip):
    return llava_sdpa if request.param == "clip" else siglip


def _vision_context(model, pixels, layer_idx):
    """The VisionContext at the input of encoder layer `layer_idx` of an unpruned tower run (all inputs kept)."""
    adapter = get_adapter(model)
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    inputs = {i: out.hidden_states[i] for i in range(layer_idx)}
    return VisionContext(adapter, adapter.vision_layout(), layer_idx, out.hidden_states[layer_idx], inputs)


@pytest.mark.parametrize("name", sorted(RULES))
def test_keep_all_is_identity(model, name):
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    base = model(**inputs).logits
    with PruningHandle(model, _plan(name, (64,) * 6)):
        assert torch.equal(model(**inputs).logits, base)
    layout = get_adapter(model).vision_layout()
    choice = _rule(name).select(_vision_context(model, inputs["pixel_values"], layout.feature_index - 1), 64)
    assert torch.equal(choice.keep, torch.arange(64).expand(2, -1))
    if choice.merge is not None:
        assert torch.equal(choice.merge, torch.eye(64).expand(2, -1, -1))


@pytest.mark.parametrize("name", sorted(RULES))
def test_cached_decode_and_padded_batch(model, name):
    """Cached decode = pruned re-forward, and a left-padded batch = its rows alone (both <= 1e-5)."""
    plan = _plan(name)
    assert_cached_decode_equals_reforward(model, plan)
    assert_padded_batch_equals_rows_alone(model, plan)


def test_tower_runs_later_layers_on_the_survivors(siglip):
    """Encoder layers from the stage on see only the k kept patches (no CLS in SigLIP)."""
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    lengths = []
    with PruningHandle(siglip, _plan("freepruner", (24,) * 6)) as handle:
        hooks = [layer.register_forward_pre_hook(  # registered after the stage's hook: sees its output
            lambda m, a, kw: lengths.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
            for layer in get_adapter(siglip).vision_layers()]
        try:
            siglip(**inputs)
        finally:
            for h in hooks:
                h.remove()
        assert handle.last_counts == [24] * 6
    assert lengths == [64, 64, 24]  # stage at the input of the last layer (the LLM reads its output)


def test_freepruner_pivots_follow_eager_attention(llava_eager):
    """Contribution degree = attention received at the stage layer, as the eager tower reports it."""
    pixels = llava_inputs([[11]], seed=3)["pixel_values"]
    tower = llava_eager.model.vision_tower
    eager = tower(pixels, output_attentions=True).attentions[1].mean(1).sum(1)[:, 1:]
    ctx = _vision_context(llava_eager, pixels, 1)
    assert torch.allclose(ctx.received(), eager, atol=1e-5)
    keep = make_rule("freepruner", {"pivot_share": 1.0}).select(ctx, 10).keep
    assert torch.equal(keep, eager.topk(10, dim=1).indices.sort(dim=1).values)
    shallow = tower(pixels, output_attentions=True).attentions[0].mean(1).sum(1)[:, 1:]
    mixed = make_rule("freepruner", {"pivot_share": 0.5, "shallow_layer": 0}).select(ctx, 10).keep[0].tolist()
    pivots = set(eager[0].topk(5).indices.tolist())
    rest = shallow[0].clone()
    rest[list(pivots)] = -1
    assert set(mixed) == pivots | set(rest.topk(5).indices.tolist())


@pytest.mark.parametrize("merge", ["normalised", "additive"])
def test_ficoco_v_merge_conserves_what_it_claims(model, merge):
    layout = get_adapter(model).vision_layout()
    ctx = _vision_context(model, llava_inputs([[11], [12]])["pixel_values"], layout.feature_index - 1)
    choice = make_rule("ficoco-v", {"merge": merge}).select(ctx, 16)
    matrix = choice.merge
    assert matrix.shape == (2, 16, 64)  # patches only: CLS is neither discarded nor merged into
    dropped = torch.ones(2, 64, dtype=torch.bool).scatter(1, choice.keep, False)
    if merge == "normalised":
        assert torch.allclose(matrix.sum(-1), torch.ones(2, 16), atol=1e-6) and bool((matrix >= 0).all())
    else:
        assert torch.allclose(matrix.sum(1)[dropped], torch.ones(2 * 48), atol=1e-6)


def test_local_penalty_pushes_each_window_minimum_down():
    score = torch.tensor([[1.0, 2.0, -1.0, 3.0, 4.0, 5.0, 6.0, 7.0,
                           8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0]])
    out = window_penalty(score).view(4, 4)
    grid = score.view(4, 4)
    assert out[0, 0] == 0.5 and out[0, 2] == -2.0 and out[2, 0] == 4.0 and out[2, 2] == 5.0
    changed = (out != grid).sum()
    assert changed == 4
    assert torch.equal(window_penalty(score[:, :15]), score[:, :15])  # not a square grid: unchanged


def test_vision_stage_errors_are_one_line(llava_sdpa):
    with pytest.raises(ValueError, match=r"vision encoder_layer must be in \[0, 1\]"):
        PruningHandle(llava_sdpa, PruningPlan(COUNTS, 64, make_rule("attention"), vision=make_rule("ficoco-v"),
                                              vision_layer=5))
    with pytest.raises(ValueError, match="not supported for the qwen2_vl family"):
        PruningHandle(tiny_qwen2_vl(), PruningPlan((16,) * 4, 16, make_rule("attention"), vision=make_rule("freepruner")))
    with pytest.raises(ValueError, match="pivot_share must be a number in"):
        make_rule("freepruner", {"pivot_share": 3})
    with pytest.raises(ValueError, match="runs in the LLM"):
        PruningPlan(COUNTS, 64, make_rule("attention"), vision=make_rule("dart"))
    # image placeholders without pixels: the stage cannot run, and says so
    inputs = llava_inputs([[11, 12]])
    with PruningHandle(llava_sdpa, _plan("freepruner")):
        with pytest.raises(PruningError, match="vision stage did not run"):
            llava_sdpa(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("rule", ["ficoco-v", "freepruner"])
def test_vision_stage_keeping_no_patch_drops_the_image(tower, rule):
    """A tower cannot run on zero tokens: it keeps its sequence and layer 0 drops every placeholder."""
    model = tiny_llava("sdpa", tower=tower)
    assert_cached_decode_equals_reforward(model, PruningPlan((0,) * 6, 64, make_rule("fitprune"),
                                                             vision=make_rule(rule)))


@pytest.mark.parametrize("images", ["per-image", "pooled"])
def test_vision_stage_with_several_images_per_prompt(llava_sdpa, images):
    """The tower sees each image alone: every image keeps counts[0] patches whatever the policy."""
    plan = PruningPlan((32, 32, 20, 20, 10, 10), 64, make_rule("fitprune"), vision=make_rule("freepruner"),
                       images=images)
    batch = multi_image_inputs([(2, [11, 12, 13]), (1, [14, 15])], seed=1)
    assert_cached_decode_equals_reforward(llava_sdpa, plan, batch)
    with PruningHandle(llava_sdpa, plan) as handle:
        llava_sdpa(**batch)
    assert handle.last_counts == [64, 64, 40, 40, 20, 20]
