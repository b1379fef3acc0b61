"""Reference ceiling for the demo (issue 9 item 7): keep the patches that hold objects first.

The demo world knows which patch holds an object (`Scene.patch_labels`), so an oracle can keep
every object patch, then blank patches in a fixed order (ascending patch index), with exactly the
uniform schedule's counts at each budget. No real rule can know the labels; the row says how much
accuracy a perfect object detector would keep at that token count, so a rule's gap to it is the
room left for selection (not for the schedule).

Bench only: the oracle is a selection rule defined here and never registered, fed the labels of
the samples in the order `measure` runs them (it checks that every forward consumed exactly its
batch). Nothing in the library changes.

    python scripts/ceiling.py [--budgets 50%,25%,12.5%] [--eval-samples 1000]

`ceiling_rows(budgets)` returns [(budget, accuracy, share of unpruned)] for scripts/bench_quality.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe_search.runtime.selection import Choice, ScoreContext, SelectionRule


def oracle_order(labels: Sequence[tuple[str, ...]]) -> torch.Tensor:
    """(patches,) keep priority of one image: object patches first, then blanks by patch index."""
    from recipe_search.demo.world import BLANK

    n = len(labels)
    is_object = torch.tensor([lab != (BLANK,) for lab in labels], dtype=torch.float32)
    return is_object * n + (n - torch.arange(n, dtype=torch.float32))  # higher = kept first


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


def ceiling_rows(budgets: Sequence[Any], eval_samples: int = 1000, calib_samples: int = 64,
                 threads: int | None = 1, loaded: Any = None) -> list[tuple[str, float, float]]:
    """(budget, accuracy, share of unpruned accuracy) of the object oracle on demo:eval with the
    uniform-from-layer-0 schedule of each budget (the counts `search-recipe compare` gives every rule).

    `budgets`: texts such as "50%" or `Budget`s; `loaded`: the demo `LoadedModel` if the caller has
    one (else it is loaded here); `threads`: torch threads to set (None: leave as is)."""
    if threads is not None:
        torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    from recipe_search.api import load
    from recipe_search.budget import parse_budgets
    from recipe_search.calibration import demo_samples
    from recipe_search.demo.world import QUESTION_TYPES, sample_item
    from recipe_search.measure import measure
    from recipe_search.pipeline import search_recipes
    from recipe_search.runtime import PruningPlan

    hf_logging.set_verbosity_error()
    loaded = loaded if loaded is not None else load("demo")
    held_out = demo_samples("eval", eval_samples)
    # the scenes behind demo:eval, item i of make_split("eval", n) (same seed, same question type)
    priorities = [oracle_order(sample_item("eval", 0, i, QUESTION_TYPES[i % len(QUESTION_TYPES)])[0].patch_labels())
                  for i in range(eval_samples)]
    base = measure(loaded, None, held_out).accuracy.overall
    work = Path(tempfile.mkdtemp(prefix="ceiling-"))
    recipes = search_recipes(loaded, demo_samples("calib", calib_samples), parse_budgets(",".join(b if isinstance(b, str) else b.text for b in budgets)),
                             method="uniform", cache_dir=work / "cache", progress=False).recipes
    rows = []
    for recipe in recipes:
        rule = ObjectOracleRule(priorities)
        plan = PruningPlan(tuple(recipe.schedule.counts), recipe.schedule.visual_tokens, rule)
        acc = measure(loaded, plan, held_out).accuracy.overall
        if rule.consumed != eval_samples or rule.queue:
            raise RuntimeError(f"object oracle: consumed {rule.consumed} of {eval_samples} labelled samples")
        rows.append((recipe.budget.asked, acc, acc / base))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="50%,25%,12.5%")
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RECIPE_SEARCH_THREADS", "1")))
    args = parser.parse_args()
    print("| budget | object oracle accuracy | of unpruned |\n|---|---|---|")
    for budget, acc, share in ceiling_rows(args.budgets.split(","), args.eval_samples, threads=args.threads):
        print(f"| {budget} | {acc:.1%} | {share:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
