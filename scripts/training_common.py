"""Training pieces shared by scripts/train_demo_model.py (LLaVA) and scripts/train_second_model.py (Qwen2-VL).

Why: both scripts follow the same recipe (stage 1: vision tower + temporary per-token head on world labels;
stage 2: projector/merger + decoder on multi-turn QA with an aux loss, a curriculum and blank-token dropping,
best calib step kept). The steps whose logic is the same live here once, parameterised by what differs
(label names, feature functions, token layout, position ids); each script keeps its model-specific parts.
Every piece does the same tensor operations in the same order as the code it replaced, so a run with a
fixed seed and thread count gives bit-identical weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# OpenAI CLIP normalisation, used by both models' image processors.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

Log = Callable[[str], None]


def add_training_args(ap: argparse.ArgumentParser, out: pathlib.Path, vision_steps: int, vision_batch: int,
                      steps: int) -> None:
    """The options both training scripts share (seed, threads, the two stages' sizes and learning rates), with
    each model's own defaults; model-specific options follow in the script."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=pathlib.Path, default=out)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; weights depend on it")
    ap.add_argument("--vision-steps", type=int, default=vision_steps)
    ap.add_argument("--vision-batch", type=int, default=vision_batch)
    ap.add_argument("--vision-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=steps, help="stage-2 steps")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--turns", type=int, default=8, help="QA turns per image in a training sequence")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-weight", type=float, default=1.0)


class Vocab:
    """Token ids of a word-level tokenizer; every world word is one token."""

    def __init__(self, tokenizer: Any) -> None:
        self.ids: dict[str, int] = tokenizer.get_vocab()

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]


@dataclass(frozen=True)
class TurnLayout:
    """Tokens around one QA turn after the image span, as the model's chat template renders them."""

    first_head: tuple[str, ...]  # before the first question (closes the image's user message)
    next_head: tuple[str, ...]  # before every later question (opens a new user message)
    before_answer: tuple[str, ...]  # after the question; the last one's logits predict the answer
    end: str  # after the answer

    def ids(self, vocab: Vocab, question: str, answer: str, first: bool) -> tuple[list[int], int, int]:
        """(ids, index whose logits predict the answer, answer id) of one turn."""
        head = [vocab.ids[t] for t in (self.first_head if first else self.next_head)]
        ids = head + vocab.encode(question) + [vocab.ids[t] for t in self.before_answer]
        pos = len(ids) - 1
        return ids + [vocab.ids[answer], vocab.ids[self.end]], pos, vocab.ids[answer]


@dataclass
class QARow:
    """One training row's text after the image span, built turn by turn."""

    ids: list[int] = field(default_factory=list)
    answer_pos: list[int] = field(default_factory=list)  # indices in `ids` whose logits predict an answer
    answers: list[int] = field(default_factory=list)
    qtypes: list[str] = field(default_factory=list)

    def add(self, layout: TurnLayout, vocab: Vocab, question: str, answer: str, qtype: str) -> None:
        t_ids, t_pos, t_ans = layout.ids(vocab, question, answer, first=not self.ids)
        self.answer_pos.append(len(self.ids) + t_pos)
        self.ids += t_ids
        self.answers.append(t_ans)
        self.qtypes.append(qtype)


def text_fields(rows: list[QARow]) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[list[str]]]:
    """(texts, answer_pos, answers, qtypes) of a batch's rows, in the Batch classes' field order."""
    return [r.ids for r in rows], [r.answer_pos for r in rows], [r.answers for r in rows], [r.qtypes for r in rows]


def setup_torch(threads: int, seed: int) -> None:
    """Pinned threads, a fixed seed and deterministic kernels: what makes a run's weights bit-reproducible."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def make_log(t0: float, lines: list[str] | None = None) -> Log:
    """A logger printing each message with the seconds since `t0` (and appending the line to `lines`)."""

    def log(msg: str) -> None:
        line = f"{time.time() - t0:7.1f}s {msg}"
        if lines is not None:
            lines.append(line)
        print(line, flush=True)

    return log


def train_probe(params: list[torch.nn.Parameter], features: Callable[[Any], torch.Tensor], width: int,
                labels: Sequence[tuple[str, int]], train_batch: Callable[[int], Any], calib: Any,
                args: argparse.Namespace, log: Log, unit: str) -> None:
    """Stage 1: train `params` (the vision tower) with a temporary linear head on per-token world labels.

    `features(batch)` gives (B, tokens, width); `labels` are (Batch attribute, number of classes) pairs,
    one cross-entropy each, summed; `train_batch(step)` gives the batch of a 1-based step. Freezing the
    tower afterwards is left to the caller (what stays trainable differs per model).
    """
    head = torch.nn.Linear(width, sum(n for _, n in labels))
    opt = torch.optim.AdamW(list(params) + list(head.parameters()), lr=args.vision_lr, weight_decay=0.0)
    bounds = np.cumsum([0] + [n for _, n in labels]).tolist()

    def losses(b: Any) -> tuple[torch.Tensor, float]:
        logits = head(features(b))
        loss, ok = None, None
        for (name, _), lo, hi in zip(labels, bounds[:-1], bounds[1:]):
            part, target = logits[..., lo:hi], getattr(b, name)
            ce = F.cross_entropy(part.flatten(0, 1), target.flatten())
            hit = part.argmax(-1) == target
            loss = ce if loss is None else loss + ce
            ok = hit if ok is None else ok & hit
        return loss, ok.float().mean().item()

    t0 = time.time()
    for step in range(1, args.vision_steps + 1):
        loss, _ = losses(train_batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.vision_steps:
            with torch.no_grad():
                _, acc = losses(calib)
            log(f"[vision] step {step} loss {loss.item():.4f} calib {unit} acc {acc:.4f} ({time.time() - t0:.0f}s)")


class Stage2Base:
    """Projector + decoder training on frozen vision features; subclasses supply the model-specific parts.

    Subclasses implement `features` (frozen tower output of a batch), `visual_tokens` (the trainable
    projection to (B, NV, hidden)), `positions` (position ids of prefix + kept visual + text tokens) and
    `aux_target` (each visual token's own words).
    """

    def __init__(self, model: Any, vocab: Vocab, prefix: Sequence[str], pad: str, nv: int, busy_label: str,
                 busy_cap: int | None) -> None:
        """`busy_label` names the Batch label whose non-zero cells are never dropped; `busy_cap` is the most
        busy cells a row can have (None: the batch's own maximum)."""
        self.model, self.vocab = model, vocab
        self.lm = model.model.language_model
        self.prefix = torch.tensor([vocab.ids[t] for t in prefix])
        self.pad, self.nv, self.busy_label, self.busy_cap = pad, nv, busy_label, busy_cap

    def features(self, b: Any) -> torch.Tensor:
        raise NotImplementedError

    def visual_tokens(self, b: Any, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def positions(self, idx: torch.Tensor, text_len: int) -> torch.Tensor:
        raise NotImplementedError

    def aux_target(self, b: Any) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, b: Any, feats: torch.Tensor, keep_blank: float, gen: torch.Generator | None):
        """Answer logits (N, V), projected visual tokens (B, NV, h), answers (N,) and their types.

        keep_blank < 1 drops that share of blank visual tokens from every row (busy tokens stay);
        survivors keep their original positions.
        """
        visual = self.visual_tokens(b, feats)
        idx = self.keep_index(b, keep_blank, gen)
        logits, answers, qtypes = self.forward_visual(b, visual, idx)
        return logits, visual, answers, qtypes

    def keep_index(self, b: Any, keep_blank: float, gen: torch.Generator | None) -> torch.Tensor:
        """(B, M) sorted indices of the visual tokens kept in each row."""
        B, NV = len(b.texts), self.nv
        lbl = getattr(b, self.busy_label)
        if keep_blank < 1.0:
            busy_max = int((lbl > 0).sum(1).max()) if self.busy_cap is None else self.busy_cap
            n_keep = busy_max + round(keep_blank * (NV - busy_max))
            idx = []
            for r in range(B):
                busy = torch.nonzero(lbl[r] > 0).flatten()
                blank = torch.nonzero(lbl[r] == 0).flatten()
                pick = blank[torch.randperm(blank.numel(), generator=gen)[: n_keep - busy.numel()]]
                idx.append(torch.sort(torch.cat([busy, pick])).values)
            return torch.stack(idx)
        return torch.arange(NV).expand(B, NV)

    def forward_visual(self, b: Any, visual: torch.Tensor, idx: torch.Tensor):
        """Answer logits (N, V), answers (N,) and types, with only the visual tokens `idx` in the sequence."""
        B = len(b.texts)
        kept = torch.gather(visual, 1, idx.unsqueeze(-1).expand(-1, -1, visual.shape[-1]))
        M, P = idx.shape[1], len(self.prefix)
        lt = max(len(t) for t in b.texts)
        text = torch.full((B, lt), self.vocab.ids[self.pad])
        mask = torch.zeros(B, P + M + lt, dtype=torch.long)
        for r, t in enumerate(b.texts):
            text[r, : len(t)] = torch.tensor(t)
            mask[r, : P + M + len(t)] = 1
        emb = self.lm.embed_tokens
        embeds = torch.cat([emb(self.prefix).expand(B, -1, -1), kept, emb(text)], dim=1)
        hidden = self.lm(inputs_embeds=embeds, attention_mask=mask,
                         position_ids=self.positions(idx, lt)).last_hidden_state
        rows = torch.tensor([r for r, ps in enumerate(b.answer_pos) for _ in ps])
        cols = torch.tensor([P + M + p for ps in b.answer_pos for p in ps])
        logits = self.model.lm_head(hidden[rows, cols])
        answers = torch.tensor([a for ans in b.answers for a in ans])
        return logits, answers, [q for qs in b.qtypes for q in qs]

    def aux_loss(self, visual: torch.Tensor, b: Any) -> torch.Tensor:
        """Cross-entropy of each visual token's tied-embedding readout against its own words."""
        logp = F.log_softmax(self.model.lm_head(self.lm.norm(visual)), dim=-1)
        return -(self.aux_target(b) * logp).sum(-1).mean()


def evaluate(stage: Stage2Base, batches: list[Any], sort_types: bool = False) -> tuple[float, dict[str, float]]:
    """Accuracy of the argmax answer on single-turn prompts in the product's layout, overall and per type
    (types in first-seen order, or sorted)."""
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for b in batches:
            logits, _, answers, qtypes = stage.forward(b, stage.features(b), 1.0, None)
            for q, ok in zip(qtypes, (logits.argmax(-1) == answers).tolist()):
                hits.setdefault(q, []).append(ok)
    items = sorted(hits.items()) if sort_types else hits.items()
    per = {q: sum(v) / len(v) for q, v in items}
    return sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values()), per


def similarity_init(model: Any, layers: int, scale: float, seed: int) -> None:
    """Warm-start the query/key maps (biases, if any, zeroed) of the first `layers` decoder layers as one
    shared random projection (keys = P, queries = scale * P) onto each head's slow rotary dims.

    Such a head attends from a word (e.g. "circle") to the visual tokens whose aux-trained embedding
    contains it, at any distance. It is generic, not a hand-built retrieval circuit, and training moves it
    freely; without it the question-to-image binding did not form within the CPU budget
    (docs/demo-model.md, docs/second-model.md).
    """
    cfg = model.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    low = torch.tensor([i for i in range(hd) if i % (hd // 2) >= hd // 4])  # slow rotary frequencies
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


def curriculum(progress: float, least: int, most: int, until: float, spread: int) -> tuple[int, int]:
    """(min, max) objects per scene at `progress` of stage 2: the max grows from 1 to `most` over the first
    `until` of it, the min trails it by `spread` (at most `least`)."""
    hi = min(most, 1 + round((most - 1) * progress / until))
    return max(1, min(least, hi - spread)), hi


def train_decoder(stage: Stage2Base, params: list[torch.nn.Parameter], calib: list[Any],
                  train_batch: Callable[[int, tuple[int, int], np.ndarray], Any],
                  n_range: Callable[[float], tuple[int, int]], args: argparse.Namespace, log: Log,
                  counted: str, sort_types: bool = False) -> float:
    """Stage 2 on `params`; restores the parameters of the best full-sequence calib evaluation at the end.

    `train_batch(step, n_range, type_weights)` gives the batch of a 1-based step, `n_range(progress)` the
    scene sizes of the curriculum, `counted` their name in the log. Returns the best calib accuracy.
    """
    model = stage.model
    if args.similarity_layers:
        similarity_init(model, args.similarity_layers, args.similarity_scale, args.seed)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm, total = args.warmup, args.steps

    def lr_at(step: int) -> float:
        if step <= warm:
            return args.lr * step / warm
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm))))

    gen = torch.Generator().manual_seed(args.seed)
    weights = np.array(args.type_weights, dtype=np.float64) / sum(args.type_weights)
    best, best_state, t0 = -1.0, None, time.time()
    for step in range(1, total + 1):
        progress = step / total
        sizes = n_range(progress)
        b = train_batch(step, sizes, weights)
        with torch.no_grad():
            feats = stage.features(b)
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
                f"{counted} {sizes} ({time.time() - t0:.0f}s)")
        if step % args.eval_every == 0 or step == total:
            acc, per = evaluate(stage, calib, sort_types)
            log(f"[decoder] step {step} calib acc {acc:.4f} " + " ".join(f"{q} {v:.3f}" for q, v in per.items()))
            if keep >= 1.0 and acc > best:
                best, best_state = acc, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    log(f"[decoder] kept best calib acc {best:.4f}")
    return best


def run_stages(model: Any, tower: torch.nn.Module, stage1: Callable[[], Any], stage2: Callable[[], Any]) -> None:
    """Stage 1 in train mode, stage 2 with the (frozen) tower in eval mode; then every parameter trainable
    again and the model in eval mode, as a saved checkpoint is expected to be."""
    model.train()
    stage1()
    tower.eval()
    stage2()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


def save_swapped(out: pathlib.Path, prefix: str, write: Callable[[pathlib.Path], None],
                 file_mode: int | None = None) -> None:
    """`write` into a temp dir next to `out`, then swap it in, so `out` is never half-written.

    The folder gets mode 755 (mkdtemp makes it private); `file_mode` is applied to its top-level entries.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    write(tmp)
    tmp.chmod(0o755)
    if file_mode is not None:
        for f in tmp.iterdir():
            f.chmod(file_mode)
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
