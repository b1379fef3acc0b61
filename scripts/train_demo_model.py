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
- layer-0 query/key maps warm-started as generic content-similarity heads (see training_common.similarity_init),
- more count and shape turns than colour and exist turns in the training mixture (1:3:1:2).
The best full-sequence step on the calib split is kept. See docs/demo-model.md.

Reproducible: fixed seed and a pinned thread count give bit-identical weights.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from recipe_search.demo import build, world

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(pathlib.Path(__file__).resolve().parent) not in sys.path:  # also when imported from elsewhere
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import training_common as common
from training_common import Vocab

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


def normalise(images: list) -> torch.Tensor:
    """CLIP normalisation of 96x96 images (no resize needed); equal to the processor to ~1e-7."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(((arr - common.CLIP_MEAN) / common.CLIP_STD).transpose(0, 3, 1, 2).copy())


# "USER : <image>*144 q ASSISTANT : a </s> USER : q ASSISTANT : a </s>"; the first turn follows the image span.
TURN = common.TurnLayout(first_head=(), next_head=("USER", ":"), before_answer=("ASSISTANT", ":"), end=build.EOS)


def turn_ids(vocab: Vocab, question: str, answer: str, first: bool) -> tuple[list[int], int, int]:
    """Token ids of one QA turn as the chat template renders it; returns (ids, answer_pos, answer_id)."""
    return TURN.ids(vocab, question, answer, first)


def make_batch(vocab: Vocab, split: str, seed: int, start: int, size: int, turns: int,
               n_objects: tuple[int, int] = (world.MIN_OBJECTS, world.MAX_OBJECTS),
               type_weights: np.ndarray | None = None,
               pool: tuple[str, ...] = world.QUESTION_TYPES) -> Batch:
    """Images start..start+size-1 of the split's stream, each with `turns` questions.

    Question types from `pool` go round-robin, or are drawn with `type_weights` (training spends
    more turns on the types that are learned last).
    """
    images, shapes, colours, sides, rows = [], [], [], [], []
    side_row = [0 if c < world.GRID // 2 else 1 for c in range(world.GRID)] * world.GRID
    for i in range(start, start + size):
        rng = world.split_rng(split, seed, i)
        scene = world.sample_scene(split, rng, n_objects)
        row = common.QARow()
        attempt = 0
        while len(row.answers) < turns and attempt < 8 * turns:
            if type_weights is None:
                qtype = pool[(i + attempt) % len(pool)]
            else:
                qtype = pool[int(rng.choice(len(pool), p=type_weights))]
            attempt += 1
            qa = world.ask(scene, qtype, rng, float(rng.random()))
            if qa is None:
                continue
            row.add(TURN, vocab, qa[0], qa[1], qtype)
        rows.append(row)
        images.append(scene.render())
        s_lbl, c_lbl = [0] * NV, [0] * NV
        for o in scene.objects:
            s_lbl[o.cell] = 1 + world.SHAPES.index(o.shape)
            c_lbl[o.cell] = 1 + list(world.COLOURS).index(o.colour)
        shapes.append(s_lbl)
        colours.append(c_lbl)
        sides.append(side_row)
    return Batch(normalise(images), torch.tensor(shapes), torch.tensor(colours), torch.tensor(sides),
                 *common.text_fields(rows))


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
    """Stage 1: tower + temporary per-patch head on (shape, colour, side) labels, then the tower frozen."""
    tower = model.model.vision_tower
    labels = [("shape_lbl", 1 + len(world.SHAPES)), ("colour_lbl", 1 + len(world.COLOURS)), ("side_lbl", 2)]
    calib = make_batch(vocab, "calib", args.seed, 10_000, 64, 1)
    common.train_probe(
        list(tower.parameters()), lambda b: vision_features(model, b.pixels), model.config.vision_config.hidden_size,
        labels, lambda step: make_batch(vocab, "train", args.seed, (step - 1) * args.vision_batch, args.vision_batch, 1),
        calib, args, log, "patch")
    for p in tower.parameters():
        p.requires_grad_(False)


class Stage2(common.Stage2Base):
    """Projector + decoder training on frozen vision features."""

    def __init__(self, model, vocab: Vocab) -> None:
        super().__init__(model, vocab, (build.BOS, "USER", ":"), build.PAD, NV, "shape_lbl", world.MAX_OBJECTS)
        # Aux-loss target: each visual token's own content words, uniform over them.
        self.shape_ids = torch.tensor([vocab.ids[world.BLANK]] + [vocab.ids[s] for s in world.SHAPES])
        self.colour_ids = torch.tensor([vocab.ids[c] for c in world.COLOURS])
        self.side_ids = torch.tensor([vocab.ids[s] for s in world.SIDES])

    def features(self, b: Batch) -> torch.Tensor:
        return vision_features(self.model, b.pixels)

    def visual_tokens(self, b: Batch, feats: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(feats)

    def positions(self, idx: torch.Tensor, text_len: int) -> torch.Tensor:
        """(B, L) 1-D positions; kept visual tokens keep theirs, text starts after the full image span."""
        B = idx.shape[0]
        return torch.cat([torch.arange(PREFIX_LEN).expand(B, -1), PREFIX_LEN + idx,
                          PREFIX_LEN + NV + torch.arange(text_len).expand(B, -1)], dim=1)

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


def train_decoder(model, vocab: Vocab, args, log) -> None:
    """Stage 2; restores the parameters of the best calib evaluation at the end."""
    stage = Stage2(model, vocab)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    calib = [make_batch(vocab, "calib", args.seed, k * 50, 50, 1, pool=args.types)
             for k in range(args.calib_questions // 50)]
    start = args.vision_steps * args.vision_batch  # fresh training images after stage 1

    def train_batch(step: int, n_objects: tuple[int, int], type_weights: np.ndarray) -> Batch:
        return make_batch(vocab, "train", args.seed, start + (step - 1) * args.batch, args.batch, args.turns,
                          n_objects, type_weights, args.types)

    common.train_decoder(
        stage, params, calib, train_batch,
        lambda progress: common.curriculum(progress, world.MIN_OBJECTS, world.MAX_OBJECTS, args.objects_until, 3),
        args, log, "objects")


def save(model, processor, out: pathlib.Path, log) -> None:
    """Write to a temp dir next to `out`, then swap it in, so `out` is never half-written."""

    def write(tmp: pathlib.Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    common.save_swapped(out, ".ckpt-", write, file_mode=0o644)  # the checkpoint ships with the package
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    log(f"saved {out} ({size:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_training_args(ap, REPO / "recipe_search" / "demo" / "checkpoint", vision_steps=300, vision_batch=32, steps=1500)
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
    ap.add_argument("--layers", type=int, default=8,
                    help="decoder layers (8: the shipped demo; e.g. 24 for a deep model, written with --out elsewhere)")
    ap.add_argument("--backbone", choices=sorted(build.BACKBONES), default="llama",
                    help="decoder family (llama: the shipped demo; qwen2 for a model unlike it, written with --out elsewhere)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--calib-questions", type=int, default=400)
    args = ap.parse_args()
    args.types = tuple(args.types)
    if len(args.type_weights) != len(args.types):
        ap.error(f"--type-weights needs one weight per type of {args.types}")

    common.setup_torch(args.threads, args.seed)
    t0 = time.time()
    log = common.make_log(t0)

    tokenizer = build.build_tokenizer()
    processor = build.build_processor(tokenizer)
    vocab = Vocab(tokenizer)
    check_layout(vocab, processor)
    model = build.build_model(tokenizer, args.layers, args.backbone)
    log(f"parameters: {sum(p.numel() for p in model.parameters()):,}; threads {args.threads}; seed {args.seed}")
    common.run_stages(model, model.model.vision_tower, lambda: train_vision(model, vocab, args, log),
                      lambda: train_decoder(model, vocab, args, log))
    save(model, processor, args.out, log)
    log(f"total wall time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
