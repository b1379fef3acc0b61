"""Why a selection rule falls below random on the demo (issue 9 item 5): the numbers in docs/rules.md.

The demo world knows which patch holds an object, so besides accuracy every rule gets an
*object recall*: the share of object patches among the tokens it keeps at its first cut (random
keeps k/144 of them in expectation). Sections:

  recall     rules x budgets on the uniform-from-layer-0 schedule: accuracy, share of unpruned,
             object recall at the cut
  depth      the attention rule (last prompt token, and query "text") and ficoco-l against
             fitprune and random when the one cut (to --depth-keep tokens) is made at layer 0, 1, 2 or 3; plus the
             patches it keeps most often (fixed positions = attention sinks)
  vit        FiCoCo-V's filter terms at the stage layer: P(object scores above blank), per term
  merge      FiCoCo-L / FiCoCo-V with and without their merge; how many discarded tokens the
             busiest survivor absorbs

    python scripts/rule_diagnostics.py [--eval-samples 1000] [--sections recall,depth,vit,merge]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe_search.runtime.selection import Choice, SelectionRule
from recipe_search.runtime.vision import VisionRule

PATCHES = 144


class Recorder:
    """Wraps a rule: records the kept patch sets at the first cut of every forward (all patches live)
    and, for merging rules, how many sources the busiest survivor takes; `drop_merge` runs the rule's
    filter alone."""

    def __init__(self, rule: SelectionRule, drop_merge: bool = False) -> None:
        self.rule, self.drop_merge = rule, drop_merge
        self.kept: list[set[int]] = []
        self.busiest: list[int] = []

    def wrapped(self) -> SelectionRule:
        recorder, inner = self, self.rule
        base = VisionRule if inner.stage == "vision" else SelectionRule

        class Wrapped(base):  # type: ignore[misc, valid-type]
            name = f"recorded-{inner.name}"
            stage = inner.stage

            def needs_layers(self, stage_layer: int) -> tuple[int, ...]:
                return inner.needs_layers(stage_layer)  # type: ignore[attr-defined]

            def select(self, ctx: Any, k: int) -> Choice:
                choice = inner.select(ctx, k)
                live = ctx.hidden.shape[1] - int(ctx.layout.has_cls) if inner.stage == "vision" else ctx.num_visual
                if live == PATCHES:
                    recorder.kept += [set(row.tolist()) for row in choice.keep]
                    if choice.merge is not None:
                        recorder.busiest += ((choice.merge > 1e-6).sum(-1).amax(-1) - 1).tolist()
                return Choice(choice.keep) if recorder.drop_merge else choice

        return Wrapped()

    def recall(self, objects: Sequence[set[int]]) -> float:
        if len(self.kept) != len(objects):
            raise RuntimeError(f"recorded {len(self.kept)} first cuts for {len(objects)} samples")
        return sum(len(k & o) for k, o in zip(self.kept, objects)) / sum(len(o) for o in objects)


def scene_objects(n: int) -> list[set[int]]:
    """Object patch indices of demo:eval items 0..n-1 (the scenes `demo_samples("eval", n)` shows)."""
    from recipe_search.demo.world import QUESTION_TYPES, sample_item

    return [{o.cell for o in sample_item("eval", 0, i, QUESTION_TYPES[i % len(QUESTION_TYPES)])[0].objects}
            for i in range(n)]


def run(loaded: Any, data: Any, rule: SelectionRule, counts: Sequence[int], drop_merge: bool = False
        ) -> tuple[float, Recorder]:
    from recipe_search.measure import measure
    from recipe_search.runtime import PruningPlan, make_rule

    recorder = Recorder(rule, drop_merge)
    wrapped = recorder.wrapped()
    if rule.stage == "vision":
        plan = PruningPlan(tuple(counts), PATCHES, make_rule("random"), vision=wrapped)
    else:
        plan = PruningPlan(tuple(counts), PATCHES, wrapped)
    return measure(loaded, plan, data).accuracy.overall, recorder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--model", default="demo",
                        help="'demo' or a checkpoint trained on the demo world (12x12 patches, 144 visual tokens)")
    parser.add_argument("--budgets", default="50%,25%,12.5%")
    parser.add_argument("--rules", default="random,attention,fitprune,ficoco-l,ficoco-v")
    parser.add_argument("--sections", default="recall,depth,vit,merge")
    parser.add_argument("--depth-keep", type=int, default=34)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RECIPE_SEARCH_THREADS", "1")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from recipe_search.api import load
    from recipe_search.budget import parse_budgets
    from recipe_search.calibration import demo_samples
    from recipe_search.measure import measure
    from recipe_search.pipeline import search_recipes
    from recipe_search.runtime import make_rule

    hf_logging.set_verbosity_error()
    sections = set(args.sections.split(","))
    loaded = load(args.model)
    data = demo_samples("eval", args.eval_samples)
    objects = scene_objects(args.eval_samples)
    base = measure(loaded, None, data).accuracy.overall
    print(f"demo:eval, {args.eval_samples} questions, unpruned accuracy {base:.1%}\n")

    counts_of: dict[str, list[int]] = {}
    if sections & {"recall", "merge"}:
        import tempfile
        recipes = search_recipes(loaded, demo_samples("calib", 64), parse_budgets(args.budgets), method="uniform",
                                 cache_dir=Path(tempfile.mkdtemp(prefix="diag-")) / "cache", progress=False).recipes
        counts_of = {r.budget.asked: list(r.schedule.counts) for r in recipes}

    if "recall" in sections:
        print("| budget | kept | rule | accuracy | of unpruned | object recall | random's recall |\n|---|---|---|---|---|---|---|")
        for budget, counts in counts_of.items():
            for name in args.rules.split(","):
                acc, rec = run(loaded, data, make_rule(name), counts)
                print(f"| {budget} | {counts[0]} | {name} | {acc:.1%} | {acc / base:.1%} | {rec.recall(objects):.3f} "
                      f"| {counts[0] / PATCHES:.3f} |", flush=True)
        print()

    if "depth" in sections:
        k = args.depth_keep
        print("| cut at layer | rule | accuracy | of unpruned | object recall | most-kept patches (share of images) |"
              "\n|---|---|---|---|---|---|")
        for layer in (0, 1, 2, 3):
            counts = [PATCHES] * layer + [k] * (loaded.adapter.dims().num_layers - layer)
            for label, name, params in (("attention (last)", "attention", {}),
                                        ("attention (text)", "attention", {"query": "text"}),
                                        ("ficoco-l", "ficoco-l", {}), ("fitprune", "fitprune", {}),
                                        ("random", "random", {})):
                acc, rec = run(loaded, data, make_rule(name, params), counts)
                top = collections.Counter(p for kept in rec.kept for p in kept).most_common(4)
                where = ", ".join(f"{p} ({c / len(rec.kept):.0%})" for p, c in top)
                print(f"| {layer} | {label} | {acc:.1%} | {acc / base:.1%} | {rec.recall(objects):.3f} | {where} |",
                      flush=True)
        print(f"(random's recall: {k / PATCHES:.3f}; kept {k} of {PATCHES} from the cut on)\n")

    if "vit" in sections:
        vit_terms(loaded, data, objects)

    if "merge" in sections:
        print("| budget | rule | with merge | filter only | busiest survivor absorbs (mean over images) |\n|---|---|---|---|---|")
        for budget, counts in counts_of.items():
            for name in ("ficoco-l", "ficoco-v"):
                merged, rec = run(loaded, data, make_rule(name), counts)
                alone, _ = run(loaded, data, make_rule(name), counts, drop_merge=True)
                print(f"| {budget} | {name} | {merged:.1%} | {alone:.1%} | "
                      f"{sum(rec.busiest) / len(rec.busiest):.1f} of {PATCHES - counts[0]} discarded |", flush=True)
    return 0


def vit_terms(loaded: Any, data: Any, objects: Sequence[set[int]], n: int = 256) -> None:
    """AUC (object above blank) of FiCoCo-V's terms, and of true redundancy, at each encoder layer's input."""
    from recipe_search.runtime.vision import VisionContext

    adapter, samples = loaded.adapter, data.samples[:n]
    layout, layers = adapter.vision_layout(), adapter.vision_layers()
    captured: dict[int, torch.Tensor] = {}

    def keep(idx: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            captured[idx] = adapter.vision_hidden(args, kwargs)
        return hook

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            inputs = adapter.inputs(loaded.processor, [s.image for s in samples], [s.prompt for s in samples])
            loaded.model(**inputs, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    is_object = torch.zeros(len(samples), layout.patches, dtype=torch.bool)
    for i, cells in enumerate(objects[:len(samples)]):
        is_object[i, list(cells)] = True

    def auc(score: torch.Tensor) -> float:
        per = [(score[i][is_object[i]][:, None] > score[i][~is_object[i]][None, :]).float().mean()
               for i in range(len(samples))]
        return float(torch.stack(per).mean())

    print("P(an object patch scores above a blank one) per term (0.5 = no information; FiCoCo-V keeps high R):\n")
    print("| encoder layer input | CLS row a | patch row mean p | keep score R = .35 a - .65 p "
          "| attention received | -mean cosine to other patches (true redundancy) |\n|---|---|---|---|---|---|")
    off = int(layout.has_cls)
    norm = torch.nn.functional.normalize
    with torch.no_grad():
        for idx in range(len(layers)):
            ctx = VisionContext(adapter, layout, idx, captured[idx])
            logits = ctx.logits()
            a = logits[:, 0, off:] if off else logits[:, off:, off:].mean(1)
            p = logits[:, off:, off:].mean(-1)
            r = 0.35 * norm(a, dim=-1) - 0.65 * norm(p, dim=-1)
            h = norm(captured[idx][:, off:].float(), dim=-1)
            cos = (h @ h.transpose(1, 2)).mean(-1)
            stage = " (the stage)" if idx == layout.feature_index - 1 else ""
            print(f"| {idx}{stage} | {auc(a):.3f} | {auc(p):.3f} | {auc(r):.3f} | {auc(ctx.received()):.3f} "
                  f"| {auc(-cos):.3f} |", flush=True)
    print()


if __name__ == "__main__":
    sys.exit(main())
