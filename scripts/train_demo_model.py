#!/usr/bin/env python
"""Train the tiny LLaVA demo model from scratch on CPU and save it as an HF checkpoint folder.

Stage 1 trains the CLIP vision tower with a temporary per-patch head on labels the world
generator knows (shape, colour, side of each 8x8 cell). Stage 2 freezes the tower and trains
projector + Llama decoder on multi-turn QA sequences (8 turns per image), with
- an auxiliary loss making each projected visual token predict its own content words through
  the tied embedding,
- a curriculum: scenes grow from 1 object to the full 5-8 over the first 30% of steps, and most
  *blank* visual tokens are dropped from the sequence (survivors keep their original
  position_ids) until the drop is annealed away at 50% of the steps,
- layer-0 query/key maps warm-started as generic content-similarity heads (see similarity_init),
- more count and shape turns than colour and exist turns in the training mixture (1:3:1:2).
The best full-sequence step on the calib split is kept. See docs/demo-model.md.

Reproducible: fixed seed and a pinned thread count give bit-identical weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from recipe_search.demo import build, world

REPO = pathlib.Path(__file__).resolve().parents[1]
PREFIX_LEN = 3  # <s> USER :
NV = build.NUM_VISUAL_TOKENS


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, 96, 96) normalised exactly like the CLIP image processor
    shape_lbl: torch.Tensor  # (B, 144) 0 = blank, 1.. = SHAPES
    colour_lbl: torch.Tensor  # (B, 144) 0 = none, 1.. = COLOURS
    side_lbl: torch.Tensor  # (B, 144) column half of every patch
    texts: list[list[int]]  # per row: token ids after the image span (all turns)
    answer_pos: list[list[int]]  # per row: index in `texts` whose logits predict an answer
    answers: list[list[int]]  # per row: answer token ids
    qtypes: list[list[str]]


class Vocab:
    """Token ids of the demo tokenizer, checked against the processor's own tokenisation."""

    def __init__(self, tokenizer) -> None:
        self.ids = tokenizer.get_vocab()

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]


def normalise(images: list) -> torch.Tensor:
    """CLIP normalisation of 96x96 images (no resize needed); equal to the processor to ~1e-7."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    return torch.from_numpy(((arr - mean) / std).transpose(0, 3, 1, 2).copy())


def turn_ids(vocab: Vocab, question: str, answer: str, first: bool) -> tuple[list[int], int, int]:
    """Token ids of one QA turn as the chat template renders it; returns (ids, answer_pos, answer_id)."""
    head = [] if first else [vocab.ids["USER"], vocab.ids[":"]]
    ids = head + vocab.encode(question) + [vocab.ids["ASSISTANT"], vocab.ids[":"]]
    pos = len(ids) - 1
    return ids + [vocab.ids[answer], vocab.ids[build.EOS]], pos, vocab.ids[answer]


def make_batch(vocab: Vocab, split: str, seed: int, start: int, size: int, turns: int,
               n_objects: tuple[int, int] = (world.MIN_OBJECTS, world.MAX_OBJECTS),
               type_weights: np.ndarray | None = None,
               pool: tuple[str, ...] = world.QUESTION_TYPES) -> Batch:
    """Images start..start+size-1 of the split's stream, each with `turns` questions.

    Question types from `pool` go round-robin, or are drawn with `type_weights` (training spends
    more turns on the types that are learned last).
    """
    images, shapes, colours, sides, texts, apos, answers, qtypes = [], [], [], [], [], [], [], []
    side_row = [0 if c < world.GRID // 2 else 1 for c in range(world.GRID)] * world.GRID
    for i in range(start, start + size):
        rng = world.split_rng(split, seed, i)
        scene = world.sample_scene(split, rng, n_objects)
        ids, pos, ans, types = [], [], [], []
        attempt = 0
        while len(ans) < turns and attempt < 8 * turns:
            if type_weights is None:
                qtype = pool[(i + attempt) % len(pool)]
            else:
                qtype = pool[int(rng.choice(len(pool), p=type_weights))]
            attempt += 1
            qa = world.ask(scene, qtype, rng, float(rng.random()))
            if qa is None:
                continue
            t_ids, t_pos, t_ans = turn_ids(vocab, qa[0], qa[1], first=not ans)
            pos.append(len(ids) + t_pos)
            ids += t_ids
            ans.append(t_ans)
            types.append(qtype)
        images.append(scene.render())
        s_lbl, c_lbl = [0] * NV, [0] * NV
        for o in scene.objects:
            s_lbl[o.cell] = 1 + world.SHAPES.index(o.shape)
            c_lbl[o.cell] = 1 + list(world.COLOURS).index(o.colour)
        shapes.append(s_lbl)
        colours.append(c_lbl)
        sides.append(side_row)
        texts.append(ids)
        apos.append(pos)
        answers.append(ans)
        qtypes.append(types)
    return Batch(normalise(images), torch.tensor(shapes), torch.tensor(colours), torch.tensor(sides),
                 texts, apos, answers, qtypes)


def check_layout(vocab: Vocab, processor) -> None:
    """The hand-built training sequence must equal what the processor produces for the same chat."""
    rng = world.split_rng("calib", 12345, 0)
    scene = world.sample_scene("calib", rng)
    qas = [world.ask(scene, "exist", rng, 0.2), world.ask(scene, "exist", rng, 0.4)]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qas[0][0]}]},
            {"role": "assistant", "content": [{"type": "text", "text": qas[0][1]}]},
            {"role": "user", "content": [{"type": "text", "text": qas[1][0]}]},
            {"role": "assistant", "content": [{"type": "text", "text": qas[1][1]}]}]
    text = processor.apply_chat_template(conv)
    got = processor(images=[scene.render()], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    ids = [vocab.ids[build.BOS], vocab.ids["USER"], vocab.ids[":"]] + [vocab.ids[build.IMAGE]] * NV
    for k, (q, a) in enumerate(qas):
        ids += turn_ids(vocab, q, a, first=k == 0)[0]
    if got[: len(ids)] != ids or len(got) > len(ids) + 1:
        sys.exit(f"training layout differs from the processor's:\n{got}\n{ids}")


def vision_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """Selected vision layer without CLS, exactly as LlavaModel.get_image_features selects it."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def train_vision(model, vocab: Vocab, args, log) -> None:
    """Stage 1: tower + temporary per-patch head on (shape, colour, side) labels."""
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    head = torch.nn.Linear(width, 1 + len(world.SHAPES) + 1 + len(world.COLOURS) + 2)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.0)
    ns, nc = 1 + len(world.SHAPES), 1 + len(world.COLOURS)

    def losses(b: Batch) -> tuple[torch.Tensor, float]:
        logits = head(vision_features(model, b.pixels))
        ls, lc, lside = logits[..., :ns], logits[..., ns:ns + nc], logits[..., ns + nc:]
        loss = (F.cross_entropy(ls.flatten(0, 1), b.shape_lbl.flatten())
                + F.cross_entropy(lc.flatten(0, 1), b.colour_lbl.flatten())
                + F.cross_entropy(lside.flatten(0, 1), b.side_lbl.flatten()))
        ok = (ls.argmax(-1) == b.shape_lbl) & (lc.argmax(-1) == b.colour_lbl) & (lside.argmax(-1) == b.side_lbl)
        return loss, ok.float().mean().item()

    calib = make_batch(vocab, "calib", args.seed, 10_000, 64, 1)
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
            log(f"[vision] step {step} loss {loss.item():.4f} calib patch acc {acc:.4f} ({time.time() - t0:.0f}s)")
    for p in tower.parameters():
        p.requires_grad_(False)


class Stage2:
    """Projector + decoder training on frozen vision features."""

    def __init__(self, model, vocab: Vocab) -> None:
        self.model, self.vocab = model, vocab
        self.lm = model.model.language_model
        self.prefix = torch.tensor([vocab.ids[build.BOS], vocab.ids["USER"], vocab.ids[":"]])
        # Aux-loss target: each visual token's own content words, uniform over them.
        self.shape_ids = torch.tensor([vocab.ids[world.BLANK]] + [vocab.ids[s] for s in world.SHAPES])
        self.colour_ids = torch.tensor([vocab.ids[c] for c in world.COLOURS])
        self.side_ids = torch.tensor([vocab.ids[s] for s in world.SIDES])

    def aux_target(self, b: Batch) -> torch.Tensor:
        B, V = b.shape_lbl.shape[0], self.model.config.text_config.vocab_size
        tgt = torch.zeros(B, NV, V)
        obj = b.shape_lbl > 0
        tgt.scatter_(2, self.shape_ids[b.shape_lbl].unsqueeze(-1), 1.0)
        tgt[obj] = tgt[obj] / 3.0
        rows = tgt[obj]
        rows[torch.arange(rows.shape[0]), self.colour_ids[b.colour_lbl[obj] - 1]] = 1 / 3
        rows[torch.arange(rows.shape[0]), self.side_ids[b.side_lbl[obj]]] = 1 / 3
        tgt[obj] = rows
        return tgt

    def forward(self, b: Batch, feats: torch.Tensor, keep_blank: float, gen: torch.Generator | None):
        """Answer logits (N, V), projected visual tokens, answers (N,) and their types.

        keep_blank < 1 drops a random share of blank visual tokens from every row (all object
        tokens stay); survivors keep their original position ids.
        """
        B = feats.shape[0]
        visual = self.model.model.multi_modal_projector(feats)
        if keep_blank < 1.0:
            n_keep = world.MAX_OBJECTS + round(keep_blank * (NV - world.MAX_OBJECTS))
            idx = []
            for r in range(B):
                obj = torch.nonzero(b.shape_lbl[r] > 0).flatten()
                blank = torch.nonzero(b.shape_lbl[r] == 0).flatten()
                pick = blank[torch.randperm(blank.numel(), generator=gen)[: n_keep - obj.numel()]]
                idx.append(torch.sort(torch.cat([obj, pick])).values)
            idx = torch.stack(idx)
        else:
            idx = torch.arange(NV).expand(B, NV)
        kept = torch.gather(visual, 1, idx.unsqueeze(-1).expand(-1, -1, visual.shape[-1]))
        M = idx.shape[1]
        lt = max(len(t) for t in b.texts)
        text = torch.full((B, lt), self.vocab.ids[build.PAD])
        mask = torch.zeros(B, PREFIX_LEN + M + lt, dtype=torch.long)
        for r, t in enumerate(b.texts):
            text[r, : len(t)] = torch.tensor(t)
            mask[r, : PREFIX_LEN + M + len(t)] = 1
        emb = self.lm.embed_tokens
        embeds = torch.cat([emb(self.prefix).expand(B, -1, -1), kept, emb(text)], dim=1)
        pos = torch.cat([torch.arange(PREFIX_LEN).expand(B, -1), PREFIX_LEN + idx,
                         PREFIX_LEN + NV + torch.arange(lt).expand(B, -1)], dim=1)
        hidden = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        rows = torch.tensor([r for r, ps in enumerate(b.answer_pos) for _ in ps])
        cols = torch.tensor([PREFIX_LEN + M + p for ps in b.answer_pos for p in ps])
        logits = self.model.lm_head(hidden[rows, cols])
        answers = torch.tensor([a for ans in b.answers for a in ans])
        qtypes = [q for qs in b.qtypes for q in qs]
        return logits, visual, answers, qtypes

    def aux_loss(self, visual: torch.Tensor, b: Batch) -> torch.Tensor:
        logp = F.log_softmax(self.model.lm_head(self.lm.norm(visual)), dim=-1)
        return -(self.aux_target(b) * logp).sum(-1).mean()


def evaluate(stage: Stage2, batches: list[Batch]) -> tuple[float, dict[str, float]]:
    """Accuracy of the argmax answer on single-turn prompts in the product's layout."""
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for b in batches:
            logits, _, answers, qtypes = stage.forward(b, vision_features(stage.model, b.pixels), 1.0, None)
            for q, ok in zip(qtypes, (logits.argmax(-1) == answers).tolist()):
                hits.setdefault(q, []).append(ok)
    per = {q: sum(v) / max(len(v), 1) for q, v in hits.items()}
    return sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values()), per


def similarity_init(model, layers: int, scale: float, seed: int) -> None:
    """Warm-start the query/key maps of the first `layers` decoder layers as a shared random
    projection (keys = P, queries = scale * P) onto the low-frequency rotary dims of each head.

    Such a head attends from a token to tokens with similar content (e.g. from the word "circle"
    to visual tokens whose aux-trained embedding contains "circle") at any distance. It is
    generic, not a hand-built retrieval circuit, and training moves it freely; without it the
    question-to-image binding did not form within the CPU budget (docs/demo-model.md).
    """
    cfg = model.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    low = torch.tensor([i for i in range(hd) if i % (hd // 2) >= hd // 4])  # slow rotary frequencies
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.language_model.layers[:layers]:
        q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
        with torch.no_grad():
            for kv in range(cfg.num_key_value_heads):
                proj = torch.linalg.qr(torch.randn(cfg.hidden_size, low.numel(), generator=gen))[0].T
                k[kv * hd:(kv + 1) * hd] = 0.0
                k[kv * hd + low] = proj
                for h in range(kv * groups, (kv + 1) * groups):
                    q[h * hd:(h + 1) * hd] = 0.0
                    q[h * hd + low] = scale * proj


def train_decoder(model, vocab: Vocab, args, log) -> None:
    """Stage 2; restores the parameters of the best calib evaluation at the end."""
    stage = Stage2(model, vocab)
    if args.similarity_layers:
        similarity_init(model, args.similarity_layers, args.similarity_scale, args.seed)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm, total = args.warmup, args.steps

    def lr_at(step: int) -> float:
        if step <= warm:
            return args.lr * step / warm
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm))))

    calib = [make_batch(vocab, "calib", args.seed, k * 50, 50, 1, pool=args.types)
             for k in range(args.calib_questions // 50)]
    gen = torch.Generator().manual_seed(args.seed)
    type_weights = np.array(args.type_weights, dtype=np.float64) / sum(args.type_weights)
    best, best_state, t0 = -1.0, None, time.time()
    start = args.vision_steps * args.vision_batch  # fresh training images after stage 1
    for step in range(1, total + 1):
        progress = step / total
        hi = min(world.MAX_OBJECTS, 1 + round((world.MAX_OBJECTS - 1) * progress / args.objects_until))
        n_objects = (max(1, min(world.MIN_OBJECTS, hi - 3)), hi)
        b = make_batch(vocab, "train", args.seed, start + (step - 1) * args.batch, args.batch, args.turns,
                       n_objects, type_weights, args.types)
        with torch.no_grad():
            feats = vision_features(model, b.pixels)
        keep = min(1.0, args.keep_start + (1 - args.keep_start) * progress / args.keep_until)
        logits, visual, answers, _ = stage.forward(b, feats, keep, gen)
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
                f"objects {n_objects} "
                f"({time.time() - t0:.0f}s)")
        if step % args.eval_every == 0 or step == total:
            acc, per = evaluate(stage, calib)
            log(f"[decoder] step {step} calib acc {acc:.4f} " + " ".join(f"{q} {v:.3f}" for q, v in per.items()))
            if keep >= 1.0 and acc > best:
                best, best_state = acc, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    log(f"[decoder] kept best calib acc {best:.4f}")


def save(model, processor, out: pathlib.Path, log) -> None:
    """Write to a temp dir next to `out`, then swap it in, so `out` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".ckpt-", dir=out.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint ships with the package
    for f in tmp.iterdir():
        f.chmod(0o644)
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    log(f"saved {out} ({size:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=pathlib.Path, default=REPO / "recipe_search" / "demo" / "checkpoint")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; weights depend on it")
    ap.add_argument("--vision-steps", type=int, default=300)
    ap.add_argument("--vision-batch", type=int, default=32)
    ap.add_argument("--vision-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=1500, help="stage-2 steps")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--turns", type=int, default=8, help="QA turns per image in a training sequence")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--objects-until", type=float, default=0.3,
                    help="fraction of stage 2 over which scenes grow from 1 object to the full 5-8")
    ap.add_argument("--keep-start", type=float, default=0.0, help="share of blank visual tokens kept at step 0")
    ap.add_argument("--keep-until", type=float, default=0.5, help="fraction of stage 2 after which all are kept")
    ap.add_argument("--similarity-layers", type=int, default=1,
                    help="decoder layers whose query/key maps start as content-similarity heads (0: none)")
    ap.add_argument("--similarity-scale", type=float, default=2.0)
    ap.add_argument("--types", nargs="+", choices=world.QUESTION_TYPES, default=list(world.QUESTION_TYPES),
                    help="question types trained and evaluated on the calib split")
    ap.add_argument("--type-weights", type=float, nargs="+", default=[1.0, 3.0, 1.0, 2.0],
                    help="training mixture of --types, one weight per type")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--calib-questions", type=int, default=400)
    args = ap.parse_args()
    args.types = tuple(args.types)
    if len(args.type_weights) != len(args.types):
        ap.error(f"--type-weights needs one weight per type of {args.types}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"{time.time() - t0:7.1f}s {msg}", flush=True)

    tokenizer = build.build_tokenizer()
    processor = build.build_processor(tokenizer)
    vocab = Vocab(tokenizer)
    check_layout(vocab, processor)
    model = build.build_model(tokenizer)
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,}; threads {args.threads}; seed {args.seed}")
    model.train()
    train_vision(model, vocab, args, log)
    model.model.vision_tower.eval()
    train_decoder(model, vocab, args, log)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    save(model, processor, args.out, log)
    log(f"total wall time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
