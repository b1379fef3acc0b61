"""G-Search and P-Sigmoid: scorer exactness, budgets, floor bisection, backends, resume and workers."""
import json
from dataclasses import replace
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from recipe_search.budget import parse_budget
from recipe_search.calibration import demo_samples
from recipe_search.flops import CostModel
from recipe_search.pipeline import LoadedModel, SearchOptions, run_workers, search_recipes, study_name
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule
from recipe_search.methods import gsearch, psigmoid
from recipe_search.methods.objective import ScheduleScorer
from recipe_search.methods.optimizers import (OptimizerError, OptunaBackend, SkoptBackend, TrialLost,
                                             default_storage, make_backend)


@pytest.fixture(scope="module")
def loaded():
    """The shipped, trained demo model: searches must work on a model whose answers mean something."""
    from recipe_search.demo import demo_checkpoint
    from recipe_search.models.loading import load_model

    model, processor, adapter = load_model(demo_checkpoint())
    return LoadedModel(model, processor, adapter, "demo")


@pytest.fixture(scope="module")
def search_set():
    return demo_samples("calib", 12)


@pytest.fixture(scope="module")
def scorer(loaded, search_set):
    return ScheduleScorer(loaded, search_set, make_rule("attention"), "previous", batch_size=6)


@pytest.fixture(scope="module")
def costs(loaded):
    return CostModel(loaded.adapter.dims(), 144, (12,) * 12)


def test_scorer_keep_all_is_the_unpruned_model(scorer):
    ev = scorer.reference()
    assert (ev.agreement, ev.kl) == (1.0, 0.0)


def test_prefix_cached_scores_equal_a_direct_pruned_run(loaded, search_set, scorer):
    counts = (144, 144, 90, 40, 40, 20, 20, 8)
    scorer.evaluate((144, 144, 90, 90, 90, 90, 90, 90))  # leaves a cached prefix (144, 144, 90)
    before = scorer.layers_run
    cached = scorer._logits(0, scorer.batches[0], scorer.plan(counts))
    assert scorer.layers_run - before < 8  # resumed after the shared prefix
    chunk = search_set.samples[:6]
    inputs = loaded.adapter.build_inputs(loaded.processor, [s.image for s in chunk], [s.prompt for s in chunk])
    with torch.no_grad(), PruningHandle(loaded.model, PruningPlan(counts, 144, make_rule("attention"), "previous")):
        direct = loaded.model(**inputs, use_cache=False).logits[:, -1]
    assert (cached - direct).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rule, vision", [("dart", None), (None, "freepruner")])
def test_other_rules_score_like_a_direct_pruned_run(loaded, search_set, scorer, rule, vision):
    """Another rule never resumes from the scorer's own rule's cached prefix; a pre-LLM stage runs the model."""
    counts = (144, 144, 90, 90, 90, 90, 90, 90) if vision is None else (90,) * 8
    scorer.evaluate((144, 144, 90, 90, 90, 90, 90, 90))  # the scorer's own rule leaves a prefix (144, 144, 90)
    plan = scorer.rule_plan(counts, rule or vision)
    got = scorer._logits(0, scorer.batches[0], plan)
    chunk = search_set.samples[:6]
    inputs = loaded.adapter.build_inputs(loaded.processor, [s.image for s in chunk], [s.prompt for s in chunk])
    with torch.no_grad(), PruningHandle(loaded.model, plan):
        direct = loaded.model(**inputs, use_cache=False).logits[:, -1]
    assert (got - direct).abs().max().item() <= 1e-5
    other = scorer.plan(counts) if vision is None else scorer.plan(counts, make_rule("fitprune"))
    assert (scorer._logits(0, scorer.batches[0], other) - got).abs().max().item() > 1e-3  # the rules differ here


@pytest.mark.parametrize("min_cut", [0.0, 0.3])
def test_gsearch_keeps_its_tolerance(scorer, costs, min_cut):
    result = gsearch.search_gsearch(scorer, costs, start_layer=2, tolerance=0.0, min_cut=min_cut)
    counts = result.counts
    assert counts[:2] == (144, 144) and result.params["min_cut"] == min_cut
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert all(b - c >= min_cut * b for b, c in zip(counts, counts[1:]) if c < b)  # each cut worth its pass
    assert scorer.evaluate(counts).value >= result.result["unpruned_value"]
    assert all(c in gsearch.token_grid(144) for c in counts)
    with pytest.raises(ValueError, match="never ranks with layer-0 attention"):
        gsearch.search_gsearch(scorer, costs, start_layer=1)


@pytest.mark.parametrize("slope,midpoint", [(0.3, 2.0), (1.0, 4.5), (2.5, 6.0), (3.0, 7.0)])
@pytest.mark.parametrize("budget", ["70%", "50%", "40%", "96tok"])
def test_floor_bisection_hits_the_budget_within_one_token_per_layer(costs, slope, midpoint, budget):
    b = parse_budget(budget)
    fitted = psigmoid.fit_floor(144, 8, 2, slope, midpoint, b, costs)
    if fitted is None:
        assert not b.is_met(psigmoid.sigmoid_schedule(144, 8, 2, 0.0, slope, midpoint), costs)
        return
    floor, counts = fitted
    assert b.is_met(counts, costs)
    assert all(a >= b_ for a, b_ in zip(counts, counts[1:])) and counts[:2] == (144, 144)
    if floor < 1:
        one_more = psigmoid.sigmoid_schedule(144, 8, 2, floor + 1.0 / 144, slope, midpoint)
        assert not b.is_met(one_more, costs)


def test_warm_start_fit_recovers_a_sigmoid():
    target = psigmoid.sigmoid_schedule(144, 8, 2, 0.2, 1.5, 4.0)
    fit = psigmoid.fit_to_curve(target, 144, 2)
    assert fit["slope"] == pytest.approx(1.5, abs=0.2) and fit["midpoint"] == pytest.approx(4.0, abs=0.3)


@pytest.mark.parametrize("optimizer", ["optuna", "skopt"])
def test_backends_write_valid_recipes_within_budget(loaded, search_set, tmp_path, optimizer):
    options = SearchOptions(optimizer=optimizer, n_trials=6, n_startup=3, work_dir=tmp_path, batch_size=6)
    outcome = search_recipes(loaded, search_set, [parse_budget("50%"), parse_budget("60%")], method="psigmoid",
                             options=options, cache_dir=tmp_path / "cache", progress=False)
    for recipe, limit in zip(outcome.recipes, (0.5, 0.6)):
        assert recipe.budget.achieved["full"] <= limit
        assert recipe.method.result["trials"] == 6 and len(recipe.method.result["history"]) == 6
        chosen = recipe.vision.rule if recipe.vision is not None else recipe.selection.rule
        assert chosen == recipe.method.result["rule"] in recipe.method.params["rules"]  # the best trial's rule
        assert len(recipe.method.params["rules"]) > 1
        assert len(recipe.method.result["kendall_tau"]) == 8


def _run(loaded, search_set, costs, tmp_path, n_trials, resume):
    scorer = ScheduleScorer(loaded, search_set, make_rule("attention"), "previous", batch_size=6)
    backend = make_backend("optuna", psigmoid.search_space(8, 2), storage=default_storage(tmp_path, "t"),
                           study_name="s", log_path=tmp_path / "s.json", n_startup=2, seed=0, resume=resume)
    return psigmoid.PSigmoidRun(scorer, parse_budget("80%"), costs, backend, 2, n_trials)


def test_interrupted_run_resumes_with_every_finished_trial(loaded, search_set, costs, tmp_path):
    run = _run(loaded, search_set, costs, tmp_path, 6, resume=False)
    calls = {"n": 0}
    real = run.scorer.evaluate_plan

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(plan)

    run.scorer.evaluate_plan = flaky
    with pytest.raises(KeyboardInterrupt):
        run.run()
    done = run.backend.finished()
    assert 1 <= len(done) < 6
    with pytest.raises(OptimizerError, match="--resume"):
        _run(loaded, search_set, costs, tmp_path, 6, resume=False)
    resumed = _run(loaded, search_set, costs, tmp_path, 6, resume=True)
    resumed.run()
    numbers = [t.number for t in resumed.backend.finished()]
    assert len(numbers) == 6 and set(t.number for t in done) <= set(numbers)


def test_two_workers_share_one_study(loaded, search_set, costs, tmp_path):
    from recipe_search.demo import demo_checkpoint

    options = SearchOptions(n_trials=6, n_startup=2, work_dir=tmp_path, batch_size=6, n_workers=2)
    budget = parse_budget("50%")
    name = study_name(loaded, search_set, budget, options, 2, costs)
    storage = default_storage(tmp_path, "psigmoid-trials")
    OptunaBackend(psigmoid.search_space(8, 2), storage, name)  # the study the workers join
    run_workers(str(demo_checkpoint()), loaded, search_set, budget, costs, options, 2)
    backend = OptunaBackend(psigmoid.search_space(8, 2), storage, name, resume=True)
    done = backend.finished()
    assert len(done) == 6
    assert {t.attrs["worker"] for t in done} == {"worker-0", "worker-1"}


def test_psigmoid_starts_earlier_only_when_the_budget_needs_it(loaded, search_set, costs, tmp_path):
    from recipe_search.methods import InfeasibleBudgetError

    options = SearchOptions(n_trials=3, n_startup=2, work_dir=tmp_path, batch_size=6)
    outcome = search_recipes(loaded, search_set, [parse_budget("50%"), parse_budget("25%")], method="psigmoid",
                             options=options, cache_dir=tmp_path / "cache", progress=False)
    allowed = [r.method.params["start_layers"] for r in outcome.recipes]
    assert allowed[0] == [0, 1, 2] and 2 not in allowed[1] and allowed[1]  # start 2 cannot meet 25 %
    assert all(r.method.params["start_layer"] in a for r, a in zip(outcome.recipes, allowed))
    assert outcome.recipes[1].budget.achieved["full"] <= 0.25
    coarse = search_recipes(loaded, search_set, [parse_budget("50%")], method="psigmoid",
                            options=replace(options, min_cut=0.4), cache_dir=tmp_path / "cache", progress=False)
    counts = coarse.recipes[0].schedule.counts
    assert coarse.recipes[0].method.params["min_cut"] == 0.4 and outcome.recipes[0].method.params["min_cut"] == 0.1
    assert all(b - c >= 0.4 * b for b, c in zip((144, *counts), counts) if c < b)
    assert study_name(loaded, search_set, parse_budget("50%"), options, 2, costs) != \
        study_name(loaded, search_set, parse_budget("50%"), replace(options, min_cut=0.4), 2, costs)
    with pytest.raises(InfeasibleBudgetError, match="cannot be met by a P-Sigmoid from layer 2"):
        search_recipes(loaded, search_set, [parse_budget("25%")], method="psigmoid",
                       options=SearchOptions(start_layer=2, n_trials=3, work_dir=tmp_path / "b"),
                       cache_dir=tmp_path / "cache", progress=False)


def test_leanest_sigmoid_is_the_closed_form_minimum(costs):
    """No (slope, midpoint, floor) in the search space costs less than the leanest schedule, so a
    start layer is refused exactly when no trial could meet the budget; the start goes down to 0
    when needed, and a budget below every start's minimum names the smallest feasible budget."""
    n, layers = costs.visual_tokens, costs.dims.num_layers
    budget = parse_budget("50%")
    for start in range(layers):
        lean = budget.achieved(psigmoid.leanest_schedule(n, layers, start), costs)
        grid = [budget.achieved(psigmoid.sigmoid_schedule(n, layers, start, floor, slope, mid), costs)
                for floor in (0.0, 0.1, 0.5) for slope in np.linspace(*psigmoid.SLOPE_RANGE, 7)
                for mid in np.linspace(start, layers - 1, 9)]
        assert min(grid) >= lean - 1e-12
    at = [budget.achieved(psigmoid.leanest_schedule(n, layers, s), costs) for s in range(3)]
    between = parse_budget(f"{(at[0] + at[1]) / 2:.4f}")  # feasible from layer 0 only
    assert psigmoid.feasible_start(n, layers, 2, between, costs) == 0
    with pytest.raises(psigmoid.InfeasibleBudgetError, match=f"smallest it can reach .from layer 0. is {at[0]:.1%}"):
        psigmoid.feasible_start(n, layers, 2, parse_budget(f"{at[0] * 0.9:.4f}"), costs)


# --- trials that survive kill -9 --------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT = "1,4"  # beat every second, an orphan after 4 s without one (default 10,60)


def _orphan(backend, *, beat):
    """A RUNNING trial of a worker that died: with `beat`, after its first heartbeat; without, before it."""
    if beat:
        trial = backend.ask()
        backend.beats.pop(trial.handle._trial_id).stop()  # the heartbeat stops, as with kill -9
        return trial.number
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna: heartbeats are meant for optimize()
        return backend.study.ask().number  # created, never beaten (or by an older version)


@pytest.mark.parametrize("journal,beat", [(False, True), (False, False), (True, True)],
                         ids=["stale-heartbeat", "no-heartbeat", "journal"])
def test_orphaned_running_trial_is_failed_retried_and_not_counted(loaded, search_set, costs, tmp_path, journal, beat):
    space = psigmoid.search_space(8, 2)
    storage = f"journal://{tmp_path / 't.log'}" if journal else default_storage(tmp_path, "t")
    first = OptunaBackend(space, storage, "s", n_startup=2, heartbeat=(1, 2))
    scorer = ScheduleScorer(loaded, search_set, make_rule("attention"), "previous", batch_size=6)
    psigmoid.PSigmoidRun(scorer, parse_budget("80%"), costs, first, 2, 1).run()
    orphan = _orphan(first, beat=beat)
    resumed = OptunaBackend(space, storage, "s", n_startup=2, resume=True, heartbeat=(1, 2))
    psigmoid.PSigmoidRun(scorer, parse_budget("80%"), costs, resumed, 2, 4).run()
    trials = resumed.study.get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    dead = next(t for t in trials if t.number == orphan)
    assert dead.state.name == "FAIL"
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == orphan]
    assert len(retried) == 1 and retried[0].params == (dead.params or retried[0].params)  # killed before sampling: none


def test_a_trial_failed_by_another_worker_is_not_told(tmp_path):
    space, storage = psigmoid.search_space(8, 2), default_storage(tmp_path, "t")
    mine = OptunaBackend(space, storage, "s", heartbeat=(1, 2))
    trial = mine.ask()
    other = OptunaBackend(space, storage, "s", resume=True, heartbeat=(1, 2))
    other.storage.set_trial_state_values(trial.handle._trial_id, state=other.optuna.trial.TrialState.FAIL)
    with pytest.raises(TrialLost, match="failed by another worker"):
        mine.tell(trial, 0.5, {})
    assert mine.finished() == [] and mine.beats == {}


def test_skopt_log_takes_one_process_at_a_time(tmp_path):
    space, log = psigmoid.search_space(8, 2), tmp_path / "s.skopt.json"
    first = SkoptBackend(space, log, n_startup=2)
    first.tell(first.ask(), 0.5, {})
    with pytest.raises(OptimizerError, match="in use by another search"):
        SkoptBackend(space, log, n_startup=2, resume=True)  # would overwrite the first one's trials
    first.close()
    again = SkoptBackend(space, log, n_startup=2, resume=True)
    assert [r.number for r in again.finished()] == [0]
    again.close()
    log.write_text(json.dumps([{"number": 0, "params": {"slope": 1, "midpoint": 3}, "value": 0.5}] * 2))
    with pytest.raises(OptimizerError, match="lost or duplicated"):
        SkoptBackend(space, log, n_startup=2, resume=True)


def _search_command(out, n_trials, optimizer, *extra):
    return [sys.executable, "-m", "recipe_search.cli", "--method", "psigmoid", "--budget", "50%",
            "--optimizer", optimizer, "--n-trials", str(n_trials), "--n-startup", "2", "--num-samples", "16",
            "--batch-size", "8", "--eval", "none", "--out", str(out), "--cache-dir", str(out.parent / "cache"),
            "--quiet", *extra]


def _trial_states(db):
    """State -> count, read-only (the search owns the file); {} until its tables exist."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return dict(con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
    except sqlite3.OperationalError:  # not created yet, or locked for a moment
        return {}


def _skopt_rows(out):
    logs = list(out.glob("*.skopt.json"))
    try:
        return json.loads(logs[0].read_text()) if logs else []
    except json.JSONDecodeError:
        return []


def _kill_mid_trial(command, out, optimizer, n_trials, log, timeout=240):
    """Start the search and SIGKILL it once a trial finished and another runs; True if one was orphaned."""
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "RECIPE_SEARCH_HEARTBEAT": HEARTBEAT},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if optimizer == "skopt":
                if 1 <= len(_skopt_rows(out)) < n_trials - 2:
                    break  # trials take ~0.5 s and follow each other at once: the kill lands in one
            else:
                states = _trial_states(out / "psigmoid-trials.db")
                if states.get("COMPLETE", 0) >= 1 and states.get("RUNNING", 0) >= 1:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"the search ended or stalled before it could be killed (see {log.name})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    return optimizer == "skopt" or _trial_states(out / "psigmoid-trials.db").get("RUNNING", 0) == 1


@pytest.mark.parametrize("optimizer", ["optuna", "skopt"])
def test_resume_after_kill_9_finishes_exactly_n_trials(tmp_path, optimizer):
    n_trials, out = 8, tmp_path / "out"
    command = _search_command(out, n_trials, optimizer)
    with open(tmp_path / "killed.log", "wb") as log:
        for attempt in range(3):  # the kill must land inside a trial; a miss (the trial just ended) retries
            if _kill_mid_trial(command + (["--resume"] if attempt else []), out, optimizer, n_trials, log):
                break
        else:
            pytest.fail("three kills in a row missed every trial")
    assert not list(out.glob("*-psigmoid-*.json")), "a killed search wrote a recipe"
    done = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RECIPE_SEARCH_HEARTBEAT": HEARTBEAT})
    assert done.returncode == 0, done.stderr[-3000:]
    recipes = list(out.glob("*-psigmoid-*.json"))
    assert [p.name for p in recipes] == ["demo-psigmoid-50pct.json"]
    result = json.loads(recipes[0].read_text())["method"]["result"]
    history = [h["trial"] for h in result["history"]]
    assert result["trials"] == n_trials and len(history) == len(set(history)) == n_trials
    if optimizer == "skopt":
        assert [row["number"] for row in _skopt_rows(out)] == list(range(n_trials)) == history
        return
    import optuna

    storage = f"sqlite:///{out / 'psigmoid-trials.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    trials = study.get_trials()
    complete = {t.number for t in trials if t.state.name == "COMPLETE"}
    assert len(complete) == n_trials and complete == set(history)
    assert not [t for t in trials if t.state.name == "RUNNING"], "an orphaned trial was left running"
    failed = {t.number for t in trials if t.state.name == "FAIL"}
    assert failed, "the orphaned trial was neither failed nor finished"
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    assert not complete & retried, "a trial and its retry both counted"
