"""Quality/cost table on the embedded demo model: FitPrune against baselines, all in one run.

For each FLOPs budget (share of the LM's full-sequence prefill FLOPs, recipe_search/flops.py):
  fitprune         FitPrune schedule, FitPrune score (c*v), same-layer attention
  fastv K=2        one drop at layer 2, last-prompt-token attention from layer 1, sized to the budget
                   (when K=2 cannot meet the budget, K=1 is tried and the row says so)
  uniform          the same count at every layer from layer 0, FitPrune score
  random@fitprune  the FitPrune schedule with uniformly random selection (seeded)
Accuracy is greedy first-token accuracy on the demo eval split; "agree" is the share of answers
equal to the unpruned model's; prefill is the best of 5 wall-clock forwards of one batch of 16
(vision tower + LM) with 1 torch thread. Prints a Markdown table.

    python scripts/bench_quality.py [--eval-samples 1000] [--budgets 50%,25%,12.5%]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="50%,25%,12.5%")
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--model", default="demo", help="'demo' or a local checkpoint of the demo architecture")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RECIPE_SEARCH_THREADS", "1")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from recipe_search.budget import parse_budgets
    from recipe_search.calibration import demo_samples
    from recipe_search.demo import demo_checkpoint
    from recipe_search.eval import accuracy, agreement, greedy_answers, prefill_seconds
    from recipe_search.models.loading import load_model
    from recipe_search.pipeline import LoadedModel, search_recipes
    from recipe_search.runtime import PruningPlan, make_rule
    from recipe_search.search import InfeasibleBudgetError, search_fastv, search_uniform
    from recipe_search.search.fitprune import SearchResult

    hf_logging.set_verbosity_error()
    model, processor, adapter = load_model(demo_checkpoint() if args.model == "demo" else args.model)
    loaded = LoadedModel(model, processor, adapter, "demo")
    budgets = parse_budgets(args.budgets)
    calib = demo_samples("calib", args.calib_samples)
    held_out = demo_samples("eval", args.eval_samples)
    timing = demo_samples("eval", 16, seed=1)

    started = time.perf_counter()
    outcome = search_recipes(loaded, calib, budgets, progress=False)
    stats, costs = outcome.stats, outcome.costs
    print(f"calibration: {len(calib)} samples, {time.perf_counter() - started:.1f} s "
          f"({'cached' if outcome.stats_cached else 'computed'}); torch threads {torch.get_num_threads()}",
          file=sys.stderr)

    reference = greedy_answers(model, processor, adapter, held_out)
    base = accuracy(reference, held_out)
    base_ms = prefill_seconds(model, processor, adapter, timing) * 1000
    n = stats.visual_tokens

    def plan_of(result: SearchResult) -> PruningPlan:
        return PruningPlan(result.counts, n, make_rule(result.rule, result.rule_params), result.score_layer)

    header = ("| budget | method | selection | kept/layer | full FLOPs | visual FLOPs | accuracy | of unpruned "
              "| agree | prefill ms | speed-up |")
    print(f"Demo model: {adapter.dims().num_layers} layers, {n} visual tokens; {held_out.source} {base.total} questions; "
          f"unpruned accuracy {base.overall:.1%} "
          f"({', '.join(f'{k} {v:.1%}' for k, v in base.per_type.items())}); unpruned prefill {base_ms:.1f} ms\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for budget, recipe in zip(budgets, outcome.recipes):
        fit = SearchResult(tuple(recipe.schedule.counts), "fitprune", {}, recipe.selection.rule,
                           recipe.selection.params, recipe.selection.score_layer)
        rows: list[tuple[str, SearchResult | str]] = [("fitprune", fit)]
        for k in (2, 1):
            try:
                rows.append((f"fastv K={k}", search_fastv(stats, budget, costs, start_layer=k)))
                break
            except InfeasibleBudgetError:
                rows.append((f"fastv K={k}", "infeasible: layers before K already exceed the budget"))
        rows.append(("uniform", search_uniform(stats, budget, costs)))
        rows.append(("random@fitprune", replace(fit, rule="random", rule_params={"seed": 0})))
        for name, result in rows:
            if isinstance(result, str):
                print(f"| {budget.text} | {name} | - | - | - | - | {result} | | | | |")
                continue
            plan = plan_of(result)
            answers = greedy_answers(model, processor, adapter, held_out, plan)
            acc = accuracy(answers, held_out)
            ms = prefill_seconds(model, processor, adapter, timing, plan) * 1000
            print(f"| {budget.text} | {name} | {result.rule} ({result.score_layer}) | {costs.mean_tokens(result.counts):.1f} "
                  f"| {costs.fraction(result.counts, 'full'):.1%} | {costs.fraction(result.counts, 'visual'):.1%} "
                  f"| {acc.overall:.1%} | {acc.overall / base.overall:.1%} | {agreement(answers, reference):.1%} "
                  f"| {ms:.1f} | {base_ms / ms:.2f}x |", flush=True)
    print(f"\nFitPrune schedules (visual tokens entering each layer): "
          + "; ".join(f"{r.budget.asked}: {r.schedule.counts}" for r in outcome.recipes))
    print(f"FitPrune search time per budget: "
          + ", ".join(f"{r.method.result['search_seconds'] * 1000:.1f} ms" for r in outcome.recipes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
