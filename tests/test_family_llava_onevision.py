"""LLaVA-OneVision: anyres single images, multi-image prompts (base tile + newline per image) and
video (frames pooled 2x2, one newline per video), all pruned by the same rules; tiny random model
with a Qwen2 decoder whose last two layers slide over 16 tokens."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from PIL import Image
from transformers import (
    LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil, SiglipVisionConfig,
)

from recipe_search.hooks import CallHook, HookSet
from recipe_search.models import get_adapter, supported_model_types
from recipe_search.models.llava_onevision import images_only_processor_class
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
    BOS, IMAGE, VIDEO, WINDOW, left_pad, run_search, text_config, word_tokenizer, write_calibration,
)

PINPOINTS = [[40, 40], [40, 80], [80, 40], [80, 80]]
PER_IMAGE = 26      # a multi-image image: 5 x 5 patches + newline
FRAMES = 4
VIDEO_TOKENS = FRAMES * 9 + 1  # 3 x 3 pooled patches per frame + one newline per video
# OneVision's own template: all images back to back, then the videos, then the text.
TEMPLATE = (
    "{%- for message in messages -%}{{- 'USER: ' -}}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'video' -%}{{- '<video>' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- '\\n' + item['text'] -}}{%- endfor -%}"
    "{{- '\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
RULES = {  # fractions of each group's own count, for 4 decoder layers
    "fitprune": ((0.75, 0.5, 0.5, 0.25), "fitprune", "same"),
    "attention-previous": ((1.0, 0.5, 0.25, 0.25), "attention", "previous"),
    "random": ((0.5, 0.5, 0.25, 0.125), "random", "same"),
    "dart": ((1.0, 0.5, 0.5, 0.25), "dart", "same"),
}


@functools.lru_cache(maxsize=None)
def tiny(attn: str = "sdpa", side: int = 5) -> LlavaOnevisionForConditionalGeneration:
    """SigLIP tower (tiles of side x 8 px, patch 8, no CLS) + 4-layer Qwen2 decoder (layers 2, 3 slide)."""
    torch.manual_seed(0)
    tile = side * 8
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=tile, patch_size=8)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text_config("qwen2"), image_token_id=IMAGE,
                                  video_token_id=VIDEO, vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  image_grid_pinpoints=[[h * tile // 40, w * tile // 40] for h, w in PINPOINTS])
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [IMAGE, VIDEO]  # a random model must not generate placeholders
    model.set_attn_implementation(attn)
    return model


def image_counts(sizes: list[tuple[int, int]], per_prompt: list[int]) -> list[int]:
    """Tokens the model gives images of these (height, width), `per_prompt` images per prompt."""
    pixels = torch.zeros(len(sizes), 5, 3, 40, 40)
    with torch.no_grad():
        feats = tiny().model.get_image_features(pixels, torch.tensor(sizes),
                                                batch_num_images=torch.tensor(per_prompt)).pooler_output
    return [f.shape[0] for f in feats]


def inputs(rows: list[tuple[list[tuple[int, int]], bool, list[int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-free inputs. A row (image sizes, has a video, suffix) is [bos, 7, 8] + its images back to
    back (one anyres image, or several in the multi-image layout) + its video + [20] + suffix."""
    sizes = [s for images, _, _ in rows for s in images]
    per_prompt = [len(images) for images, _, _ in rows]
    counts = iter(image_counts(sizes, per_prompt) if sizes else [])
    ids, mask = left_pad([[BOS, 7, 8] + sum(([IMAGE] * next(counts) for _ in images), [])
                          + [VIDEO] * VIDEO_TOKENS * video + [20] + suffix for images, video, suffix in rows])
    gen = torch.Generator().manual_seed(seed)
    out = {"input_ids": ids, "attention_mask": mask}
    if sizes:
        out.update(pixel_values=torch.randn(len(sizes), 5, 3, 40, 40, generator=gen), image_sizes=torch.tensor(sizes),
                   batch_num_images=torch.tensor(per_prompt))
    videos = sum(video for _, video, _ in rows)
    if videos:
        out["pixel_values_videos"] = torch.randn(videos, FRAMES, 3, 40, 40, generator=gen)
    return out


def plan(name: str, visual_tokens: int, images: str = "per-image") -> PruningPlan:
    fractions, rule, where = RULES[name]
    return PruningPlan(tuple(round(f * visual_tokens) for f in fractions), visual_tokens, make_rule(rule), where,
                       images=images)


def groups(model, ids: list[int]) -> list[int]:
    """Sizes of the groups `visual_groups` forms in one row."""
    g = get_adapter(model).visual_groups(torch.tensor([ids]))[0]
    return torch.bincount(g[g >= 0]).tolist()


SIZES = [(40, 40), (40, 80), (90, 40)]  # (height, width)


# 1. the family is recognised, its groups ---------------------------------------------------------
def test_family_recognised_with_video():
    adapter = get_adapter(tiny())
    assert adapter.family == "llava_onevision" and "llava_onevision" in supported_model_types()
    assert "video" in adapter.modalities and adapter.visual_token_ids == (IMAGE, VIDEO)
    assert adapter.visual_tokens_per_image() is None
    assert [adapter.layer_window(i) for i in range(4)] == [None, None, WINDOW, WINDOW]
    assert image_counts(SIZES[:2], [2]) == [PER_IMAGE, PER_IMAGE]
    assert len(set(image_counts(SIZES, [1, 1, 1]))) == 3


def test_video_and_images_form_sensible_groups():
    model = tiny()
    single = image_counts([SIZES[2]], [1])[0]
    # a video is one group (its frames compete), never merged with an image written right before it
    assert groups(model, [1, 7] + [VIDEO] * VIDEO_TOKENS + [20]) == [VIDEO_TOKENS]
    assert groups(model, [1] + [IMAGE] * single + [VIDEO] * VIDEO_TOKENS + [20]) == [single, VIDEO_TOKENS]
    # images written back to back by OneVision's template: the multi-image layout splits into images
    assert groups(model, [1] + [IMAGE] * 3 * PER_IMAGE + [20]) == [PER_IMAGE] * 3
    assert groups(model, [1] + [IMAGE] * single + [20]) == [single]
    # where one anyres image can have 2 (P + 1) tokens (tiles of 4 x 4: 16 + 2 x 9 = 34), it stays one group
    small = tiny(side=4)
    assert 34 in get_adapter(small).single_image_token_counts
    assert groups(small, [1] + [IMAGE] * 34 + [20]) == [34]
    assert groups(small, [1] + [IMAGE] * 51 + [20]) == [17] * 3


def test_vision_side_rules_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="^vision-side selection rules are not supported for the llava_onevision family"):
        PruningHandle(model, PruningPlan((8, 8, 4, 4), 16, make_rule("fitprune"), vision=make_rule("freepruner")))
    assert not model._forward_pre_hooks


# 2. keep-all is the bare model, images and video --------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_identical(attn):
    batch = inputs([([SIZES[0], SIZES[1]], True, [11, 12, 13]), ([SIZES[2]], True, [14])])
    assert_keep_all_identical(tiny(attn), batch, PruningPlan.keep_all(4, PER_IMAGE, make_rule("fitprune")))


# 3. score rows are the layer's own attention -----------------------------------------------------
def test_score_rows_match_eager():
    batch = inputs([([SIZES[0]], True, [11, 12, 13]), ([SIZES[1], SIZES[2]], False, [14])], seed=1)
    assert_score_rows_match_eager(tiny("eager"), batch)


# 4. decode masks (full and sliding layers) --------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_masks_equal_model_masks(attn):
    batch = inputs([([], True, [11, 12, 13]), ([SIZES[1]], False, [14])], seed=1)
    assert batch["input_ids"].shape[1] > WINDOW
    assert_decode_masks_equal_model_masks(tiny(attn), plan("fitprune", VIDEO_TOKENS), batch, steps=4)


# 5. cached generate() equals a pruned re-forward: video rows and image rows -------------------------
@pytest.mark.parametrize("rule", sorted(RULES))
def test_video_cached_decode_equals_reforward_and_counts(rule):
    """Processor-free video input: the frames' placeholders are pruned to the schedule's counts."""
    batch = inputs([([], True, [11, 12, 13]), ([], True, [14])], seed=1)
    p = plan(rule, VIDEO_TOKENS)
    assert_cached_decode_equals_reforward(tiny(), p, batch)
    with PruningHandle(tiny(), p) as handle:
        tiny()(**batch)
        assert handle.last_counts == list(p.counts) and p.counts[-1] < VIDEO_TOKENS


@pytest.mark.parametrize("rule", ["fitprune", "attention-previous"])
def test_image_cached_decode_equals_reforward(rule):
    batch = inputs([([SIZES[1]], False, [11, 12, 13]), ([SIZES[2]], False, [14])], seed=1)
    first, second = image_counts([SIZES[1], SIZES[2]], [1, 1])
    p = plan(rule, first)
    assert_cached_decode_equals_reforward(tiny(), p, batch)
    with PruningHandle(tiny(), p) as handle:
        tiny()(**inputs([([SIZES[2]], False, [14])], seed=1))
        assert handle.last_counts == p.counts_for(second) != list(p.counts)


def test_image_and_video_in_one_prompt_each_keep_their_share():
    """Per image, the two images and the video written back to back each keep their own schedule
    (the video the fractions of its 37 tokens); pooled, they compete for the counts of all 89."""
    model = tiny()
    adapter = get_adapter(model)
    batch = inputs([([SIZES[0], SIZES[1]], True, [11, 12])], seed=3)
    spans = [torch.arange(3, 3 + PER_IMAGE), torch.arange(3 + PER_IMAGE, 3 + 2 * PER_IMAGE),
             torch.arange(3 + 2 * PER_IMAGE, 3 + 2 * PER_IMAGE + VIDEO_TOKENS)]
    splits = {}
    for images in ("per-image", "pooled"):
        p = plan("fitprune", PER_IMAGE, images)
        live: list[torch.Tensor] = []
        with PruningHandle(model, p), HookSet() as hooks:
            for layer in adapter.decoder_layers():  # after the runtime's hook: positions of the live tokens
                hooks.add(layer, CallHook(lambda m, a, k: live.append(adapter.read_layer_call(a, k).position_ids[0])))
            model(**batch)
        splits[images] = [[int(torch.isin(pos, span).sum()) for span in spans] for pos in live]
    video = p.counts_for(VIDEO_TOKENS)
    assert splits["per-image"] == [[c, c, v] for c, v in zip(p.counts, video)]
    assert [sum(s) for s in splits["pooled"]] == p.counts_for(2 * PER_IMAGE + VIDEO_TOKENS)
    assert splits["pooled"] != splits["per-image"]


# 6. rows with different image sizes, numbers of images, a video -----------------------------------
@pytest.mark.parametrize("images", ["per-image", "pooled"])
def test_mixed_rows_match_rows_alone(images):
    rows = [([SIZES[0], SIZES[1]], False, [11, 12, 13]), ([SIZES[2]], True, [14, 15]), ([], True, [16])]
    batch = inputs(rows, seed=2)
    alone = [inputs([row], seed=2) for row in rows]
    alone[0]["pixel_values"] = batch["pixel_values"][:2]
    alone[1]["pixel_values"] = batch["pixel_values"][2:3]
    alone[1]["pixel_values_videos"] = batch["pixel_values_videos"][:1]
    alone[2]["pixel_values_videos"] = batch["pixel_values_videos"][1:2]
    for rule in ("fitprune", "attention-previous", "dart"):
        assert_rows_alone(tiny(), plan(rule, PER_IMAGE, images), batch, alone)


# 7. search-recipe end to end on a saved checkpoint (images; the processor has no video part) --------
def test_search_recipe_end_to_end(tmp_path):
    folder = tmp_path / "ckpt"
    processor = images_only_processor_class()(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": 40, "width": 40},
                                                        image_grid_pinpoints=PINPOINTS),
        tokenizer=word_tokenizer(), num_image_tokens=25, vision_feature_select_strategy="full", chat_template=TEMPLATE)
    model = tiny()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**config, "processor_class": "LlavaOnevisionProcessor"}))

    loaded, rebuilt, adapter = load_model(folder)
    assert adapter.family == "llava_onevision"
    assert isinstance(rebuilt.image_processor, LlavaOnevisionImageProcessorPil)
    assert not hasattr(rebuilt, "video_processor")
    images = [Image.new("RGB", (w, h), (30, 30, 200)) for h, w in SIZES]  # PIL sizes are (w, h)
    built = adapter.build_inputs(rebuilt, [images[:2], images[2]], ["compare images", "what colour is the circle ?"])
    assert built["batch_num_images"].tolist() == [2, 1]
    assert (built["input_ids"] == IMAGE).sum(1).tolist() == [2 * PER_IMAGE, image_counts([SIZES[2]], [1])[0]]
    assert groups(loaded, built["input_ids"][0].tolist()) == [PER_IMAGE, PER_IMAGE]
    loaded(**built)

    calib = write_calibration(tmp_path / "data", [(40, 40), (80, 40), (40, 90), (60, 60)])
    with calib.open("a") as f:
        f.write(json.dumps({"image": ["img0.png", "img1.png"], "prompt": "compare images"}) + "\n")
    recipe = run_search(folder, calib, tmp_path / "out", num_samples=5, family="llava_onevision")
    assert recipe.model.visual_tokens_per_image is None
