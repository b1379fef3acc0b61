"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models, processor-free inputs, and a saved checkpoint
with a word-level tokenizer, a chat template and the PIL image processor, all built offline."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from recipe_search.models import adapter_class
from recipe_search.models.qwen2_vl import image_only_processor

PAD, START, END, UNK, IMAGE, VIDEO, VSTART, VEND = range(8)
SPECIAL = ("<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
           "<|vision_end|>")
WORDS = ("user", "assistant", "what", "color", "shape", "is", "the", "this", "red", "green", "blue", "circle",
         "square", "?", "how", "many", "seconds")
VOCAB = 64
USER, ASSISTANT, TIMESTAMP = 8, 9, 24  # TIMESTAMP ("seconds") stands in for Qwen3-VL's frame time text
PATCH, MERGE, TEMPORAL = 4, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH
LAYERS = 4

# one item of a processor-free prompt: a text id, ("image", h, w) or ("video", t, h, w) in patch grids
Item = Union[int, tuple]

CLASSES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
}

CHAT_TEMPLATE = (
    "{%- for m in messages -%}<|im_start|>{{ m['role'] }} "
    "{%- if m['content'] is string -%} {{ m['content'] }}{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif c['type'] == 'text' -%} {{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}<|im_end|>"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant{%- endif -%}"
)


def _vision_config(family: str) -> dict[str, Any]:
    common = dict(num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                  in_channels=3)
    if family == "qwen2_vl":
        return dict(common, depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2)
    if family == "qwen2_5_vl":  # windows of 2x2 merged tokens, the last block attends globally
        return dict(common, depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16,
                    fullatt_block_indexes=[1], tokens_per_second=2)
    # Qwen3-VL: DeepStack features from vision blocks 0 and 1 go to decoder layers 0 and 1
    return dict(common, depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                num_position_embeddings=64, deepstack_visual_indexes=[0, 1])


def tiny_model(family: str, attn: str = "sdpa", seed: int = 0, sliding_window: int | None = None) -> Any:
    """A 4-layer h64 decoder (4 heads, 2 KV heads) with a 2-block vision tower, patch 4, merge 2.

    `sliding_window` (Qwen2 decoders): layers 2 and 3 attend within that window.
    """
    torch.manual_seed(seed)
    rope: dict[str, Any] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                pad_token_id=PAD, bos_token_id=START, eos_token_id=END)
    if family == "qwen3_vl":
        text.update(head_dim=16, rope_parameters={**rope, "mrope_interleaved": True})
    else:
        text.update(rope_parameters=rope)
    if sliding_window is not None:
        text.update(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=LAYERS // 2)
    config_cls, model_cls = (getattr(transformers, name) for name in CLASSES[family])
    config = config_cls(text_config=text, vision_config=_vision_config(family), image_token_id=IMAGE,
                        video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    model = model_cls(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = END
    return model


def _expand(family: str, item: Item) -> tuple[list[int], list[int]]:
    """Token ids and mm_token_type_ids of one item, as the family's processor lays it out."""
    if isinstance(item, int):
        return [item], [0]
    if item[0] == "image":
        n = item[1] * item[2] // MERGE**2
        return [VSTART] + [IMAGE] * n + [VEND], [0] + [1] * n + [0]
    t, h, w = item[1:]
    n = h * w // MERGE**2
    if family == "qwen3_vl":  # every frame: "<time>" <|vision_start|> frame <|vision_end|>
        return [TIMESTAMP, VSTART, *[VIDEO] * n, VEND] * t, [0, 0, *[2] * n, 0] * t
    return [VSTART] + [VIDEO] * (t * n) + [VEND], [0] + [2] * (t * n) + [0]


def qwen_inputs(family: str, rows: Sequence[Sequence[Item]], seed: int = 0,
                row_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded processor-free inputs: each row is <|im_start|> user + its items + <|im_start|> assistant.

    Each image's or video's pixels are drawn from (seed, row id, item index), so a row built alone
    with its batch row id gets the very pixels it had in the batch.
    """
    row_ids = list(range(len(rows))) if row_ids is None else list(row_ids)
    ids, types = [], []
    pixels: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
    grids: dict[str, list[list[int]]] = {"image": [], "video": []}
    for row, row_id in zip(rows, row_ids):
        row_ids_, row_types = [START, USER], [0, 0]
        for j, item in enumerate(row):
            tok, typ = _expand(family, item)
            row_ids_ += tok
            row_types += typ
            if not isinstance(item, int):
                grid = [1, *item[1:]] if item[0] == "image" else list(item[1:])
                gen = torch.Generator().manual_seed(seed * 10_000 + row_id * 100 + j)
                pixels[item[0]].append(torch.randn(grid[0] * grid[1] * grid[2], PATCH_DIM, generator=gen))
                grids[item[0]].append(grid)
        ids.append(row_ids_ + [END, START, ASSISTANT])
        types.append(row_types + [0, 0, 0])
    width = max(len(r) for r in ids)
    out: dict[str, torch.Tensor] = {
        "input_ids": torch.tensor([[PAD] * (width - len(r)) + r for r in ids]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids]),
        "mm_token_type_ids": torch.tensor([[0] * (width - len(r)) + r for r in types]),
    }
    if pixels["image"]:
        out["pixel_values"] = torch.cat(pixels["image"])
        out["image_grid_thw"] = torch.tensor(grids["image"])
    if pixels["video"]:
        out["pixel_values_videos"] = torch.cat(pixels["video"])
        out["video_grid_thw"] = torch.tensor(grids["video"])
        if family == "qwen2_5_vl":  # seconds per temporal patch: spaces the frames' M-RoPE time positions
            out["second_per_grid_ts"] = torch.tensor([1.0] * len(grids["video"]))
    return out


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose ids match the tiny configs (special tokens first, then words)."""
    words = list(WORDS) + [f"w{i}" for i in range(VOCAB - len(SPECIAL) - len(WORDS))]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIAL))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   unk_token="<unk>", padding_side="left",
                                   extra_special_tokens={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>"})


def qwen_processor(family: str) -> Any:
    """The family's processor with the PIL image processor (images of 8x8 to 32x32 pixels per side
    area, i.e. 1 to 16 visual tokens) and no video processor."""
    image_processor = transformers.Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE,
                                                            temporal_patch_size=TEMPORAL,
                                                            size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32})
    cls = image_only_processor(adapter_class(family).processor_class)
    return cls(image_processor=image_processor, tokenizer=qwen_tokenizer(), chat_template=CHAT_TEMPLATE)


def save_checkpoint(family: str, folder: Path) -> Path:
    """A tiny random checkpoint of `family` with its processor, as `save_pretrained` writes them."""
    tiny_model(family).save_pretrained(folder)
    qwen_processor(family).save_pretrained(folder)
    return folder


def calibration_file(folder: Path) -> Path:
    """data.jsonl with PNG images of three sizes (16, 15 and 4 visual tokens) beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    prompts = ["what color is the circle ?", "what shape is this ?", "how many red square ?"]
    lines = []
    for i, (h, w) in enumerate([(32, 32), (24, 40), (16, 16), (32, 32), (24, 40), (32, 32)]):
        name = f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
        lines.append(json.dumps({"image": name, "prompt": prompts[i % len(prompts)]}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- what every Qwen family's test module checks, on its own tiny model --------------------------------------
# Row 0 has one 16-token image; row 1 two images of 6 tokens each (another size, another count).
MIXED_ROWS: list[list[Item]] = [[("image", 8, 8), 12, 13], [("image", 4, 6), ("image", 6, 4), 14]]
# Row 0 a 2x(8x8) video; row 1 a 4-token image and a 2x(4x4) video.
VIDEO_ROWS: list[list[Item]] = [[("video", 2, 8, 8), 12], [("image", 4, 4), ("video", 2, 4, 4), 13, 14]]
PLANS = {  # counts for a 16-token image over the 4 layers; other images use the fractions
    "fitprune": ((16, 10, 10, 4), "fitprune", {}, "same"),
    "attention-previous": ((16, 16, 8, 4), "attention", {}, "previous"),
    "random": ((12, 12, 6, 2), "random", {"seed": 3}, "same"),
    "dart": ((16, 8, 8, 4), "dart", {}, "same"),
}


def plan(name: str, images: str = "per-image") -> Any:
    from recipe_search.runtime import PruningPlan, make_rule

    counts, rule, params, where = PLANS[name]
    return PruningPlan(counts, 16, make_rule(rule, params), where, images=images)


def unit_sizes(family: str, row: Sequence[Item]) -> list[int]:
    """Visual tokens of each selection unit of a row under the per-image policy: an image, a Qwen2
    video, or one frame of a Qwen3-VL video (frames are separated by timestamps there)."""
    sizes: list[int] = []
    for item in row:
        if isinstance(item, int):
            continue
        if item[0] == "image":
            sizes.append(item[1] * item[2] // MERGE**2)
        elif family == "qwen3_vl":
            sizes += [item[2] * item[3] // MERGE**2] * item[1]
        else:
            sizes.append(item[1] * item[2] * item[3] // MERGE**2)
    return sizes


def expected_counts(family: str, row: Sequence[Item], pruning_plan: Any) -> list[int]:
    """Visual tokens of `row` entering each layer: every unit keeps its own share of the schedule."""
    per_unit = [pruning_plan.counts_for(n) for n in unit_sizes(family, row)]
    return [sum(layer) for layer in zip(*per_unit)]


def check_cached_decode(model: Any, family: str, rows: list[list[Item]], name: str) -> None:
    """Cached generate() equals a pruned re-forward, and row 0 keeps exactly its units' counts."""
    from checks import assert_cached_decode_equals_reforward
    from recipe_search.runtime import PruningHandle

    pruning_plan = plan(name)
    inputs = qwen_inputs(family, rows, seed=1)
    assert_cached_decode_equals_reforward(model, pruning_plan, inputs, steps=3)
    with PruningHandle(model, pruning_plan) as handle:
        model(**inputs)
        assert handle.last_counts == expected_counts(family, rows[0], pruning_plan)
        assert handle.last_counts[-1] < handle.last_counts[0]


def check_rows_alone(model: Any, family: str, images: str) -> None:
    """A left-padded batch with other image sizes and image counts per row equals each row alone."""
    from checks import assert_rows_alone

    rows = MIXED_ROWS + [[("video", 2, 4, 6), 15]]
    batch = qwen_inputs(family, rows, seed=2)
    alone = [qwen_inputs(family, [row], seed=2, row_ids=[i]) for i, row in enumerate(rows)]
    assert_rows_alone(model, plan("fitprune", images), batch, alone)


def check_cli(family: str, tmp_path: Path, capsys: Any) -> None:
    """`search-recipe --model DIR --calib data.jsonl --budget 50% --eval none` on a saved tiny checkpoint."""
    from recipe_search import load_recipe
    from recipe_search.cli import main

    folder = save_checkpoint(family, tmp_path / f"tiny-{family}")
    calib = calibration_file(tmp_path / "calib")
    out = tmp_path / "out"
    argv = ["--model", str(folder), "--calib", str(calib), "--budget", "50%", "--n-trials", "4", "--eval", "none", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    recipes = sorted(out.glob("*.json"))
    assert [p.name for p in recipes] == [f"tiny-{family}-auto-50pct.json"]  # the default search
    recipe = load_recipe(recipes[0])
    assert (recipe.model.family, recipe.model.model_type, len(recipe.schedule.counts)) == (family, family, LAYERS)
    assert recipe.schedule.visual_tokens == 16  # the most common count of the calibration images
    assert recipe.budget.achieved["full"] <= 0.5


def hub_layout(family: str, folder: Path) -> Path:
    """A saved tiny checkpoint rewritten to the file layout of the Qwen hub checkpoints: image
    processor in preprocessor_config.json (min/max pixels), a video processor config, and the
    chat template in the legacy chat_template.json."""
    from recipe_search.models import adapter_class

    save_checkpoint(family, folder)
    base = adapter_class(family).processor_class
    image = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    size = image.pop("size")
    image.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"], processor_class=base)
    (folder / "preprocessor_config.json").write_text(json.dumps(image))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": PATCH, "processor_class": base}))
    (folder / "processor_config.json").unlink()
    template = folder / "chat_template.jinja"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
    template.unlink()
    return folder


def check_load_processor(family: str, tmp_path: Path) -> None:
    """A hub-layout folder loads its processor without torchvision (PIL image processor, no video
    processor), and `build_inputs` gives left-padded inputs the model runs, several image sizes
    and image counts per row."""
    from recipe_search.models import adapter_class

    folder = hub_layout(family, tmp_path / "hub-like")
    adapter_cls = adapter_class(family)
    processor = adapter_cls.load_processor(str(folder))
    assert isinstance(processor, getattr(transformers, adapter_cls.processor_class))
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.image_processor.patch_size == PATCH and processor.chat_template == CHAT_TEMPLATE
    assert not hasattr(processor, "video_processor")
    model = getattr(transformers, CLASSES[family][1]).from_pretrained(folder).eval()
    adapter = adapter_cls(model)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(32, 32), (16, 24)]]
    inputs = adapter.build_inputs(processor, [images[1], images], ["what color is this ?", "what shape ?"])
    assert bool((inputs["attention_mask"][0] == 0).any())  # the shorter row is left-padded
    # 32x32 px -> 8x8 patches -> 16 tokens; 16x24 px -> 4x6 patches -> 6 tokens
    assert adapter.visual_mask(inputs["input_ids"]).sum(dim=1).tolist() == [6, 6 + 16]
    assert adapter.visual_groups(inputs["input_ids"]).amax(dim=1).tolist() == [0, 1]
    assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape
