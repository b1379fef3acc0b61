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
import copy
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *ROLE_WORDS, *world.vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
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
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)  # the image processor's (OpenAI CLIP)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


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


class Vocab:
    def __init__(self, tokenizer: Any) -> None:
        self.ids: dict[str, int] = tokenizer.get_vocab()

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]


PREFIX = (START, "user", VSTART)  # tokens before the image span


def turn_ids(vocab: Vocab, question: str, answer: str, first: bool) -> tuple[list[int], int, int]:
    """Token ids after the image span for one QA turn; (ids, index predicting the answer, answer id)."""
    head = [vocab.ids[VEND]] if first else [vocab.ids[START], vocab.ids["user"]]
    ids = head + vocab.encode(question) + [vocab.ids[END], vocab.ids[START], vocab.ids["assistant"]]
    pos = len(ids) - 1
    return ids + [vocab.ids[answer], vocab.ids[END]], pos, vocab.ids[answer]


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
    images, kinds, cols, texts, apos, answers, qtypes = [], [], [], [], [], [], []
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
        ids, ps, ans, qs = [], [], [], []
        for k in range(turns):
            for _ in range(8):  # a type the scene cannot answer: draw another
                q = (world.QUESTION_TYPES[(i + k) % 4] if type_weights is None
                     else world.QUESTION_TYPES[int(rng.choice(4, p=type_weights))])
                qa = world.ask(scene, q, rng, float(rng.random()))
                if qa is not None:
                    break
            if qa is None:
                continue
            t_ids, p, a = turn_ids(vocab, qa[0], qa[1], first=not ids)
            ps.append(len(ids) + p)
            ids += t_ids
            ans.append(a)
            qs.append(q)
        images.append(scene.render())
        kinds.append(kl)
        cols.append(cl)
        texts.append(ids)
        apos.append(ps)
        answers.append(ans)
        qtypes.append(qs)
    return Batch(patchify(images), torch.stack(kinds), torch.stack(cols), texts, apos, answers, qtypes)


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
    """Stage 1: patch embed + ViT blocks + merger, with a temporary linear head on the merged tokens."""
    visual = model.model.visual
    width = model.config.text_config.hidden_size
    head = torch.nn.Linear(width, len(KIND_CLASSES) + 1 + len(world.COLOURS))
    opt = torch.optim.AdamW(list(visual.parameters()) + list(head.parameters()), lr=args.vision_lr, weight_decay=0.0)
    nk = len(KIND_CLASSES)

    def losses(b: Batch) -> tuple[torch.Tensor, float]:
        B = b.kind_lbl.shape[0]
        merged = visual.merger(tower_states(model, b.pixels, B)).view(B, NV, width)
        logits = head(merged)
        lk, lc = logits[..., :nk], logits[..., nk:]
        loss = F.cross_entropy(lk.flatten(0, 1), b.kind_lbl.flatten()) + F.cross_entropy(
            lc.flatten(0, 1), b.colour_lbl.flatten())
        ok = (lk.argmax(-1) == b.kind_lbl) & (lc.argmax(-1) == b.colour_lbl)
        return loss, ok.float().mean().item()

    calib = make_batch(vocab, "calib", args.seed, 0, 48, 1)
    t0 = time.time()
    for step in range(1, args.vision_steps + 1):
        b = make_batch(vocab, "train", args.seed, (step - 1) * args.vision_batch, args.vision_batch, 1)
        loss, _ = losses(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.vision_steps:
            with torch.no_grad():
                _, acc = losses(calib)
            log(f"[vision] step {step} loss {loss.item():.4f} calib cell acc {acc:.4f} ({time.time() - t0:.0f}s)")
    for name, p in visual.named_parameters():
        if not name.startswith("merger."):
            p.requires_grad_(False)


class Stage2:
    """Merger + decoder training on frozen ViT states, in the processor's layout."""

    def __init__(self, model: Any, vocab: Vocab) -> None:
        self.model, self.vocab = model, vocab
        self.lm = model.model.language_model
        self.prefix = torch.tensor([vocab.ids[t] for t in PREFIX])
        # aux target: each visual token's own words, uniform over them
        self.kind_ids = torch.tensor([vocab.ids[k] for k in KIND_CLASSES])
        self.colour_ids = torch.tensor([vocab.ids[c] for c in world.COLOURS])

    def aux_target(self, b: Batch) -> torch.Tensor:
        B, V = b.kind_lbl.shape[0], self.model.config.text_config.vocab_size
        tgt = torch.zeros(B, NV, V)
        tgt.scatter_(2, self.kind_ids[b.kind_lbl].unsqueeze(-1), 1.0)
        tile = b.colour_lbl > 0
        rows = tgt[tile] * 0.5
        rows[torch.arange(rows.shape[0]), self.colour_ids[b.colour_lbl[tile] - 1]] = 0.5
        tgt[tile] = rows
        return tgt

    def forward(self, b: Batch, states: torch.Tensor, keep_blank: float, gen: torch.Generator | None):
        """Answer logits (N, V), merged visual tokens (B, 100, h), answers (N,), types.

        keep_blank < 1 drops that share of blank cells' tokens (tiles and pebbles stay); survivors keep
        their M-RoPE positions."""
        B = len(b.texts)
        visual = self.model.model.visual.merger(states).view(B, NV, -1)
        idx = self.keep_index(b, keep_blank, gen)
        logits, answers, qtypes = self.forward_visual(b, visual, idx)
        return logits, visual, answers, qtypes

    def keep_index(self, b: Batch, keep_blank: float, gen: torch.Generator | None) -> torch.Tensor:
        """(B, M) sorted indices of the visual tokens kept in each row."""
        B = len(b.texts)
        if keep_blank < 1.0:
            busy_max = int((b.kind_lbl > 0).sum(1).max())
            n_keep = busy_max + round(keep_blank * (NV - busy_max))
            idx = []
            for r in range(B):
                busy = torch.nonzero(b.kind_lbl[r] > 0).flatten()
                blank = torch.nonzero(b.kind_lbl[r] == 0).flatten()
                pick = blank[torch.randperm(blank.numel(), generator=gen)[: n_keep - busy.numel()]]
                idx.append(torch.sort(torch.cat([busy, pick])).values)
            idx = torch.stack(idx)
        else:
            idx = torch.arange(NV).expand(B, NV)
        return idx

    def forward_visual(self, b: Batch, visual: torch.Tensor, idx: torch.Tensor):
        """Answer logits (N, V), answers (N,) and types, with only the visual tokens `idx` in the sequence."""
        B = len(b.texts)
        kept = torch.gather(visual, 1, idx.unsqueeze(-1).expand(-1, -1, visual.shape[-1]))
        M, P = idx.shape[1], len(PREFIX)
        lt = max(len(t) for t in b.texts)
        text = torch.full((B, lt), self.vocab.ids[PAD])
        mask = torch.zeros(B, P + M + lt, dtype=torch.long)
        for r, t in enumerate(b.texts):
            text[r, : len(t)] = torch.tensor(t)
            mask[r, : P + M + len(t)] = 1
        emb = self.lm.embed_tokens
        embeds = torch.cat([emb(self.prefix).expand(B, -1, -1), kept, emb(text)], dim=1)
        hidden = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(idx, lt)).last_hidden_state
        rows = torch.tensor([r for r, ps in enumerate(b.answer_pos) for _ in ps])
        cols = torch.tensor([P + M + p for ps in b.answer_pos for p in ps])
        logits = self.model.lm_head(hidden[rows, cols])
        answers = torch.tensor([a for ans in b.answers for a in ans])
        return logits, answers, [q for qs in b.qtypes for q in qs]

    def aux_loss(self, visual: torch.Tensor, b: Batch) -> torch.Tensor:
        logp = F.log_softmax(self.model.lm_head(self.lm.norm(visual)), dim=-1)
        return -(self.aux_target(b) * logp).sum(-1).mean()


def evaluate(stage: Stage2, batches: list[Batch]) -> tuple[float, dict[str, float]]:
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for b in batches:
            states = tower_states(stage.model, b.pixels, len(b.texts))
            logits, _, answers, qtypes = stage.forward(b, states, 1.0, None)
            for q, ok in zip(qtypes, (logits.argmax(-1) == answers).tolist()):
                hits.setdefault(q, []).append(ok)
    per = {q: sum(v) / len(v) for q, v in sorted(hits.items())}
    return sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values()), per


def similarity_init(model: Any, layers: int, scale: float, seed: int) -> None:
    """Warm-start the query/key maps (biases zeroed) of the first `layers` decoder layers as one shared
    random projection (keys = P, queries = scale * P) onto each head's slow rotary dims.

    Such a head attends from a word to the visual tokens whose aux-trained embedding contains it, at any
    distance. Generic, trained freely afterwards; the demo needed it for the question-to-image binding
    to form within a CPU budget (docs/demo-model.md), and so does this model (docs/second-model.md).
    """
    cfg = model.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    low = torch.tensor([i for i in range(hd) if i % (hd // 2) >= hd // 4])
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.language_model.layers[:layers]:
        attn = layer.self_attn
        with torch.no_grad():
            for lin in (attn.q_proj, attn.k_proj):
                if lin.bias is not None:
                    lin.bias.zero_()
            for kv in range(cfg.num_key_value_heads):
                proj = torch.linalg.qr(torch.randn(cfg.hidden_size, low.numel(), generator=gen))[0].T
                attn.k_proj.weight[kv * hd:(kv + 1) * hd] = 0.0
                attn.k_proj.weight[kv * hd + low] = proj
                for h in range(kv * groups, (kv + 1) * groups):
                    attn.q_proj.weight[h * hd:(h + 1) * hd] = 0.0
                    attn.q_proj.weight[h * hd + low] = scale * proj


def train_decoder(model: Any, vocab: Vocab, args: argparse.Namespace, log: Callable[[str], None]) -> float:
    """Stage 2; restores the parameters of the best full-sequence calib evaluation at the end."""
    stage = Stage2(model, vocab)
    if args.similarity_layers:
        similarity_init(model, args.similarity_layers, args.similarity_scale, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm, total = args.warmup, args.steps

    def lr_at(step: int) -> float:
        if step <= warm:
            return args.lr * step / warm
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm))))

    calib = eval_batches(vocab, "calib", args.calib_questions, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    weights = np.array(args.type_weights, dtype=np.float64) / sum(args.type_weights)
    best, best_state, t0 = -1.0, None, time.time()
    start = args.vision_steps * args.vision_batch  # fresh training images after stage 1
    for step in range(1, total + 1):
        progress = step / total
        hi = min(world.MAX_TARGETS, 1 + round((world.MAX_TARGETS - 1) * progress / args.targets_until))
        n_targets = (max(1, min(world.MIN_TARGETS, hi - 2)), hi)
        b = make_batch(vocab, "train", args.seed, start + (step - 1) * args.batch, args.batch, args.turns,
                       n_targets, weights)
        with torch.no_grad():
            states = tower_states(model, b.pixels, args.batch)
        keep = min(1.0, args.keep_start + (1 - args.keep_start) * progress / args.keep_until)
        logits, visual, answers, _ = stage.forward(b, states, keep, gen)
        loss_qa = F.cross_entropy(logits, answers)
        loss_aux = stage.aux_loss(visual, b)
        loss = loss_qa + args.aux_weight * loss_aux
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0:
            log(f"[decoder] step {step} qa {loss_qa.item():.4f} aux {loss_aux.item():.4f} keep {keep:.2f} "
                f"targets {n_targets} ({time.time() - t0:.0f}s)")
        if step % args.eval_every == 0 or step == total:
            acc, per = evaluate(stage, calib)
            log(f"[decoder] step {step} calib acc {acc:.4f} " + " ".join(f"{q} {v:.3f}" for q, v in per.items()))
            if keep >= 1.0 and acc > best:
                best, best_state = acc, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    log(f"[decoder] kept best calib acc {best:.4f}")
    return best


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".second-", dir=out.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    write_jsonl(tmp, "calib", args.calib_images, args.seed)
    write_jsonl(tmp, "eval", args.eval_images, args.seed)
    (tmp / "train_log.txt").write_text("\n".join(log_lines) + "\n")
    tmp.chmod(0o755)
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; weights depend on it")
    ap.add_argument("--vision-steps", type=int, default=250)
    ap.add_argument("--vision-batch", type=int, default=24)
    ap.add_argument("--vision-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=1400, help="stage-2 steps")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--turns", type=int, default=8, help="QA turns per image in a training sequence")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-weight", type=float, default=1.0)
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
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    if args.evaluate_only:
        report = evaluate_checkpoint(args.out, args.eval_n, (0.25, 0.5), args.seed)
        print(json.dumps(report, indent=2))
        return
    t0 = time.time()
    lines: list[str] = []

    def log(msg: str) -> None:
        line = f"{time.time() - t0:7.1f}s {msg}"
        lines.append(line)
        print(line, flush=True)

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    vocab = Vocab(tokenizer)
    model = build_model(tokenizer)
    check_layout(vocab, processor, model)
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,}; {NV} visual tokens; "
        f"threads {args.threads}; seed {args.seed}")
    model.train()
    train_vision(model, vocab, args, log)
    model.model.visual.eval()
    train_decoder(model, vocab, args, log)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    log(f"training wall time {time.time() - t0:.0f}s")
    save(model, processor, args.out, args, lines)
    print(f"saved {args.out} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
