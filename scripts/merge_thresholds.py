"""Merging near-duplicate drops at several thresholds, against plain dropping, on a trained model.

For each budget, the uniform schedule (the same count at every layer from layer 0, as
`search-recipe compare` gives every rule) under each rule, with dropped tokens merged into their
most similar survivor when the cosine similarity reaches the threshold (runtime/plan.py,
proportional attention) or simply dropped ("off"). A threshold of 1e-6 merges every dropped token
that points at all the same way as some survivor. Prints the share of unpruned held-out accuracy.

    python scripts/merge_thresholds.py --model demo
    python scripts/merge_thresholds.py --model ~/.cache/recipe-search/second-model

`--model` is "demo" or a folder written by scripts/train_second_model.py. One torch thread by default.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trained_models import add_model_options, model_and_data  # noqa: E402  (scripts/, beside this file)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, calib_samples=64)
    parser.add_argument("--rules", default="fitprune,dart")
    parser.add_argument("--thresholds", default="off,1e-6,0.85,0.9,0.95")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from recipe_search.budget import parse_budgets
    from recipe_search.measure import measure
    from recipe_search.methods.objective import candidate_plan
    from recipe_search.pipeline import search_recipes

    hf_logging.set_verbosity_error()
    loaded, calib, held = model_and_data(args.model, args.calib_samples, args.eval_samples)
    base = measure(loaded, None, held).accuracy
    assert base is not None, "the held-out data needs answers"
    work = Path(tempfile.mkdtemp(prefix="merge-thresholds-"))
    recipes = search_recipes(loaded, calib, parse_budgets(args.budgets), method="uniform", cache_dir=work,
                             progress=False).recipes
    thresholds = [None if t == "off" else float(t) for t in args.thresholds.split(",")]
    print(f"{args.model}: unpruned held-out accuracy {base.overall:.1%} on {base.total} questions; share of it kept\n")
    print("| budget | kept tokens | rule | " + " | ".join("off" if t is None else f"merge >= {t:g}" for t in thresholds)
          + " |\n|---|---:|---|" + "---:|" * len(thresholds))
    for recipe in recipes:
        for rule in args.rules.split(","):
            cells = []
            for threshold in thresholds:
                plan = candidate_plan(recipe.schedule.counts, rule, recipe.schedule.visual_tokens,
                                      merge_threshold=threshold)
                got = measure(loaded, plan, held).accuracy
                assert got is not None
                cells.append(f"{got.overall / base.overall:.1%}")
            print(f"| {recipe.budget.asked} | {recipe.schedule.counts[0]} | {rule} | " + " | ".join(cells) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
