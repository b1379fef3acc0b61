"""LLM-side rules that do more than rank: FiCoCo-L (merges) and DART (pivots + duplication)."""
import pytest
import torch

from checks import assert_cached_decode_equals_reforward, assert_padded_batch_equals_rows_alone, layer_contexts
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule
from recipe_search.runtime.ficoco import compress, correlate
from recipe_search.runtime.selection import Choice, SelectionRule
from tiny_models import llava_inputs

COUNTS = (64, 40, 40, 20, 10, 10)
RULES = {
    "ficoco-l": {},
    "ficoco-l-additive": {"merge": "additive"},
    "dart": {},
    "dart-image-only": {"image_pivots": 2, "text_pivots": 0},
}


def _rule(name):
    return make_rule(name.split("-additive")[0].split("-image-only")[0], RULES[name])


@pytest.fixture(params=["sdpa", "eager"])
def model(request, llava_sdpa, llava_eager):
    return llava_sdpa if request.param == "sdpa" else llava_eager


def _context(model, inputs, layer_idx=2):
    """The ScoreContext of an unpruned forward at the input of decoder layer `layer_idx`."""
    return layer_contexts(model, inputs)[0][layer_idx]


@pytest.mark.parametrize("name", sorted(RULES))
def test_keep_all_is_identity(llava_sdpa, name):
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    base = llava_sdpa(**inputs).logits
    with PruningHandle(llava_sdpa, PruningPlan.keep_all(6, 64, _rule(name))):
        assert torch.equal(llava_sdpa(**inputs).logits, base)
    choice = _rule(name).select(_context(llava_sdpa, inputs), 64)
    assert torch.equal(choice.keep, torch.arange(64).expand(2, -1))
    if choice.merge is not None:
        assert torch.equal(choice.merge, torch.eye(64).expand(2, -1, -1))


@pytest.mark.parametrize("name", sorted(RULES))
def test_cached_decode_and_padded_batch(model, name):
    """Cached decode = pruned re-forward, and a left-padded batch = its rows alone (both <= 1e-5)."""
    plan = PruningPlan(COUNTS, 64, _rule(name))
    assert_cached_decode_equals_reforward(model, plan)
    assert_padded_batch_equals_rows_alone(model, plan)


@pytest.mark.parametrize("merge", ["normalised", "additive"])
def test_ficoco_l_compress_conserves_what_it_claims(llava_sdpa, merge):
    """Each discarded token hands out weights summing to 1; normalised rows are convex combinations."""
    ctx = _context(llava_sdpa, llava_inputs([[11, 12, 13], [14, 15]]))
    choice = make_rule("ficoco-l", {"merge": merge}).select(ctx, 24)
    keep, matrix = choice.keep, choice.merge
    assert matrix.shape == (2, 24, 64) and bool((keep.diff(dim=1) > 0).all())
    dropped = torch.ones(2, 64, dtype=torch.bool).scatter(1, keep, False)
    if merge == "additive":
        kept_cols = matrix.gather(2, keep[:, None, :].expand(-1, 24, -1))
        assert torch.equal(kept_cols, torch.eye(24).expand(2, -1, -1))
        handed_out = matrix.sum(dim=1)[dropped].view(2, 40)
        assert torch.allclose(handed_out, torch.ones(2, 40), atol=1e-6)
    else:
        assert bool((matrix >= 0).all())
        assert torch.allclose(matrix.sum(dim=-1), torch.ones(2, 24), atol=1e-6)
        additive = make_rule("ficoco-l", {"merge": "additive"}).select(ctx, 24).merge
        assert torch.allclose(matrix, additive / additive.sum(-1, keepdim=True), atol=1e-6)
    # discarded tokens are the most redundant: the merge moves their states into kept ones
    assert bool((matrix.gather(2, torch.nonzero(dropped)[:, 1].view(2, 40)[:, None, :].expand(-1, 24, -1)) > 0).any())


def test_correlate_picks_top_quantile_and_normalises():
    corr = torch.tensor([[[0.0, 5.0, 1.0, 4.0], [3.0, 0.0, 0.0, 0.0]]])
    weights = correlate(corr, 0.5)
    # row 0: two entries above its median -> k = 2 for the whole row (shared); softmax over the top 2
    expected0 = torch.zeros(4).index_put_((torch.tensor([1, 3]),), torch.softmax(torch.tensor([5.0, 4.0]), 0))
    assert torch.allclose(weights[0, 0], expected0)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2))
    matrix = compress(weights, torch.tensor([[0, 2, 3, 5]]), torch.tensor([[1, 4]]), 6, "additive")
    assert torch.allclose(matrix[0, :, [1, 4]].sum(0), torch.ones(2))


class _MergeAllIntoFirst(SelectionRule):
    """Test rule: keep the first visual token, set it to the mean of all visual tokens."""

    name = "test-merge-all"

    def select(self, ctx, k):
        n = ctx.num_visual
        return Choice(torch.zeros(ctx.hidden.shape[0], 1, dtype=torch.long), torch.full((ctx.hidden.shape[0], 1, n), 1 / n))


def test_applier_applies_merge_weights(llava_sdpa):
    inputs = llava_inputs([[11, 12, 13], [14, 15]])
    layer = llava_sdpa.model.language_model.layers[1]
    seen = []
    grab = lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).clone())  # noqa: E731
    before = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with PruningHandle(llava_sdpa, PruningPlan((64, 1, 1, 1, 1, 1), 64, _MergeAllIntoFirst())):
        after = layer.register_forward_pre_hook(grab, with_kwargs=True)
        llava_sdpa(**inputs)
        after.remove()
    before.remove()
    full, pruned = seen
    visual = inputs["input_ids"] == 5
    for row in range(2):
        vis = full[row][visual[row]]
        start = int(visual[row].nonzero()[0])
        assert pruned.shape[1] == full.shape[1] - 63
        assert torch.allclose(pruned[row, start], vis.mean(0), atol=1e-6)
        assert torch.equal(pruned[row, :start], full[row, :start])


def test_dart_keeps_pivots_and_least_duplicated(llava_sdpa):
    ctx = _context(llava_sdpa, llava_inputs([[11, 12, 13], [14, 15]]))
    keep = make_rule("dart", {"image_pivots": 1, "text_pivots": 0}).select(ctx, 9).keep
    vis = ctx.visual_positions()
    norms = ctx.query_key()[1].norm(dim=-1).square().sum(1).gather(1, vis)
    hidden = torch.nn.functional.normalize(ctx.hidden.gather(1, vis[..., None].expand(-1, -1, 64)), dim=-1)
    for row in range(2):
        pivot = int(norms[row].argmax())
        sim = hidden[row] @ hidden[row, pivot]
        sim[pivot] = float("inf")
        expected = torch.cat([torch.tensor([pivot]), sim.topk(8, largest=False).indices]).sort().values
        assert torch.equal(keep[row], expected)


@pytest.mark.parametrize("name,params,message", [
    ("ficoco-l", {"gamma": 2}, "gamma must be a number in [0, 1]"),
    ("ficoco-l", {"merge": "sum"}, "merge must be one of normalised, additive"),
    ("ficoco-l", {"alpha": 1}, "bad parameters"),
    ("dart", {"image_pivots": -1}, "image_pivots must be a non-negative integer"),
    ("dart", {"image_pivots": 0, "text_pivots": 0}, "at least one pivot"),
])
def test_bad_parameters_are_one_line(name, params, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        make_rule(name, params)
    assert "\n" not in str(err.value)


def test_non_ranking_rules_cannot_score_at_previous_layer():
    with pytest.raises(ValueError, match="does not rank tokens"):
        PruningPlan((64, 64, 32, 32, 8, 8), 64, make_rule("dart"), "previous")
    with pytest.raises(ValueError, match="runs in the vision tower"):
        PruningPlan(COUNTS, 64, make_rule("ficoco-v"))


@pytest.mark.parametrize("counts", [(64, 40, 20, 10, 0, 0), (0, 0, 0, 0, 0, 0)])
def test_merging_rule_may_keep_no_token(llava_sdpa, counts):
    """FiCoCo folds dropped tokens into kept ones; with none kept it simply drops them all."""
    assert_cached_decode_equals_reforward(llava_sdpa, PruningPlan(counts, 64, make_rule("ficoco-l")))
