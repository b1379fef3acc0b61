"""Mistral 3 (Pixtral tower, Mistral decoder) through the pruning runtime, from tiny random configs.

What the family adds and what is proved here: images at their own resolution give different token
counts (rows with other image sizes and numbers of images match the rows alone, plans scale to each
image's count); `[IMG]` rows interleaved with `[IMG_BREAK]` and closed by `[IMG_END]`, where only the
`[IMG]` tokens are pruned and all rows of one image form one selection unit, also for images written
back to back; a sliding-window Mistral decoder and a Ministral 3 decoder (position-scaled queries,
exact below its original context) score like eager attention. The runtime tests use processor-free
inputs; transformers' PixtralProcessor needs torchvision, so without it the adapter's own image-only
processor is built from the saved folder (both config layouts), gives inputs the model accepts, and
runs the command line end to end.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessorPil,
                          PreTrainedTokenizerFast)

from tiny_models import left_pad, random_image
from tiny_llava_families import run_search, write_calibration
from checks import (assert_cached_decode_equals_reforward, assert_decode_masks_equal_model_masks,
                    assert_keep_all_identical, assert_manual_continuation_matches_generate, assert_rows_alone,
                    assert_score_rows_match_eager)
from recipe_search.models import get_adapter, supported_model_types
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule

PAD, EOS, BOS, IMG, BREAK, END = 0, 1, 2, 10, 12, 13
VOCAB = 64
MERGE = 8             # pixels per merged token side: patch 4 x spatial merge 2
LAYERS = 4
WINDOW = 8


def tiny_mistral3(attn: str = "sdpa", seed: int = 0, text: str = "mistral",
                  window: int | None = None) -> Mistral3ForConditionalGeneration:
    """Pixtral (patch 4, up to 64 px) + 2x2 patch merger + a 4-layer decoder (GQA 4/2 heads, head_dim 16).

    text="ministral3": a Ministral 3 decoder with position-dependent query scaling beyond 64 tokens
    (original_max_position_embeddings), so a short prompt scores exactly and a long one is refused.
    """
    torch.manual_seed(seed)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=16, patch_size=4, image_size=64)
    text_config = dict(model_type=text, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=512, sliding_window=window, pad_token_id=PAD, bos_token_id=BOS,
                       eos_token_id=EOS)
    if text == "ministral3":
        text_config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                          "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                          "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                          "llama_4_scaling_beta": 0.5}
    config = Mistral3Config(vision_config=vision, text_config=text_config, image_token_index=IMG,
                            spatial_merge_size=2)
    model = Mistral3ForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.suppress_tokens = [IMG, BREAK, END]  # a generated placeholder would need an image
    return model


def image_tokens(height: int, width: int) -> list[int]:
    """The processor's layout of an image of height x width pixels: rows of [IMG], [IMG_BREAK]
    between rows, [IMG_END] last."""
    rows, cols = height // MERGE, width // MERGE
    out = [t for _ in range(rows) for t in [IMG] * cols + [BREAK]]
    out[-1] = END
    return out


def mistral3_inputs(prompts: list[list[int]], sizes: list[list[tuple[int, int]]] | None = None,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-free, left-padded inputs: [bos, 20, 21] + each image's tokens + prompt ids; pixel
    values padded to the largest image with `image_sizes` giving each image's own (h, w)."""
    sizes = sizes or [[(32, 32)]] * len(prompts)
    gen = torch.Generator().manual_seed(seed)
    rows = [[BOS, 20, 21] + [t for hw in images for t in image_tokens(*hw)] + p for p, images in zip(prompts, sizes)]
    ids, mask = left_pad(rows)
    flat = [hw for images in sizes for hw in images]
    height, wide = max(h for h, _ in flat), max(w for _, w in flat)
    pixels = torch.zeros(len(flat), 3, height, wide)
    for i, (h, w) in enumerate(flat):
        pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_sizes": torch.tensor(flat, dtype=torch.long)}


def rows_alone(batch: dict, prompts: list[list[int]], sizes: list[list[tuple[int, int]]]) -> list[dict]:
    """Each row of a `mistral3_inputs` batch on its own, with its own images' pixels (same values)."""
    alone, start = [], 0
    for p, images in zip(prompts, sizes):
        single = mistral3_inputs([p], [images])
        height, wide = max(h for h, _ in images), max(w for _, w in images)
        single["pixel_values"] = batch["pixel_values"][start:start + len(images), :, :height, :wide]
        start += len(images)
        alone.append(single)
    return alone


@pytest.fixture(scope="module")
def sdpa() -> Mistral3ForConditionalGeneration:
    return tiny_mistral3("sdpa")


@pytest.fixture(scope="module")
def eager() -> Mistral3ForConditionalGeneration:
    return tiny_mistral3("eager")


PROMPTS = [[22, 23, 24, 25, 26, 27], [28, 29]]
SIZES = [[(32, 32), (16, 40)], [(24, 24)]]  # 16 + 10 tokens in row 0, 9 in row 1


def test_family_is_recognised(sdpa):
    adapter = get_adapter(sdpa)
    assert adapter.family == "mistral3" and "mistral3" in supported_model_types()
    assert adapter.visual_tokens_per_image() is None
    assert adapter.visual_token_ids == (IMG,)
    assert [adapter.layer_window(i) for i in range(LAYERS)] == [None] * LAYERS


def test_visual_groups_are_whole_images(sdpa):
    """All rows of one image are one group (breaks and ends are not visual), also for images written
    back to back or separated by text, and for a one-row image."""
    adapter = get_adapter(sdpa)
    a, b, c = image_tokens(24, 16), image_tokens(8, 24), image_tokens(16, 16)
    row = [BOS, 20, *a, *b, 21, 22, *c, 23]
    ids = torch.tensor([row, [PAD] * 3 + row[:-3]])
    groups = adapter.visual_groups(ids)
    expected = [-1, -1] + [0 if t == IMG else -1 for t in a] + [1 if t == IMG else -1 for t in b] + [-1, -1] \
        + [2 if t == IMG else -1 for t in c] + [-1]
    assert groups[0].tolist() == expected
    assert groups[1].tolist() == [-1] * 3 + expected[:-3]
    assert torch.equal(adapter.visual_mask(ids), ids == IMG)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_identical(attn, sdpa, eager):
    model = sdpa if attn == "sdpa" else eager
    assert_keep_all_identical(model, mistral3_inputs(PROMPTS, SIZES), PruningPlan.keep_all(LAYERS, 16,
                                                                                          make_rule("attention")))


def test_score_rows_match_eager(eager):
    assert_score_rows_match_eager(eager, mistral3_inputs(PROMPTS, SIZES, seed=3))


def test_score_rows_match_eager_sliding_window_decoder():
    assert_score_rows_match_eager(tiny_mistral3("eager", window=WINDOW), mistral3_inputs(PROMPTS, SIZES, seed=3))


def test_ministral3_decoder_scores_exactly_within_its_context():
    """Below original_max_position_embeddings (64 here) Ministral 3's query scale is 1: score rows
    match eager; beyond it they would not, so the adapter's context length stops there."""
    model = tiny_mistral3("eager", text="ministral3")
    inputs = mistral3_inputs([[22, 23], [24]], [[(16, 24)], [(16, 16)]], seed=4)
    assert inputs["input_ids"].shape[1] < 64
    assert_score_rows_match_eager(model, inputs)
    assert get_adapter(model).context_length() == 64
    long = mistral3_inputs([[22, 23], [24]], [[(64, 64)], [(16, 16)]], seed=4)
    assert long["input_ids"].shape[1] > 64  # past the cap the queries are scaled: why the cap is needed
    with pytest.raises(AssertionError, match="score rows differ"):
        assert_score_rows_match_eager(model, long)


@pytest.mark.parametrize("attn,window", [("sdpa", None), ("eager", None), ("sdpa", WINDOW), ("eager", WINDOW)])
def test_decode_masks_equal_model_masks(attn, window, sdpa, eager):
    model = (sdpa if attn == "sdpa" else eager) if window is None else tiny_mistral3(attn, window=window)
    inputs = mistral3_inputs(PROMPTS, SIZES, seed=6)
    assert inputs["input_ids"].shape[1] > 2 * WINDOW
    steps = 3 if window is None else WINDOW + 2  # the sliding cache wraps during decoding
    assert_decode_masks_equal_model_masks(model, PruningPlan((16, 9, 5, 2), 16, make_rule("fitprune")), inputs,
                                          steps=steps)


@pytest.mark.parametrize("rule,score_layer", [("fitprune", "same"), ("attention", "previous"), ("random", "same"),
                                              ("dart", "same")])
def test_cached_decode_equals_reforward(rule, score_layer, sdpa):
    """Row 0's image (16 tokens) follows the plan; row 1's (9 tokens) its fractions."""
    plan = PruningPlan((16, 12, 7, 3), 16, make_rule(rule), score_layer)
    assert_cached_decode_equals_reforward(sdpa, plan, mistral3_inputs(PROMPTS, [[(32, 32)], [(24, 24)]], seed=7))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_with_other_image_sizes_match_rows_alone(attn, sdpa, eager):
    model = sdpa if attn == "sdpa" else eager
    batch = mistral3_inputs(PROMPTS, SIZES, seed=8)
    plan = PruningPlan((16, 12, 6, 2), 16, make_rule("attention"))
    assert_rows_alone(model, plan, batch, rows_alone(batch, PROMPTS, SIZES))
    with PruningHandle(model, plan) as handle:
        model(**batch)
        # row 0: a 16-token image on the plan and a 10-token one on its fractions, each its own unit
        assert handle.last_counts == [a + b for a, b in zip(plan.counts_for(16), plan.counts_for(10))]



def test_manual_continuation_matches_generate(sdpa):
    """A hand-rolled decode step (one unpadded row, no mask or positions given) on the pruned cache
    continues at the right position."""
    plan = PruningPlan((16, 10, 6, 3), 16, make_rule("attention"))
    assert_manual_continuation_matches_generate(sdpa, mistral3_inputs(PROMPTS[:1], [[(24, 32)]], seed=9), plan)

# -- processor and command line --------------------------------------------------------------------
needs_no_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                                          reason="torchvision is installed: the checkpoint's PixtralProcessor is used")

SPECIALS = ("<pad>", "</s>", "<s>", "[INST]", "[/INST]", "<unk>", "<ctrl6>", "<ctrl7>", "<ctrl8>", "<ctrl9>", "[IMG]",
            "<ctrl11>", "[IMG_BREAK]", "[IMG_END]")
INST, END_INST = 3, 4
WORDS = ("what", "colour", "is", "the", "shape", "?", "left", "and", "right")
WORD = {w: len(SPECIALS) + i for i, w in enumerate(WORDS)}
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '[INST]' -}}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '[IMG]' -}}{%- else -%}{{- ' ' + item['text'] + ' ' -}}{%- endif -%}"
    "{%- endfor -%}{{- '[/INST]' -}}{%- endif -%}"
    "{%- endfor -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose ids match the tiny config ([IMG] 10, [IMG_BREAK] 12, [IMG_END] 13)."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *WORDS])}
    assert vocab["[IMG]"] == IMG and vocab["[IMG_BREAK]"] == BREAK and vocab["[IMG_END]"] == END and len(vocab) < VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    # adds <s> like the real tokenizer, whose chat template also writes it: build_inputs must not double it
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


IMAGE_PROCESSOR = {"image_processor_type": "PixtralImageProcessor", "do_resize": True, "do_rescale": True,
                   "do_normalize": True, "do_pad": True, "do_convert_rgb": True, "resample": 3,
                   "rescale_factor": 1 / 255, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "patch_size": {"height": 4, "width": 4},
                   "size": {"longest_edge": 64}}
SETTINGS = {"processor_class": "PixtralProcessor", "patch_size": 4, "spatial_merge_size": 2, "image_token": "[IMG]",
            "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}


def save_checkpoint(folder, model: Mistral3ForConditionalGeneration, layout: str) -> None:
    """The model and what PixtralProcessor.save_pretrained writes, by hand (PixtralProcessor cannot be
    imported here). "nested": transformers 5's layout, the image-processor settings inside
    processor_config.json and the template in chat_template.jinja; "legacy": hub checkpoints such as
    Mistral Small 3.1, with preprocessor_config.json, a flat processor_config.json and chat_template.json;
    "bare": no processor settings at all (patch and merge sizes then come from the model config) and
    the template in the tokenizer's config."""
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    if layout == "bare":
        (folder / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR))
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": CHAT_TEMPLATE}))
    elif layout == "nested":
        (folder / "processor_config.json").write_text(json.dumps({**SETTINGS, "image_processor": IMAGE_PROCESSOR}))
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    else:
        (folder / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR))
        (folder / "processor_config.json").write_text(json.dumps(SETTINGS))
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


@pytest.fixture(scope="module", params=["nested", "legacy", "bare"])
def checkpoint(request, tmp_path_factory, sdpa):
    folder = tmp_path_factory.mktemp(f"mistral3_{request.param}")
    save_checkpoint(folder, sdpa, request.param)
    return folder


@needs_no_torchvision
def test_processor_without_torchvision_gives_model_inputs(checkpoint, sdpa):
    """load_processor builds the image-only processor from the folder's saved settings (either layout).
    Images are resized to whole 8-px merged patches with the longest edge at most 64 (20x30 -> 24x32,
    100x50 -> 64x32, 48x24 stays): the [IMG] rows, breaks and end of each image follow its resized
    size, the batch is left-padded with one BOS per row, and the model accepts the inputs (its forward
    checks the [IMG] count against the image features)."""
    adapter = get_adapter(sdpa)
    processor = type(adapter).load_processor(str(checkpoint))
    assert isinstance(processor.image_processor, PixtralImageProcessorPil)
    assert processor.image_token == "[IMG]"
    assert processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "what ?"}]}],
                                         add_generation_prompt=True, tokenize=False) == "<s>[INST][IMG] what ? [/INST]"
    images = [[random_image(0, (20, 30)), random_image(1, (100, 50))], random_image(2, (48, 24))]  # (width, height)
    inputs = adapter.build_inputs(processor, images, ["left and right", "what colour is the shape ?"])
    assert list(inputs) == ["input_ids", "attention_mask", "pixel_values", "image_sizes"]
    assert inputs["image_sizes"].tolist() == [[32, 24], [32, 64], [24, 48]]
    assert inputs["pixel_values"].shape == (3, 3, 32, 64)
    expected = [[BOS, INST, *image_tokens(32, 24), *image_tokens(32, 64), *(WORD[w] for w in "left and right".split()),
                 END_INST],
                [BOS, INST, *image_tokens(24, 48), *(WORD[w] for w in "what colour is the shape ?".split()), END_INST]]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    width = max(len(r) for r in expected)
    assert ids.shape == (2, width)
    for row, want in enumerate(expected):
        pad = width - len(want)
        assert ids[row].tolist() == [PAD] * pad + want
        assert mask[row].tolist() == [0] * pad + [1] * len(want)
    assert pad > 0  # the second row is the shorter one: left padding is exercised
    # the pixels are the saved image processor's (mean, std, longest edge), zero-padded per image
    reference = PixtralImageProcessorPil(**{k: v for k, v in IMAGE_PROCESSOR.items() if k != "image_processor_type"})
    flat = [images[0][0], images[0][1], images[1]]
    assert torch.equal(inputs["pixel_values"], reference(flat, patch_size=MERGE, return_tensors="pt")["pixel_values"])
    groups = adapter.visual_groups(ids)
    assert [int(groups[0][ids[0] == IMG].max()) + 1, int(groups[1][ids[1] == IMG].max()) + 1] == [2, 1]
    assert [(groups[0] == g).sum().item() for g in (0, 1)] == [12, 32]
    with torch.no_grad():
        logits = sdpa(**inputs).logits
    assert logits.shape == (2, width, VOCAB) and torch.isfinite(logits).all()
    plan = PruningPlan((32, 16, 8, 4), 32, make_rule("fitprune"))
    with PruningHandle(sdpa, plan) as handle:
        sdpa.generate(**inputs, max_new_tokens=2, do_sample=False)
        # row 0: a 12-token image on the plan's fractions and a 32-token one on the plan, each its own unit
        assert handle.last_counts == [a + b for a, b in zip(plan.counts_for(12), plan.counts_for(32))]


@needs_no_torchvision
def test_processor_refuses_placeholders_without_images(checkpoint, sdpa):
    processor = type(get_adapter(sdpa)).load_processor(str(checkpoint))
    with pytest.raises(ValueError, match=r"2 \[IMG\] placeholders for 1 images"):
        processor(images=[random_image(0, (16, 16))], text=["<s>[INST][IMG][IMG] what [/INST]"])


def test_search_recipe_end_to_end(checkpoint, tmp_path):
    sizes = [(32, 32), (64, 32), (40, 24), (100, 50)]
    calib = write_calibration(tmp_path / "data", sizes, prompts=("what colour is the shape ?",), pairs=((0, 2),))
    run_search(checkpoint, calib, tmp_path / "out", num_samples=5, family="mistral3", batch_size=4)