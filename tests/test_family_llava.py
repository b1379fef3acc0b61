"""LLaVA-1.5 with a Mistral (sliding window) or a Qwen2 (hybrid full / sliding layers) decoder.

The Llama decoder is covered by test_runtime_equivalence.py. Every prompt here is longer than the
16-token window, so the sliding masks and the sliding-window KV cache matter.
"""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from recipe_search.hooks import CallHook, HookSet
from recipe_search.models import get_adapter, supported_model_types
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule
from checks import (
    assert_cached_decode_equals_reforward,
    assert_decode_masks_equal_model_masks,
    assert_keep_all_identical,
    assert_rows_alone,
    assert_score_rows_match_eager,
    layer_contexts,
)
from tiny_llava_families import (
    BOS, CHAT_TEMPLATE, IMAGE, VIDEO, WINDOW, left_pad, run_search, text_config, word_tokenizer, write_calibration,
)

BACKBONES = ("mistral", "qwen2")
N_IMAGE = 64  # CLIP 32 px, patch 4, CLS dropped
PLANS = {  # 4 decoder layers, counts for a 64-token image
    "fitprune": ((48, 40, 20, 10), "fitprune", "same"),
    "attention-previous": ((64, 40, 20, 10), "attention", "previous"),
    "random": ((40, 40, 12, 12), "random", "same"),
    "dart": ((64, 32, 32, 16), "dart", "same"),
}


@functools.lru_cache(maxsize=None)
def tiny(backbone: str, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    """CLIP tower (32 px, patch 4 -> 64 visual tokens) + a 4-layer Mistral or Qwen2 decoder."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=4, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text_config(backbone), image_token_id=IMAGE,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [IMAGE, VIDEO]  # a random model must not generate placeholders
    model.set_attn_implementation(attn)
    return model


def inputs(rows: list[tuple[int, list[int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded processor-free inputs; a row (n, suffix) is [bos, 7, 8] + n x (64 image tokens, 20) + suffix."""
    gen = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([[BOS, 7, 8] + ([IMAGE] * N_IMAGE + [20]) * n + suffix for n, suffix in rows])
    pixels = torch.randn(sum(n for n, _ in rows), 3, 32, 32, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def plan(name: str, images: str = "per-image") -> PruningPlan:
    counts, rule, where = PLANS[name]
    return PruningPlan(counts, N_IMAGE, make_rule(rule), where, images=images)


# 1. the family is recognised ---------------------------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONES)
def test_family_recognised_with_its_windows(backbone):
    adapter = get_adapter(tiny(backbone))
    assert adapter.family == "llava" and "llava" in supported_model_types()
    dims = adapter.dims()
    assert (dims.num_layers, dims.hidden_size, dims.num_heads, dims.num_kv_heads) == (4, 64, 4, 2)
    assert adapter.visual_tokens_per_image() == N_IMAGE
    windows = [adapter.layer_window(i) for i in range(4)]
    assert windows == ([WINDOW] * 4 if backbone == "mistral" else [None, None, WINDOW, WINDOW])


# 2. keep-all is the bare model -------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_keep_all_identical(backbone, attn):
    assert_keep_all_identical(tiny(backbone, attn), inputs([(1, [11, 12, 13]), (1, [14])]),
                              PruningPlan.keep_all(4, N_IMAGE, make_rule("fitprune")))


# 3. score rows are the layer's own attention -----------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONES)
def test_score_rows_match_eager(backbone):
    assert_score_rows_match_eager(tiny(backbone, "eager"), inputs([(1, [11, 12, 13]), (1, [14])], seed=1))


# 4. decode masks, with prompts longer than the window ---------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_decode_masks_equal_model_masks(backbone, attn):
    batch = inputs([(1, [11, 12, 13]), (1, [14])], seed=1)
    assert batch["input_ids"].shape[1] > WINDOW
    assert_decode_masks_equal_model_masks(tiny(backbone, attn), plan("fitprune"), batch, steps=4)


# 5. cached generate() equals a pruned re-forward ---------------------------------------------------
@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("backbone", BACKBONES)
def test_cached_decode_equals_reforward(backbone, plan_name):
    assert_cached_decode_equals_reforward(tiny(backbone), plan(plan_name), inputs([(1, [11, 12, 13]), (1, [14])], 1))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mistral_sliding_window_generate_after_pruning(attn):
    """A user's report: cached generate() with a pruned recipe on a Mistral-backed LLaVA (window 16)
    crashed with "The size of tensor a (16) must match the size of tensor b (78)": the decode mask
    spanned the pruned prefix while the sliding-window cache holds only the window. The runtime
    before its rewrite fails here the same way ("(16) ... (63)" on this 78-token prompt); now it must
    run, and every step must equal the pruned re-forward."""
    batch = inputs([(1, [11, 12, 13, 14, 15, 16, 17, 18, 19, 21])], seed=3)
    assert batch["input_ids"].shape[1] == 78
    assert_cached_decode_equals_reforward(tiny("mistral", attn), plan("fitprune"), batch, steps=6)


# 6. rows with different numbers of images ----------------------------------------------------------
@pytest.mark.parametrize("images", ["per-image", "pooled"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_rows_with_different_image_counts_match_rows_alone(backbone, images):
    model = tiny(backbone)
    batch = inputs([(2, [11, 12, 13]), (1, [14, 15])], seed=1)
    alone = [inputs([(2, [11, 12, 13])], seed=1), inputs([(1, [14, 15])], seed=1)]
    alone[1]["pixel_values"] = batch["pixel_values"][2:3]
    for name in ("fitprune", "attention-previous"):
        assert_rows_alone(model, plan(name, images), batch, alone)
    # the check's count assertion reads a two-image row as one image of 128: a plan keeping all at layer 0
    assert_cached_decode_equals_reforward(model, plan("attention-previous", images), batch, steps=3)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_two_images_keep_their_own_share_or_compete_when_pooled(backbone):
    """Per image (default), each image keeps the schedule's count, the rule's top-k within that image;
    pooled, the two images' tokens compete for the counts of their total, top-k over both."""
    model = tiny(backbone)
    batch = inputs([(2, [11, 12, 13])], seed=4)
    first = torch.arange(3, 3 + N_IMAGE)
    second = first + N_IMAGE + 1
    counts = (64, 40, 40, 20)  # the first drop is at layer 1, scored on an unpruned input
    ctx = layer_contexts(model, batch)[0][1]
    rule = make_rule("fitprune")
    adapter = get_adapter(model)
    survivors = {}

    def record(images):
        def hook(layer, args, kwargs):  # runs after the runtime's hook: the live tokens' positions
            survivors[images] = adapter.read_layer_call(args, kwargs).position_ids[0]
        return hook

    for images in ("per-image", "pooled"):
        with PruningHandle(model, PruningPlan(counts, N_IMAGE, rule, images=images)), HookSet() as hooks:
            hooks.add(adapter.decoder_layers()[1], CallHook(record(images)))
            model(**batch)
    per_image, pooled = survivors["per-image"], survivors["pooled"]
    split = [int(torch.isin(per_image, img).sum()) for img in (first, second)]
    assert split == [40, 40]
    for img in (first, second):
        sub = ctx.unit_context(0, torch.isin(torch.arange(ctx.hidden.shape[1]), img)[None])
        assert torch.equal(per_image[torch.isin(per_image, img)], img[rule.select(sub, 40).keep[0]])
    both = torch.cat([first, second])
    assert torch.equal(pooled[torch.isin(pooled, both)], both[rule.select(ctx, 80).keep[0]])
    assert [int(torch.isin(pooled, img).sum()) for img in (first, second)] != [40, 40]  # they did compete


# 7. search-recipe end to end on a saved checkpoint -------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONES)
def test_search_recipe_end_to_end(backbone, tmp_path):
    tokenizer = word_tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)
    model = tiny(backbone)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    calib = write_calibration(tmp_path / "data", [(40, 32), (32, 48), (64, 64), (32, 32)])
    recipe = run_search(tmp_path / "ckpt", calib, tmp_path / "out", num_samples=4, family="llava")
    assert recipe.schedule.visual_tokens == N_IMAGE and recipe.model.model_type == "llava"
