"""Qwen3-VL: q/k-normed attention, interleaved M-RoPE and DeepStack under pruning.

DeepStack adds vision features to the visual positions after decoder layers 0 and 1 of the tiny
model; drops at those layers must give every surviving token its own features (checked against a
reference built from the bare model's layers), keep-all must stay bit-identical, and a layer run
outside the text model (the schedule scorer) must refuse rather than silently skip the features.
"""
import pytest
import torch

from checks import assert_decode_masks_equal_model_masks, assert_keep_all_identical, assert_score_rows_match_eager
from recipe_search.calibration.data import Sample, SampleSet
from recipe_search.hooks import CallHook, HookSet
from recipe_search.models import get_adapter, supported_model_types
from recipe_search.pipeline import LoadedModel
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule
from recipe_search.methods.objective import ScheduleScorer
from tiny_qwen import (LAYERS, MIXED_ROWS, PLANS, VIDEO_ROWS, calibration_file, check_cached_decode, check_cli,
                       check_load_processor, check_rows_alone, plan, qwen_inputs, qwen_processor, tiny_model)

FAMILY = "qwen3_vl"
DEEPSTACK_LAYERS = 2  # vision blocks 0 and 1 feed decoder layers 0 and 1


@pytest.fixture(scope="module")
def models():
    return {"sdpa": tiny_model(FAMILY, "sdpa"), "eager": tiny_model(FAMILY, "eager")}


@pytest.fixture(params=["sdpa", "eager"])
def model(request, models):
    return models[request.param]


def test_family_is_recognised(models):
    adapter = get_adapter(models["sdpa"])
    assert adapter.family == FAMILY and FAMILY in supported_model_types()
    assert adapter.model_class == type(models["sdpa"]).__name__
    assert adapter.visual_token_ids == (4, 5)  # images and video frames are both prunable
    assert [adapter.layer_window(i) for i in range(LAYERS)] == [None] * LAYERS
    assert len(models["sdpa"].config.vision_config.deepstack_visual_indexes) == DEEPSTACK_LAYERS


def test_keep_all_identical(model):
    """The DeepStack hooks add the model's own features the model's own way: bit-identical."""
    keep_all = PruningPlan.keep_all(LAYERS, 16, make_rule("fitprune"))
    assert_keep_all_identical(model, qwen_inputs(FAMILY, MIXED_ROWS), keep_all)
    assert_keep_all_identical(model, qwen_inputs(FAMILY, VIDEO_ROWS), keep_all)


def test_score_rows_match_eager(models):
    """q_norm/k_norm and the interleaved M-RoPE tables: the adapter's rows equal eager attention."""
    assert_score_rows_match_eager(models["eager"], qwen_inputs(FAMILY, MIXED_ROWS))
    assert_score_rows_match_eager(models["eager"], qwen_inputs(FAMILY, VIDEO_ROWS))


@pytest.mark.parametrize("name", ["random", "dart"])
def test_decode_masks_equal_model_masks(model, name):
    assert_decode_masks_equal_model_masks(model, plan(name), qwen_inputs(FAMILY, MIXED_ROWS), steps=3)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_cached_decode_equals_reforward(model, name):
    check_cached_decode(model, FAMILY, MIXED_ROWS, name)


@pytest.mark.parametrize("name", ["fitprune", "attention-previous"])
def test_video_tokens_pruned_cached_decode_equals_reforward(model, name):
    check_cached_decode(model, FAMILY, VIDEO_ROWS, name)


@pytest.mark.parametrize("images", ["per-image", "pooled"])
def test_rows_of_other_image_sizes_equal_rows_alone(model, images):
    check_rows_alone(model, FAMILY, images)


def _reference_logits(model, inputs: dict, keep: torch.Tensor, drop_layer: int) -> torch.Tensor:
    """Logits of one unpadded row whose columns outside `keep` are removed entering `drop_layer`:
    the bare model's own layers from there on, survivors keeping their rotary positions, and every
    surviving visual token receiving its own DeepStack feature after layers 0..DEEPSTACK_LAYERS-1."""
    text = model.model.language_model
    seen: dict = {}
    with HookSet() as hooks:
        hooks.add(text, CallHook(lambda m, a, k: seen.update(text=k)))
        hooks.add(text.layers[drop_layer], CallHook(lambda m, a, k: seen.update(layer=(a, k))))
        with torch.no_grad():
            model(**inputs)
    args, kwargs = seen["layer"]
    hidden = (args[0] if args else kwargs["hidden_states"])[:, keep]
    rope = tuple(t[:, keep] for t in kwargs["position_embeddings"])
    visual = seen["text"]["visual_pos_masks"][0]
    feature_row = visual.long().cumsum(0) - 1  # row of each visual column in the DeepStack features
    survivors = keep[visual[keep]]
    length = keep.numel()
    causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    with torch.no_grad():
        for idx in range(drop_layer, LAYERS):
            hidden = text.layers[idx](hidden, position_embeddings=rope, attention_mask=causal)
            if idx < DEEPSTACK_LAYERS:
                hidden = hidden.clone()
                hidden[0, visual[keep]] += seen["text"]["deepstack_visual_embeds"][idx][feature_row[survivors]]
        return model.lm_head(text.norm(hidden))


@pytest.mark.parametrize("drop_layer,counts,rule", [(0, (6, 6, 6, 6), "attention"), (1, (16, 7, 7, 7), "random"),
                                                    (2, (16, 16, 5, 5), "fitprune")])
def test_drop_at_deepstack_layer_feeds_survivors_their_features(model, drop_layer, counts, rule):
    inputs = qwen_inputs(FAMILY, [[("image", 8, 8), 12, 13, 14]], seed=4)
    with PruningHandle(model, PruningPlan(counts, 16, make_rule(rule))) as handle:
        with torch.no_grad():
            pruned = model(**inputs).logits
        keep = handle._state.cols[0].clone()
    assert handle.last_counts == list(counts) and keep.numel() == inputs["input_ids"].shape[1] - 16 + counts[-1]
    visual = (inputs["input_ids"][0] == 4).nonzero()[:, 0]
    kept_visual = keep[(inputs["input_ids"][0] == 4)[keep]]
    assert not torch.equal(kept_visual, visual[: counts[-1]])  # survivors are not simply the first features
    diff = (pruned - _reference_logits(model, inputs, keep, drop_layer)).abs().max().item()
    assert diff <= 1e-5, f"drop at layer {drop_layer}: logits differ from the DeepStack reference by {diff}"


def test_schedule_scorer_replays_deepstack(models, tmp_path):
    """The schedule scorer (gsearch, psigmoid) runs decoder layers one by one, outside the text model;
    its pruned logits, fresh and from a reused prefix, equal a pruned forward of the whole model."""
    model = models["sdpa"]
    from PIL import Image

    calib = calibration_file(tmp_path)
    samples = tuple(Sample(Image.open(calib.parent / f"im{i}.png").convert("RGB"), "what shape is this ?")
                    for i in range(2))
    processor = qwen_processor(FAMILY)
    loaded = LoadedModel(model, processor, get_adapter(model), "tiny")
    rule = make_rule("attention")
    scorer = ScheduleScorer(loaded, SampleSet(samples, "tiny"), rule, "previous")
    inputs = get_adapter(model).inputs(processor, [s.image for s in samples], [s.prompt for s in samples])
    for counts in ((16, 16, 8, 8), (16, 16, 8, 3), (16, 5, 5, 5)):  # the second reuses the first's prefix
        n = scorer.visual_tokens
        plan = PruningPlan(tuple(round(c * n / 16) for c in counts), n, rule, "previous")
        got = scorer._logits(0, scorer.batches[0], plan)
        with PruningHandle(model, plan), torch.no_grad():
            want = model(**inputs).logits[:, -1]
        assert (got - want).abs().max().item() <= 1e-5, counts


def test_processor_without_torchvision(tmp_path):
    check_load_processor(FAMILY, tmp_path)


def test_search_recipe_cli_end_to_end(tmp_path, capsys):
    check_cli(FAMILY, tmp_path, capsys)
