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
from .methods import gsearch, psigmoid
from .methods.objective import ScheduleScorer
from .methods.optimizers import default_storage, make_backend, optimizer_name
from .recipe.rules import with_rule
from .stats import CalibrationStats



@dataclass
class LoadedModel:
    model: Any
    processor: Any
    adapter: ModelAdapter
    name_or_path: str


@dataclass(frozen=True)
class SearchOptions:
    """Knobs of the output-scoring searches; FitPrune and the baselines use only start_layer."""

    start_layer: int | None = None
    metric: str = "agreement"
    tolerance: float = 0.0
    optimizer: Any = "optuna"           # a registered name (OPTIMIZERS) or an optuna sampler instance
    n_trials: int = 48
    n_startup: int = 8
    seed: int = 0
    storage: str | None = None          # optuna URL; default: SQLite file in `work_dir`
    resume: bool = False
    n_workers: int = 1
    warm_start: dict[str, float] | None = None
    work_dir: Path = Path(".")
    batch_size: int = 16
    images: str = "per-image"           # how several images in one prompt share the schedule
    progress: Callable[[int, dict[str, Any]], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SearchOutcome:
    stats: CalibrationStats
    stats_cached: CacheOutcome  # truthy when the statistics came from the cache; `.note` says why not
    costs: CostModel
    recipes: list[Recipe]
    results: list[SearchResult]


def study_name(loaded: LoadedModel, search_set: SampleSet, budget: Budget, options: SearchOptions, start: int) -> str:
    """Same model, data, budget and settings -> same study, so --resume finds it."""
    key = f"{loaded.adapter.fingerprint()}:{search_set.content_hash()}:{budget.kind}:{budget.value}:{budget.formula}:" \
          f"{options.metric}:{start}:{optimizer_name(options.optimizer)}:{options.seed}"
    return f"psigmoid-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _scorer(loaded: LoadedModel, search_set: SampleSet, options: SearchOptions, costs: CostModel) -> ScheduleScorer:
    return ScheduleScorer(loaded, search_set, make_rule(gsearch.RULE, gsearch.RULE_PARAMS), gsearch.SCORE_LAYER,
                          metric=options.metric, batch_size=options.batch_size, images=options.images,
                          visual_tokens=costs.visual_tokens)


def _psigmoid_run(loaded: LoadedModel, search_set: SampleSet, budget: Budget, costs: CostModel,
                  options: SearchOptions, start: int, worker: str, scorer: ScheduleScorer | None = None,
                  resume: bool | None = None) -> psigmoid.PSigmoidRun:
    scorer = scorer or _scorer(loaded, search_set, options, costs)
    name = study_name(loaded, search_set, budget, options, start)
    backend = make_backend(
        options.optimizer, psigmoid.search_space(len(scorer.layers), start),
        storage=options.storage or default_storage(options.work_dir, "psigmoid-trials"), study_name=name,
        log_path=options.work_dir / f"{name}.skopt.json", n_startup=options.n_startup, seed=options.seed,
        resume=options.resume if resume is None else resume, worker=worker,
    )
    return psigmoid.PSigmoidRun(scorer, budget, costs, backend, start, options.n_trials, options.progress, worker)


def _worker(source: str, name_or_path: str, search_set: SampleSet, budget: Budget, costs: CostModel,
            options: SearchOptions, start: int, worker: int, threads: int, ready: Any) -> None:
    """One of --n-workers processes: load the model and run trials until the shared study is full."""
    import torch

    from .models.loading import load_model

    torch.set_num_threads(threads)
    model, processor, adapter = load_model(source)
    loaded = LoadedModel(model, processor, adapter, name_or_path)
    run = _psigmoid_run(loaded, search_set, budget, costs, replace(options, progress=None), start,
                        f"worker-{worker}", resume=True)
    try:
        ready.wait(timeout=600)  # start trials together, whatever each worker's loading time was
    except threading.BrokenBarrierError:
        pass
    try:
        run.run()
    finally:
        run.backend.close()


def run_workers(source: str, loaded: LoadedModel, search_set: SampleSet, budget: Budget, costs: CostModel,
                options: SearchOptions, start: int) -> None:
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
                                              replace(options, progress=None), start, i, threads, ready))
             for i in range(options.n_workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = {f"worker-{i}": p.exitcode for i, p in enumerate(procs) if p.exitcode}
    if failed:
        storage = options.storage or default_storage(options.work_dir, "psigmoid-trials")
        done = study_progress(storage, study_name(loaded, search_set, budget, options, start)).finished
        codes = ", ".join(f"{w} exit code {c}" for w, c in failed.items())
        if done < options.n_trials:
            raise RuntimeError(f"{len(failed)} of {len(procs)} search workers failed ({codes}) with {done} of "
                               f"{options.n_trials} trials finished; --resume finishes the study")
        print(f"search-recipe: warning: {len(failed)} of {len(procs)} search workers died ({codes}); the others "
              f"failed and redid their interrupted trials and finished the study", file=sys.stderr)


def _psigmoid_start(scorer: ScheduleScorer, budget: Budget, costs: CostModel, asked: int | None) -> int:
    """The start layer: as asked (checked), else the default 2 or the latest earlier layer from
    which some sigmoid meets the budget (closed form, before any trial)."""
    layers = len(scorer.layers)
    if asked is not None:
        psigmoid.check_feasible(scorer.visual_tokens, layers, asked, budget, costs)
        return asked
    return psigmoid.feasible_start(scorer.visual_tokens, layers, METHODS["psigmoid"].start_layer, budget, costs)

def search_recipes(loaded: LoadedModel, data: SampleSet, budgets: Sequence[Budget | None], *,
                   method: str = "fitprune", options: SearchOptions = SearchOptions(),
                   search_set: SampleSet | None = None, model_source: str | None = None,
                   cache_dir: Path | None = None, batch_size: int = 8, progress: bool = True,
                   rule: str | None = None) -> SearchOutcome:
    """One calibration pass (or cache hit), then one search and one recipe per budget.

    `rule` names a selection rule that replaces the method's own in every recipe (rules.py).

    `budgets` is ignored (one recipe) for budgetless methods. Methods that score on model outputs
    score on `search_set`, by default the calibration samples.
    """
    spec = METHODS.get(method)
    stats, cached = calibrate(loaded.model, loaded.processor, loaded.adapter, data, cache_dir=cache_dir,
                              batch_size=batch_size, progress=progress)
    costs = CostModel(loaded.adapter.dims(), stats.visual_tokens, tuple(int(t) for t in stats.text_tokens))
    identity = model_identity(loaded.adapter, loaded.name_or_path)
    calib = CalibrationRecord(source=data.source, num_samples=len(data), data_hash=stats.meta["data_hash"],
                              description=f"{len(data)} samples from {data.source}, unpruned model, batch {batch_size}")
    start = spec.start_layer if options.start_layer is None else options.start_layer
    searched = search_set or data
    scorer = _scorer(loaded, searched, options, costs) if spec.on_outputs else None
    results: list[tuple[Budget | None, SearchResult]] = []
    if method == "gsearch":
        assert scorer is not None
        results.append((None, gsearch.search_gsearch(scorer, costs, start_layer=start, tolerance=options.tolerance)))
    for budget in ([] if spec.budgetless else budgets):
        assert budget is not None
        if method == "psigmoid":
            assert scorer is not None
            start = _psigmoid_start(scorer, budget, costs, options.start_layer)
            run = _psigmoid_run(loaded, searched, budget, costs, options, start, "main", scorer)
            params = {"optimizer": optimizer_name(options.optimizer), "n_trials": options.n_trials, "n_startup": options.n_startup,
                      "seed": options.seed, "search_set": searched.source, "search_samples": len(searched),
                      "warm_start": options.warm_start}
            started = time.perf_counter()
            if options.warm_start and not run.backend.finished():
                run.backend.enqueue(options.warm_start)
            if options.n_workers > 1:
                if model_source is None:
                    raise ValueError("--n-workers needs the model's path so each worker can load it")
                run_workers(model_source, loaded, searched, budget, costs, options, start)
            else:
                run.run()
            results.append((budget, psigmoid.best_result(run, time.perf_counter() - started, params)))
        else:
            assert spec.run is not None
            results.append((budget, spec.run(stats, budget, costs, start_layer=start)))
    for _, result in results:
        if spec.on_outputs:
            result.result["kendall_tau"] = stats.kendall_tau.round(3).tolist()
    recipes = [make_recipe(r, b, costs, identity, calib, images=options.images) for b, r in results]
    if rule is not None:
        recipes = [with_rule(r, loaded.adapter, costs, rule) for r in recipes]
    return SearchOutcome(stats, cached, costs, recipes, [r for _, r in results])
