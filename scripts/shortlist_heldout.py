"""How well the default search's pick predicts held-out accuracy: every candidate it shortlisted, measured.

Runs `search-recipe`'s default search (methods/auto.py) on a trained model at each budget, then
measures the winner and every runner-up the recipe records on the held-out questions, next to
the search and validation scores the search saw. It shows whether the validation score (a count of
answers on a few dozen samples) or the KL divergence from the unpruned model orders the candidates
as held-out accuracy does (docs/rules.md, "Choosing among candidates the samples cannot tell apart").

    python scripts/shortlist_heldout.py --model demo
    python scripts/shortlist_heldout.py --model ~/.cache/recipe-search/second-model

`--model` is "demo" or a folder written by scripts/train_second_model.py (checkpoint + calib.jsonl +
eval.jsonl). One torch thread by default.
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

from recipe_search.methods import METHODS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, calib_samples=METHODS.get("auto").calibration_samples)
    parser.add_argument("--validation-share", type=float, default=None,
                        help="share of the calibration samples kept for validation (default: the search's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from recipe_search.budget import parse_budgets
    from recipe_search.measure import measure
    from recipe_search.methods.objective import candidate_plan
    from recipe_search.pipeline import SearchOptions, search_recipes

    hf_logging.set_verbosity_error()
    loaded, calib, held = model_and_data(args.model, args.calib_samples, args.eval_samples)
    base = measure(loaded, None, held)
    assert base.accuracy is not None, "the held-out data needs answers"
    work = Path(tempfile.mkdtemp(prefix="shortlist-"))
    share = {} if args.validation_share is None else {"validation_share": args.validation_share}
    recipes = search_recipes(loaded, calib, parse_budgets(args.budgets), method="auto",
                             options=SearchOptions(work_dir=work, **share), cache_dir=work / "cache",
                             progress=False).recipes
    print(f"{args.model}: unpruned held-out accuracy {base.accuracy.overall:.1%} on {base.accuracy.total} questions; "
          f"validation samples per candidate: {recipes[0].method.params['validation_samples']}\n")
    print("| budget | rank | schedule | rule | search acc. | search KL | validation acc. | validation KL "
          "| held-out accuracy |\n|---|---:|---|---|---:|---:|---:|---:|---:|")
    for recipe in recipes:
        result = recipe.method.result
        for rank, row in enumerate([result["winner"], *result["runners_up"]]):
            plan = candidate_plan(row["counts"], row["rule"], recipe.schedule.visual_tokens,
                                  merge_threshold=row.get("merge_threshold"))
            got = measure(loaded, plan, held, reference=base).accuracy
            assert got is not None
            rule = row["rule"] + ("+merge" if row.get("merge_threshold") is not None else "")
            print(f"| {recipe.budget.asked} | {rank} | {row['schedule']} | {rule} | {row['search_value']:.3f} "
                  f"| {row['search_kl']:.4f} | {row['validation_value']:.3f} | {row['validation_kl']:.4f} "
                  f"| {got.overall:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
