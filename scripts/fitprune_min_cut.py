"""What FitPrune's `min_cut` changes: schedules, cuts and held-out accuracy, with and without it.

A cut scores every live visual token (the FitPrune rule reads N x N attention rows); `min_cut` makes
a layer cut only when the fit removes at least that share of its live tokens there (smaller drops
wait for a later layer), and the bisection on alpha then meets the budget with fewer cuts. This
script runs FitPrune at each budget with min_cut 0 (the fit as published) and with the default,
and measures both schedules with the FitPrune rule on the model's held-out questions. Schedules of
the medium random-weight model of scripts/bench_speed.py (8 and 32 layers, the demo's statistics
resampled) are listed too, with their cut counts; their prefill times are in bench_speed.

    python scripts/fitprune_min_cut.py --model demo [--budgets 50%,25%,12.5%] [--eval-samples 1000]
    python scripts/fitprune_min_cut.py --model ~/.cache/recipe-search/second-model
    python scripts/fitprune_min_cut.py --medium-only
    python scripts/fitprune_min_cut.py --model ~/.cache/recipe-search/deep-demo --psigmoid-trials 32
        (a 24-layer demo-world model: scripts/train_demo_model.py --layers 24 --out that folder)

With --psigmoid-trials, P-Sigmoid's pick at each budget is measured too, and the same curve with
min_cut 0 (floor re-fitted), so what holding small drops costs in accuracy is measured on its own.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import cut_count  # noqa: E402  (scripts/bench_speed.py)


def medium(budgets: list, emit: Callable[[str], None]) -> None:
    import bench_speed

    from recipe_search.flops import CostModel
    from recipe_search.methods import search_fitprune
    from recipe_search.methods.cuts import MIN_CUT
    from recipe_search.models import get_adapter

    emit("\n## Medium random-weight model (scripts/bench_speed.py), FitPrune on the demo's statistics\n")
    emit("| layers | budget | min_cut | cuts | LM FLOPs (full) | alpha | visual tokens entering each layer |")
    emit("|---:|---|---:|---:|---:|---:|---|")
    for layers in (8, 32):
        with torch.device("meta"):  # only its shape is read: no weights are made
            adapter = get_adapter(bench_speed.build_model(layers))
        n = adapter.visual_tokens_per_image()
        costs = CostModel(adapter.dims(), n, (bench_speed.text_tokens(),))
        stats = bench_speed.demo_statistics(layers, n)
        for budget in budgets:
            for min_cut in (0.0, MIN_CUT):
                r = search_fitprune(stats, budget, costs, min_cut=min_cut)
                emit(f"| {layers} | {budget.text} | {min_cut:g} | {cut_count(r.counts, n)} | "
                     f"{costs.fraction(r.counts, 'full'):.1%} | {r.result['alpha']:.3f} | {' '.join(map(str, r.counts))} |")


def trained(spec: str, args: argparse.Namespace, budgets: list, emit: Callable[[str], None]) -> None:
    from trained_models import model_and_data  # scripts/trained_models.py

    from recipe_search.calibration import calibrate
    from recipe_search.flops import CostModel
    from recipe_search.measure import measure
    from recipe_search.methods import search_fitprune
    from recipe_search.methods.cuts import MIN_CUT
    from recipe_search.runtime import PruningPlan, make_rule

    loaded, calib, held_out = model_and_data(spec, args.calib_samples, args.eval_samples)
    stats, _ = calibrate(loaded.model, loaded.processor, loaded.adapter, calib, progress=False)
    costs = CostModel(loaded.adapter.dims(), stats.visual_tokens, tuple(int(t) for t in stats.text_tokens))
    base = measure(loaded, None, held_out)
    assert base.accuracy is not None, f"{spec}: the held-out data needs answers"
    n = stats.visual_tokens

    def row(budget: Any, label: str, plan: Any) -> str:
        acc = measure(loaded, plan, held_out, reference=base).accuracy
        assert acc is not None and base.accuracy is not None
        counts = plan.counts
        return (f"| {budget.text} | {label} | {cut_count(counts, n)} | {costs.fraction(counts, 'full'):.1%} | "
                f"{acc.overall:.1%} | {acc.overall / base.accuracy.overall:.1%} | {' '.join(map(str, counts))} |")

    emit(f"\n## {spec}: {loaded.adapter.dims().num_layers} layers, {held_out.source}, {base.accuracy.total} "
         f"questions, unpruned accuracy {base.accuracy.overall:.1%}; FitPrune rule, calibration "
         f"{len(calib.samples)} samples\n")
    emit("| budget | min_cut | cuts | LM FLOPs (full) | accuracy | kept | visual tokens entering each layer |")
    emit("|---|---:|---:|---:|---:|---:|---|")
    for budget in budgets:
        for min_cut in (0.0, MIN_CUT):
            r = search_fitprune(stats, budget, costs, min_cut=min_cut)
            emit(row(budget, f"{min_cut:g}", PruningPlan(r.counts, n, make_rule("fitprune"))))
    if args.psigmoid_trials:
        psigmoid_rows(loaded, calib, budgets, costs, args.psigmoid_trials, row, emit)


def psigmoid_rows(loaded: Any, calib: Any, budgets: list, costs: Any, trials: int,
                  row: Callable[[Any, str, Any], str], emit: Callable[[str], None]) -> None:
    """P-Sigmoid's own search (BO over slope, midpoint, start layer and rule, min_cut as default), then
    its winning curve with min_cut 0 (every drop of the curve a cut, floor re-fitted to the budget):
    the same sigmoid and rule, held or not, so the accuracy difference is the hold's alone."""
    import dataclasses
    import tempfile

    from recipe_search.methods import psigmoid
    from recipe_search.methods.cuts import MIN_CUT
    from recipe_search.pipeline import SearchOptions, search_recipes
    from recipe_search.runtime.apply import plan_from_recipe

    emit(f"\nP-Sigmoid ({trials} trials per budget, its validated pick), the same curve without the hold:\n")
    emit("| budget | curve (rule), min_cut | cuts | LM FLOPs (full) | accuracy | kept | visual tokens entering each layer |")
    emit("|---|---|---:|---:|---:|---:|---|")
    layers = loaded.adapter.dims().num_layers
    with tempfile.TemporaryDirectory() as tmp:
        for budget in budgets:
            try:  # the statistics come from the default cache, where trained() put them
                (recipe,) = search_recipes(loaded, calib, [budget], method="psigmoid", progress=False,
                                           options=SearchOptions(n_trials=trials, work_dir=Path(tmp) / budget.text)
                                           ).recipes
            except ValueError as exc:  # e.g. no sigmoid can meet the budget on this model
                emit(f"| {budget.text} | - | - | - | - | - | no recipe: {exc} |")
                continue
            res, start = recipe.method.result, recipe.method.params["start_layer"]
            held = plan_from_recipe(recipe)
            label = f"slope {res['slope']:.2f}, midpoint {res['midpoint']:.2f}, start {start} ({recipe.selection.rule})"
            emit(row(budget, f"{label}, {recipe.method.params.get('min_cut', MIN_CUT):g}", held))
            plain = psigmoid.fit_proposal(held.visual_tokens, layers, start, res["slope"], res["midpoint"], budget,
                                          costs, 0.0)
            if plain is None:
                emit(f"| {budget.text} | {label}, 0 | - | - | - | - | the curve cannot meet the budget unheld |")
                continue
            emit(row(budget, f"{label}, 0", dataclasses.replace(held, counts=tuple(plain[2]))))


def main() -> int:
    from trained_models import add_model_options

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, calib_samples=64)
    parser.add_argument("--medium-only", action="store_true", help="only the medium model's schedules (seconds)")
    parser.add_argument("--psigmoid-trials", type=int, default=0,
                        help="also P-Sigmoid's search with this many trials per budget, its curve held and not (0: off)")
    parser.add_argument("--out", default=None, help="also write the Markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from recipe_search.budget import parse_budgets

    budgets = parse_budgets(args.budgets)
    out: list[str] = []

    def emit(text: str) -> None:
        out.append(text)
        print(text, flush=True)

    emit("# fitprune_min_cut: FitPrune schedules with and without min_cut\n")
    emit(f"`python scripts/fitprune_min_cut.py {' '.join(sys.argv[1:])}`")
    medium(budgets, emit)
    if not args.medium_only:
        trained(args.model, args, budgets, emit)
    if args.out:
        Path(args.out).write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
