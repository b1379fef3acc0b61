#!/usr/bin/env python
"""Train the second small model (Qwen2-VL layout) from scratch on CPU on the "tiles" world.

Why: the demo model (LLaVA + Llama on recipe_search/demo/world.py) is one toy; a second one with
another world (recipe_search/demo/world2.py) and another architecture (Qwen2VLForConditionalGeneration:
its own ViT with a 2x2 patch merger, Qwen2 decoder with M-RoPE) checks that recipes and the qwen2_vl
adapter behave on a *trained* model too. Weights are never committed: this script makes them.

    python scripts/train_second_model.py          # --seed 0 --threads 1 --out ~/.cache/recipe-search/second-model

Writes into --out: the Hugging Face checkpoint (config, safetensors, tokenizer, PIL image processor,
chat template), calib.jsonl and eval.jsonl with their PNGs under images/, and train_log.txt.

Training (same recipe as the demo's, adapted; docs/second-model.md):
1. vision tower (patch embed, 2 ViT blocks, patch merger) with a temporary per-cell head on labels the
   world generator knows (kind / pebble / blank, colour / none), then blocks frozen;
2. merger + decoder on multi-turn QA sequences built with the processor's token layout and M-RoPE
   positions, an aux loss (each visual token predicts its cell's words through the tied embedding),
   a curriculum (few targets first; some blank cells dropped early, survivors keep their positions),
   and decoder layer-0 query/key maps warm-started as content-similarity heads.
The best full-sequence step on the calib split is kept. Fixed seed, one thread and
torch.use_deterministic_algorithms(True) make a run reproducible.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = pathlib.Path(__file__).resolve().parent
for _path in (REPO, SCRIPTS):  # runnable from a checkout without `pip install -e .`, and importable by tests
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import training_common as common
from training_common import Vocab

from recipe_search.demo import world2 as world

DEFAULT_OUT = pathlib.Path("~/.cache/recipe-search/second-model").expanduser()

# -- tokenizer, processor, model ---------------------------------------------------------------------------
PAD, START, END, UNK, IMAGE, VIDEO, VSTART, VEND = (
    "<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
    "<|vision_end|>")
SPECIAL_TOKENS: tuple[str, ...] = (PAD, START, END, UNK, IMAGE, VIDEO, VSTART, VEND)
ROLE_WORDS: tuple[str, ...] = ("user", "assistant")
PATCH, MERGE, TEMPORAL = 8, 2, 2
NV = (world.IMAGE_SIZE // (PATCH * MERGE)) ** 2  # 100 visual tokens, one per 16x16 cell
assert PATCH * MERGE == world.CELL
LAYERS = 6

# Qwen-style turns: "<|im_start|>user <|vision_start|><|image_pad|><|vision_end|> q<|im_end|>"
# "<|im_start|>assistant a<|im_end|>"; the generation prompt ends on "assistant", whose logits give the answer.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}<|im_start|>{{ m['role'] + ' ' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}<|im_end|>"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant{%- endif -%}"
)


def build_tokenizer() -> Any:
    """Word-level tokenizer: every world word is one token, so every answer is one token."""
    from transformers import PreTrainedTokenizerFast

    from recipe_search.demo.build import word_level

    tok, _ = word_level([*SPECIAL_TOKENS, *ROLE_WORDS, *world.vocabulary()], UNK)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=END, unk_token=UNK, padding_side="left",
        model_max_length=512, extra_special_tokens={"image_token": IMAGE, "video_token": VIDEO})


def build_processor(tokenizer: Any) -> Any:
    """Qwen2VLProcessor with the PIL image processor and no video processor (no torchvision needed)."""
    import transformers

    from recipe_search.models.qwen2_vl import image_only_processor

    pixels = world.IMAGE_SIZE * world.IMAGE_SIZE  # min = max: every image is exactly 160x160 -> 100 tokens
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
        size={"shortest_edge": pixels, "longest_edge": pixels})
    cls = image_only_processor("Qwen2VLProcessor")
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_config(tokenizer: Any) -> Any:
    """Qwen2-VL layout, small: ViT (embed 64, 2 blocks, patch 8, 2x2 merger) -> Qwen2 decoder h128 x 6 layers."""
    from transformers import Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = {"vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1_000_000.0},
            "tie_word_embeddings": True, "pad_token_id": ids(PAD), "bos_token_id": ids(START),
            "eos_token_id": ids(END)}
    vision = {"depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 2, "mlp_ratio": 2, "patch_size": PATCH,
              "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL, "in_channels": 3}
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids(IMAGE), video_token_id=ids(VIDEO),
                         vision_start_token_id=ids(VSTART), vision_end_token_id=ids(VEND), tie_word_embeddings=True)


def build_model(tokenizer: Any) -> Any:
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration(build_config(tokenizer))
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.convert_tokens_to_ids(START)
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("output embedding is not tied to the input embedding (the aux loss relies on it)")
    return model


# -- batches -------------------------------------------------------------------------------------------------
MEAN, STD = common.CLIP_MEAN, common.CLIP_STD  # the image processor's (OpenAI CLIP)


def patchify(images: list) -> torch.Tensor:
    """(B * 400, 3*2*8*8) pixel patches laid out exactly as Qwen2VLImageProcessorPil lays them out."""
    out = []
    g = world.IMAGE_SIZE // PATCH
    for im in images:
        a = ((np.asarray(im, dtype=np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)
        p = a.reshape(3, g // MERGE, MERGE, PATCH, g // MERGE, MERGE, PATCH).transpose(1, 4, 2, 5, 0, 3, 6)
        p = np.broadcast_to(p[:, :, :, :, :, None], (*p.shape[:5], TEMPORAL, *p.shape[5:]))
        out.append(p.reshape(g * g, 3 * TEMPORAL * PATCH * PATCH))
    return torch.from_numpy(np.concatenate(out))


PREFIX = (START, "user", VSTART)  # tokens before the image span


# after the image span: "<|vision_end|> q<|im_end|> <|im_start|>assistant a<|im_end|>", later turns
# opening with "<|im_start|>user".
TURN = common.TurnLayout(first_head=(VEND,), next_head=(START, "user"), before_answer=(END, START, "assistant"),
                         end=END)


def turn_ids(vocab: Vocab, question: str, answer: str, first: bool) -> tuple[list[int], int, int]:
    """Token ids after the image span for one QA turn; (ids, index predicting the answer, answer id)."""
    return TURN.ids(vocab, question, answer, first)


@dataclass
class Batch:
    pixels: torch.Tensor  # (B*400, 384)
    kind_lbl: torch.Tensor  # (B, 100): 0 blank, 1 pebble, 2.. kinds
    colour_lbl: torch.Tensor  # (B, 100): 0 none, 1.. colours
    texts: list[list[int]]
    answer_pos: list[list[int]]
    answers: list[list[int]]
    qtypes: list[list[str]]


KIND_CLASSES = (world.BLANK, world.PEBBLE, *world.KINDS)


def make_batch(vocab: Vocab, split: str, seed: int, start: int, size: int, turns: int,
               n_targets: tuple[int, int] = (world.MIN_TARGETS, world.MAX_TARGETS),
               type_weights: np.ndarray | None = None) -> Batch:
    """Images start..start+size-1 of the split's stream (seed offset 1 keeps them apart from make_split's
    calib/eval items), each with `turns` questions; types round-robin or drawn with `type_weights`."""
    colours = list(world.COLOURS)
    images, kinds, cols, rows = [], [], [], []
    for i in range(start, start + size):
        rng = world.split_rng(split, seed + 1, i)
        scene = world.sample_scene(split, rng, n_targets)
        kl = torch.zeros(world.GRID ** 2, dtype=torch.long)
        cl = torch.zeros(world.GRID ** 2, dtype=torch.long)
        for c in scene.pebbles:
            kl[c] = 1
        for t in scene.tiles:
            kl[t.cell] = KIND_CLASSES.index(t.kind)
            cl[t.cell] = 1 + colours.index(t.colour)
        row = common.QARow()
        for k in range(turns):
            for _ in range(8):  # a type the scene cannot answer: draw another
                q = (world.QUESTION_TYPES[(i + k) % 4] if type_weights is None
                     else world.QUESTION_TYPES[int(rng.choice(4, p=type_weights))])
                qa = world.ask(scene, q, rng, float(rng.random()))
                if qa is not None:
                    break
            if qa is None:
                continue
            row.add(TURN, vocab, qa[0], qa[1], q)
        rows.append(row)
        images.append(scene.render())
        kinds.append(kl)
        cols.append(cl)
    return Batch(patchify(images), torch.stack(kinds), torch.stack(cols), *common.text_fields(rows))


def eval_batches(vocab: Vocab, split: str, n: int, seed: int) -> list[Batch]:
    """Single-turn batches of make_split's items, i.e. exactly the questions the product is asked."""
    samples = world.make_split(split, n, seed)
    out = []
    for k in range(0, n, 50):
        chunk = samples[k:k + 50]
        texts, apos, answers = [], [], []
        for s in chunk:
            ids, p, a = turn_ids(vocab, s.question, s.answer, first=True)
            texts.append(ids[:p + 1])
            apos.append([p])
            answers.append([a])
        zeros = torch.zeros(len(chunk), NV, dtype=torch.long)
        out.append(Batch(patchify([s.image for s in chunk]), zeros, zeros, texts, apos, answers,
                         [[s.qtype] for s in chunk]))
    return out


def check_layout(vocab: Vocab, processor: Any, model: Any) -> None:
    """The training token layout and M-RoPE positions equal what the processor and model produce."""
    sample = world.make_split("calib", 1)[0]
    qas = [(sample.question, sample.answer), ("is there any ring ?", "yes")]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qas[0][0]}]},
            {"role": "assistant", "content": [{"type": "text", "text": qas[0][1]}]},
            {"role": "user", "content": [{"type": "text", "text": qas[1][0]}]},
            {"role": "assistant", "content": [{"type": "text", "text": qas[1][1]}]}]
    text = processor.apply_chat_template(chat, tokenize=False)
    inputs = processor(images=[sample.image], text=[text], return_tensors="pt")
    got = inputs["input_ids"][0].tolist()
    ids = [vocab.ids[t] for t in PREFIX] + [vocab.ids[IMAGE]] * NV
    for k, (q, a) in enumerate(qas):
        ids += turn_ids(vocab, q, a, first=k == 0)[0]
    if got != ids:
        sys.exit(f"training layout differs from the processor's:\n{got}\n{ids}")
    if not torch.equal(inputs["pixel_values"], patchify([sample.image])):
        diff = (inputs["pixel_values"] - patchify([sample.image])).abs().max().item()
        if diff > 1e-5:
            sys.exit(f"pixel patches differ from the image processor's (max abs diff {diff})")
    if inputs["image_grid_thw"].tolist() != [[1, world.GRID * MERGE, world.GRID * MERGE]]:
        sys.exit(f"unexpected image grid {inputs['image_grid_thw'].tolist()}")
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"])
    mine = positions(torch.arange(NV)[None], len(got) - len(PREFIX) - NV)
    if not torch.equal(pos, mine):
        sys.exit("M-RoPE positions differ from the model's get_rope_index")


def positions(idx: torch.Tensor, text_len: int) -> torch.Tensor:
    """(3, B, L) M-RoPE positions of prefix + kept visual tokens `idx` (B, M) + `text_len` text tokens,
    as get_rope_index assigns them (temporal, row, column; text resumes after the image's extent)."""
    B, P = idx.shape[0], len(PREFIX)
    pre = torch.arange(P).expand(3, B, P)
    vis = torch.stack([torch.full_like(idx, P), P + idx // world.GRID, P + idx % world.GRID])
    txt = (P + world.GRID + torch.arange(text_len)).expand(3, B, text_len)
    return torch.cat([pre, vis, txt], dim=2)


# -- model pieces --------------------------------------------------------------------------------------------
def tower_states(model: Any, pixels: torch.Tensor, n_images: int) -> torch.Tensor:
    """Pre-merger ViT states (B*400, 64)."""
    grid = torch.tensor([[1, world.GRID * MERGE, world.GRID * MERGE]] * n_images)
    return model.model.visual(pixels, grid_thw=grid).last_hidden_state


def train_vision(model: Any, vocab: Vocab, args: argparse.Namespace, log: Callable[[str], None]) -> None:
    """Stage 1: patch embed + ViT blocks + merger, with a temporary linear head on the merged tokens; then
    everything but the merger frozen."""
    visual = model.model.visual
    width = model.config.text_config.hidden_size

    def merged(b: Batch) -> torch.Tensor:
        B = b.kind_lbl.shape[0]
        return visual.merger(tower_states(model, b.pixels, B)).view(B, NV, width)

    labels = [("kind_lbl", len(KIND_CLASSES)), ("colour_lbl", 1 + len(world.COLOURS))]
    calib = make_batch(vocab, "calib", args.seed, 0, 48, 1)
    common.train_probe(
        list(visual.parameters()), merged, width, labels,
        lambda step: make_batch(vocab, "train", args.seed, (step - 1) * args.vision_batch, args.vision_batch, 1),
        calib, args, log, "cell")
    for name, p in visual.named_parameters():
        if not name.startswith("merger."):
            p.requires_grad_(False)


class Stage2(common.Stage2Base):
    """Merger + decoder training on frozen ViT states, in the processor's layout."""

    def __init__(self, model: Any, vocab: Vocab) -> None:
        super().__init__(model, vocab, PREFIX, PAD, NV, "kind_lbl", None)
        # aux target: each visual token's own words, uniform over them
        self.kind_ids = torch.tensor([vocab.ids[k] for k in KIND_CLASSES])
        self.colour_ids = torch.tensor([vocab.ids[c] for c in world.COLOURS])

    def features(self, b: Batch) -> torch.Tensor:
        return tower_states(self.model, b.pixels, len(b.texts))

    def visual_tokens(self, b: Batch, feats: torch.Tensor) -> torch.Tensor:
        """Merged visual tokens (B, 100, h) of the pre-merger ViT states."""
        return self.model.model.visual.merger(feats).view(len(b.texts), NV, -1)

    def positions(self, idx: torch.Tensor, text_len: int) -> torch.Tensor:
        return positions(idx, text_len)

    def aux_target(self, b: Batch) -> torch.Tensor:
        B, V = b.kind_lbl.shape[0], self.model.config.text_config.vocab_size
        tgt = torch.zeros(B, NV, V)
        tgt.scatter_(2, self.kind_ids[b.kind_lbl].unsqueeze(-1), 1.0)
        tile = b.colour_lbl > 0
        rows = tgt[tile] * 0.5
        rows[torch.arange(rows.shape[0]), self.colour_ids[b.colour_lbl[tile] - 1]] = 0.5
        tgt[tile] = rows
        return tgt


def train_decoder(model: Any, vocab: Vocab, args: argparse.Namespace, log: Callable[[str], None]) -> float:
    """Stage 2; restores the parameters of the best full-sequence calib evaluation at the end."""
    stage = Stage2(model, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    calib = eval_batches(vocab, "calib", args.calib_questions, args.seed)
    start = args.vision_steps * args.vision_batch  # fresh training images after stage 1

    def train_batch(step: int, n_targets: tuple[int, int], weights: np.ndarray) -> Batch:
        return make_batch(vocab, "train", args.seed, start + (step - 1) * args.batch, args.batch, args.turns,
                          n_targets, weights)

    return common.train_decoder(
        stage, params, calib, train_batch,
        lambda progress: common.curriculum(progress, world.MIN_TARGETS, world.MAX_TARGETS, args.targets_until, 2),
        args, log, "targets", sort_types=True)


# -- output --------------------------------------------------------------------------------------------------
def write_jsonl(folder: pathlib.Path, split: str, n: int, seed: int) -> None:
    """`{split}.jsonl` ({"image", "prompt", "question", "answer", "qtype"}) with PNGs under images/."""
    images = folder / "images"
    images.mkdir(exist_ok=True)
    lines = []
    for s in world.make_split(split, n, seed):
        name = f"images/{s.image_id}.png"
        s.image.save(folder / name)
        lines.append(json.dumps({"image": name, "prompt": s.question, "question": s.question,
                                 "answer": s.answer, "qtype": s.qtype}))
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def save(model: Any, processor: Any, out: pathlib.Path, args: argparse.Namespace, log_lines: list[str]) -> None:
    """Write to a temp dir next to `out`, then swap it in, so `out` is never half-written."""

    def write(tmp: pathlib.Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_jsonl(tmp, "calib", args.calib_images, args.seed)
        write_jsonl(tmp, "eval", args.eval_images, args.seed)
        (tmp / "train_log.txt").write_text("\n".join(log_lines) + "\n")

    common.save_swapped(out, ".second-", write)


def evaluate_checkpoint(folder: pathlib.Path, n: int, drops: tuple[float, ...], seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy the way the product asks: the package's loader (processor with the chat template,
    left padding), greedy first generated token == answer, on the first `n` eval items; plus accuracy with
    a random share of visual tokens removed before the decoder (survivors keep their M-RoPE positions)."""
    from recipe_search.models.loading import load_model

    model, processor, adapter = load_model(str(folder))
    samples = world.make_split("eval", n, seed)
    hits: dict[str, list[bool]] = {q: [] for q in world.QUESTION_TYPES}
    for k in range(0, n, 50):
        chunk = samples[k:k + 50]
        inputs = adapter.build_inputs(processor, [s.image for s in chunk], [s.question for s in chunk])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        for s, tok in zip(chunk, out[:, inputs["input_ids"].shape[1]].tolist()):
            hits[s.qtype].append(processor.tokenizer.decode([tok]).strip() == s.answer)
    report: dict[str, Any] = {"n": n, "accuracy": sum(sum(v) for v in hits.values()) / n,
                              "per_type": {q: sum(v) / len(v) for q, v in hits.items() if v}, "random_drop": {}}
    vocab = Vocab(processor.tokenizer)
    stage = Stage2(model, vocab)
    batches = eval_batches(vocab, "eval", n, seed)
    for drop in drops:
        gen = torch.Generator().manual_seed(seed)
        ok = 0
        with torch.no_grad():
            for b in batches:
                B = len(b.texts)
                grid = torch.tensor([[1, world.GRID * MERGE, world.GRID * MERGE]] * B)
                visual = model.model.visual(b.pixels, grid_thw=grid).pooler_output.view(B, NV, -1)
                keep = NV - round(drop * NV)
                idx = torch.stack([torch.sort(torch.randperm(NV, generator=gen)[:keep]).values for _ in range(B)])
                logits = stage.forward_visual(b, visual, idx)[0]
                ok += int((logits.argmax(-1) == torch.tensor([a[0] for a in b.answers])).sum())
        report["random_drop"][drop] = ok / n
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_training_args(ap, DEFAULT_OUT, vision_steps=250, vision_batch=24, steps=1400)
    ap.add_argument("--targets-until", type=float, default=0.3,
                    help="fraction of stage 2 over which scenes grow from 1 target to the full 4-6")
    ap.add_argument("--keep-start", type=float, default=0.0, help="share of blank cells' tokens kept at step 0")
    ap.add_argument("--keep-until", type=float, default=0.5, help="fraction of stage 2 after which all are kept")
    ap.add_argument("--similarity-layers", type=int, default=1)
    ap.add_argument("--similarity-scale", type=float, default=2.0)
    ap.add_argument("--type-weights", type=float, nargs=4, default=[1.0, 3.0, 1.0, 2.0],
                    help=f"training mixture of {world.QUESTION_TYPES}")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--calib-questions", type=int, default=400)
    ap.add_argument("--calib-images", type=int, default=256, help="records in calib.jsonl")
    ap.add_argument("--eval-images", type=int, default=1000, help="records in eval.jsonl")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="no training: evaluate the checkpoint in --out (product path + random drop)")
    ap.add_argument("--eval-n", type=int, default=1000, help="eval questions for --evaluate-only")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup_torch(args.threads, args.seed)
    if args.evaluate_only:
        report = evaluate_checkpoint(args.out, args.eval_n, (0.25, 0.5), args.seed)
        print(json.dumps(report, indent=2))
        return
    t0 = time.time()
    lines: list[str] = []
    log = common.make_log(t0, lines)

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    vocab = Vocab(tokenizer)
    model = build_model(tokenizer)
    check_layout(vocab, processor, model)
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,}; {NV} visual tokens; "
        f"threads {args.threads}; seed {args.seed}")
    common.run_stages(model, model.model.visual, lambda: train_vision(model, vocab, args, log),
                      lambda: train_decoder(model, vocab, args, log))
    log(f"training wall time {time.time() - t0:.0f}s")
    save(model, processor, args.out, args, lines)
    print(f"saved {args.out} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
