"""Tiny random InternVL, Idefics3 and SmolVLM checkpoints with real processors, built offline in code.

These families cut every image into tiles, so inputs come from the family's own processor (a word-level
tokenizer, the chat template, the PIL image processor): the token layouts the tests exercise (tags
around tiles, several tiles per image, images of other sizes) are exactly the processor's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from recipe_search.models.internvl import InternVLImagesOnlyProcessor
from recipe_search.models.smolvlm import SmolVLMImagesOnlyProcessor

VOCAB = 96
LAYERS = 4
TILE = 32            # pixels per tile side: the vision tower's image size
TILE_TOKENS = 16     # 8x8 patches of 4 px, pixel-shuffled by 2: visual tokens per tile
WORDS = ("user", "assistant", "User", "Assistant", ":", "what", "colour", "is", "the", "shape", "?", "left",
         "right", "red", "blue", "a", "and", "describe", "image", "which", "one", "bigger")
PROMPTS = ("what colour is the shape ?", "describe the image", "which one is bigger ?", "the left shape is red ?")


def word_tokenizer(specials: list[str], bos: str, eos: str, pad: str = "<pad>", unk: str = "<unk>",
                   **named: str) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: `specials` (pad, unk, bos, eos first) then WORDS; `named` special tokens
    become tokenizer attributes (e.g. context_image_token) as in the families' hub tokenizers."""
    vocab = {tok: i for i, tok in enumerate([*specials, *WORDS])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk,
                                   extra_special_tokens=named or None, padding_side="left", model_max_length=2048)


def images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """Random RGB images of (height, width) `sizes`: no image is all zeros (Idefics3 drops those as padding)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(1, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def suppress_placeholders(model: Any, ids: list[int], pad: int) -> None:
    """generate() never emits a visual placeholder (a re-forward would look for its image); the raw
    logits the checks compare are unaffected."""
    model.generation_config.suppress_tokens = ids
    model.generation_config.pad_token_id = pad


# -- InternVL -------------------------------------------------------------------------------------
INTERNVL_SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
INTERNVL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def internvl_processor() -> InternVLImagesOnlyProcessor:
    """InternVL's processor with 32 px tiles (up to 4 plus a thumbnail) and 16 tokens per tile."""
    tokenizer = word_tokenizer(INTERNVL_SPECIALS, bos="<|im_start|>", eos="<|im_end|>", start_image_token="<img>",
                               end_image_token="</img>", context_image_token="<IMG_CONTEXT>", video_token="<video>")
    image_processor = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True,
                                               min_patches=1, max_patches=4)
    return InternVLImagesOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       image_seq_length=TILE_TOKENS, chat_template=INTERNVL_TEMPLATE)


def tiny_internvl(tokenizer: Any, attn: str = "sdpa", backbone: str = "qwen2", window: int | None = None,
                  seed: int = 0) -> InternVLForConditionalGeneration:
    """InternViT (32 px, patch 4, CLS dropped) + pixel shuffle 0.5 (16 tokens per tile) + a 4-layer Qwen2 or
    Llama decoder with GQA (4 heads, 2 KV heads); with `window`, Qwen2's layers 2 and 3 slide."""
    torch.manual_seed(seed)
    text: dict[str, Any] = dict(model_type=backbone, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if window is not None:
        text.update(use_sliding_window=True, sliding_window=window, max_window_layers=2)
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TILE, patch_size=4),
        text_config=text, image_token_id=tokenizer.context_image_token_id, image_seq_length=TILE_TOKENS,
        downsample_ratio=0.5, tie_word_embeddings=False)
    model = InternVLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    suppress_placeholders(model, [tokenizer.context_image_token_id], tokenizer.pad_token_id)
    return model


# -- Idefics3 and SmolVLM ---------------------------------------------------------------------------
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
TILED_SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                  "<global-img>", *ROW_COL]
TILED_TEMPLATE = (
    "{{- '<|im_start|>' -}}"
    "{%- for message in messages -%}"
    "{{- message['role'] | capitalize -}}{{- ':' -}}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- ' ' + item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{{- '<end_of_utterance>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def tiled_processor(family: str) -> Any:
    """Idefics3's or SmolVLM's processor: images resized to a 64 px longest edge, cut into 32 px tiles
    (2x2 or 1x2 by aspect ratio) plus the global view, 16 `<image>` tokens per tile."""
    tokenizer = word_tokenizer(TILED_SPECIALS, bos="<|im_start|>", eos="<end_of_utterance>")
    kwargs = dict(size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE})
    if family == "idefics3":
        return Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**kwargs), tokenizer=tokenizer,
                                 image_seq_len=TILE_TOKENS, chat_template=TILED_TEMPLATE)
    return SmolVLMImagesOnlyProcessor(image_processor=SmolVLMImageProcessorPil(**kwargs), tokenizer=tokenizer,
                                      image_seq_len=TILE_TOKENS, chat_template=TILED_TEMPLATE)


def tiny_tiled(family: str, tokenizer: Any, attn: str = "sdpa", seed: int = 0) -> Any:
    """SigLIP-style tower (32 px, patch 4) + pixel shuffle 2 (16 tokens per tile) + a 4-layer Llama decoder
    with GQA (4 heads, 2 KV heads)."""
    torch.manual_seed(seed)
    config_cls, model_cls = ((Idefics3Config, Idefics3ForConditionalGeneration) if family == "idefics3"
                             else (SmolVLMConfig, SmolVLMForConditionalGeneration))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = config_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TILE, patch_size=4),
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_id=image_id, scale_factor=2, pad_token_id=tokenizer.pad_token_id)
    model = model_cls(config).eval()
    model.set_attn_implementation(attn)
    suppress_placeholders(model, [image_id], tokenizer.pad_token_id)
    return model


# -- checkpoints and calibration data ---------------------------------------------------------------
def save_checkpoint(model: Any, processor: Any, folder: Path, processor_class: str) -> Path:
    """`model` and `processor` saved as a hub-style checkpoint folder whose processor_config.json names
    transformers' own processor class (as a real checkpoint does), whatever class built it here."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    path = folder / "processor_config.json"
    config = json.loads(path.read_text())
    config["processor_class"] = processor_class
    path.write_text(json.dumps(config, indent=2))
    return folder


def write_calibration(folder: Path, sizes: list[list[tuple[int, int]]], seed: int = 0) -> Path:
    """data.jsonl with PNG files beside it: line i has the images of `sizes[i]` (a list when several)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(sizes):
        names = []
        for j, image in enumerate(images(row, seed=seed + i)):
            name = f"img{i}_{j}.png"
            image.save(folder / name)
            names.append(name)
        lines.append(json.dumps({"image": names[0] if len(names) == 1 else names,
                                 "prompt": PROMPTS[i % len(PROMPTS)]}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- plans and inputs shared by the three test modules ----------------------------------------------
def rule_plans() -> dict[str, Any]:
    """The rules every family is checked with, on 4 layers, for an image of 48 visual tokens (3 tiles)."""
    from recipe_search.runtime import PruningPlan, make_rule

    return {
        "fitprune": PruningPlan((48, 30, 30, 12), 48, make_rule("fitprune")),
        "attention-previous": PruningPlan((48, 24, 24, 10), 48, make_rule("attention"), "previous"),
        "random": PruningPlan((40, 30, 20, 10), 48, make_rule("random", {"seed": 3})),
        "dart": PruningPlan((48, 24, 24, 12), 48, make_rule("dart")),
    }


def batch_and_rows(adapter: Any, processor: Any, per_prompt: list, prompts: list[str]) -> tuple[dict, list[dict]]:
    """A left-padded batch through `adapter.build_inputs`, and each of its rows processed alone."""
    batch = adapter.build_inputs(processor, per_prompt, prompts)
    alone = [adapter.build_inputs(processor, [ims], [p]) for ims, p in zip(per_prompt, prompts)]
    return batch, alone


def sized_inputs(model: Any, processor: Any, per_prompt: list, seed: int = 0) -> dict:
    """Inputs through the adapter's `build_inputs` for prompts given as an image size (h, w) or a list of
    sizes each: random images of those sizes, with PROMPTS in turn."""
    from recipe_search.models import get_adapter

    sizes = [entry if isinstance(entry, list) else [entry] for entry in per_prompt]
    pics = iter(images([s for row in sizes for s in row], seed))
    grouped = [[next(pics) for _ in row] if isinstance(entry, list) else next(pics)
               for row, entry in zip(sizes, per_prompt)]
    return get_adapter(model).build_inputs(processor, grouped, list(PROMPTS[:len(per_prompt)]))
