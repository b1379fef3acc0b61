"""`search-recipe compare`: every selection rule x every budget on one model, in one run.

One calibration pass and one schedule search per budget (by default `uniform` from layer 0, so
every rule, LLM-side or vision-side, faces the very same per-layer counts); then each rule is
put into each recipe (rules.py) and measured: held-out accuracy, LM prefill FLOPs under both
formulas, the vision encoder's FLOPs, and prefill wall-clock. Prints a Markdown table and draws
accuracy against FLOPs (LM full + vision encoder when the tower is known) with the unpruned
point and the Pareto front.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .flops import CostModel, VisionCost
from .recipe.build import vision_shares
from .recipe.schema import Recipe

DEFAULT_RULES = ("attention", "fitprune", "random", "dart", "ficoco-l", "ficoco-v", "freepruner")


@dataclass(frozen=True)
class CompareRow:
    """One rule on one budget's schedule, as measured."""

    method: str                     # the schedule search
    budget: str
    rule: str
    stage: str                      # "llm" or "vision" (pre-LLM)
    mean_tokens: float
    full: float                     # LM prefill FLOPs share, full sequence
    visual: float                   # LM prefill FLOPs share, visual tokens only
    vision_encoder: float | None    # vision encoder + projector share (None: tower not supported)
    full_with_vision: float | None  # LM full + vision encoder, share of both unpruned
    accuracy: float | None
    prefill_ms: float | None        # None when timing is off

    @property
    def flops(self) -> float:
        """The x-axis of the Pareto plot: LM + vision when known, else LM full."""
        return self.full_with_vision if self.full_with_vision is not None else self.full


def rule_row(loaded: Any, recipe: Recipe, rule: str, costs: CostModel, held_out: Any, timing: Any,
             batch_size: int = 16, progress: bool = False) -> CompareRow:
    """Put `rule` into `recipe` and measure it: accuracy (if `held_out`), FLOPs and prefill time."""
    from .measure import measure
    from .recipe.rules import with_rule

    adapter = loaded.adapter
    chosen = with_rule(recipe, adapter, costs, rule)
    counts = chosen.schedule.counts
    try:
        layout = adapter.vision_layout()
    except ValueError:
        shares: dict[str, float | None] = {"vision_encoder": None, "full_with_vision": None}
    else:
        stage = chosen.vision.encoder_layer if chosen.vision is not None else None
        shares = dict(vision_shares(counts, costs, VisionCost(layout, stage)))
    got = measure(loaded, chosen, held_out, timing=timing, batch_size=batch_size, progress=progress,
                  desc=f"{rule} {recipe.budget.asked}")
    return CompareRow(recipe.method.name, recipe.budget.asked, label(rule), "vision" if chosen.vision is not None else "llm",
                      costs.mean_tokens(counts), costs.fraction(counts, "full"), costs.fraction(counts, "visual"),
                      shares["vision_encoder"], shares["full_with_vision"],
                      got.accuracy.overall if got.accuracy is not None else None,
                      got.prefill_seconds * 1000 if got.prefill_seconds is not None else None)


def label(rule: str) -> str:
    """How outputs name a rule: our freePruner design is never presented as the paper's method."""
    return "freepruner (freePruner-style)" if rule == "freepruner" else rule


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(rows: Sequence[CompareRow], base_accuracy: float | None, base_ms: float | None) -> str:
    """Markdown table, unpruned first (prefill columns show '-' when timing was off)."""
    lines = ["| schedule | budget | rule | where | kept/layer | LM full | LM visual | vision enc. | LM+vision "
             "| accuracy | of unpruned | prefill ms | speed-up |", "|" + "---|" * 13]
    lines.append(f"| - | - | unpruned | - | all | 100.0% | 100.0% | 100.0% | 100.0% | {_pct(base_accuracy)} | 100.0% "
                 f"| {_ms(base_ms)} | {'-' if base_ms is None else '1.00x'} |")
    for r in rows:
        kept = "n/a" if r.accuracy is None or not base_accuracy else f"{r.accuracy / base_accuracy:.1%}"
        lines.append(f"| {r.method} | {r.budget} | {r.rule} | {'pre-LLM' if r.stage == 'vision' else 'LLM'} "
                     f"| {r.mean_tokens:.1f} | {r.full:.1%} | {r.visual:.1%} | {_pct(r.vision_encoder)} "
                     f"| {_pct(r.full_with_vision)} | {_pct(r.accuracy)} | {kept} | {_ms(r.prefill_ms)} "
                     f"| {'-' if base_ms is None or r.prefill_ms is None else f'{base_ms / r.prefill_ms:.2f}x'} |")
    return "\n".join(lines)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both lower FLOPs and higher accuracy, by FLOPs."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot_pareto(rows: Sequence[CompareRow], base_accuracy: float, path: str | Path, title: str) -> Path:
    """Accuracy against FLOPs share, one marker series per rule, unpruned point, Pareto front."""
    from .plot import _save, plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    methods = list(dict.fromkeys(r.method for r in rows))
    rules = list(dict.fromkeys(r.rule for r in rows))
    for method, rule in dict.fromkeys((r.method, r.rule) for r in rows):
        mine = sorted((r for r in rows if (r.method, r.rule) == (method, rule) and r.accuracy is not None),
                      key=lambda r: r.flops)
        where = "pre-LLM" if mine[0].stage == "vision" else "LLM"
        ax.plot([r.flops for r in mine], [r.accuracy for r in mine], marker="o" if where == "LLM" else "s",
                color=f"C{rules.index(rule) % 10}", linestyle=("-", "--", ":", "-.")[methods.index(method) % 4],
                linewidth=1, label=f"{rule} ({where}{', ' + method + ' schedule' if len(methods) > 1 else ''})")
    ax.scatter([1.0], [base_accuracy], marker="*", s=160, color="black", zorder=5, label="unpruned")
    front = pareto_front([(r.flops, r.accuracy) for r in rows if r.accuracy is not None] + [(1.0, base_accuracy)])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", linestyle="--",
            linewidth=1, label="Pareto front")
    lm_only = any(r.full_with_vision is None for r in rows)
    ax.set_xlabel("prefill FLOPs, share of unpruned (" + ("LM, full sequence" if lm_only else
                                                           "LM full sequence + vision encoder") + ")")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def _parser() -> argparse.ArgumentParser:
    from .cli import _add_model_options

    p = argparse.ArgumentParser(prog="search-recipe compare",
                                description="Every selection rule x every budget on one model, in one run: "
                                            "a table of accuracy, FLOPs and prefill time, and a Pareto plot.")
    p.add_argument("--budget", default="50%,25%,12.5%", help="budgets, comma-separated (default: 50%%,25%%,12.5%%)")
    p.add_argument("--rules", default=",".join(DEFAULT_RULES),
                   help=f"selection rules, comma-separated (default: {','.join(DEFAULT_RULES)})")
    from .methods import METHODS

    p.add_argument("--method", default="uniform", choices=[n for n in METHODS if not METHODS[n].on_outputs],
                   help="schedule search shared by all rules (default: uniform from layer 0, the same counts "
                        "for every rule)")
    p.add_argument("--start-layer", type=int, default=None, help="first layer that may drop (default: the method's)")
    p.add_argument("--formula", default="full", choices=["full", "visual"], help="FLOPs formula of the budgets")
    p.add_argument("--calib", default="demo", help="calibration data: 'demo', a .jsonl file or a dataset folder")
    p.add_argument("--num-samples", type=int, default=64, help="calibration samples (default: 64)")
    p.add_argument("--out", default="search-recipe-out", help="folder for the plot (default: ./search-recipe-out)")
    p.add_argument("--plot", default=None, help="PNG path of the Pareto plot (default: in --out)")
    p.add_argument("--cache-dir", default=None, help="calibration statistics cache")
    _add_model_options(p)
    return p


def run_compare(argv: Sequence[str]) -> int:
    from .budget import parse_budgets
    from .cli import _check_positive, _check_start_layer, _Session, check_writable
    from .runtime.selection import make_rule

    args = _parser().parse_args(argv)
    budgets = parse_budgets(args.budget, args.formula)
    rules = [s.strip() for s in args.rules.split(",") if s.strip()]
    if not rules:
        raise ValueError("--rules: give at least one selection rule")
    for name in rules:
        make_rule(name)
    _check_positive(num_samples=args.num_samples, eval_samples=args.eval_samples, batch_size=args.batch_size)
    _check_start_layer(args.start_layer)
    check_writable(args.out, args.plot)

    from .calibration import load_samples
    from .pipeline import SearchOptions, search_recipes

    calib = load_samples(args.calib, args.num_samples, split="calib")  # before the model: bad data fails at once
    session = _Session.open(args, fallback_data=args.calib)
    loaded = session.loaded
    outcome = search_recipes(loaded, calib, budgets, method=args.method,
                             options=SearchOptions(start_layer=args.start_layer),
                             cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                             batch_size=args.batch_size, progress=not args.quiet)
    rows = [rule_row(loaded, recipe, rule, outcome.costs, session.held_out, session.timing,
                    batch_size=args.batch_size, progress=not args.quiet)
            for recipe in outcome.recipes for rule in rules]
    session.header()
    print(f"schedules: {args.method} (visual tokens entering each layer) "
          + "; ".join(f"{r.budget.asked}: {r.schedule.counts}" for r in outcome.recipes))
    print("pre-LLM rules make the schedule's first cut inside the vision tower; LLM rules drop in the "
          + (f"decoder. Prefill: best of 5, batch {len(session.timing)}.\n" if session.timing is not None
             else "decoder. Prefill not timed (--no-timing).\n"))
    base = session.base
    base_acc = base.accuracy.overall if base.accuracy is not None else None
    print(table(rows, base_acc, base.prefill_seconds * 1000 if base.prefill_seconds is not None else None))
    if base_acc is not None:
        name = Path(loaded.name_or_path).name or "model"
        path = plot_pareto(rows, base_acc, args.plot or Path(args.out) / f"{name}-compare-pareto.png",
                           f"{name}: rules x budgets ({args.method} schedules)")
        print(f"\nPareto plot: {path}")
    return 0
