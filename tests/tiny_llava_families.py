"""Offline builders shared by the LLaVA-family test modules (LLaVA-1.5 backbones, NeXT, OneVision):
tiny text configs, a word-level tokenizer with a chat template, calibration folders of PNG files,
and the end-to-end `search-recipe` run on a saved tiny checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import MistralConfig, PreTrainedTokenizerFast, Qwen2Config

from recipe_search import load_recipe
from recipe_search.cli import main
from tiny_models import left_pad  # noqa: F401  (re-exported for the LLaVA family tests)

WINDOW = 16  # sliding window of the Mistral / Qwen2 backbones: shorter than every test prompt
WORDS = ("\n", "what", "colour", "is", "the", "circle", "square", "how", "many", "shapes", "are", "there", "?",
         "USER", "ASSISTANT", ":", "red", "blue", "this", "video", "describe", "compare", "images")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>")
PAD, BOS, EOS, IMAGE, VIDEO = 0, 1, 2, 4, 5  # ids of the specials above
PROMPTS = ("what colour is the circle ?", "how many shapes are there ?", "is there a red square ?",
           "what colour is the square ?")

# One user turn: every image (then video) as "<image>\n" / "<video>\n", the question, then "ASSISTANT:".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set items = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set items = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- for item in items -%}{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] + '\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{- 'ASSISTANT: ' -}}{%- for item in items -%}{{- item['text'] -}}{%- endfor -%}{{- '</s>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def text_config(kind: str, layers: int = 4, vocab: int = 64) -> MistralConfig | Qwen2Config:
    """A tiny decoder (h64, 4 heads / 2 KV heads). "mistral": every layer slides over WINDOW tokens;
    "qwen2": layers >= 2 slide (max_window_layers), the first two attend fully (a hybrid cache)."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if kind == "mistral":
        return MistralConfig(sliding_window=WINDOW, **common)
    if kind == "qwen2":
        return Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2, **common)
    raise ValueError(kind)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS with <image> and <video> placeholders (ids 4 and 5); a line break
    is a token of its own, so "<image>\\n<image>" keeps text between the two images, as real templates do."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *WORDS, "a"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", BOS)])
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>",
                                                                            "video_token": "<video>"},
                                   padding_side="left", model_max_length=4096)


def write_calibration(folder: Path, sizes: list[tuple[int, int]], seed: int = 0, prompts: tuple[str, ...] = PROMPTS,
                      pairs: tuple[tuple[int, int], ...] = ()) -> Path:
    """`folder/data.jsonl` with one {"image", "prompt"} line per (width, height) in `sizes`, PNGs beside it,
    then one two-image line ("left and right") per pair of those images' indices in `pairs`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "prompt": prompts[i % len(prompts)]}))
    lines += [json.dumps({"image": [f"img{a}.png", f"img{b}.png"], "prompt": "left and right"}) for a, b in pairs]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_search(checkpoint: Path, calib: Path, out: Path, num_samples: int, family: str,
               batch_size: int = 8) -> object:
    """`search-recipe --model DIR --calib data.jsonl --budget 50% --eval none --quiet`: exit 0, one
    recipe written for `family`, its achieved FLOPs within the budget."""
    argv = ["--model", str(checkpoint), "--calib", str(calib), "--budget", "50%", "--n-trials", "4", "--eval", "none",
            "--num-samples", str(num_samples), "--out", str(out), "--cache-dir", str(out / "cache"), "--quiet",
            "--batch-size", str(batch_size)]
    assert main(argv) == 0
    recipes = sorted(out.glob("*.json"))
    assert len(recipes) == 1, recipes
    recipe = load_recipe(recipes[0])
    assert recipe.model.family == family
    assert recipe.budget.achieved["full"] <= 0.5
    return recipe
