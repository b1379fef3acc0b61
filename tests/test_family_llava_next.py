"""LLaVA-NeXT (anyres): the visual-token count follows each image's size, so rows of one batch keep
different numbers of tokens; tiny random model with a Mistral decoder (16-token sliding window)."""
from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor,
)

from recipe_search.models import get_adapter, supported_model_types
from recipe_search.models.loading import load_model
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule
from checks import (
    assert_cached_decode_equals_reforward,
    assert_decode_masks_equal_model_masks,
    assert_keep_all_identical,
    assert_rows_alone,
    assert_score_rows_match_eager,
)
from tiny_llava_families import (
    BOS, CHAT_TEMPLATE, IMAGE, VIDEO, WINDOW, left_pad, run_search, text_config, word_tokenizer, write_calibration,
)

PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # (height, width): up to 2 x 2 tiles of 32 px, + the base tile
RULES = {  # fractions of each image's own count, for 4 decoder layers
    "fitprune": ((0.75, 0.5, 0.5, 0.25), "fitprune", "same"),
    "attention-previous": ((1.0, 0.5, 0.25, 0.25), "attention", "previous"),
    "random": ((0.5, 0.5, 0.25, 0.125), "random", "same"),
    "dart": ((1.0, 0.5, 0.5, 0.25), "dart", "same"),
}


@functools.lru_cache(maxsize=None)
def tiny(attn: str = "sdpa") -> LlavaNextForConditionalGeneration:
    """CLIP tower (32 px tiles, patch 8: 16 patches per tile, CLS dropped) + 4-layer Mistral decoder."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaNextConfig(vision_config=vision, text_config=text_config("mistral"), image_grid_pinpoints=PINPOINTS,
                             image_token_id=IMAGE, vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [IMAGE, VIDEO]  # a random model must not generate placeholders
    model.set_attn_implementation(attn)
    return model


def image_counts(sizes: list[tuple[int, int]]) -> list[int]:
    """Visual tokens the model produces for images of these (height, width): base + unpadded grid + newlines."""
    pixels = torch.zeros(len(sizes), 5, 3, 32, 32)
    with torch.no_grad():
        feats = tiny().model.get_image_features(pixels, torch.tensor(sizes)).pooler_output
    return [f.shape[0] for f in feats]


def inputs(rows: list[tuple[list[tuple[int, int]], list[int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-free inputs; a row (sizes, suffix) is [bos, 7, 8] + per image (its tokens, 20) + suffix."""
    sizes = [s for images, _ in rows for s in images]
    counts = iter(image_counts(sizes))
    ids, mask = left_pad([[BOS, 7, 8] + sum(([IMAGE] * next(counts) + [20] for _ in images), []) + suffix
                          for images, suffix in rows])
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(len(sizes), 5, 3, 32, 32, generator=gen),
            "image_sizes": torch.tensor(sizes)}


def rows_alone(batch: dict, rows: list[tuple[list[tuple[int, int]], list[int]]], seed: int) -> list[dict]:
    """Each row of `batch` as its own input, with its own images' pixels."""
    out, first = [], 0
    for row in rows:
        single = inputs([row], seed)
        n = len(row[0])
        single["pixel_values"] = batch["pixel_values"][first:first + n]
        first += n
        out.append(single)
    return out


def plan(name: str, visual_tokens: int) -> PruningPlan:
    fractions, rule, where = RULES[name]
    counts = tuple(round(f * visual_tokens) for f in fractions)
    return PruningPlan(counts, visual_tokens, make_rule(rule), where)


SIZES = [(32, 32), (32, 64), (90, 40)]  # (height, width): three different counts


# 1. the family is recognised ---------------------------------------------------------------------
def test_family_recognised_and_counts_vary_with_size():
    adapter = get_adapter(tiny())
    assert adapter.family == "llava_next" and "llava_next" in supported_model_types()
    assert adapter.visual_tokens_per_image() is None
    assert (adapter.dims().num_layers, adapter.dims().num_kv_heads) == (4, 2)
    assert [adapter.layer_window(i) for i in range(4)] == [WINDOW] * 4
    counts = image_counts(SIZES)
    assert len(set(counts)) == 3 and min(counts) > 16


def test_newline_positions_are_visual_tokens():
    """image_newline features sit at image placeholders: every one of them is a prunable visual token."""
    model = tiny()
    batch = inputs([([SIZES[1]], [11, 12])])
    feats = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output[0]
    newline = (feats == model.model.image_newline).all(-1)
    assert int(newline.sum()) > 0
    assert int(get_adapter(model).visual_mask(batch["input_ids"]).sum()) == feats.shape[0]
    assert get_adapter(model).visual_token_ids == (IMAGE,)


def test_vision_side_rules_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="^vision-side selection rules are not supported for the llava_next family"):
        PruningHandle(model, PruningPlan((8, 8, 4, 4), 16, make_rule("fitprune"), vision=make_rule("ficoco-v")))
    assert not model._forward_pre_hooks and not model.get_decoder().layers[0]._forward_pre_hooks


# 2. keep-all is the bare model -------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_identical(attn):
    batch = inputs([([SIZES[0]], [11, 12, 13]), ([SIZES[2]], [14])])
    n = image_counts([SIZES[0]])[0]
    assert_keep_all_identical(tiny(attn), batch, PruningPlan.keep_all(4, n, make_rule("fitprune")))


# 3. score rows are the layer's own attention -----------------------------------------------------
def test_score_rows_match_eager():
    assert_score_rows_match_eager(tiny("eager"), inputs([([SIZES[0]], [11, 12, 13]), ([SIZES[2]], [14])], seed=1))


# 4. decode masks, with prompts longer than the window ---------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_masks_equal_model_masks(attn):
    batch = inputs([([SIZES[1]], [11, 12, 13]), ([SIZES[2]], [14])], seed=1)
    assert batch["input_ids"].shape[1] > WINDOW
    n = image_counts([SIZES[1]])[0]
    assert_decode_masks_equal_model_masks(tiny(attn), plan("fitprune", n), batch, steps=4)


# 5. cached generate() equals a pruned re-forward, rows with different image sizes -----------------
@pytest.mark.parametrize("rule", sorted(RULES))
def test_cached_decode_equals_reforward(rule):
    batch = inputs([([SIZES[1]], [11, 12, 13]), ([SIZES[2]], [14])], seed=1)
    first, second = image_counts([SIZES[1], SIZES[2]])
    p = plan(rule, first)
    assert_cached_decode_equals_reforward(tiny(), p, batch)
    with PruningHandle(tiny(), p) as handle:  # the second row keeps the fractions of its own count
        tiny()(**inputs([([SIZES[2]], [14])], seed=1))
        assert handle.last_counts == p.counts_for(second) != list(p.counts)


# 6. rows with different image sizes and numbers of images -----------------------------------------
@pytest.mark.parametrize("images", ["per-image", "pooled"])
def test_rows_with_different_image_sizes_match_rows_alone(images):
    rows = [([SIZES[0], SIZES[2]], [11, 12, 13]), ([SIZES[1]], [14, 15])]
    batch = inputs(rows, seed=2)
    alone = rows_alone(batch, rows, seed=2)
    n = image_counts([SIZES[0]])[0]
    for rule in ("fitprune", "attention-previous", "dart"):
        fractions, name, where = RULES[rule]
        p = PruningPlan(tuple(round(f * n) for f in fractions), n, make_rule(name), where, images=images)
        assert_rows_alone(tiny(), p, batch, alone)


# 7. search-recipe end to end on a saved checkpoint -------------------------------------------------
def test_search_recipe_end_to_end(tmp_path):
    tokenizer = word_tokenizer()
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    model = tiny()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")

    loaded, rebuilt, adapter = load_model(tmp_path / "ckpt")
    assert adapter.family == "llava_next"
    assert isinstance(rebuilt, LlavaNextProcessor) and isinstance(rebuilt.image_processor, LlavaNextImageProcessorPil)
    images = [Image.new("RGB", (w, h), (200, 30, 30)) for h, w in SIZES[:2]]  # PIL sizes are (w, h)
    built = adapter.build_inputs(rebuilt, images, ["what colour is the circle ?", "how many shapes are there ?"])
    assert (built["input_ids"] == IMAGE).sum(1).tolist() == image_counts(SIZES[:2])
    assert bool(built["attention_mask"][:, -1].all())  # left-padded
    loaded(**built)
    calib = write_calibration(tmp_path / "data", [(32, 32), (64, 32), (40, 90), (48, 48)])
    recipe = run_search(tmp_path / "ckpt", calib, tmp_path / "out", num_samples=4, family="llava_next")
    assert recipe.model.visual_tokens_per_image is None
