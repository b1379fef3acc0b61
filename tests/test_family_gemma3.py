"""Gemma 3 through the pruning runtime, from a tiny random config built in code.

What the family adds over Llama-style decoders and what is proved here: q/k norms and the
`query_pre_attn_scalar` scale (score rows vs eager), interleaved sliding-window layers whose rotary
table has its own base (each layer's (cos, sin) at the survivors; decode masks with a window shorter
than the prompt), bidirectional attention inside each image during the prefill (the mask a pruned
layer receives is the model's own rule at the survivors), no soft-capping where the config names one
but Gemma3ForConditionalGeneration ignores it, and a processor built without torchvision.
"""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                          Gemma3TextConfig, PreTrainedTokenizerFast, SiglipVisionConfig)

from tiny_models import left_pad, random_image
from tiny_llava_families import run_search, write_calibration
from checks import (assert_cached_decode_equals_reforward, assert_decode_masks_equal_model_masks,
                    assert_keep_all_identical, assert_manual_continuation_matches_generate, assert_rows_alone,
                    assert_score_rows_match_eager)
from recipe_search.hooks import CallHook, HookSet, ModelHook
from recipe_search.models import ModelAdapter, get_adapter, supported_model_types
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule

PAD, EOS, BOS, BOI, EOI, IMG = 0, 1, 2, 3, 4, 5
SPECIALS = ("<pad>", "<eos>", "<bos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<unk>",
            "<start_of_turn>", "<end_of_turn>")
WORDS = ("user", "model", "what", "colour", "is", "the", "shape", "?", "left", "right", "red", "blue", "a", "and")
VOCAB = 64
N_IMAGE = 16          # mm_tokens_per_image: 8x8 SigLIP patches pooled 2x2
WINDOW = 8            # shorter than every prompt below
LAYERS = 4
TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<start_of_image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{{- '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def tiny_gemma3(attn: str = "sdpa", seed: int = 0) -> Gemma3ForConditionalGeneration:
    """SigLIP (32 px, patch 4) pooled to 16 soft tokens + a 4-layer Gemma 3 decoder (GQA 4/2 heads,
    head_dim 16, query_pre_attn_scalar 24, sliding/global layers with rotary bases 100 / 10000).

    The config names attention and final-logit soft-capping values that Gemma3ForConditionalGeneration
    does not apply, so an adapter that applied them would fail the score-row and logits tests.
    Zero-initialised weights (RMSNorm scales, the projector) get random values so that they matter.
    generate() never emits image markers (raw logits, which the checks compare, are unaffected).
    """
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=4)
    text = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, layer_types=TYPES,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        final_logit_softcapping=0.5, attn_logit_softcapping=0.5, max_position_embeddings=256,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=N_IMAGE,
                          boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMG)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if not bool(param.any()):
                param.normal_(0.0, 0.3)
    model.set_attn_implementation(attn)
    model.generation_config.suppress_tokens = [BOI, EOI, IMG]  # a generated placeholder would need an image
    return model


def gemma3_inputs(prompts: list[list[int]], images: list[int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-free, left-padded inputs: [bos, 7, 8] + per image [boi, soft x 16, eoi] + prompt ids,
    with token_type_ids marking the soft tokens (the processor's layout, see the processor test)."""
    images = images or [1] * len(prompts)
    gen = torch.Generator().manual_seed(seed)
    rows = [[BOS, 7, 8] + [BOI, *[IMG] * N_IMAGE, EOI] * n + p for p, n in zip(prompts, images)]
    ids, mask = left_pad(rows)
    pixels = torch.randn(sum(images), 3, 32, 32, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "token_type_ids": (ids == IMG).long()}


def row_alone(batch: dict, prompts: list[list[int]], images: list[int], i: int, seed: int) -> dict:
    """Row `i` of a `gemma3_inputs` batch on its own, with its own images' pixels."""
    single = gemma3_inputs([prompts[i]], [images[i]], seed=seed)
    start = sum(images[:i])
    single["pixel_values"] = batch["pixel_values"][start:start + images[i]]
    return single


@pytest.fixture(scope="module")
def sdpa() -> Gemma3ForConditionalGeneration:
    return tiny_gemma3("sdpa")


@pytest.fixture(scope="module")
def eager() -> Gemma3ForConditionalGeneration:
    return tiny_gemma3("eager")


PROMPTS = [[9, 10, 11, 12, 13, 14], [15, 16]]


def test_family_is_recognised(sdpa):
    adapter = get_adapter(sdpa)
    assert adapter.family == "gemma3" and "gemma3" in supported_model_types()
    assert adapter.visual_tokens_per_image() == N_IMAGE
    assert adapter.visual_token_ids == (IMG,)  # boi / eoi markers stay text
    assert [adapter.layer_window(i) for i in range(LAYERS)] == [WINDOW, None, WINDOW, None]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_identical(attn, sdpa, eager):
    model = sdpa if attn == "sdpa" else eager
    assert_keep_all_identical(model, gemma3_inputs(PROMPTS, [2, 1]), PruningPlan.keep_all(LAYERS, N_IMAGE,
                                                                                          make_rule("attention")))


def test_score_rows_match_eager(eager):
    assert_score_rows_match_eager(eager, gemma3_inputs(PROMPTS, [2, 1], seed=3))


def test_final_logits_match_model_without_softcapping(sdpa):
    """The model's logits come from the last layer's output through `final_logits`; the base
    contract's soft-capping (named in this config) would change them."""
    adapter = get_adapter(sdpa)
    inputs = gemma3_inputs(PROMPTS, seed=4)
    last: list[torch.Tensor] = []
    with HookSet() as hooks:
        hooks.add(adapter.decoder_layers()[-1], _Output(last))
        logits = sdpa(**inputs).logits
    assert torch.allclose(adapter.final_logits(last[0]), logits, atol=1e-5, rtol=0)
    assert not torch.allclose(ModelAdapter.final_logits(adapter, last[0]), logits, atol=1e-3, rtol=0)


class _Output(ModelHook):
    """Records a module's output."""

    def __init__(self, sink: list) -> None:
        self.sink = sink

    def post_forward(self, module, args, kwargs, output):
        self.sink.append(output[0] if isinstance(output, tuple) else output)
        return None


def _rule_mask(inputs: dict, idx: int) -> torch.Tensor:
    """(B, L, L) Gemma 3's prefill mask from its definition: a key is visible if it is not padding
    and is causal or in the query's own image, and (sliding layers) fewer than W positions back."""
    ids, pad = inputs["input_ids"], inputs["attention_mask"].bool()
    image = inputs["token_type_ids"] == 1
    start = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    block = torch.where(image, torch.cumsum(start.long(), 1), -1)
    pos = torch.arange(ids.shape[1])
    causal = pos[None, :, None] >= pos[None, None, :]
    same_image = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    allowed = (causal | same_image) & pad[:, None, :]
    if TYPES[idx] == "sliding_attention":
        allowed = allowed & (pos[None, None, :] > pos[None, :, None] - WINDOW)
    return allowed


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_masks_and_rope_at_survivors(attn, sdpa, eager):
    """The mask each pruned layer receives is the model's own rule (causal + padding + one image's
    bidirectional block + the layer's window) at the surviving columns, and its (cos, sin) is that
    layer type's rotary table at the survivors' original positions."""
    model = sdpa if attn == "sdpa" else eager
    adapter = get_adapter(model)
    inputs = gemma3_inputs(PROMPTS, [2, 1], seed=5)
    own: dict[int, torch.Tensor] = {}
    with HookSet() as hooks:  # the model's own masks on the unpruned prompt: the rule, exactly
        for i, layer in enumerate(adapter.decoder_layers()):
            hooks.add(layer, CallHook(lambda m, a, k, i=i: own.__setitem__(i, adapter.read_layer_call(a, k).mask)))
        model(**inputs)
    for i in range(LAYERS):
        expected = _rule_mask(inputs, i)
        got = own[i][:, 0] if own[i].dtype == torch.bool else own[i][:, 0] > torch.finfo(own[i].dtype).min / 2
        real = inputs["attention_mask"].bool()
        assert torch.equal(got[real], expected[real]), f"layer {i}: the rule is not the model's mask"

    decoder = adapter.decoder()
    plan = PruningPlan((16, 10, 6, 3), N_IMAGE, make_rule("attention"))
    seen: list[tuple[int, torch.Tensor, object]] = []
    with PruningHandle(model, plan) as handle:
        with HookSet() as hooks:  # registered after the runtime's: sees the call the layer gets
            for i, layer in enumerate(adapter.decoder_layers()):
                hooks.add(layer, CallHook(lambda m, a, k, i=i: seen.append(
                    (i, handle._state.cols.clone(), adapter.read_layer_call(a, k)))))
            model(**inputs)
    assert [i for i, *_ in seen] == list(range(LAYERS))
    for idx, cols, call in seen[1:]:
        assert cols.shape[1] < inputs["input_ids"].shape[1], "layer was not pruned"
        full = _rule_mask(inputs, idx)
        kv = cols.clamp(min=0)
        expected = full.gather(1, kv[:, :, None].expand(-1, -1, full.shape[2])).gather(2, kv[:, None, :].expand(
            -1, kv.shape[1], -1)) & (cols >= 0)[:, None, :]
        mask = call.mask
        got = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
        real = (cols >= 0) & inputs["attention_mask"].bool().gather(1, kv)
        assert torch.equal(got[real], expected[real]), f"layer {idx}: pruned prefill mask differs"
        cos, sin = decoder.rotary_emb(call.hidden, kv, TYPES[idx])
        assert torch.equal(call.rope[0][real], cos[real]) and torch.equal(call.rope[1][real], sin[real]), \
            f"layer {idx}: rotary table is not this layer type's at the survivors"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_masks_equal_model_masks(attn, sdpa, eager):
    model = sdpa if attn == "sdpa" else eager
    inputs = gemma3_inputs(PROMPTS, [2, 1], seed=6)
    assert inputs["input_ids"].shape[1] > 2 * WINDOW
    assert_decode_masks_equal_model_masks(model, PruningPlan((16, 9, 5, 2), N_IMAGE, make_rule("fitprune")), inputs,
                                          steps=WINDOW + 2)  # the sliding cache wraps during decoding


@pytest.mark.parametrize("rule,score_layer", [("fitprune", "same"), ("attention", "previous"), ("random", "same"),
                                              ("dart", "same")])
def test_cached_decode_equals_reforward(rule, score_layer, sdpa):
    plan = PruningPlan((16, 12, 7, 3), N_IMAGE, make_rule(rule), score_layer)
    assert_cached_decode_equals_reforward(sdpa, plan, gemma3_inputs(PROMPTS, seed=7))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_with_other_image_counts_match_rows_alone(attn, sdpa, eager):
    model = sdpa if attn == "sdpa" else eager
    prompts, images = [[9, 10], [11, 12, 13, 14, 15, 16, 17]], [2, 1]
    batch = gemma3_inputs(prompts, images, seed=8)
    alone = [row_alone(batch, prompts, images, i, seed=8) for i in range(2)]
    assert_rows_alone(model, PruningPlan((16, 12, 6, 2), N_IMAGE, make_rule("attention")), batch, alone)



def test_manual_continuation_matches_generate(sdpa):
    """A hand-rolled decode step (one unpadded row, no mask or positions given) on the pruned cache
    continues at the right position."""
    plan = PruningPlan((16, 10, 6, 3), N_IMAGE, make_rule("attention"))
    assert_manual_continuation_matches_generate(sdpa, gemma3_inputs(PROMPTS[:1], seed=9), plan)

# -- processor and command line --------------------------------------------------------------------
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose special-token ids match the tiny config (pad 0 ... soft token 5)."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    # adds <bos> like the real tokenizer, whose chat template also writes it: build_inputs must not double it
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", BOS)])
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        padding_side="left", model_max_length=512)


def build_processor() -> Gemma3Processor:
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return Gemma3Processor(image_processor=image_processor, tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE,
                           image_seq_length=N_IMAGE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sdpa):
    folder = tmp_path_factory.mktemp("gemma3")
    sdpa.save_pretrained(folder)
    build_processor().save_pretrained(folder)
    return folder


def test_processor_without_torchvision_gives_model_inputs(checkpoint, sdpa):
    """load_processor rebuilds the saved processor from PIL parts; build_inputs nests the images per
    prompt and gives boi + 16 soft tokens + eoi per image, token types on the soft tokens only."""
    adapter = get_adapter(sdpa)
    processor = type(adapter).load_processor(str(checkpoint))
    assert isinstance(processor.image_processor, Gemma3ImageProcessorPil)
    assert getattr(processor, "video_processor", None) is None
    images = [random_image(i, (40, 28)) for i in range(3)]
    inputs = adapter.build_inputs(processor, [images[:2], images[2]], ["what colour is it ?", "shape"])
    ids = inputs["input_ids"]
    assert (ids == IMG).sum(1).tolist() == [2 * N_IMAGE, N_IMAGE]
    assert (ids == BOI).sum(1).tolist() == [2, 1] and (ids == EOI).sum(1).tolist() == [2, 1]
    assert torch.equal(inputs["token_type_ids"].bool(), ids == IMG)
    assert inputs["attention_mask"][1, 0] == 0  # left padded
    row = ids[0, inputs["attention_mask"][0].bool()].tolist()
    assert row[:2] == [BOS, SPECIALS.index("<start_of_turn>")] and (ids == BOS).sum(1).tolist() == [1, 1]
    first = row.index(BOI)
    assert row[first:first + N_IMAGE + 2] == [BOI, *[IMG] * N_IMAGE, EOI]
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    assert adapter.visual_groups(ids)[0][ids[0] == IMG].unique().tolist() == [0, 1]
    with PruningHandle(sdpa, PruningPlan((16, 8, 4, 4), N_IMAGE, make_rule("fitprune"))) as handle:
        sdpa.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.last_counts == [32, 16, 8, 8]  # row 0: two images, each its own schedule


def test_search_recipe_end_to_end(checkpoint, tmp_path):
    calib = write_calibration(tmp_path / "data", [(40, 28)] * 4, prompts=("what colour is the shape ?",),
                              pairs=((0, 1),))
    run_search(checkpoint, calib, tmp_path / "out", num_samples=5, family="gemma3", batch_size=4)
