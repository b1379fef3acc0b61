"""Aya Vision (Cohere 2 decoder) through the pruning runtime, from a tiny random config built in code.

What the family adds and what is proved here: interleaved-layout RoPE (the attention module's own
rotary), parallel attention + MLP behind one LayerNorm, full-attention layers without RoPE (NoPE)
next to sliding-window layers — all in the score rows matched against eager attention at every
layer; decode masks with a window shorter than the prompt; images cut into a varying number of
crops (rows with other crop counts match the rows alone); logits without Cohere's `logit_scale`
(AyaVisionForConditionalGeneration does not apply it); a processor built without torchvision.
"""
from __future__ import annotations

import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor, Cohere2Config,
                          GotOcr2ImageProcessorPil, PreTrainedTokenizerFast, SiglipVisionConfig)

from tiny_models import left_pad, random_image
from tiny_llava_families import run_search, write_calibration
from checks import (assert_cached_decode_equals_reforward, assert_decode_masks_equal_model_masks,
                    assert_keep_all_identical, assert_manual_continuation_matches_generate, assert_rows_alone,
                    assert_score_rows_match_eager, layer_contexts)
from recipe_search.hooks import HookSet, ModelHook
from recipe_search.models import ModelAdapter, get_adapter, supported_model_types
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule

SPECIALS = ("<pad>", "<eos>", "<bos>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<unk>", "<image>",
            "<|IMG_LINE_BREAK|>", "TILE_GLOBAL", "TILE_1", "TILE_2", "TILE_3", "TILE_4")
PAD, EOS, BOS, START, END, PATCH, TILE_GLOBAL, TILE_1 = 0, 1, 2, 3, 4, 5, 9, 10
WORDS = ("User", "Chatbot", ":", "what", "colour", "is", "the", "shape", "?", "left", "and", "right")
VOCAB = 64
N_CROP = 16           # tokens per crop: 8x8 SigLIP patches, pixel shuffle 2
WINDOW = 8
LAYERS = 4
TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- 'User :' if message['role'] == 'user' else 'Chatbot :' -}}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>' -}}{%- else -%}{{- ' ' + item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{{- ' ' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Chatbot :' -}}{%- endif -%}"
)


def tiny_aya(attn: str = "sdpa", seed: int = 0) -> AyaVisionForConditionalGeneration:
    """SigLIP (32 px, patch 4, pixel shuffle 2 -> 16 tokens per crop) + a 4-layer Cohere 2 decoder
    (GQA 4/2 heads, sliding layers with window 8 alternating with NoPE full layers)."""
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=4, vision_use_head=False)
    text = Cohere2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW, layer_types=TYPES,
                         max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 100.0},
                         logit_scale=0.25, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    config = AyaVisionConfig(vision_config=vision, text_config=text, image_token_index=PATCH, downsample_factor=2,
                             vision_feature_select_strategy="full", vision_feature_layer=-1)
    model = AyaVisionForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.suppress_tokens = [START, END, PATCH]  # a generated placeholder would need an image
    return model


def image_tokens(crops: int) -> list[int]:
    """The processor's layout of one image cut into `crops` crops (tiles, then the thumbnail)."""
    tiles = [tok for k in range(crops - 1 if crops > 1 else 0) for tok in (TILE_1 + k, *[PATCH] * N_CROP)]
    return [START, *tiles, TILE_GLOBAL, *[PATCH] * N_CROP, END]


def aya_inputs(prompts: list[list[int]], crops: list[list[int]] | None = None,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-free, left-padded inputs: [bos, 14, 15] + the images (each a number of crops) + prompt."""
    crops = crops or [[1]] * len(prompts)
    gen = torch.Generator().manual_seed(seed)
    rows = [[BOS, 14, 15] + [t for n in images for t in image_tokens(n)] + p for p, images in zip(prompts, crops)]
    ids, mask = left_pad(rows)
    pixels = torch.randn(sum(sum(c) for c in crops), 3, 32, 32, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@pytest.fixture(scope="module")
def sdpa() -> AyaVisionForConditionalGeneration:
    return tiny_aya("sdpa")


@pytest.fixture(scope="module")
def eager() -> AyaVisionForConditionalGeneration:
    return tiny_aya("eager")


PROMPTS = [[16, 17, 18, 19, 20, 21], [22, 23]]


def test_family_is_recognised(sdpa):
    adapter = get_adapter(sdpa)
    assert adapter.family == "aya_vision" and "aya_vision" in supported_model_types()
    assert adapter.visual_tokens_per_image() == N_CROP
    assert adapter.visual_token_ids == (PATCH,)
    assert [adapter.layer_window(i) for i in range(LAYERS)] == [WINDOW, None, WINDOW, None]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_identical(attn, sdpa, eager):
    model = sdpa if attn == "sdpa" else eager
    plan = PruningPlan.keep_all(LAYERS, N_CROP, make_rule("attention"))
    assert_keep_all_identical(model, aya_inputs(PROMPTS, [[3], [1, 1]]), plan)


def test_score_rows_match_eager(eager):
    assert_score_rows_match_eager(eager, aya_inputs(PROMPTS, [[3], [1, 1]], seed=3))


def test_score_math_is_cohere2s(eager):
    """The rotary is Cohere 2's interleaved one, and full layers must not rotate: the default query/key
    math (RoPE everywhere) differs there, so the score-row test above proves the NoPE layers."""
    adapter = get_adapter(eager)
    contexts, _ = layer_contexts(eager, aya_inputs(PROMPTS, seed=3))
    for ctx in contexts:
        assert adapter.rotary(ctx.layer) is sys.modules[type(ctx.layer.self_attn).__module__].apply_rotary_pos_emb
        ours = adapter.query_key(ctx.layer, ctx.hidden, ctx.rope)
        default = ModelAdapter.query_key(adapter, ctx.layer, ctx.hidden, ctx.rope)
        same = all(torch.equal(a, b) for a, b in zip(ours, default))
        assert same == (TYPES[ctx.layer_idx] == "sliding_attention"), f"layer {ctx.layer_idx}"
    assert "cohere2" in type(contexts[0].layer.self_attn).__module__


class _Output(ModelHook):
    """Records a module's output."""

    def __init__(self, sink: list) -> None:
        self.sink = sink

    def post_forward(self, module, args, kwargs, output):
        self.sink.append(output[0] if isinstance(output, tuple) else output)
        return None


def test_final_logits_match_model(sdpa):
    """Final LayerNorm and LM head; AyaVisionForConditionalGeneration applies no `logit_scale`."""
    adapter = get_adapter(sdpa)
    last: list[torch.Tensor] = []
    with HookSet() as hooks:
        hooks.add(adapter.decoder_layers()[-1], _Output(last))
        logits = sdpa(**aya_inputs(PROMPTS, seed=4)).logits
    assert torch.allclose(adapter.final_logits(last[0]), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_masks_equal_model_masks(attn, sdpa, eager):
    model = sdpa if attn == "sdpa" else eager
    inputs = aya_inputs(PROMPTS, [[2], [1]], seed=6)
    assert inputs["input_ids"].shape[1] > 2 * WINDOW
    assert_decode_masks_equal_model_masks(model, PruningPlan((16, 9, 5, 2), N_CROP, make_rule("fitprune")), inputs,
                                          steps=WINDOW + 2)  # the sliding cache wraps during decoding


@pytest.mark.parametrize("rule,score_layer", [("fitprune", "same"), ("attention", "previous"), ("random", "same"),
                                              ("dart", "same")])
def test_cached_decode_equals_reforward(rule, score_layer, sdpa):
    plan = PruningPlan((16, 12, 7, 3), N_CROP, make_rule(rule), score_layer)
    assert_cached_decode_equals_reforward(sdpa, plan, aya_inputs(PROMPTS, seed=7))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_with_other_crop_counts_match_rows_alone(attn, sdpa, eager):
    """Row 0: a wide image (two tiles and the thumbnail) and a second image; row 1: one single-crop image."""
    model = sdpa if attn == "sdpa" else eager
    prompts, crops = [[16, 17], [18, 19, 20, 21, 22, 23, 24]], [[3, 1], [1]]
    batch = aya_inputs(prompts, crops, seed=8)
    alone, start = [], 0
    for p, c in zip(prompts, crops):
        single = aya_inputs([p], [c], seed=8)
        single["pixel_values"] = batch["pixel_values"][start:start + sum(c)]
        start += sum(c)
        alone.append(single)
    assert_rows_alone(model, PruningPlan((16, 12, 6, 2), N_CROP, make_rule("attention")), batch, alone)



def test_manual_continuation_matches_generate(sdpa):
    """A hand-rolled decode step (one unpadded row, no mask or positions given) on the pruned cache
    continues at the right position."""
    plan = PruningPlan((16, 10, 6, 3), N_CROP, make_rule("attention"))
    assert_manual_continuation_matches_generate(sdpa, aya_inputs(PROMPTS[:1], [[3]], seed=9), plan)

# -- processor and command line --------------------------------------------------------------------
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose marker ids match the tiny config (patch token 5, TILE_k 10...)."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    # adds <bos> like the real tokenizer, whose chat template also writes it: build_inputs must not double it
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", BOS)])
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", model_max_length=512)


def build_processor() -> AyaVisionProcessor:
    """Crops of 32 px (the tower's size), up to 3 per image plus the thumbnail, 16 tokens each."""
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=3)
    return AyaVisionProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=8, img_size=32,
                              downsample_factor=1, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sdpa):
    folder = tmp_path_factory.mktemp("aya")
    sdpa.save_pretrained(folder)
    build_processor().save_pretrained(folder)
    return folder


def test_processor_without_torchvision_gives_model_inputs(checkpoint, sdpa):
    """load_processor rebuilds the saved processor from PIL parts; a wide image gives two tiles and
    the thumbnail (three crops of 16 patch tokens, each its own selection unit), a square one one crop."""
    adapter = get_adapter(sdpa)
    processor = type(adapter).load_processor(str(checkpoint))
    assert isinstance(processor.image_processor, GotOcr2ImageProcessorPil)
    assert getattr(processor, "video_processor", None) is None
    inputs = adapter.build_inputs(processor, [random_image(0, (64, 32)),
                                              [random_image(1, (30, 30)), random_image(2, (20, 24))]],
                                  ["what colour is it ?", "left and right"])
    ids = inputs["input_ids"]
    assert (ids == PATCH).sum(1).tolist() == [3 * N_CROP, 2 * N_CROP]
    assert (ids == START).sum(1).tolist() == [1, 2] and (ids == TILE_GLOBAL).sum(1).tolist() == [1, 2]
    assert inputs["pixel_values"].shape == (5, 3, 32, 32)
    assert ids[0, 0] == BOS and (ids == BOS).sum(1).tolist() == [1, 1]  # the template's, not a second one
    groups = adapter.visual_groups(ids)
    assert [groups[r][ids[r] == PATCH].unique().numel() for r in range(2)] == [3, 2]
    with PruningHandle(sdpa, PruningPlan((16, 8, 4, 4), N_CROP, make_rule("fitprune"))) as handle:
        sdpa.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.last_counts == [48, 24, 12, 12]  # row 0: three crops, each its own schedule


def test_search_recipe_end_to_end(checkpoint, tmp_path):
    sizes = [(32, 32), (64, 32), (40, 40), (32, 64)]
    calib = write_calibration(tmp_path / "data", sizes, prompts=("what colour is the shape ?",), pairs=((0, 2),))
    run_search(checkpoint, calib, tmp_path / "out", num_samples=5, family="aya_vision", batch_size=4)