"""G-Search and P-Sigmoid: scorer exactness, budgets, floor bisection, backends, resume and workers."""
import pytest
import torch

from recipe_search.budget import parse_budget
from recipe_search.calibration import demo_samples
from recipe_search.flops import CostModel
from recipe_search.pipeline import LoadedModel, SearchOptions, run_workers, search_recipes, study_name
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule
from recipe_search.search import gsearch, psigmoid
from recipe_search.search.objective import ScheduleScorer
from recipe_search.search.optimizers import OptimizerError, OptunaBackend, default_storage, make_backend


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
    cached = scorer._logits(0, scorer.batches[0], counts)
    assert scorer.layers_run - before < 8  # resumed after the shared prefix
    chunk = search_set.samples[:6]
    inputs = loaded.adapter.build_inputs(loaded.processor, [s.image for s in chunk], [s.prompt for s in chunk])
    with torch.no_grad(), PruningHandle(loaded.model, PruningPlan(counts, 144, make_rule("attention"), "previous")):
        direct = loaded.model(**inputs, use_cache=False).logits[:, -1]
    assert (cached - direct).abs().max().item() <= 1e-5


def test_gsearch_keeps_its_tolerance(scorer, costs):
    result = gsearch.search_gsearch(scorer, costs, start_layer=2, tolerance=0.0)
    counts = result.counts
    assert counts[:2] == (144, 144)
    assert all(a >= b for a, b in zip(counts, counts[1:]))
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
        assert recipe.selection.rule == "attention" and recipe.selection.score_layer == "previous"
        assert len(recipe.method.result["kendall_tau"]) == 8


def _run(loaded, search_set, costs, tmp_path, n_trials, resume):
    scorer = ScheduleScorer(loaded, search_set, make_rule("attention"), "previous", batch_size=6)
    backend = make_backend("optuna", psigmoid.search_space(8, 2), storage=default_storage(tmp_path, "t"),
                           study_name="s", log_path=tmp_path / "s.json", n_startup=2, seed=0, resume=resume)
    return psigmoid.PSigmoidRun(scorer, parse_budget("80%"), costs, backend, 2, n_trials)


def test_interrupted_run_resumes_with_every_finished_trial(loaded, search_set, costs, tmp_path):
    run = _run(loaded, search_set, costs, tmp_path, 6, resume=False)
    calls = {"n": 0}
    real = run.scorer.evaluate

    def flaky(counts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(counts)

    run.scorer.evaluate = flaky
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
    name = study_name(loaded, search_set, budget, options, 2)
    storage = default_storage(tmp_path, "psigmoid-trials")
    OptunaBackend(psigmoid.search_space(8, 2), storage, name)  # the study the workers join
    run_workers(str(demo_checkpoint()), loaded, search_set, budget, costs, options, 2)
    backend = OptunaBackend(psigmoid.search_space(8, 2), storage, name, resume=True)
    done = backend.finished()
    assert len(done) == 6
    assert {t.attrs["worker"] for t in done} == {"worker-0", "worker-1"}


def test_psigmoid_starts_earlier_only_when_the_budget_needs_it(loaded, search_set, tmp_path):
    from recipe_search.search import InfeasibleBudgetError

    options = SearchOptions(n_trials=3, n_startup=2, work_dir=tmp_path, batch_size=6)
    outcome = search_recipes(loaded, search_set, [parse_budget("50%"), parse_budget("25%")], method="psigmoid",
                             options=options, cache_dir=tmp_path / "cache", progress=False)
    assert [r.method.params["start_layer"] for r in outcome.recipes] == [2, 1]
    assert outcome.recipes[1].schedule.counts[0] == 144 and outcome.recipes[1].budget.achieved["full"] <= 0.25
    with pytest.raises(InfeasibleBudgetError, match="pruning from layer 2 on"):
        search_recipes(loaded, search_set, [parse_budget("25%")], method="psigmoid",
                       options=SearchOptions(start_layer=2, n_trials=3, work_dir=tmp_path / "b"),
                       cache_dir=tmp_path / "cache", progress=False)
