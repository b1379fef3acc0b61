"""Idefics3 through the pruning runtime, from tiny random checkpoints and Idefics3's own processor.

What the family adds and what is proved here: an image is a grid of tiles plus a global view, each
written as `<fake_token_around_image>` + a row/col or `<global-img>` tag + `<image>` x n; the tags are
text (never pruned) and all tiles of an image form one group for the per-image policy; the processor
takes one list of images per prompt and is rebuilt from a saved folder without torchvision.

test_family_smolvlm.py runs these same tests on SmolVLM by overriding the `family` fixture.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from checks import (assert_cached_decode_equals_reforward, assert_decode_masks_equal_model_masks,
                    assert_keep_all_identical, assert_rows_alone, assert_score_rows_match_eager)
from recipe_search import load_recipe
from recipe_search.cli import main
from recipe_search.models import get_adapter, supported_model_types
from recipe_search.models.base import chat_prompt
from recipe_search.runtime import PruningPlan, make_rule
from tiny_tiled import (LAYERS, PROMPTS, TILE_TOKENS, batch_and_rows, images, rule_plans, save_checkpoint,
                        sized_inputs, tiled_processor, tiny_tiled, write_calibration)

SQUARE, WIDE, TALL = (30, 30), (20, 70), (70, 24)  # 2x2 tiles, 1x2 tiles, 2x1 tiles; each + the global view
LOADED = {"idefics3": ("Idefics3Processor", "Idefics3ImageProcessorPil"),
          "smolvlm": ("SmolVLMImagesOnlyProcessor", "SmolVLMImageProcessorPil")}
HUB_PROCESSOR = {"idefics3": "Idefics3Processor", "smolvlm": "SmolVLMProcessor"}


@pytest.fixture(scope="module")
def family() -> str:
    return "idefics3"


@pytest.fixture(scope="module")
def processor(family):
    return tiled_processor(family)


@pytest.fixture(scope="module")
def models(family, processor) -> dict:
    """attention -> model; both share their weights."""
    return {attn: tiny_tiled(family, processor.tokenizer, attn) for attn in ("sdpa", "eager")}


def _tiles(processor, size: tuple[int, int], **kwargs) -> int:
    """Tiles the image processor makes of an image of `size`: rows x cols plus the global view."""
    info = processor.image_processor(images=[images([size])], return_row_col_info=True, **kwargs)
    rows, cols = int(info["rows"][0][0]), int(info["cols"][0][0])
    return rows * cols + 1 if rows or cols else 1


def test_family_is_recognised(family, models, processor):
    adapter = get_adapter(models["sdpa"])
    assert adapter.family == family and family in supported_model_types()
    assert adapter.visual_tokens_per_image() is None  # the tile count follows the image
    tok = processor.tokenizer
    assert adapter.visual_token_ids == (tok.convert_tokens_to_ids("<image>"),)
    tags = ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_2_col_2>"]
    assert not bool(adapter.visual_mask(torch.tensor([tok.convert_tokens_to_ids(tags)])).any())
    assert [adapter.layer_window(i) for i in range(LAYERS)] == [None] * LAYERS


@pytest.mark.parametrize("splitting", [True, False])
def test_tiles_of_an_image_form_one_group(models, processor, splitting):
    """Each image's group is all of its tiles and its global view, in prompt order, whatever the grid;
    with image splitting off every image is its global view alone."""
    adapter = get_adapter(models["sdpa"])
    per_prompt = [[SQUARE], [WIDE, TALL], [TALL, SQUARE, WIDE]]
    texts = [chat_prompt(processor, p, len(s)) for p, s in zip(PROMPTS, per_prompt)]
    pics = [images(s) for s in per_prompt]
    ids = processor(images=pics, text=texts, padding=True, return_tensors="pt",
                    do_image_splitting=splitting)["input_ids"]
    groups = adapter.visual_groups(ids)
    for row, sizes in enumerate(per_prompt):
        expected = torch.cat([torch.full((_tiles(processor, s, do_image_splitting=splitting) * TILE_TOKENS,), u)
                              for u, s in enumerate(sizes)])
        assert torch.equal(groups[row][groups[row] >= 0], expected)
        assert torch.equal(groups[row] >= 0, adapter.visual_mask(ids)[row])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_identical(models, processor, attn):
    model = models[attn]
    assert_keep_all_identical(model, sized_inputs(model, processor, [WIDE, [SQUARE, TALL]]),
                              PruningPlan.keep_all(LAYERS, 48, make_rule("attention")))


def test_score_rows_match_eager(models, processor):
    model = models["eager"]
    assert_score_rows_match_eager(model, sized_inputs(model, processor, [WIDE, [SQUARE, TALL]], seed=3))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_masks_equal_model_masks(models, processor, attn):
    model = models[attn]
    assert_decode_masks_equal_model_masks(model, rule_plans()["fitprune"],
                                          sized_inputs(model, processor, [WIDE, [SQUARE, TALL]], seed=4))


@pytest.mark.parametrize("rule", sorted(rule_plans()))
def test_cached_decode_equals_reforward(models, processor, rule):
    """Row 0 is one 48-token image (so the counts are the plan's), row 1 two images of other sizes."""
    model = models["sdpa"]
    inputs = sized_inputs(model, processor, [WIDE, [TALL, SQUARE]], seed=1)
    assert_cached_decode_equals_reforward(model, rule_plans()[rule], inputs, steps=4)


@pytest.mark.parametrize("images_policy", ["per-image", "pooled"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_alone(models, processor, attn, images_policy):
    """Rows with different image sizes and numbers of images, left-padded together (pixel values padded
    with empty images), give each row's logits as when the row is processed and run alone."""
    model = models[attn]
    plan = PruningPlan((48, 40, 20, 8), 48, make_rule("attention"), images=images_policy)
    pics = images([WIDE, SQUARE, TALL, TALL], seed=2)
    per_prompt = [pics[0], [pics[1], pics[2]], pics[3]]
    batch, alone = batch_and_rows(get_adapter(model), processor, per_prompt, list(PROMPTS[:3]))
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3
    assert_rows_alone(model, plan, batch, alone)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, family, models, processor):
    folder = tmp_path_factory.mktemp(f"{family}-ckpt")
    return save_checkpoint(models["sdpa"], processor, folder, HUB_PROCESSOR[family])


def test_processor_rebuilt_without_torchvision(family, checkpoint, processor, models):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the checkpoint's own processor is used")
    adapter = get_adapter(models["sdpa"])
    loaded = adapter.load_processor(str(checkpoint))
    assert (type(loaded).__name__, type(loaded.image_processor).__name__) == LOADED[family]
    assert loaded.image_seq_len == TILE_TOKENS
    pics = images([WIDE, SQUARE, TALL], seed=5)
    ours = adapter.build_inputs(loaded, [pics[0], pics[1:]], list(PROMPTS[:2]))
    theirs = adapter.build_inputs(processor, [pics[0], pics[1:]], list(PROMPTS[:2]))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_search_recipe_cli(family, checkpoint, tmp_path, capsys):
    calib = write_calibration(tmp_path / "calib", [[WIDE], [SQUARE, TALL], [TALL], [WIDE], [SQUARE], [WIDE, WIDE]])
    out = tmp_path / "out"
    code = main(["--model", str(checkpoint), "--calib", str(calib), "--budget", "50%", "--n-trials", "4", "--eval", "none",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    recipes = sorted(out.glob("*.json"))
    assert len(recipes) == 1
    recipe = load_recipe(recipes[0])
    assert recipe.model.family == family and recipe.budget.achieved["full"] <= 0.5
    assert json.loads(recipes[0].read_text())["format"] == "recipe-search/recipe"
