"""Evaluate the demo checkpoint the way the product queries it.

Accuracy: chat-template prompt, processor with left padding, greedy decoding, correct iff the
first generated token decodes (stripped) to the answer word. Also reports how concentrated the
last prompt token's attention over the visual tokens is per decoder layer, and the accuracy when
a random share of visual tokens is removed from the input (positions of survivors kept), so
that a pruning benchmark built on this model can be judged.

    python -m recipe_search.demo.evaluate --n 1000
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from dataclasses import asdict, dataclass

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from recipe_search.demo import demo_checkpoint, world


@dataclass
class Report:
    n: int
    accuracy: float
    per_type: dict[str, float]
    top10_attention_share: dict[int, float]  # layer -> mean share of visual attention on top 10% tokens
    random_drop_accuracy: dict[float, float]  # share of visual tokens removed -> accuracy


def prompt(processor, question: str) -> str:
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(chat, add_generation_prompt=True)


def batches(samples: list[world.VQASample], size: int):
    for i in range(0, len(samples), size):
        yield samples[i : i + size]


def accuracy(model, processor, samples: list[world.VQASample], batch_size: int = 50) -> tuple[float, dict[str, float]]:
    processor.tokenizer.padding_side = "left"
    hits: dict[str, list[bool]] = {q: [] for q in world.QUESTION_TYPES}
    for chunk in batches(samples, batch_size):
        inputs = processor(images=[s.image for s in chunk], text=[prompt(processor, s.question) for s in chunk],
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        first = out[:, inputs["input_ids"].shape[1]]
        for s, tok in zip(chunk, first.tolist()):
            hits[s.qtype].append(processor.tokenizer.decode([tok]).strip() == s.answer)
    per = {q: sum(v) / len(v) for q, v in hits.items() if v}
    return sum(sum(v) for v in hits.values()) / len(samples), per


def attention_concentration(model, processor, samples: list[world.VQASample]) -> dict[int, float]:
    """Per layer: mean share of the last prompt token's visual attention held by its top 10% tokens."""
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    image_id = model.config.image_token_id
    totals: dict[int, float] = {}
    try:
        for s in samples:
            inputs = processor(images=[s.image], text=[prompt(processor, s.question)], return_tensors="pt")
            with torch.no_grad():
                out = model(**inputs, output_attentions=True)
            vis = inputs["input_ids"][0] == image_id
            k = math.ceil(0.1 * int(vis.sum()))
            for layer, att in enumerate(out.attentions):
                row = att[0, :, -1, :].mean(0)[vis]
                share = (row.topk(k).values.sum() / row.sum()).item()
                totals[layer] = totals.get(layer, 0.0) + share
    finally:
        model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    return {layer: v / len(samples) for layer, v in totals.items()}


def random_drop_accuracy(model, processor, samples: list[world.VQASample], drop: float, seed: int = 0) -> float:
    """Accuracy with a random `drop` share of visual tokens removed before the decoder."""
    gen = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    hits = 0
    for s in samples:
        inputs = processor(images=[s.image], text=[prompt(processor, s.question)], return_tensors="pt")
        ids = inputs["input_ids"][0]
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
            embeds = model.get_input_embeddings()(ids).clone()
            vis = torch.nonzero(ids == image_id).flatten()
            embeds[vis] = feats
            n_drop = round(drop * vis.numel())
            dropped = vis[torch.randperm(vis.numel(), generator=gen)[:n_drop]]
            keep = torch.ones(ids.numel(), dtype=torch.bool)
            keep[dropped] = False
            pos = torch.arange(ids.numel())[keep]
            out = model.model.language_model(inputs_embeds=embeds[keep][None], position_ids=pos[None])
            tok = model.lm_head(out.last_hidden_state[0, -1]).argmax().item()
        hits += processor.tokenizer.decode([tok]).strip() == s.answer
    return hits / len(samples)


def run(checkpoint: pathlib.Path, n: int, attention_n: int, drops: tuple[float, ...], seed: int) -> Report:
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    samples = world.make_split("eval", n, seed=seed)
    acc, per = accuracy(model, processor, samples)
    conc = attention_concentration(model, processor, samples[:attention_n])
    dropped = {d: random_drop_accuracy(model, processor, samples, d) for d in drops}
    return Report(n, acc, per, conc, dropped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None, help="default: the shipped demo checkpoint")
    ap.add_argument("--n", type=int, default=1000, help="eval questions")
    ap.add_argument("--attention-n", type=int, default=200, help="questions for the attention statistic")
    ap.add_argument("--drops", type=float, nargs="*", default=[0.25, 0.5])
    ap.add_argument("--seed", type=int, default=0, help="eval split seed")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = run(args.checkpoint or demo_checkpoint(), args.n, args.attention_n, tuple(args.drops), args.seed)
    print(f"accuracy {report.accuracy:.4f} on {report.n} eval questions")
    for q, v in report.per_type.items():
        print(f"  {q:9s} {v:.4f}")
    print("top-10% share of last-token visual attention per layer:",
          " ".join(f"L{k}:{v:.3f}" for k, v in report.top10_attention_share.items()))
    for d, v in report.random_drop_accuracy.items():
        print(f"random drop {d:.0%} of visual tokens: accuracy {v:.4f}")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
