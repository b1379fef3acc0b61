"""InternVL through the pruning runtime, from tiny random checkpoints and InternVL's own processor.

What the family adds and what is proved here: an image is several tiles (up to 4 plus a thumbnail here)
whose `<IMG_CONTEXT>` tokens are one run between `<img>` and `</img>`, so one image is one group for the
per-image policy whatever its tile count; Qwen2 (here with sliding-window layers, prompts longer than
the window) or Llama decoders; the processor is rebuilt from a saved folder without torchvision.
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
from recipe_search.models.internvl import InternVLImagesOnlyProcessor
from recipe_search.runtime import PruningPlan, make_rule
from tiny_tiled import (LAYERS, PROMPTS, TILE_TOKENS, batch_and_rows, images, internvl_processor, rule_plans,
                        save_checkpoint, sized_inputs, tiny_internvl, write_calibration)

WINDOW = 24  # Qwen2's layers 2 and 3 slide; every prompt below is longer
WIDE, SQUARE, TALL = (40, 70), (32, 32), (70, 20)  # 2 tiles + thumbnail, 1 tile, 4 tiles + thumbnail
BACKBONES = {"qwen2": WINDOW, "llama": None}


@pytest.fixture(scope="module")
def processor() -> InternVLImagesOnlyProcessor:
    return internvl_processor()


@pytest.fixture(scope="module")
def models(processor) -> dict:
    """(backbone, attention) -> model; both attentions of a backbone share their weights."""
    return {(b, attn): tiny_internvl(processor.tokenizer, attn, b, window)
            for b, window in BACKBONES.items() for attn in ("sdpa", "eager")}


def test_family_is_recognised(models, processor):
    for backbone in BACKBONES:
        adapter = get_adapter(models[(backbone, "sdpa")])
        assert adapter.family == "internvl" and "internvl" in supported_model_types()
        assert adapter.visual_tokens_per_image() is None  # the tile count follows the image
        assert adapter.visual_token_ids == (processor.tokenizer.context_image_token_id,)  # <img>, </img> are text
    adapter = get_adapter(models[("qwen2", "sdpa")])
    assert [adapter.layer_window(i) for i in range(LAYERS)] == [None, None, WINDOW, WINDOW]
    assert [get_adapter(models[("llama", "sdpa")]).layer_window(i) for i in range(LAYERS)] == [None] * LAYERS


def test_tiles_of_an_image_form_one_group(models, processor):
    """Each image's group is exactly the `<IMG_CONTEXT>` tokens between its own `<img>` and `</img>`,
    all of its tiles (the image processor's patch count x tokens per tile)."""
    adapter = get_adapter(models[("qwen2", "sdpa")])
    per_prompt = [WIDE, [SQUARE, TALL], [TALL, WIDE, SQUARE]]
    inputs = sized_inputs(models[("qwen2", "sdpa")], processor, per_prompt)
    groups = adapter.visual_groups(inputs["input_ids"])
    tok = processor.tokenizer
    for row, entry in enumerate(per_prompt):
        sizes = entry if isinstance(entry, list) else [entry]
        ids = inputs["input_ids"][row]
        opens = (ids == tok.start_image_token_id).nonzero()[:, 0].tolist()
        closes = (ids == tok.end_image_token_id).nonzero()[:, 0].tolist()
        assert len(opens) == len(closes) == len(sizes)
        for u, (a, b, pic) in enumerate(zip(opens, closes, images(sizes))):
            tiles = int(processor.image_processor(images=[pic], crop_to_patches=True)["num_patches"][0])
            assert tiles > 1 or pic.size == SQUARE[::-1]
            expected = torch.zeros_like(ids, dtype=torch.bool)
            expected[a + 1:b] = True
            assert torch.equal(groups[row] == u, expected) and int(expected.sum()) == tiles * TILE_TOKENS
        assert int((groups[row] >= 0).sum()) == int(adapter.visual_mask(ids[None]).sum())


def test_video_frames_are_image_groups(models, processor):
    """A video is written as frames `<img>` + `<IMG_CONTEXT>` x 16 + `</img>` (the processor's own text for
    it) and fed as images: each frame is one group, and a pruned cached decode equals the re-forward."""
    model = models[("qwen2", "sdpa")]
    adapter = get_adapter(model)
    frames = 3
    video = processor.replace_video_token({"pixel_values_videos": [torch.zeros(frames, 3, 32, 32)]}, 0)
    text = f"<|im_start|>user\n{video}\n{PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n"
    inputs = dict(processor.tokenizer([text], return_tensors="pt"))
    inputs["pixel_values"] = torch.randn(frames, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    groups = adapter.visual_groups(inputs["input_ids"])[0]
    assert [int((groups == u).sum()) for u in range(frames)] == [TILE_TOKENS] * frames
    assert int((groups >= 0).sum()) == frames * TILE_TOKENS
    plan = PruningPlan((16, 12, 8, 4), 16, make_rule("fitprune"))
    assert_cached_decode_equals_reforward(model, plan, inputs, steps=3)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_identical(models, processor, backbone, attn):
    model = models[(backbone, attn)]
    assert_keep_all_identical(model, sized_inputs(model, processor, [WIDE, [SQUARE, TALL]]),
                              PruningPlan.keep_all(LAYERS, 48, make_rule("attention")))


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_score_rows_match_eager(models, processor, backbone):
    model = models[(backbone, "eager")]
    assert_score_rows_match_eager(model, sized_inputs(model, processor, [WIDE, [SQUARE, TALL]], seed=3))


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_masks_equal_model_masks(models, processor, backbone, attn):
    """Sliding layers' rebuilt masks (window 24, prompts of 100+ tokens) and full layers' alike."""
    model = models[(backbone, attn)]
    inputs = sized_inputs(model, processor, [WIDE, [SQUARE, TALL]], seed=4)
    assert inputs["input_ids"].shape[1] > 2 * WINDOW
    assert_decode_masks_equal_model_masks(model, rule_plans()["fitprune"], inputs)


@pytest.mark.parametrize("rule", sorted(rule_plans()))
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_cached_decode_equals_reforward(models, processor, backbone, rule):
    """Row 0 is one 48-token image (so the counts are the plan's), row 1 two images of other sizes."""
    model = models[(backbone, "sdpa")]
    inputs = sized_inputs(model, processor, [WIDE, [TALL, SQUARE]], seed=1)
    assert_cached_decode_equals_reforward(model, rule_plans()[rule], inputs, steps=4)


@pytest.mark.parametrize("images_policy", ["per-image", "pooled"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_alone(models, processor, attn, images_policy):
    """Rows with different image sizes and numbers of images, left-padded together, give each row's
    logits as when the row is processed and run alone."""
    model = models[("qwen2", attn)]
    plan = PruningPlan((48, 40, 20, 8), 48, make_rule("attention"), images=images_policy)
    pics = images([WIDE, SQUARE, TALL, TALL], seed=2)
    per_prompt = [pics[0], [pics[1], pics[2]], pics[3]]
    batch, alone = batch_and_rows(get_adapter(model), processor, per_prompt, list(PROMPTS[:3]))
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3
    assert_rows_alone(model, plan, batch, alone)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, models, processor):
    folder = tmp_path_factory.mktemp("internvl-ckpt")
    return save_checkpoint(models[("qwen2", "sdpa")], processor, folder, "InternVLProcessor")


def test_processor_rebuilt_without_torchvision(checkpoint, processor, models):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the checkpoint's own processor is used")
    loaded = get_adapter(models[("qwen2", "sdpa")]).load_processor(str(checkpoint))
    assert type(loaded.image_processor).__name__ == "GotOcr2ImageProcessorPil"
    assert loaded.image_seq_length == TILE_TOKENS and getattr(loaded, "video_processor", None) is None
    adapter = get_adapter(models[("qwen2", "sdpa")])
    pics = images([WIDE, SQUARE, TALL], seed=5)
    ours = adapter.build_inputs(loaded, [pics[0], pics[1:]], list(PROMPTS[:2]))
    theirs = adapter.build_inputs(processor, [pics[0], pics[1:]], list(PROMPTS[:2]))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_search_recipe_cli(checkpoint, tmp_path, capsys):
    calib = write_calibration(tmp_path / "calib", [[WIDE], [SQUARE, TALL], [TALL], [WIDE], [SQUARE], [WIDE, WIDE]])
    out = tmp_path / "out"
    code = main(["--model", str(checkpoint), "--calib", str(calib), "--budget", "50%", "--n-trials", "4", "--eval", "none",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    recipes = sorted(out.glob("*.json"))
    assert len(recipes) == 1
    recipe = load_recipe(recipes[0])
    assert recipe.model.family == "internvl" and recipe.budget.achieved["full"] <= 0.5
    assert json.loads(recipes[0].read_text())["format"] == "recipe-search/recipe"
