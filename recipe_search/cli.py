"""`search-recipe`: find a pruning recipe for a budget, write it with its plot, and report what it costs."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Sequence

EPILOG = """\
examples:
  search-recipe --budget 50%                  demo model + demo data, FitPrune, recipe + plot + report
  search-recipe --budget 50%,25%,12.5%        one calibration pass, one recipe per budget, one plot
  search-recipe --budget 64tok                mean of 64 visual tokens per layer instead of a FLOPs share
  search-recipe --model ./llava-1.5-7b-hf --calib calib.jsonl --budget 40%
  search-recipe plot out/*.json --out curves.png

budgets: 50% and 0.5 mean "the pruned model may use 50% of the unpruned language model's prefill
FLOPs over the full sequence (text + visual tokens)"; --formula visual counts visual tokens only
(FitPrune's accounting). Both figures are always printed and written to the recipe.

--calib takes 'demo', a JSONL file with one {"image": path, "prompt": str, "answer": str?} per line
(image paths relative to the file), or a dataset folder written by datasets' save_to_disk.
Nothing is ever downloaded: --model must be a local folder or a hub id already in the local cache.
"""


def _search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="search-recipe",
        description="Search a per-layer visual-token pruning recipe that meets a compute budget, "
                    "write it as JSON with a layer-retention plot, and report accuracy and prefill time "
                    "before and after. Use `search-recipe plot RECIPE...` to draw existing recipes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--budget", default="50%",
                   help="compute budget(s), comma-separated: 50%%, 0.5 or 64tok (default: 50%%)")
    p.add_argument("--method", default="fitprune", choices=["fitprune", "fastv", "uniform"],
                   help="search method: fitprune (default), or the baselines fastv (one drop at layer 2) "
                        "and uniform (same count at every layer)")
    p.add_argument("--model", default="demo",
                   help="'demo' (the embedded model) or a local Hugging Face checkpoint folder / cached hub id")
    p.add_argument("--calib", default="demo", help="calibration data: 'demo', a .jsonl file or a dataset folder")
    p.add_argument("--num-samples", type=int, default=64, help="calibration samples (default: 64)")
    p.add_argument("--formula", default="full", choices=["full", "visual"],
                   help="FLOPs formula a percentage budget is measured with (default: full)")
    p.add_argument("--start-layer", type=int, default=None,
                   help="first decoder layer that may drop tokens (default: 0; 2 for fastv)")
    p.add_argument("--out", default="search-recipe-out", help="folder for recipes and plot (default: ./search-recipe-out)")
    p.add_argument("--plot", default=None, help="PNG path of the retention plot (default: in --out)")
    p.add_argument("--eval", default=None,
                   help="held-out set with answers to report accuracy on: 'demo' (default for the demo model), "
                        "a .jsonl / dataset folder, or 'none'")
    p.add_argument("--eval-samples", type=int, default=1000, help="held-out questions (default: 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size for calibration and evaluation")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the demo model, torch's default otherwise)")
    p.add_argument("--cache-dir", default=None, help="calibration statistics cache (default: ~/.cache/recipe-search)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="search-recipe plot", description="Overlay the layer-retention curves of recipes.")
    p.add_argument("recipes", nargs="+", help="recipe JSON files")
    p.add_argument("--out", default="retention.png", help="PNG to write (default: retention.png)")
    return p


def _budget_slug(text: str) -> str:
    return re.sub(r"[^0-9a-zA-Z.]+", "", text.replace("%", "pct")) or "budget"


def _fmt_schedule(counts: Sequence[int]) -> str:
    return " ".join(f"{i}:{c}" for i, c in enumerate(counts))


def _run_plot(argv: Sequence[str]) -> int:
    from .plot import plot_retention
    from .recipe import load_recipe

    args = _plot_parser().parse_args(argv)
    recipes = [load_recipe(p) for p in args.recipes]
    print(f"wrote {plot_retention(recipes, args.out)}")
    return 0


def _run_search(argv: Sequence[str]) -> int:
    args = _search_parser().parse_args(argv)
    from .budget import parse_budgets

    budgets = parse_budgets(args.budget, args.formula)  # validate before any heavy import or loading
    if args.num_samples <= 0 or args.eval_samples <= 0 or args.batch_size <= 0:
        raise ValueError("--num-samples, --eval-samples and --batch-size must be positive")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from .calibration import load_samples
    from .eval import accuracy, greedy_answers, prefill_seconds
    from .models.loading import load_model
    from .pipeline import LoadedModel, search_recipes
    from .plot import plot_retention
    from .recipe import save_recipe
    from .runtime.apply import plan_from_recipe
    from .search import DEFAULT_START_LAYER

    is_demo = args.model == "demo"
    threads = args.threads or (1 if is_demo else None)
    if threads:
        torch.set_num_threads(threads)
    if is_demo:
        from .demo import demo_checkpoint

        source = demo_checkpoint()
    else:
        source = args.model
    model, processor, adapter = load_model(source, attn_implementation=args.attn)
    loaded = LoadedModel(model, processor, adapter, "demo" if is_demo else str(args.model))
    calib = load_samples(args.calib, args.num_samples, split="calib")
    start_layer = DEFAULT_START_LAYER[args.method] if args.start_layer is None else args.start_layer
    outcome = search_recipes(loaded, calib, budgets, method=args.method, start_layer=start_layer,
                             cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                             batch_size=args.batch_size, progress=not args.quiet)

    out = Path(args.out)
    name = Path(loaded.name_or_path).name or "model"
    paths = []
    for recipe in outcome.recipes:
        paths.append(save_recipe(recipe, out / f"{name}-{args.method}-{_budget_slug(recipe.budget.asked)}.json"))
    plot_path = plot_retention(outcome.recipes, args.plot or out / f"{name}-{args.method}-retention.png")

    arch = adapter.architecture()
    print(f"\nmodel {loaded.name_or_path}: {arch.family}, {arch.dims.num_layers} layers, "
          f"{outcome.stats.visual_tokens} visual tokens per image; torch threads {torch.get_num_threads()}")
    print(f"calibration: {len(calib)} samples from {calib.source} "
          f"({'statistics from cache' if outcome.stats_cached else 'statistics computed and cached'})")
    print("FLOPs: 'full' = LM prefill over text + visual tokens, 'visual' = visual tokens only "
          "(FitPrune); formulas in the recipe and in recipe_search/flops.py")

    eval_spec = args.eval or ("demo" if is_demo else "none")
    held_out = None if eval_spec == "none" else load_samples(eval_spec, args.eval_samples, split="eval")
    if held_out is not None and not held_out.has_answers:
        raise ValueError(f"--eval {eval_spec}: every sample needs an answer to measure accuracy")
    timing = load_samples(eval_spec if held_out is not None else args.calib, 16, split="eval")
    base_time = prefill_seconds(model, processor, adapter, timing)
    base_acc = None
    if held_out is not None:
        base_acc = accuracy(greedy_answers(model, processor, adapter, held_out, batch_size=args.batch_size,
                                           progress=not args.quiet, desc="eval unpruned"), held_out)

    for recipe, path in zip(outcome.recipes, paths):
        b = recipe.budget
        plan = plan_from_recipe(recipe)
        print(f"\nbudget {b.asked} -> {path}")
        print(f"  achieved: full-sequence FLOPs {b.achieved['full']:.1%}, visual-only FLOPs {b.achieved['visual']:.1%}, "
              f"mean visual tokens {b.achieved['mean_visual_tokens']:.1f} (asked: {b.value:g} {b.kind}, {b.formula})")
        print(f"  visual tokens kept entering each layer: {_fmt_schedule(recipe.schedule.counts)}")
        found = ", ".join(f"{k} {v:.4g}" for k, v in recipe.method.result.items() if isinstance(v, (int, float)))
        print(f"  search: {recipe.method.name} ({found}); selection rule {recipe.selection.rule}, "
              f"scored at the {recipe.selection.score_layer} layer")
        if held_out is not None and base_acc is not None:
            pruned = accuracy(greedy_answers(model, processor, adapter, held_out, plan, batch_size=args.batch_size,
                                             progress=not args.quiet, desc=f"eval {b.asked}"), held_out)
            print(f"  held-out accuracy ({held_out.source}, {pruned.total} q): unpruned {base_acc.overall:.1%} -> "
                  f"pruned {pruned.overall:.1%} ({pruned.overall / max(base_acc.overall, 1e-9):.1%} kept)")
            for qtype in base_acc.per_type:
                print(f"    {qtype:<10} {base_acc.per_type[qtype]:.1%} -> {pruned.per_type.get(qtype, 0.0):.1%}")
        pruned_time = prefill_seconds(model, processor, adapter, timing, plan)
        print(f"  prefill wall-clock (batch {len(timing)}, best of 5): unpruned {base_time * 1000:.1f} ms -> "
              f"pruned {pruned_time * 1000:.1f} ms ({base_time / pruned_time:.2f}x)")
    print(f"\nretention plot: {plot_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["plot"]:
            return _run_plot(argv[1:])
        return _run_search(argv)
    except KeyboardInterrupt:
        print("search-recipe: interrupted; no recipe written (cached statistics, if any, are complete)",
              file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        if os.environ.get("RECIPE_SEARCH_DEBUG"):
            raise
        print(f"search-recipe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
