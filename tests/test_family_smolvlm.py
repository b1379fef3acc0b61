"""SmolVLM through the pruning runtime: Idefics3's token layout with SmolVLM's model and processor.

Every test of test_family_idefics3.py runs here on a tiny SmolVLM (the `family` fixture is overridden);
the tests below cover what SmolVLM's processor adds: it wants one list of images per prompt, and
transformers' SmolVLMProcessor cannot be built without a video processor (torchvision) and `num2words`,
which the image-only processor the adapter loads does not need.
"""
from __future__ import annotations

import pytest
from transformers import SmolVLMImageProcessorPil, SmolVLMProcessor
from transformers.utils import is_num2words_available

from recipe_search.models import get_adapter
from recipe_search.models.base import chat_prompt
from test_family_idefics3 import (SQUARE, TALL, WIDE, _tiles, checkpoint, models, processor,  # noqa: F401  (fixtures)
                                  test_cached_decode_equals_reforward, test_decode_masks_equal_model_masks,
                                  test_family_is_recognised, test_keep_all_identical,
                                  test_processor_rebuilt_without_torchvision, test_rows_alone,
                                  test_score_rows_match_eager, test_search_recipe_cli,
                                  test_tiles_of_an_image_form_one_group)
from tiny_tiled import PROMPTS, images


@pytest.fixture(scope="module")
def family() -> str:
    return "smolvlm"


def test_processor_wants_one_image_list_per_prompt(models, processor):
    """A flat image list is read as all images of one prompt; the adapter nests them per prompt."""
    pics = images([WIDE, SQUARE, TALL])
    per_prompt = [[pics[0]], pics[1:]]
    texts = [chat_prompt(processor, p, len(ims)) for p, ims in zip(PROMPTS, per_prompt)]
    with pytest.raises(ValueError, match="number of <image> tokens"):
        processor(images=pics, text=texts, padding=True, return_tensors="pt")
    adapter = get_adapter(models["sdpa"])
    inputs = adapter.build_inputs(processor, per_prompt, list(PROMPTS[:2]))
    tiles = [_tiles(processor, WIDE), _tiles(processor, SQUARE) + _tiles(processor, TALL)]
    assert inputs["pixel_values"].shape[:2] == (2, max(tiles))  # the shorter row padded with empty tiles
    assert adapter.visual_groups(inputs["input_ids"]).amax(dim=1).tolist() == [0, 1]


@pytest.mark.skipif(is_num2words_available(), reason="num2words is installed")
def test_transformers_processor_needs_num2words(processor):
    """Why the adapter has its own image-only processor: transformers' refuses to exist without
    num2words (it only spells the frame count of video prompts)."""
    with pytest.raises(ImportError, match="num2words"):
        SmolVLMProcessor(SmolVLMImageProcessorPil(), processor.tokenizer, None)
