"""The default search (methods/auto.py): candidates, validation pick, time bound, rules inside the BO."""
from collections import Counter

import pytest

from recipe_search.budget import parse_budget
from recipe_search.calibration import DataError, demo_samples
from recipe_search.demo.world import QUESTION_TYPES
from recipe_search.flops import CostModel
from recipe_search.methods import METHODS, auto, psigmoid, search_fitprune
from recipe_search.methods.cuts import MIN_CUT
from recipe_search.methods.objective import Evaluation, ScheduleScorer, merit_keys
from recipe_search.methods.optimizers import (
    OptunaBackend,
    SkoptBackend,
    default_storage,
)
from recipe_search.pipeline import LoadedModel, SearchOptions, search_recipes
from recipe_search.runtime import make_rule
from recipe_search.runtime.apply import plan_from_recipe
from recipe_search.runtime.selection import RULES


@pytest.fixture(scope="module")
def loaded():
    from recipe_search.demo import demo_checkpoint
    from recipe_search.models.loading import load_model

    model, processor, adapter = load_model(demo_checkpoint())
    return LoadedModel(model, processor, adapter, "demo")


@pytest.fixture(scope="module")
def costs(loaded):
    return CostModel(loaded.adapter.dims(), 144, (12,) * 12)


@pytest.fixture(scope="module")
def searched(loaded, tmp_path_factory):
    """One default search at two budgets on 16 demo samples (4 search, 12 validation: auto's split)."""
    tmp = tmp_path_factory.mktemp("auto")
    options = SearchOptions(n_trials=6, n_startup=3, work_dir=tmp, batch_size=8)
    data = demo_samples("calib", 16)
    return data, search_recipes(loaded, data, [parse_budget("50%"), parse_budget("25%")], method="auto",
                                options=options, cache_dir=tmp / "cache", progress=False)


def test_split_keeps_every_question_type_in_both_parts():
    """The demo's samples cycle through four question types: taking every other sample would put colour
    and existence questions in one part and count and shape in the other."""
    data = demo_samples("calib", 128)
    for share, sizes in ((0.5, (64, 64)), (0.25, (96, 32)), (0.75, (32, 96))):
        search, validation = data.split(share)
        assert (len(search), len(validation)) == sizes
        assert {id(s) for s in search.samples}.isdisjoint(id(s) for s in validation.samples)
        for part in (search, validation):
            assert Counter(s.qtype for s in part.samples) == {t: len(part) // 4 for t in QUESTION_TYPES}
            order = [data.samples.index(s) for s in part.samples]
            assert order == sorted(order)
    assert data.split(0.5) == data.split(0.5)  # seeded
    assert [len(p) for p in demo_samples("calib", 2).split(0.1)] == [1, 1]
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(DataError, match="validation share must be between 0 and 1"):
            data.split(bad)


@pytest.mark.parametrize("budget", ["50%", "25%", "12.5%", "64tok"])
def test_scaled_curve_is_the_largest_scale_within_budget(costs, budget):
    b = parse_budget(budget)
    shape = (144, 144, 144, 133, 122, 122, 122, 2)
    got = auto.scaled_schedule(shape, 144, b, costs)
    assert got is not None and b.is_met(got, costs)
    assert list(got) == sorted(got, reverse=True)
    bigger = tuple(min(144, c + 1) if c < 144 else c for c in got)
    assert bigger == got or not b.is_met(bigger, costs) or got[0] == 144


@pytest.mark.parametrize("text_tokens", [(12,) * 12, (5, 40, 17)])
def test_an_infeasible_budget_names_the_smallest_one_that_is_met(costs, text_tokens):
    """The named smallest budget must itself pass, and a tenth of a point less must not: a user who
    retries with the number the error gives gets a recipe."""
    import re

    from recipe_search.methods import InfeasibleBudgetError

    model = CostModel(costs.dims, 144, text_tokens)
    layers = costs.dims.num_layers
    with pytest.raises(InfeasibleBudgetError) as err:
        auto.check_feasible(parse_budget("1%"), model, layers)
    message = str(err.value)
    assert "\n" not in message and message.startswith("budget 1% cannot be met: the text tokens alone cost")
    smallest = float(re.search(r"smallest budget these prompts can meet is ([0-9.]+)%", message).group(1))
    auto.check_feasible(parse_budget(f"{smallest:g}%"), model, layers)
    with pytest.raises(InfeasibleBudgetError):
        auto.check_feasible(parse_budget(f"{smallest - 0.1:.1f}%"), model, layers)
    auto.check_feasible(parse_budget("1tok"), model, layers)  # no visual token at all is always a mean of 0


def test_fixed_schedules_meet_the_budget_and_differ(loaded, searched, costs):
    _, outcome = searched
    for budget in ("50%", "25%", "12.5%"):
        b = parse_budget(budget)
        made = auto.fixed_schedules(outcome.stats, b, outcome.costs, (144, 144, 144, 133, 122, 122, 122, 2))
        assert made and all(b.is_met(c, outcome.costs) for _, c in made)
        assert len({c for _, c in made}) == len(made)
        assert any(name == "fitprune" for name, _ in made)
        fit = dict(made)["fitprune"]
        published = dict(auto.fixed_schedules(outcome.stats, b, outcome.costs, None, min_cut=0.0))["fitprune"]
        assert fit == search_fitprune(outcome.stats, b, outcome.costs, min_cut=MIN_CUT).counts
        assert published == search_fitprune(outcome.stats, b, outcome.costs, min_cut=0.0).counts
    assert all(r.method.params["min_cut"] == MIN_CUT for r in outcome.recipes)  # recorded with the winner


def test_winner_is_the_best_validated_candidate_and_recorded(loaded, searched):
    _, outcome = searched
    for recipe in outcome.recipes:
        assert recipe.method.name == "auto"
        # auto picks on three quarters of its samples (G-Search and P-Sigmoid on half: test_gsearch_...)
        assert recipe.method.params["validation_samples"] == 12 and recipe.calibration.num_samples == 16
        result = recipe.method.result
        rows = [result["winner"], *result["runners_up"]]
        assert len(rows) >= 2
        evals = [Evaluation(r["validation_value"], r["validation_agreement"], r["validation_kl"], None) for r in rows]
        keys = merit_keys(evals, recipe.method.params["validation_samples"])
        assert keys[0] == min(keys)  # the best validation score, statistical ties to the lower KL
        assert recipe.budget.achieved["full"] <= recipe.budget.value + 1e-9
        assert result["candidates_scored"] >= len(rows)
        assert len(result["winner"]["counts"]) == 8
        assert "random" not in {r["rule"] for r in rows}  # the baseline is never a candidate


def test_recorded_validation_score_is_what_the_recipe_does(loaded, searched):
    """Re-score the written recipe on the validation samples: the runtime plan built from the JSON
    gives exactly the agreement the search recorded for its winner."""
    data, outcome = searched
    _, validation = data.split(METHODS.get("auto").validation_share)
    scorer = ScheduleScorer(loaded, validation, make_rule("attention"), "previous", batch_size=8,
                            metric=outcome.recipes[0].method.params["metric"])
    for recipe in outcome.recipes:
        ev = scorer.evaluate_plan(plan_from_recipe(recipe))
        assert ev.agreement == pytest.approx(recipe.method.result["validation_agreement"])
        assert ev.value == pytest.approx(recipe.method.result["validation_value"])


def test_an_exhausted_time_budget_still_writes_the_first_candidate(loaded, tmp_path):
    options = SearchOptions(n_trials=6, n_startup=3, work_dir=tmp_path, batch_size=8, time_budget=1e-6)
    outcome = search_recipes(loaded, demo_samples("calib", 8), [parse_budget("50%")], method="auto",
                             options=options, cache_dir=tmp_path / "cache", progress=False)
    (recipe,) = outcome.recipes
    assert recipe.method.result["candidates_scored"] == 1
    assert recipe.method.result["winner"]["schedule"] == "fitprune"
    assert recipe.selection.rule == "fitprune"


def test_one_rule_limits_every_candidate(loaded, tmp_path):
    options = SearchOptions(n_trials=4, n_startup=2, work_dir=tmp_path, batch_size=8)
    outcome = search_recipes(loaded, demo_samples("calib", 8), [parse_budget("50%")], method="auto",
                             options=options, cache_dir=tmp_path / "cache", progress=False, rule="dart")
    result = outcome.recipes[0].method.result
    assert {r["rule"] for r in [result["winner"], *result["runners_up"]]} == {"dart"}
    assert outcome.recipes[0].selection.rule == "dart"


def test_psigmoid_searches_the_rule_and_start_layer(loaded, costs, tmp_path):
    """The rule and the start layer are categorical BO parameters; the recipe takes the best trial's."""
    scorer = ScheduleScorer(loaded, demo_samples("calib", 8), make_rule("attention"), "previous", batch_size=8)
    rules, starts = ("fitprune", "attention-text", "freepruner"), (0, 1, 2)
    backend = OptunaBackend(psigmoid.search_space(8, 2, rules, starts), default_storage(tmp_path, "t"), "s",
                            n_startup=8, seed=3)
    run = psigmoid.PSigmoidRun(scorer, parse_budget("50%"), costs, backend, 2, 8)
    run.run()
    done = backend.finished()
    assert len({t.params["rule"] for t in done}) > 1 and len({t.params["start"] for t in done}) > 1
    for t in done:
        if t.attrs["feasible"]:
            plan = scorer.rule_plan(t.attrs["counts"], t.params["rule"])
            assert scorer.evaluate_plan(plan).objective == pytest.approx(t.value)
            assert (plan.vision is not None) == (t.params["rule"] == "freepruner")
    best = psigmoid.best_result(run, 0.0, {})
    top = max((t for t in done if t.attrs["feasible"]), key=lambda t: (t.value, -t.attrs["flops_full"]))
    assert best.result["rule"] == top.params["rule"] and best.params["start_layer"] == top.params["start"]
    for t in done:  # a variant's trial becomes a registered rule with the variant's parameters
        if t.attrs["feasible"] and t.params["rule"] == "attention-text":
            assert t.attrs["rule_base"] == "attention" and t.attrs["rule_params"]["query"] == "text"
    assert best.rule in RULES.names() and make_rule(best.rule, best.rule_params).params() == best.rule_params


def test_skopt_keeps_categorical_parameters_across_a_resume(tmp_path):
    space = psigmoid.search_space(8, 2, ("fitprune", "dart"), (0, 1, 2))
    log = tmp_path / "s.skopt.json"
    first = SkoptBackend(space, log, n_startup=2, seed=0)
    for value in (0.3, 0.6):
        trial = first.ask()
        assert trial.params["rule"] in ("fitprune", "dart") and trial.params["start"] in (0, 1, 2)
        first.tell(trial, value, {})
    first.close()
    again = SkoptBackend(space, log, n_startup=2, seed=0, resume=True)
    assert [t.params for t in again.finished()] == [t.params for t in first.finished()]
    assert again.ask().params["rule"] in ("fitprune", "dart")
    again.close()


def test_gsearch_runs_per_rule_and_checks_the_validation_part(loaded, tmp_path):
    options = SearchOptions(work_dir=tmp_path, batch_size=8)
    outcome = search_recipes(loaded, demo_samples("calib", 16), [], method="gsearch", options=options,
                             cache_dir=tmp_path / "cache", progress=False, rule="dart")
    (recipe,) = outcome.recipes
    result = recipe.method.result
    assert recipe.selection.rule == "dart" and recipe.selection.score_layer == "same"
    assert result["validation_samples"] == 8 and result["validation_value"] == 1.0  # both halves kept every answer
    assert result["value"] == 1.0 and recipe.calibration.num_samples == 16  # statistics: every sample


def test_scores_the_samples_cannot_tell_apart_go_to_the_lower_kl():
    """On 64 samples a best score of 0.953 is within 1.96 standard errors (0.052) of 0.922: a tie that
    the KL decides; 0.875 is not, whatever its KL."""
    best, close, far = (Evaluation(v, v, kl, v) for v, kl in ((0.953, 0.096), (0.922, 0.078), (0.875, 0.001)))
    keys = merit_keys([best, close, far], 64)
    assert sorted(range(3), key=keys.__getitem__) == [1, 0, 2]
    keys = merit_keys([best, close, far], 1000)  # a thousand samples tell 0.953 from 0.922
    assert sorted(range(3), key=keys.__getitem__) == [0, 1, 2]
    perfect = merit_keys([Evaluation(1.0, 1.0, 0.5, 1.0), Evaluation(63 / 64, 1.0, 0.1, 1.0)], 64)
    assert perfect[1] < perfect[0]  # at least one answer of slack, even at a perfect score
