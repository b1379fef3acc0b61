"""Quality/cost table on the embedded demo model: every search method against baselines, one run.

For each FLOPs budget (share of the LM's full-sequence prefill FLOPs, recipe_search/flops.py):
  fitprune         FitPrune schedule (attention statistics), FitPrune score, same-layer attention
  psigmoid         sigmoid schedule tuned by optuna TPE (8 random + 40 guided trials) on agreement
                   with the unpruned model over the calibration samples; starts at layer 2, or 1 when
                   layer 2 cannot meet the budget
  fastv K=2        one drop at layer 2, last-prompt-token attention from layer 1, sized to the budget
                   (K=1 when K=2 cannot meet the budget; the row says so)
  uniform          the same count at every layer from layer 0, FitPrune score
  random@fitprune  the FitPrune schedule with uniformly random selection (seeded)
and once, without a budget:
  gsearch          greedy least cost with no loss of agreement on the calibration samples
then selection rules x budgets (recipe_search/compare.py): every rule (attention, fitprune,
random, dart, ficoco-l in the LLM; ficoco-v, freepruner (freePruner-style) before the LLM) on the
uniform-from-layer-0 schedule (the same counts for every rule) and on the FitPrune schedule
(vision-side rules make its first cut before the LLM), with FLOPs under both LM formulas, the vision
encoder's share and LM + vision, accuracy and prefill time, and a Pareto plot (--pareto).
Accuracy is greedy first-token accuracy on the demo eval split; "agree" is the share of answers
equal to the unpruned model's; prefill is the best of 5 wall-clock forwards of one batch of 16
(vision tower + LM) with 1 torch thread; "search" is the method's own search time (calibration,
shared by all, is printed once). Prints a Markdown table.

    python scripts/bench_quality.py [--eval-samples 1000] [--budgets 50%,25%,12.5%] [--trials 48]
                                    [--rule-methods uniform,fitprune] [--pareto bench-pareto.png]
                                    [--rules-only]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="50%,25%,12.5%")
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--trials", type=int, default=48, help="P-Sigmoid trials per budget")
    parser.add_argument("--model", default="demo", help="'demo' or a local checkpoint of the demo architecture")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RECIPE_SEARCH_THREADS", "1")))
    parser.add_argument("--rule-methods", default="uniform,fitprune",
                        help="schedules the rule x budget section runs on")
    parser.add_argument("--pareto", default="bench-pareto.png", help="PNG of the rule section's Pareto plot")
    parser.add_argument("--rules-only", action="store_true", help="only the rule x budget section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from recipe_search.budget import Budget, parse_budgets
    from recipe_search.calibration import calibrate, demo_samples
    from recipe_search.demo import demo_checkpoint
    from recipe_search.measure import measure
    from recipe_search.flops import CostModel
    from recipe_search.models.loading import load_model
    from recipe_search.pipeline import LoadedModel, SearchOptions, search_recipes
    from recipe_search.runtime import PruningPlan, make_rule
    from recipe_search.methods import InfeasibleBudgetError, SearchResult, search_fastv, search_fitprune, search_uniform

    hf_logging.set_verbosity_error()
    model, processor, adapter = load_model(demo_checkpoint() if args.model == "demo" else args.model)
    loaded = LoadedModel(model, processor, adapter, "demo")
    budgets = parse_budgets(args.budgets)
    calib = demo_samples("calib", args.calib_samples)
    held_out = demo_samples("eval", args.eval_samples)
    timing = demo_samples("eval", 16, seed=1)
    work = Path(tempfile.mkdtemp(prefix="bench-"))

    started = time.perf_counter()
    stats, _ = calibrate(model, processor, adapter, calib, cache_dir=work / "cache", progress=False)
    calib_seconds = time.perf_counter() - started
    costs = CostModel(adapter.dims(), stats.visual_tokens, tuple(int(t) for t in stats.text_tokens))
    base_run = measure(loaded, None, held_out, timing=timing)
    base, base_ms = base_run.accuracy, base_run.prefill_seconds * 1000
    n = stats.visual_tokens

    def output_search(method: str, budget: Budget | None, start: int) -> SearchResult:
        options = SearchOptions(start_layer=start, n_trials=args.trials, work_dir=work / f"{method}-{start}")
        budgets_ = [budget] if budget is not None else []
        return search_recipes(loaded, calib, budgets_, method=method, options=options, cache_dir=work / "cache",
                              progress=False).results[0]

    def first_feasible(label: str, tries: list[tuple[str, Callable[[], SearchResult]]]) -> tuple[str, SearchResult | str]:
        for name, attempt in tries:
            try:
                return name, attempt()
            except InfeasibleBudgetError:
                continue
        return label, "infeasible: the layers kept whole already exceed the budget"

    header = ("| budget | method | selection | kept/layer | full FLOPs | visual FLOPs | accuracy | of unpruned "
              "| agree | prefill ms | speed-up | search s |")
    print(f"Demo model: {adapter.dims().num_layers} layers, {n} visual tokens; {held_out.source}, {base.total} questions; "
          f"unpruned accuracy {base.overall:.1%} ({', '.join(f'{k} {v:.1%}' for k, v in base.per_type.items())}); "
          f"unpruned prefill {base_ms:.1f} ms; calibration ({len(calib)} samples) {calib_seconds:.1f} s; "
          f"torch threads {torch.get_num_threads()}\n")
    if not args.rules_only:
        print(header)
        print("|" + "---|" * (header.count("|") - 1))

    def row(budget_text: str, name: str, result: SearchResult | str) -> None:
        if isinstance(result, str):
            print(f"| {budget_text} | {name} | - | - | - | - | {result} | | | | | |", flush=True)
            return
        plan = PruningPlan(result.counts, n, make_rule(result.rule, result.rule_params), result.score_layer)
        got = measure(loaded, plan, held_out, timing=timing, reference=base_run)
        acc, ms = got.accuracy, got.prefill_seconds * 1000
        print(f"| {budget_text} | {name} | {result.rule} ({result.score_layer}) | {costs.mean_tokens(result.counts):.1f} "
              f"| {costs.fraction(result.counts, 'full'):.1%} | {costs.fraction(result.counts, 'visual'):.1%} "
              f"| {acc.overall:.1%} | {acc.overall / base.overall:.1%} | {got.agreement:.1%} "
              f"| {ms:.1f} | {base_ms / ms:.2f}x | {result.seconds:.2f} |", flush=True)

    schedules: dict[str, list[int]] = {}
    for budget in ([] if args.rules_only else budgets):
        fit = search_fitprune(stats, budget, costs)
        schedules[f"fitprune {budget.text}"] = list(fit.counts)
        row(budget.text, "fitprune", fit)
        name, ps = first_feasible("psigmoid", [(f"psigmoid (start {s})", lambda s=s: output_search("psigmoid", budget, s))
                                              for s in (2, 1)])
        if not isinstance(ps, str):
            schedules[f"psigmoid {budget.text}"] = list(ps.counts)
        row(budget.text, name, ps)
        row(budget.text, *first_feasible("fastv", [(f"fastv K={k}", lambda k=k: search_fastv(stats, budget, costs,
                                                                                              start_layer=k))
                                                   for k in (2, 1)]))
        row(budget.text, "uniform", search_uniform(stats, budget, costs))
        row(budget.text, "random@fitprune", replace(fit, rule="random", rule_params={"seed": 0}, seconds=0.0))
    if not args.rules_only:
        gs = output_search("gsearch", None, 2)
        schedules["gsearch"] = list(gs.counts)
        row("none", "gsearch (least cost)", gs)
        print("\nSchedules (visual tokens entering each layer): "
              + "; ".join(f"{k}: {v}" for k, v in schedules.items()))
        print(f"G-Search: {gs.result['evaluations']} schedule evaluations, {gs.result['layers_run']} decoder-layer "
              f"batch runs thanks to prefix reuse (no reuse: {gs.result['evaluations'] * adapter.dims().num_layers * -(-len(calib) // 16)})")

    from recipe_search.compare import DEFAULT_RULES, plot_pareto, rule_row, table

    rows = []
    for method in args.rule_methods.split(","):
        recipes = search_recipes(loaded, calib, budgets, method=method, cache_dir=work / "cache", progress=False).recipes
        rows += [rule_row(loaded, recipe, rule, costs, held_out, timing) for recipe in recipes
                 for rule in DEFAULT_RULES]
        print(f"\n{method} schedules: " + "; ".join(f"{r.budget.asked}: {r.schedule.counts}" for r in recipes),
              flush=True)
    print("\nSelection rules x budgets (LM full/visual: LM prefill FLOPs share; vision enc.: vision encoder + "
          "projector share; LM+vision: both together; pre-LLM rules make the schedule's first cut in the tower):\n")
    print(table(rows, base.overall, base_ms))
    print(f"\nPareto plot: {plot_pareto(rows, base.overall, args.pareto, 'demo model: rules x budgets')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
