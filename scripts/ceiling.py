"""Reference ceiling (issue 9 item 7): keep the visual tokens that hold objects first.

The trained models come from synthetic worlds that know which visual token holds an object: the demo
world's patch labels (`Scene.patch_labels`, one token per 8 px patch) and the tiles world's cell labels
(`world2.Scene.cell_labels`, one token per 16 px cell after Qwen2-VL's 2x2 merger, row-major as the
merger orders them). An oracle keeps every object token first (the tiles world's grey pebbles, never
asked about, count as background), then the others in a fixed order (ascending index), with exactly
the uniform schedule's counts at each budget. No real rule can know the labels; the row says how much
accuracy a perfect object detector would keep at that token count, so a rule's gap to it is the room
left for selection (not for the schedule).

Bench only: the oracle is a selection rule defined here and never registered, fed the labels of
the samples in the order `measure` runs them (it checks that every forward consumed exactly its
batch). Nothing in the library changes. For a scripts/train_second_model.py folder the scenes are
re-drawn from the tiles world (split "eval", seed 0, as the script writes eval.jsonl) and every
record's question and answer must match its scene, else the ceiling is refused.

    python scripts/ceiling.py [--model demo|FOLDER] [--budgets 50%,25%,12.5%] [--eval-samples 1000]
                              [--schedules '17,0,0,0,0,0;9,9,0,0,0,0']

`ceiling_rows(spec, budgets)` returns [(budget, full FLOPs, accuracy, share of unpruned)] for
scripts/bench_quality.py.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe_search.runtime.selection import Choice, ScoreContext, SelectionRule
from trained_models import add_model_options, demo_world  # scripts/trained_models.py


def oracle_order(is_object: Sequence[bool]) -> torch.Tensor:
    """(tokens,) keep priority of one image: object tokens first, then the others by index."""
    n = len(is_object)
    flags = torch.tensor(list(is_object), dtype=torch.float32)
    return flags * n + (n - torch.arange(n, dtype=torch.float32))  # higher = kept first


def object_flags(spec: str, held_out: Any) -> list[list[bool]]:
    """Per held-out sample (in order), which of its visual tokens hold an object, from the world that drew it."""
    if spec == "demo" or demo_world(spec):
        from recipe_search.demo.world import BLANK, QUESTION_TYPES, sample_item

        scenes = [sample_item("eval", 0, i, QUESTION_TYPES[i % len(QUESTION_TYPES)])[0]
                  for i in range(len(held_out))]
        return [[lab != (BLANK,) for lab in scene.patch_labels()] for scene in scenes]
    from recipe_search.demo import world2

    flags = []
    for i, sample in enumerate(held_out.samples):
        qtype = world2.QUESTION_TYPES[i % len(world2.QUESTION_TYPES)]
        scene, question, answer = world2.sample_item("eval", 0, i, qtype)
        if (sample.prompt, sample.answer, sample.qtype) != (question, answer, qtype):
            raise ValueError(f"{spec}: eval record {i} is not the tiles world's eval item {i} (seed 0); "
                             "no ceiling for this folder")
        flags.append([lab not in ((world2.BLANK,), (world2.PEBBLE,)) for lab in scene.cell_labels()])
    return flags


class ObjectOracleRule(SelectionRule):
    """Keeps object patches first, from labels handed over per sample in evaluation order.

    The applier calls the rule at each cutting layer of one forward with the rows of that batch;
    the first call of a forward (a layer index not above the previous call's) takes the next
    `batch` priorities from the queue. Live visual tokens are mapped to patches by their original
    column minus the image's first column, read at the forward's first cut (all patches live).
    """

    name = "object-oracle"  # bench-only, not registered: recipes can never name it

    def __init__(self, priorities: list[torch.Tensor]) -> None:
        self.queue = list(priorities)
        self.consumed = 0
        self._batch: torch.Tensor | None = None
        self._start: torch.Tensor | None = None
        self._last_layer = -1

    def select(self, ctx: ScoreContext, k: int) -> Choice:
        vis = ctx.visual_positions()
        cols = ctx.cols.gather(1, vis)                                   # (B, n_live) original columns
        batch = vis.shape[0]
        if self._batch is None or ctx.layer_idx <= self._last_layer:    # a new forward
            if len(self.queue) < batch:
                raise RuntimeError("object oracle: more rows than labelled samples")
            if vis.shape[1] != self.queue[0].numel():
                raise RuntimeError("object oracle: the first cut must see every patch of the image")
            self._batch = torch.stack(self.queue[:batch])
            del self.queue[:batch]
            self.consumed += batch
            self._start = cols[:, :1]
        self._last_layer = ctx.layer_idx
        assert self._start is not None
        patch = cols - self._start
        scores = self._batch.to(vis.device).gather(1, patch)
        return Choice.top(scores, k)


def ceiling_rows(spec: str, budgets: Sequence[Any], eval_samples: int = 1000, calib_samples: int = 64,
                 threads: int | None = 1, loaded: Any = None, schedules: Sequence[tuple[int, ...]] = (),
                 cache_dir: Path | None = None, base: float | None = None) -> list[tuple[str, float, float, float]]:
    """(budget, full FLOPs share, accuracy, share of unpruned accuracy) of the object oracle on the held-out
    split of `spec` ("demo" or a folder of scripts/trained_models.py) with the uniform-from-layer-0 schedule
    of each budget (the counts `search-recipe compare` gives every rule), then with each of `schedules`
    (visual tokens entering each layer; labelled by their counts), e.g. front-loaded ones.

    `budgets`: texts such as "50%" or `Budget`s; `loaded`: the model's `LoadedModel` if the caller has
    one (else it is loaded here); `threads`: torch threads to set (None: leave as is); `cache_dir`: where
    the caller keeps this model's calibration statistics (None: a temporary one); `base`: the unpruned
    model's accuracy on the same held-out samples if the caller measured it (None: measured here)."""
    if threads is not None:
        torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    from recipe_search.api import load
    from recipe_search.budget import parse_budgets
    from recipe_search.measure import measure
    from recipe_search.pipeline import search_recipes
    from recipe_search.runtime import PruningPlan
    from trained_models import data_for  # scripts/trained_models.py

    hf_logging.set_verbosity_error()
    loaded = loaded if loaded is not None else load("demo" if spec == "demo" else str(Path(spec).expanduser()))
    calib, held_out = data_for(spec, calib_samples, eval_samples)
    priorities = [oracle_order(flags) for flags in object_flags(spec, held_out)]
    if base is None:
        base = measure(loaded, None, held_out).accuracy.overall
    texts = ",".join(b if isinstance(b, str) else b.text for b in budgets)
    with tempfile.TemporaryDirectory(prefix="ceiling-") as work:
        outcome = search_recipes(loaded, calib, parse_budgets(texts), method="uniform",
                                 cache_dir=cache_dir or Path(work) / "cache", progress=False)
    layers = len(outcome.recipes[0].schedule.counts)
    for counts in schedules:
        if len(counts) != layers or not all(0 <= c <= outcome.costs.visual_tokens for c in counts):
            raise ValueError(f"schedule {list(counts)}: needs {layers} counts in 0..{outcome.costs.visual_tokens}")
    runs = [(r.budget.asked, tuple(r.schedule.counts)) for r in outcome.recipes]
    runs += [(str(list(counts)), tuple(counts)) for counts in schedules]
    rows = []
    for label, counts in runs:
        rule = ObjectOracleRule(priorities)
        acc = measure(loaded, PruningPlan(counts, outcome.costs.visual_tokens, rule), held_out).accuracy.overall
        if rule.consumed != len(held_out) or rule.queue:
            raise RuntimeError(f"object oracle: consumed {rule.consumed} of {len(held_out)} labelled samples")
        rows.append((label, outcome.costs.fraction(counts, "full"), acc, acc / base))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, calib_samples=64)
    parser.add_argument("--schedules", default="",
                        help="more schedules for the oracle, ';'-separated, each the visual tokens entering every "
                             "layer, e.g. '17,0,0,0,0,0;9,9,0,0,0,0'")
    args = parser.parse_args()
    try:
        schedules = [tuple(int(c) for c in text.split(",")) for text in args.schedules.split(";") if text.strip()]
    except ValueError:
        parser.error(f"--schedules: expected ';'-separated lists of integers, got {args.schedules!r}")
    try:
        rows = ceiling_rows(args.model, args.budgets.split(","), args.eval_samples, args.calib_samples,
                            threads=args.threads, schedules=schedules)
    except ValueError as exc:  # a schedule of the wrong depth, or a folder the tiles world did not draw
        parser.error(str(exc))
    print("| budget or schedule | full FLOPs | object oracle accuracy | of unpruned |\n|---|---:|---:|---:|")
    for label, full, acc, share in rows:
        print(f"| {label} | {full:.1%} | {acc:.1%} | {share:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
