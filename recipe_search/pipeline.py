"""The search pipeline as one call: calibration -> statistics -> search -> recipe, per budget."""
from __future__ import annotations

import hashlib
import multiprocessing
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .budget import Budget
from .calibration.cache import CacheOutcome
from .calibration import SampleSet, calibrate
from .flops import CostModel
from .models import ModelAdapter
from .recipe.build import make_recipe
from .recipe.identity import model_identity
from .recipe.schema import CalibrationRecord, Recipe
from .runtime.selection import make_rule
from .methods import METHODS, SearchResult
from .methods import auto, gsearch, psigmoid
from .methods.objective import Evaluation, ScheduleScorer
from .methods.cuts import MIN_CUT, check_min_cut
from .methods.optimizers import default_storage, make_backend, optimizer_name
from .recipe.rules import with_merge_threshold, with_rule
from .stats import CalibrationStats



@dataclass
class LoadedModel:
    model: Any
    processor: Any
    adapter: ModelAdapter
    name_or_path: str


#: Where studies go when the caller names no folder (the API): a stable place, so a second call resumes.
STUDIES = Path.home() / ".cache" / "recipe-search" / "studies"


@dataclass(frozen=True)
class SearchOptions:
    """Knobs of the searches: the output-scoring ones use most; FitPrune start_layer and min_cut (which
    every schedule but the baselines' single cut also follows), the baselines start_layer only."""

    start_layer: int | None = None
    metric: str | None = None          # None: accuracy for `auto` when every sample has an answer, else agreement
    tolerance: float = 0.0
    optimizer: Any = "optuna"           # a registered name (OPTIMIZERS) or an optuna sampler instance
    n_trials: int = 48
    n_startup: int = 8
    seed: int = 0
    storage: str | None = None          # optuna URL; default: SQLite file in `work_dir`
    resume: bool = False
    n_workers: int = 1
    warm_start: dict[str, float] | None = None
    work_dir: Path = field(default_factory=lambda: STUDIES)  # the CLI: --out
    batch_size: int = 16
    images: str = "per-image"           # how several images in one prompt share the schedule
    time_budget: float = 600.0          # auto: seconds for the whole search, over every budget
    validation_share: float | None = None  # share of the calibration samples kept for picking only (None: the method's)
    merge_threshold: float | None = auto.MERGE_THRESHOLD  # auto: tried beside plain dropping (None: never merge)
    min_cut: float = MIN_CUT            # a layer cuts only when it drops this share of its live tokens (cuts.py)
    progress: Callable[[int, dict[str, Any]], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_min_cut(self.min_cut)  # a bad value fails before calibration, not after it


@dataclass(frozen=True)
class SearchOutcome:
    stats: CalibrationStats
    stats_cached: CacheOutcome  # truthy when the statistics came from the cache; `.note` says why not
    costs: CostModel
    recipes: list[Recipe]
    results: list[SearchResult]


def study_name(loaded: LoadedModel, search_set: SampleSet, budget: Budget, options: SearchOptions, start: int,
               costs: CostModel, rules: Sequence[str] = (), starts: Sequence[int] = (), study: str = "psigmoid") -> str:
    """Same model, data, costs, budget and settings (search space included) -> same study, so --resume
    and every worker find it (the costs decide which schedules meet the budget)."""
    key = f"{loaded.adapter.fingerprint()}:{search_set.content_hash()}:{budget.kind}:{budget.value}:{budget.formula}:" \
          f"{options.metric}:{start}:{optimizer_name(options.optimizer)}:{options.seed}:" \
          f"{costs.visual_tokens}:{sum(costs.text_tokens)}/{len(costs.text_tokens)}:{options.min_cut}"
    if rules or starts or study != "psigmoid":
        key += f":{study}:{','.join(rules)}:{','.join(map(str, starts))}"
    return f"{study}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _scorer(loaded: LoadedModel, search_set: SampleSet, options: SearchOptions, costs: CostModel) -> ScheduleScorer:
    return ScheduleScorer(loaded, search_set, make_rule(gsearch.RULE, gsearch.RULE_PARAMS), gsearch.SCORE_LAYER,
                          metric=options.metric or "agreement", batch_size=options.batch_size, images=options.images,
                          visual_tokens=costs.visual_tokens)


def _psigmoid_run(loaded: LoadedModel, search_set: SampleSet, budget: Budget, costs: CostModel,
                  options: SearchOptions, start: int, worker: str, scorer: ScheduleScorer | None = None,
                  resume: bool | None = None, rules: Sequence[str] = (), starts: Sequence[int] = (),
                  study: str = "psigmoid") -> psigmoid.PSigmoidRun:
    scorer = scorer or _scorer(loaded, search_set, options, costs)
    name = study_name(loaded, search_set, budget, options, start, costs, rules, starts, study)
    backend = make_backend(
        options.optimizer, psigmoid.search_space(len(scorer.layers), start, rules, starts),
        storage=options.storage or default_storage(options.work_dir, "psigmoid-trials"), study_name=name,
        log_path=options.work_dir / f"{name}.skopt.json", n_startup=options.n_startup, seed=options.seed,
        resume=options.resume if resume is None else resume, worker=worker,
    )
    return psigmoid.PSigmoidRun(scorer, budget, costs, backend, start, options.n_trials, options.progress, worker,
                                rule=rules[0] if len(rules) == 1 else gsearch.RULE, min_cut=options.min_cut)


def _worker(source: str, name_or_path: str, search_set: SampleSet, budget: Budget, costs: CostModel,
            options: SearchOptions, start: int, worker: int, threads: int, ready: Any,
            rules: Sequence[str] = (), starts: Sequence[int] = ()) -> None:
    """One of --n-workers processes: load the model and run trials until the shared study is full."""
    import torch

    from .models.loading import load_model

    torch.set_num_threads(threads)
    model, processor, adapter = load_model(source)
    loaded = LoadedModel(model, processor, adapter, name_or_path)
    run = _psigmoid_run(loaded, search_set, budget, costs, replace(options, progress=None), start,
                        f"worker-{worker}", resume=True, rules=rules, starts=starts)
    try:
        ready.wait(timeout=600)  # start trials together, whatever each worker's loading time was
    except threading.BrokenBarrierError:
        pass
    try:
        run.run()
    finally:
        run.backend.close()


def run_workers(source: str, loaded: LoadedModel, search_set: SampleSet, budget: Budget, costs: CostModel,
                options: SearchOptions, start: int, rules: Sequence[str] = (), starts: Sequence[int] = ()) -> None:
    """Start `options.n_workers` processes on one (already created) optuna study and wait for them.

    A worker that dies (kill -9, out of memory) leaves a running trial that the others fail once its
    heartbeat is stale and then redo, so the study still ends with `options.n_trials` finished
    trials: that is a warning. Only a study left unfinished is an error (finish it with --resume).
    """
    import sys

    import torch

    from .methods.optimizers import study_progress

    if options.optimizer == "skopt":
        raise ValueError("--n-workers needs an optuna optimizer: skopt keeps its trials in one process")
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // options.n_workers)
    ready = ctx.Barrier(options.n_workers)
    procs = [ctx.Process(target=_worker, args=(source, loaded.name_or_path, search_set, budget, costs,
                                              replace(options, progress=None), start, i, threads, ready,
                                              tuple(rules), tuple(starts)))
             for i in range(options.n_workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = {f"worker-{i}": p.exitcode for i, p in enumerate(procs) if p.exitcode}
    if failed:
        storage = options.storage or default_storage(options.work_dir, "psigmoid-trials")
        done = study_progress(storage, study_name(loaded, search_set, budget, options, start, costs, rules,
                                                       starts)).finished
        codes = ", ".join(f"{w} exit code {c}" for w, c in failed.items())
        if done < options.n_trials:
            raise RuntimeError(f"{len(failed)} of {len(procs)} search workers failed ({codes}) with {done} of "
                               f"{options.n_trials} trials finished; --resume finishes the study")
        print(f"search-recipe: warning: {len(failed)} of {len(procs)} search workers died ({codes}); the others "
              f"failed and redid their interrupted trials and finished the study", file=sys.stderr)


def _psigmoid_starts(scorer: ScheduleScorer, budget: Budget, costs: CostModel, asked: int | None,
                     min_cut: float) -> tuple[int, ...]:
    """The start layers the BO may choose: the one asked (checked), else every layer up to the
    default 2 from which some sigmoid meets the budget (closed form, before any trial); a one-line
    error naming the smallest feasible budget when none does."""
    layers = len(scorer.layers)
    if asked is not None:
        psigmoid.check_feasible(scorer.visual_tokens, layers, asked, budget, costs, min_cut)
        return (asked,)
    latest = psigmoid.feasible_start(scorer.visual_tokens, layers, METHODS["psigmoid"].start_layer, budget, costs,
                                     min_cut)
    return psigmoid.feasible_starts(scorer.visual_tokens, layers, latest, budget, costs, min_cut)


def _run_psigmoid(loaded: LoadedModel, searched: SampleSet, budget: Budget, costs: CostModel, options: SearchOptions,
                  scorer: ScheduleScorer, rules: Sequence[str], model_source: str | None, study: str = "psigmoid",
                  deadline: float | None = None, resume: bool | None = None,
                  validation: ScheduleScorer | None = None) -> SearchResult:
    """One P-Sigmoid search over (slope, midpoint, start layer, rule) for `budget`; with `validation`,
    the best few trials are re-scored there and the best of them wins."""
    starts = _psigmoid_starts(scorer, budget, costs, options.start_layer, options.min_cut)
    run = _psigmoid_run(loaded, searched, budget, costs, options, max(starts), "main", scorer, resume=resume,
                        rules=rules, starts=starts if len(starts) > 1 else (), study=study)
    run.deadline = deadline
    params = {"optimizer": optimizer_name(options.optimizer), "n_trials": options.n_trials, "n_startup": options.n_startup,
              "seed": options.seed, "search_set": searched.source, "search_samples": len(searched),
              "warm_start": options.warm_start, "rules": list(rules), "start_layers": list(starts),
              "min_cut": options.min_cut}
    started = time.perf_counter()
    try:
        if options.warm_start and not run.backend.finished():
            run.backend.enqueue(options.warm_start)
        if options.n_workers > 1:
            if model_source is None:
                raise ValueError("--n-workers needs the model's path so each worker can load it")
            run_workers(model_source, loaded, searched, budget, costs, options, max(starts), rules,
                        starts if len(starts) > 1 else ())
        else:
            run.run()
        return psigmoid.best_result(run, time.perf_counter() - started, params, validation)
    finally:
        run.backend.close()


def _auto(loaded: LoadedModel, stats: CalibrationStats, scorer: ScheduleScorer, validation: ScheduleScorer,
          budgets: Sequence[Budget], costs: CostModel, options: SearchOptions, rules: Sequence[str],
          progress: bool) -> list[tuple[Budget | None, SearchResult]]:
    """The default search (methods/auto.py): candidates of every schedule and rule per budget, the
    time budget shared between the budgets, the winner picked on the validation samples."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    end = started + options.time_budget
    search_set, validation_set = scorer.data, validation.data
    layers = len(scorer.layers)
    for budget in budgets:
        auto.check_feasible(budget, costs, layers)
    # G-Search's lossless curve, shaped once for every budget, within a fifth of the time
    shape = None
    if layers > 2:
        found = gsearch.search_gsearch(scorer, costs, start_layer=2, deadline=started + options.time_budget / 5,
                                       min_cut=options.min_cut)
        shape = found.counts
    out: list[tuple[Budget | None, SearchResult]] = []
    bar = tqdm(total=len(budgets), desc="auto search", unit="budget", disable=not progress)
    for i, budget in enumerate(budgets):
        t0 = time.monotonic()
        share = (end - t0) / (len(budgets) - i)
        schedules = auto.fixed_schedules(stats, budget, costs, shape, options.min_cut)
        grid = auto.score_grid(scorer, schedules, rules, costs, t0 + share / 2)
        bo: list[auto.Candidate] = []
        try:
            found_bo = _run_psigmoid(loaded, search_set, budget, costs, replace(options, n_workers=1), scorer, rules,
                                     None, study="auto",
                                     deadline=t0 + share * 0.85, resume=True, validation=validation)
        except (ValueError, psigmoid.InfeasibleBudgetError):
            found_bo = None  # no sigmoid fits the budget, or no trial finished in time: the grid decides
        if found_bo is not None:  # its trial already scored it on the search samples
            name = found_bo.result["rule"]  # the candidate's name: a registered rule or a variant
            plan = scorer.rule_plan(found_bo.counts, name)
            got = Evaluation(*(found_bo.result[k] for k in ("value", "agreement", "kl", "accuracy")))
            bo.append(auto.Candidate(f"P-Sigmoid (BO, start {found_bo.params['start_layer']})", plan, name, got,
                                     costs.fraction(plan.counts, "full")))
        merged = ([] if options.merge_threshold is None else
                  auto.with_merging(scorer, grid + bo, options.merge_threshold, t0 + share * 0.95))
        ranked = auto.pick(grid + bo + merged, len(search_set), validation)
        params = {"time_budget": options.time_budget, "rules": list(rules), "metric": scorer.metric,
                  "search_set": search_set.source, "search_samples": len(search_set),
                  "validation_samples": len(validation_set), "n_trials": options.n_trials,
                  "optimizer": optimizer_name(options.optimizer), "seed": options.seed,
                  "start_layer": int(next((j for j, c in enumerate(ranked[0].plan.counts) if c < costs.visual_tokens),
                                          layers))}
        params["merge_threshold"] = options.merge_threshold
        params["min_cut"] = options.min_cut  # every candidate schedule's but the uniform ones'
        out.append((budget, auto.as_result(ranked, len(grid) + len(bo) + len(merged), params, time.monotonic() - t0)))
        bar.update(1)
    bar.close()
    return out


def search_recipes(loaded: LoadedModel, data: SampleSet, budgets: Sequence[Budget | None], *,
                   method: str = "auto", options: SearchOptions = SearchOptions(),
                   search_set: SampleSet | None = None, model_source: str | None = None,
                   cache_dir: Path | None = None, batch_size: int = 8, progress: bool = True,
                   rule: str | None = None, merge_threshold: float | None = None) -> SearchOutcome:
    """One calibration pass (or cache hit), then one search and one recipe per budget.

    `rule` names a selection rule: the only one auto, G-Search and P-Sigmoid search with, and the one
    that replaces the method's own in every other method's recipes (recipe/rules.py).
    `merge_threshold` puts near-duplicate merging into the recipes of every method but auto, which
    searches it (`options.merge_threshold`).

    `budgets` is ignored (one recipe) for budgetless methods. Methods that score on model outputs
    (auto, G-Search, P-Sigmoid) score on a search part and check on a validation part whose answers
    no search sees: two parts of the calibration samples (`options.validation_share`, by default the
    method's: three quarters validate for auto, half for G-Search and P-Sigmoid), or
    `search_set` and the calibration samples when a search set is given. Their recipes record both
    agreements. The attention statistics (no answers in them) come from all calibration samples, so
    every method sees the same statistics and the same costs.
    """
    spec = METHODS.get(method)
    searched = validation_set = None
    if spec.on_outputs:
        share = spec.validation_share if options.validation_share is None else options.validation_share
        searched, validation_set = data.split(share) if search_set is None else (search_set, data)
    if options.metric is None:
        scored = searched or data
        options = replace(options, metric="accuracy" if method == "auto" and scored.has_answers else "agreement")
    stats, cached = calibrate(loaded.model, loaded.processor, loaded.adapter, data, cache_dir=cache_dir,
                              batch_size=batch_size, progress=progress)
    costs = CostModel(loaded.adapter.dims(), stats.visual_tokens, tuple(int(t) for t in stats.text_tokens))
    identity = model_identity(loaded.adapter, loaded.name_or_path)
    calib = CalibrationRecord(source=data.source, num_samples=len(data), data_hash=stats.meta["data_hash"],
                              description=f"{len(data)} samples from {data.source}, unpruned model, batch {batch_size}")
    start = spec.start_layer if options.start_layer is None else options.start_layer
    scorer = validation = None
    if searched is not None and validation_set is not None:
        scorer, validation = _scorer(loaded, searched, options, costs), _scorer(loaded, validation_set, options, costs)
    rules = (rule,) if rule is not None else None
    results: list[tuple[Budget | None, SearchResult]] = []
    if method == "auto":
        assert scorer is not None and validation is not None
        results = _auto(loaded, stats, scorer, validation, [b for b in budgets if b is not None], costs, options,
                        rules or auto.rule_order(scorer.rule_names()), progress)
    elif method == "gsearch":
        assert scorer is not None
        results.append((None, gsearch.search_gsearch(scorer, costs, start_layer=start, tolerance=options.tolerance,
                                                     rule=rule or gsearch.RULE, validation=validation,
                                                     min_cut=options.min_cut)))
    for budget in ([] if spec.budgetless or method == "auto" else budgets):
        assert budget is not None
        if method == "psigmoid":
            assert scorer is not None and validation is not None
            results.append((budget, _run_psigmoid(loaded, searched, budget, costs, options, scorer,
                                                  rules or auto.rule_order(scorer.rule_names()), model_source,
                                                  validation=validation)))
        else:
            assert spec.run is not None
            results.append((budget, spec.run(stats, budget, costs, start_layer=start,
                                             **{name: getattr(options, name) for name in spec.run_options})))
    for _, result in results:
        if spec.on_outputs:
            result.result["kendall_tau"] = stats.kendall_tau.round(3).tolist()
    recipes = [make_recipe(r, b, costs, identity, calib, images=options.images) for b, r in results]
    recipes = [with_rule(rec, loaded.adapter, costs, res.vision_rule) if res.vision_rule else rec
               for rec, (_, res) in zip(recipes, results)]
    if rule is not None and method not in ("auto", "psigmoid", "gsearch"):
        recipes = [with_rule(r, loaded.adapter, costs, rule) for r in recipes]
    if merge_threshold is not None and method != "auto":
        recipes = [with_merge_threshold(r, merge_threshold) for r in recipes]
    return SearchOutcome(stats, cached, costs, recipes, [r for _, r in results])
