"""Qwen2-VL beyond tests/test_qwen2_vl.py: generate() under keep-all, exact score rows, decode masks
with a sliding window, every rule family on images and on video, rows of other image sizes and
counts, and the command line on a saved checkpoint whose processor needs no torchvision."""
import pytest

from checks import assert_decode_masks_equal_model_masks, assert_keep_all_identical, assert_score_rows_match_eager
from recipe_search.models import get_adapter, supported_model_types
from recipe_search.runtime import PruningPlan, make_rule
from tiny_qwen import (LAYERS, MIXED_ROWS, PLANS, VIDEO_ROWS, check_cached_decode, check_cli, check_load_processor,
                       check_rows_alone, plan, qwen_inputs, tiny_model)



@pytest.fixture(scope="module")
def family() -> str:
    """The model type under test (tests/test_family_qwen2_5_vl.py reruns this module with its own)."""
    return "qwen2_vl"


@pytest.fixture(scope="module")
def models(family):
    return {"sdpa": tiny_model(family, "sdpa"), "eager": tiny_model(family, "eager")}


@pytest.fixture(params=["sdpa", "eager"])
def model(request, models):
    return models[request.param]


def test_family_is_recognised(models, family):
    adapter = get_adapter(models["sdpa"])
    assert adapter.family == family and family in supported_model_types()
    assert adapter.model_class == type(models["sdpa"]).__name__
    assert adapter.visual_token_ids == (4, 5)  # images and video frames are both prunable


def test_keep_all_identical(model, family):
    keep_all = PruningPlan.keep_all(LAYERS, 16, make_rule("fitprune"))
    assert_keep_all_identical(model, qwen_inputs(family, MIXED_ROWS), keep_all)
    assert_keep_all_identical(model, qwen_inputs(family, VIDEO_ROWS), keep_all)


def test_score_rows_match_eager(models, family):
    assert_score_rows_match_eager(models["eager"], qwen_inputs(family, MIXED_ROWS))
    assert_score_rows_match_eager(models["eager"], qwen_inputs(family, VIDEO_ROWS))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_masks_equal_model_masks_sliding_window(attn, family):
    model = tiny_model(family, attn, sliding_window=12)  # layers 2-3 slide; prompts are 22-25 tokens
    assert [get_adapter(model).layer_window(i) for i in range(LAYERS)] == [None, None, 12, 12]
    assert_decode_masks_equal_model_masks(model, plan("fitprune"), qwen_inputs(family, MIXED_ROWS), steps=3)


def test_decode_masks_equal_model_masks(model, family):
    assert_decode_masks_equal_model_masks(model, plan("random"), qwen_inputs(family, MIXED_ROWS), steps=3)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_cached_decode_equals_reforward(model, name, family):
    check_cached_decode(model, family, MIXED_ROWS, name)


@pytest.mark.parametrize("name", ["fitprune", "attention-previous"])
def test_video_tokens_pruned_cached_decode_equals_reforward(model, name, family):
    check_cached_decode(model, family, VIDEO_ROWS, name)


@pytest.mark.parametrize("images", ["per-image", "pooled"])
def test_rows_of_other_image_sizes_equal_rows_alone(model, images, family):
    check_rows_alone(model, family, images)


def test_processor_without_torchvision(tmp_path, family):
    check_load_processor(family, tmp_path)


def test_search_recipe_cli_end_to_end(tmp_path, capsys, family):
    check_cli(family, tmp_path, capsys)
