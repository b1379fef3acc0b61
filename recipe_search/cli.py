"""`search-recipe`: find a pruning recipe for a budget, write it with its plot, and report what it costs."""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

EPILOG = """\
examples:
  search-recipe --budget 50%                  demo model + demo data, the best recipe the default search
                                              finds (every schedule and rule, picked on held-out samples)
  search-recipe --budget 50%,25%,12.5%        one calibration pass, one recipe per budget, one plot
  search-recipe --budget 50% --time-budget 60 the same search bounded to one minute
  search-recipe --budget 50% --method fitprune  one method alone (milliseconds after calibration)
  search-recipe --budget 64tok                mean of 64 visual tokens per layer instead of a FLOPs share
  search-recipe --model ./llava-1.5-7b-hf --calib calib.jsonl --budget 40%
  search-recipe plot out/*.json --out curves.png
  search-recipe eval out/demo-auto-50pct.json          accuracy and prefill time of an existing recipe
  search-recipe --budget 25% --rule dart            only this selection rule (recorded)
  search-recipe compare --budget 50%,25%,12.5%          every rule x budget: table + Pareto plot
  search-recipe --config search.yaml --budget 25%       options from YAML (flags win); every run writes
                                                        OUT/search.yaml, which reproduces it
  search-recipe --print-config                          the options (defaults, file, flags) as YAML

budgets: 50% and 0.5 mean "the pruned model may use 50% of the unpruned language model's prefill
FLOPs over the full sequence (text + visual tokens)"; --formula visual counts visual tokens only
(FitPrune's accounting). Both figures are always printed and written to the recipe.

--calib takes 'demo', a JSONL file with one {"image": path, "prompt": str, "answer": str?} per line
(image paths relative to the file), or a dataset folder written by datasets' save_to_disk.
Nothing is ever downloaded: --model must be a local folder or a hub id already in the local cache.
"""


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo",
                   help="'demo' (the embedded model) or a local Hugging Face checkpoint folder / cached hub id")
    p.add_argument("--eval", default=None,
                   help="held-out set with answers to report accuracy on: 'demo' (default for the demo model), "
                        "a .jsonl / dataset folder, or 'none'")
    p.add_argument("--eval-samples", type=int, default=1000, help="held-out questions (default: 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size for calibration and evaluation")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (default), cuda, cuda:1, mps, or auto (accelerate's "
                        "device_map='auto': layers spread over the GPUs, the rest offloaded to CPU or disk)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "bf16", "float16", "fp16"],
                   help="weights and activations (default: float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the demo model, torch's default otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True,
                   help="time the prefill, unpruned and pruned, on 16 samples (default: on; --no-timing skips it)")


def _search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="search-recipe",
        description="Search a per-layer visual-token pruning recipe that meets a compute budget, "
                    "write it as JSON with a layer-retention plot, and report accuracy and prefill time "
                    "before and after. Also: `search-recipe plot RECIPE...` draws recipes, "
                    "`search-recipe eval RECIPE...` measures them.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--budget", default=None,
                   help="compute budget(s), comma-separated: 50%%, 0.5 or 64tok (default: 50%%; "
                        "gsearch takes none: it finds the least cost without loss)")
    from .methods import METHODS
    from .methods.optimizers import OPTIMIZERS

    p.add_argument("--method", default="auto", choices=METHODS.names(),
                   help="; ".join(f"{m.name}: {m.summary}" for m in (METHODS[n] for n in METHODS)))
    p.add_argument("--rule", default=None,
                   help="selection rule: attention, fitprune, random, ficoco-l, dart (in the LLM) or ficoco-v, "
                        "freepruner (freePruner-style) (in the vision tower: the schedule's first cut happens "
                        "before the LLM). auto, gsearch and psigmoid then search with this rule only; other "
                        "methods get it in place of their own. Default: auto and psigmoid try every rule; recorded")
    p.add_argument("--images", default="per-image", choices=["per-image", "pooled"],
                   help="prompts with several images (or video frames): each image keeps its share of every "
                        "layer's count (per-image, default) or all compete for one pool (pooled); recorded")
    p.add_argument("--calib", default="demo", help="calibration data: 'demo', a .jsonl file (\"image\": a path "
                                                   "or a list of paths) or a dataset folder")
    p.add_argument("--num-samples", type=int, default=None,
                   help="calibration samples (default: 256 for auto, which scores candidates on a quarter of them and "
                        "picks on the other three quarters, 64 otherwise, G-Search and P-Sigmoid validating on "
                        "half); from larger data, a seeded draw stratified by question type or answer")
    p.add_argument("--image-folder", default=None,
                   help="folder that --calib's image paths are relative to (default: the data file's folder)")
    p.add_argument("--turns", default="first", choices=["first", "all"],
                   help="LLaVA conversation JSON: the first human/gpt turn of each entry (default) or every turn")
    p.add_argument("--columns", default=None,
                   help="--calib dataset column names, e.g. image=img,prompt=question,answer=answers "
                        "(fields: image, prompt, answer, qtype)")
    p.add_argument("--formula", default="full", choices=["full", "visual"],
                   help="FLOPs formula a percentage budget is measured with (default: full)")
    p.add_argument("--start-layer", type=int, default=None,
                   help="first decoder layer that may drop tokens (default: 0 for fitprune and uniform, 2 for "
                        "fastv and gsearch; psigmoid and auto's BO choose among layers 0-2 from which the budget "
                        "can be met, and fix it when given)")
    p.add_argument("--min-cut", type=_min_cut, default=None, metavar="SHARE",
                   help="auto, fitprune, gsearch and psigmoid: a layer cuts only when its schedule drops at least "
                        "this share of its live visual tokens there, since every cut pays one scoring pass; smaller "
                        "drops wait for a later layer (default 0.1; 0: each method's published schedule, which on "
                        "deep models cuts at many layers a few tokens at a time)")
    g = p.add_argument_group("auto / gsearch / psigmoid (score schedules on what the model answers)")
    g.add_argument("--time-budget", type=float, default=600.0,
                   help="auto: seconds for the whole search over every budget (default: 600; the demo at three "
                        "budgets needs about two minutes); the best recipe found in time is written")
    g.add_argument("--merge-threshold", type=_merge_threshold, default=None, metavar="COSINE|off",
                   help="merge every dropped token whose cosine similarity to a survivor reaches this into it, "
                        "attention weighing merged tokens by how many they stand for. auto tries its candidates "
                        "with and without it (default 0.9; 'off': plain dropping only); other methods write it "
                        "into their recipes when given (default: no merging); recorded in the recipe")
    g.add_argument("--search-set", default=None,
                   help="samples the schedules are scored on: 'demo', .jsonl or dataset folder (default: the "
                        "calibration samples); for auto, the validation samples that pick the winner")
    g.add_argument("--metric", default=None, choices=["agreement", "accuracy"],
                   help="agreement with the unpruned model's answers (label-free) or accuracy; default: "
                        "accuracy for auto when every sample has an answer, else agreement")
    g.add_argument("--tolerance", type=float, default=0.0, help="gsearch: allowed metric drop (default: 0)")
    g.add_argument("--optimizer", default="optuna", choices=OPTIMIZERS.names(),
                   help="psigmoid: optuna TPE (default), optuna's GP sampler, or scikit-optimize GP-EI")
    g.add_argument("--n-trials", type=int, default=48, help="psigmoid: trials in all (default: 48)")
    g.add_argument("--n-startup", type=int, default=8, help="psigmoid: random trials first (default: 8)")
    g.add_argument("--seed", type=int, default=0, help="psigmoid: optimiser seed (default: 0)")
    g.add_argument("--storage", default=None,
                   help="psigmoid: optuna storage URL shared by workers (sqlite:///f.db, postgresql://..., "
                        "journal:///f.log); default: a SQLite file in --out")
    g.add_argument("--resume", action="store_true", help="psigmoid: continue an interrupted study")
    g.add_argument("--n-workers", type=int, default=1, help="psigmoid: local worker processes (default: 1)")
    g.add_argument("--seed-recipe", default=None,
                   help="psigmoid: warm-start the first trial from this recipe's curve (e.g. a gsearch recipe)")
    p.add_argument("--out", default="search-recipe-out", help="folder for recipes and plot (default: ./search-recipe-out)")
    p.add_argument("--plot", default=None, help="PNG path of the retention plot (default: in --out)")
    p.add_argument("--cache-dir", default=None, help="calibration statistics cache (default: ~/.cache/recipe-search)")
    _add_model_options(p)
    return p


def _plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="search-recipe plot", description="Overlay the layer-retention curves of recipes.")
    p.add_argument("recipes", nargs="+", help="recipe JSON files")
    p.add_argument("--out", default="retention.png", help="PNG to write (default: retention.png)")
    return p


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="search-recipe eval",
                                description="Apply existing recipes to a model and report accuracy and prefill time "
                                            "against the unpruned model.")
    p.add_argument("recipes", nargs="+", help="recipe JSON files")
    p.add_argument("--allow-other-checkpoint", action="store_true",
                   help="use a recipe on another checkpoint of the same architecture")
    _add_model_options(p)
    return p


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv` over the defaults of `--config FILE` (YAML, every option a key, flags win).

    Keys are option names with dashes or underscores; an unknown key, a value of the wrong type or
    outside an option's choices is one line naming the key. The file is read with `yaml.safe_load`.
    """
    import yaml

    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="read options from a YAML file (keys: option names; flags given here win); every "
                             "run writes its resolved options to OUT/search.yaml")
    parser.add_argument("--print-config", action="store_true", help="print the resolved options as YAML and exit")
    first = parser.parse_args(argv)
    if first.config is None:
        return first
    try:
        loaded = yaml.safe_load(Path(first.config).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"--config {first.config}: cannot read ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {first.config}: not YAML ({str(exc).splitlines()[0]})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {first.config}: expected a mapping of option: value")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "print_config")}
    values = {}
    for key, value in loaded.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise ValueError(f"--config {first.config}: unknown key {str(key)!r}; known: "
                             f"{', '.join(sorted(a.replace('_', '-') for a in actions))}")
        values[dest] = _config_value(first.config, str(key), actions[dest], value)
    parser.set_defaults(**values)
    return parser.parse_args(argv)


def _config_value(path: str, key: str, action: argparse.Action, value: Any) -> Any:
    """`value` checked against what the option accepts on the command line."""
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {key} must be true or false, not {value!r}")
        return value
    if value is None:
        return None
    kind = action.type or str
    if kind not in (int, float, str):  # an option with its own parser: give it the text a command line would
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"--config {path}: {key} must be a number or a word, not {value!r}")
        try:
            return kind(str(value))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--config {path}: {key}: {exc}") from None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"--config {path}: {key} must be an integer, not {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"--config {path}: {key} must be a number, not {value!r}")
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"--config {path}: {key} must be a string, not {value!r}")
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"--config {path}: {key} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return value


def resolved_config(args: argparse.Namespace) -> str:
    """The run's options as YAML, so `--config` of this text reproduces the run."""
    import yaml

    options = {k.replace("_", "-"): v for k, v in vars(args).items() if k not in ("config", "print_config")}
    return yaml.safe_dump(options, sort_keys=False, default_flow_style=False)


def _budget_slug(text: str) -> str:
    return re.sub(r"[^0-9a-zA-Z.]+", "", text.replace("%", "pct")) or "budget"


def _check_start_layer(value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"--start-layer must be 0 or more, got {value}")


def check_writable(folder: str | Path, plot: str | Path | None = None) -> None:
    """Fail in one line, before any work, when results could not be written to `folder` or `plot`."""
    from .recipe.io import unwritable

    targets = [("--out", Path(folder))]
    if plot is not None:
        targets.append(("--plot", Path(plot).parent if str(Path(plot).parent) else Path(".")))
        if Path(plot).is_dir():
            raise ValueError(f"--plot {plot}: is a folder; give a .png file path")
    for flag, path in targets:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path}: exists and is not a folder")
        reason = unwritable(path)
        if reason:
            raise ValueError(f"{flag} {path}: cannot write there ({reason})")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


@dataclass
class _Session:
    """A loaded model plus the unpruned reference every recipe is reported against.

    The reference is measured when the first recipe is reported, not when the model is loaded: a
    search that fails (an infeasible budget, a bad option found late) fails before an evaluation
    that takes minutes on a large model and held-out set."""

    loaded: Any
    source: str
    held_out: Any
    timing: Any
    args: argparse.Namespace
    _base: Any = None         # Measurement of the unpruned model, once measured

    @property
    def base(self) -> Any:
        if self._base is None:
            from .measure import measure

            self._base = measure(self.loaded, None, self.held_out, timing=self.timing,
                                 batch_size=self.args.batch_size, progress=not self.args.quiet,
                                 desc="eval unpruned")
        return self._base

    @classmethod
    def open(cls, args: argparse.Namespace, fallback_data: str,
             fallback_options: dict[str, Any] | None = None) -> "_Session":
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from .calibration import load_samples
        from .models.loading import load_model
        from .pipeline import LoadedModel

        is_demo = args.model == "demo"
        threads = args.threads or (1 if is_demo else None)
        if threads:
            torch.set_num_threads(threads)
        if is_demo:
            from .demo import demo_checkpoint

            source: Any = demo_checkpoint()
        else:
            source = args.model
        model, processor, adapter = load_model(source, attn_implementation=args.attn, dtype=args.dtype,
                                               device=args.device)
        loaded = LoadedModel(model, processor, adapter, "demo" if is_demo else str(args.model))
        eval_spec = args.eval or ("demo" if is_demo else "none")
        held_out = None if eval_spec == "none" else load_samples(eval_spec, args.eval_samples, split="eval")
        if held_out is not None and not held_out.has_answers:
            raise ValueError(f"--eval {eval_spec}: every sample needs an answer to measure accuracy")
        timing = None
        if args.timing:
            timing = (load_samples(eval_spec, 16, split="eval") if held_out is not None
                      else load_samples(fallback_data, 16, split="eval", **(fallback_options or {})))
        return cls(loaded, str(source), held_out, timing, args)

    def header(self) -> None:
        import torch

        arch = self.loaded.adapter.architecture()
        print(f"\nmodel {self.loaded.name_or_path}: {arch.family}, {arch.dims.num_layers} layers, "
              f"{arch.visual_tokens_per_image or 'variable'} visual tokens per image; "
              f"torch threads {torch.get_num_threads()}")
        print("FLOPs: 'full' = LM prefill over text + visual tokens, 'visual' = visual tokens only "
              "(FitPrune); formulas in the recipe and in recipe_search/flops.py")

    def report(self, recipe: Any, where: Path) -> None:
        """Print one recipe's budget, schedule, accuracy and measured prefill time."""
        from .measure import measure

        b = recipe.budget
        base = self.base  # measured (once) before anything of this recipe is printed
        print(f"\nbudget {b.asked}: {where}")
        print(f"  achieved: full-sequence FLOPs {b.achieved['full']:.1%}, visual-only FLOPs {b.achieved['visual']:.1%}, "
              f"mean visual tokens {b.achieved['mean_visual_tokens']:.1f}"
              + (f" (asked: {b.value:g} {b.kind}, {b.formula})" if b.kind != "none" else ""))
        print("  visual tokens kept entering each layer: "
              + " ".join(f"{i}:{c}" for i, c in enumerate(recipe.schedule.counts)))
        found = ", ".join(f"{k} {v:.4g}" for k, v in recipe.method.result.items() if isinstance(v, (int, float)))
        start = recipe.method.params.get("start_layer", recipe.method.params.get("drop_layer"))
        print(f"  search: {recipe.method.name}, pruning from layer {start} ({found}); selection rule "
              f"{recipe.selection.rule}, scored at the {recipe.selection.score_layer} layer"
              + (f"; dropped tokens with cosine >= {recipe.selection.merge_threshold:g} to a survivor merge into it"
                 if recipe.selection.merge_threshold is not None else ""))
        if recipe.method.name == "auto":
            _print_candidates(recipe.method.result)
        if recipe.vision is not None:
            print(f"  pre-LLM stage: {recipe.vision.rule} keeps {recipe.schedule.counts[0]} of "
                  f"{recipe.schedule.visual_tokens} patches at vision encoder layer {recipe.vision.encoder_layer}; "
                  f"vision encoder FLOPs {b.achieved['vision_encoder']:.1%}, LM full + vision "
                  f"{b.achieved['full_with_vision']:.1%}")
        got = measure(self.loaded, recipe, self.held_out, timing=self.timing, reference=base,
                      batch_size=self.args.batch_size, progress=not self.args.quiet, desc=f"eval {b.asked}")
        if got.accuracy is not None:
            pruned, unpruned = got.accuracy, base.accuracy
            print(f"  held-out accuracy ({self.held_out.source}, {pruned.total} q): unpruned {unpruned.overall:.1%} -> "
                  f"pruned {pruned.overall:.1%} ({pruned.overall / max(unpruned.overall, 1e-9):.1%} kept)")
            for qtype in unpruned.per_type:
                print(f"    {qtype:<10} {unpruned.per_type[qtype]:.1%} -> {pruned.per_type.get(qtype, 0.0):.1%}")
        if got.prefill_seconds is not None:
            print(f"  prefill wall-clock (batch {len(self.timing)}): {got.timing.describe()}")
            print(f"  KV cache after prefill: unpruned {_mb(base.kv_cache_bytes)} -> pruned "
                  f"{_mb(got.kv_cache_bytes)}; peak memory above the model: unpruned {_mb(base.peak_bytes)} "
                  f"-> pruned {_mb(got.peak_bytes)}")


def _run_plot(argv: Sequence[str]) -> int:
    from .plot import plot_retention
    from .recipe import load_recipe

    args = _plot_parser().parse_args(argv)
    recipes = [load_recipe(p) for p in args.recipes]
    print(f"wrote {plot_retention(recipes, args.out)}")
    return 0


def _run_eval(argv: Sequence[str]) -> int:
    from .recipe import load_recipe
    from .runtime.apply import check_recipe_matches

    args = _eval_parser().parse_args(argv)
    _check_positive(eval_samples=args.eval_samples, batch_size=args.batch_size)
    recipes = [load_recipe(p) for p in args.recipes]
    session = _Session.open(args, fallback_data="demo")
    for path, recipe in zip(args.recipes, recipes):
        try:
            check_recipe_matches(session.loaded.adapter, recipe, args.allow_other_checkpoint)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    session.header()
    for path, recipe in zip(args.recipes, recipes):
        session.report(recipe, Path(path))
    return 0


def _run_search(argv: Sequence[str]) -> int:
    args = parse_with_config(_search_parser(), argv)
    if args.print_config:
        print(resolved_config(args), end="")
        return 0
    from .budget import parse_budgets

    if args.method == "gsearch":
        if args.budget is not None:
            raise ValueError("gsearch finds the least cost without loss and takes no --budget; "
                             "use --method psigmoid for a budget")
        budgets = []
    else:  # validate before any heavy import or loading
        budgets = parse_budgets("50%" if args.budget is None else args.budget, args.formula)
    from .methods import METHODS, check_run_options

    if args.num_samples is None:
        args.num_samples = METHODS[args.method].calibration_samples
    _check_positive(num_samples=args.num_samples, eval_samples=args.eval_samples, batch_size=args.batch_size,
                    n_trials=args.n_trials, n_workers=args.n_workers)
    if not args.time_budget > 0:
        raise ValueError(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    _check_start_layer(args.start_layer)
    check_run_options(args.method, ["min_cut"] if args.min_cut is not None else [],
                      lambda option: "--" + option.replace("_", "-"))
    check_writable(args.out, args.plot)
    if not 0 <= args.tolerance < 1:
        raise ValueError(f"--tolerance must be in [0, 1), got {args.tolerance}")
    if args.rule is not None:
        from .runtime.selection import make_rule

        if make_rule(args.rule).merges and isinstance(args.merge_threshold, float):
            raise ValueError(f"--merge-threshold: rule {args.rule!r} merges by its own weights; use another "
                             "rule or drop the threshold")

    from .calibration import load_samples
    from .pipeline import SearchOptions, search_recipes
    from .plot import plot_history, plot_retention
    from .recipe import load_recipe, save_recipe, write_atomic
    from .methods.auto import MERGE_THRESHOLD
    from .methods.psigmoid import fit_to_curve

    out = Path(args.out)
    warm_start = None
    if args.seed_recipe:
        seed_recipe = load_recipe(args.seed_recipe)
        start = METHODS["psigmoid"].start_layer if args.start_layer is None else args.start_layer
        warm_start = fit_to_curve(seed_recipe.schedule.counts, seed_recipe.schedule.visual_tokens, start)
    # data first: a bad --calib fails in a second, before the model is loaded and evaluated
    calib_options = {"image_folder": args.image_folder, "turns": args.turns, "columns": args.columns}
    calib = load_samples(args.calib, args.num_samples, split="calib", **calib_options)
    search_set = load_samples(args.search_set, args.num_samples, split="calib") if args.search_set else None
    session = _Session.open(args, fallback_data=args.calib, fallback_options=calib_options)
    loaded = session.loaded
    with _TrialBar(args) as bar:
        options = SearchOptions(
            start_layer=args.start_layer, metric=args.metric, tolerance=args.tolerance, optimizer=args.optimizer,
            n_trials=args.n_trials, n_startup=args.n_startup, seed=args.seed, storage=args.storage,
            resume=args.resume, n_workers=args.n_workers, warm_start=warm_start, work_dir=out,
            batch_size=args.batch_size, images=args.images, progress=bar.update, time_budget=args.time_budget,
            merge_threshold=(MERGE_THRESHOLD if args.merge_threshold is None
                             else None if args.merge_threshold == "off" else args.merge_threshold),
            **({} if args.min_cut is None else {"min_cut": args.min_cut}),
        )
        outcome = search_recipes(loaded, calib, budgets, method=args.method, options=options, search_set=search_set,
                                 model_source=session.source, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                                 batch_size=args.batch_size, progress=not args.quiet, rule=args.rule,
                                 merge_threshold=args.merge_threshold if isinstance(args.merge_threshold, float)
                                 else None)
    name = Path(loaded.name_or_path).name or "model"
    if args.rule:
        name = f"{name}-{args.rule}"
    paths = [save_recipe(r, out / f"{name}-{args.method}-{_budget_slug(r.budget.asked) if r.budget.kind != 'none' else 'least-cost'}.json")
             for r in outcome.recipes]
    write_atomic(out / "search.yaml", resolved_config(args).encode())
    plot_path = plot_retention(outcome.recipes, args.plot or out / f"{name}-{args.method}-retention.png")
    history_paths = []
    if args.method == "psigmoid":
        for recipe, path in zip(outcome.recipes, paths):
            trials = recipe.method.result.get("history", [])
            history_paths.append(plot_history(trials, path.with_suffix(".history.png"),
                                              f"P-Sigmoid {recipe.budget.asked}: {args.optimizer}, {args.metric}"))
    session.header()
    print(f"calibration: {len(calib)} samples from {calib.source} "
          f"({_cache_note(outcome.stats_cached)})")
    print("".join(f"  {note}\n" for note in calib.notes), end="")
    if args.method in ("gsearch", "psigmoid"):
        _print_tau(outcome.stats.kendall_tau)
    for recipe, path in zip(outcome.recipes, paths):
        session.report(recipe, path)
    print(f"\nretention plot: {plot_path}")
    print(f"options: {out / 'search.yaml'} (search-recipe --config {out / 'search.yaml'} runs this again)")
    for path in history_paths:
        print(f"optimisation history: {path}")
    return 0


def _min_cut(text: str) -> float:
    """--min-cut: a share in [0, 1)."""
    from .methods.cuts import check_min_cut

    try:
        return check_min_cut(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share of the live tokens in [0, 1), e.g. 0.1, not {text!r}") from None


def _merge_threshold(text: str) -> float | str:
    """--merge-threshold: a cosine similarity in (0, 1], or 'off'."""
    if text.strip().lower() == "off":
        return "off"
    from .runtime.plan import check_merge_threshold

    try:
        return check_merge_threshold(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity in (0, 1] or 'off', got {text!r}") from None


def _rule_label(row: dict[str, Any]) -> str:
    return row["rule"] + ("+merge" if row.get("merge_threshold") is not None else "")


def _print_candidates(result: dict[str, Any]) -> None:
    """The default search's winner and runners-up, as the recipe records them."""
    rows = [result["winner"], *result["runners_up"]]
    print(f"  winner of {result['candidates_scored']} candidates: {rows[0]['schedule']} with the {_rule_label(rows[0])} "
          "rule (search = samples the schedules were scored on, validation = samples that only picked)")
    print(f"    {'schedule':<28} {'rule':<20} {'FLOPs':>6} {'search agree':>12} {'valid. agree':>12} {'valid. metric':>13}")
    for row in rows:
        print(f"    {row['schedule']:<28} {_rule_label(row):<20} {row['flops_full']:>6.1%} {row['search_agreement']:>12.1%} "
              f"{row.get('validation_agreement', float('nan')):>12.1%} {row.get('validation_value', float('nan')):>13.1%}")


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MB"


def _cache_note(outcome: Any) -> str:
    if outcome:
        return "statistics from cache"
    return f"statistics computed; {outcome.note}" if outcome.note else "statistics computed and cached"


def _print_tau(tau: Any) -> None:
    """G-Search's premise: visual-token rankings agree between layers (except the first)."""
    print("Kendall tau between layers' visual-token rankings (last prompt token attention, calibration mean):")
    print("      " + " ".join(f"{j:>5}" for j in range(len(tau))))
    for i, row in enumerate(tau):
        print(f"  {i:>3} " + " ".join(f"{v:5.2f}" for v in row))
    off = [tau[i][i + 1] for i in range(1, len(tau) - 1)]
    if off:
        print(f"  adjacent layers from layer 1 on: mean tau {sum(off) / len(off):.2f} "
              f"(the method's premise wants it high; published reports give >= 0.7)")


class _TrialBar:
    """A progress bar over P-Sigmoid trials, fed by the search's progress callback."""

    def __init__(self, args: argparse.Namespace) -> None:
        from tqdm.auto import tqdm

        self.bar = (tqdm(total=args.n_trials, desc="psigmoid trials", unit="trial", disable=args.quiet)
                    if args.method == "psigmoid" else None)

    def update(self, number: int, attrs: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if attrs.get("feasible"):
                self.bar.set_postfix(value=f"{attrs['value']:.3f}", flops=f"{attrs['flops_full']:.1%}")

    def __enter__(self) -> "_TrialBar":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .compare import run_compare

    commands = {"plot": _run_plot, "eval": _run_eval, "compare": run_compare}
    try:
        if argv[:1] and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return _run_search(argv)
    except KeyboardInterrupt:
        print("search-recipe: interrupted; no recipe written (cached statistics, if any, are complete)",
              file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        if os.environ.get("RECIPE_SEARCH_DEBUG"):
            raise
        print(f"search-recipe: error: {one_line(str(exc))}", file=sys.stderr)
        return 2


def one_line(text: str, limit: int = 400) -> str:
    """A message fit for one terminal line: control characters escaped, long text cut."""
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text.strip())
    return escaped if len(escaped) <= limit else escaped[: limit - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())
