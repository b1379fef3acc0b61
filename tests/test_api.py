"""The one-call API: search(model, data, budget) with every accepted input, apply_recipe with a path."""
import subprocess
import sys

import pytest
import torch

import recipe_search
from recipe_search import apply_recipe, save_recipe
from recipe_search.calibration import demo_samples
from recipe_search.calibration.data import DataError


def test_applying_a_recipe_imports_no_search_code():
    code = ("import sys, recipe_search\n"
            "from recipe_search import apply_recipe, load_recipe\n"
            "bad = [m for m in sys.modules if m.startswith(('recipe_search.methods', 'recipe_search.pipeline',"
            " 'recipe_search.api', 'optuna'))]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def demo_records():
    return [{"image": s.image, "prompt": s.prompt, "answer": s.answer} for s in demo_samples("calib", 6).samples]


def _check(recipes, budgets):
    assert [r.budget.value for r in recipes] == budgets
    for recipe in recipes:
        assert recipe.budget.achieved["full"] <= recipe.budget.value
        assert recipe.model.family == "llava"


def test_search_from_paths_and_names(tmp_path):
    recipes = recipe_search.search("demo", "demo", "50%,25%", num_samples=6, cache_dir=tmp_path, progress=False,
                                   n_trials=4, work_dir=tmp_path)
    _check(recipes, [0.5, 0.25])


def test_search_takes_records_samplesets_datasets_and_a_loaded_model(tmp_path, demo_records, random_demo):
    model, processor, _ = random_demo
    fast = {"method": "fitprune"}  # the inputs are the subject here, not the search
    from_records = recipe_search.search(model, demo_records, 0.5, processor=processor, cache_dir=tmp_path,
                                        progress=False, **fast)
    from_set = recipe_search.search(model, demo_samples("calib", 6), ["50%"], processor=processor,
                                    cache_dir=tmp_path, progress=False, **fast)
    _check(from_records, [0.5])
    assert from_set[0].schedule == from_records[0].schedule  # the same samples, however given
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(demo_records)
    from_dataset = recipe_search.search(model, ds, "50%", processor=processor, cache_dir=tmp_path, progress=False,
                                        **fast)
    assert from_dataset[0].schedule == from_records[0].schedule


def test_search_options_and_rules_reach_the_recipe(tmp_path, random_demo, demo_records):
    model, processor, _ = random_demo
    (recipe,) = recipe_search.search(model, demo_records, "50%", processor=processor, method="uniform",
                                     rule="dart", start_layer=1, images="pooled", cache_dir=tmp_path,
                                     progress=False)
    assert recipe.method.name == "uniform" and recipe.selection.rule == "dart"
    assert recipe.selection.images == "pooled" and recipe.schedule.counts[0] == recipe.schedule.visual_tokens


def test_search_refuses_what_it_cannot_use(random_demo, demo_records):
    model, processor, _ = random_demo
    with pytest.raises(ValueError, match="unknown search option 'n_trails'"):
        recipe_search.search(model, demo_records, "50%", processor=processor, n_trails=3)
    with pytest.raises(ValueError, match="^min_cut is read by --method auto, fitprune, gsearch or psigmoid only, "
                                         "not by fastv$"):
        recipe_search.search(model, demo_records, "50%", processor=processor, method="fastv", min_cut=0.2)
    with pytest.raises(ValueError, match="needs its processor"):
        recipe_search.search(model, demo_records, "50%")
    with pytest.raises(DataError, match="record 0: needs 'image' and 'prompt'"):
        recipe_search.search(model, [{"img": 1}], "50%", processor=processor)
    with pytest.raises(DataError, match="not understood"):
        recipe_search.search(model, 42, "50%", processor=processor)


def test_apply_recipe_takes_a_path(tmp_path, random_demo, demo_records):
    model, processor, adapter = random_demo
    (recipe,) = recipe_search.search(model, demo_records, "50%", processor=processor, cache_dir=tmp_path,
                                     progress=False)
    path = save_recipe(recipe, tmp_path / "r.json")
    inputs = adapter.inputs(processor, [demo_records[0]["image"]], [demo_records[0]["prompt"]])
    with apply_recipe(model, path) as by_path:
        a = model(**inputs).logits
    with apply_recipe(model, recipe):
        b = model(**inputs).logits
    assert torch.equal(a, b) and by_path.last_counts == recipe.schedule.counts


def test_search_takes_an_optuna_sampler_instance(tmp_path, random_demo, demo_records):
    """Users pass sampler objects, as optuna intends; the recipe records which one ran."""
    optuna = pytest.importorskip("optuna")
    model, processor, _ = random_demo
    sampler = optuna.samplers.RandomSampler(seed=3)
    (recipe,) = recipe_search.search(model, demo_records, "80%", processor=processor, method="psigmoid",
                                     optimizer=sampler, n_trials=3, n_startup=1, work_dir=tmp_path,
                                     cache_dir=tmp_path, progress=False)
    assert recipe.method.params["optimizer"] == "optuna:RandomSampler"
    assert len(recipe.method.result["history"]) == 3
    storage = f"sqlite:///{tmp_path / 'psigmoid-trials.db'}"  # what optuna-dashboard shows, per trial
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    for trial in trials:
        if trial.user_attrs["feasible"]:
            assert {"counts", "flops_full", "agreement", "rule"} <= set(trial.user_attrs)
            assert trial.user_attrs["rule"] == trial.params["rule"]  # the rule is a BO parameter
    with pytest.raises(ValueError, match="optimizer must be a name"):
        recipe_search.search(model, demo_records, "80%", processor=processor, method="psigmoid", optimizer=42,
                             n_trials=2, work_dir=tmp_path / "b", cache_dir=tmp_path, progress=False)


def test_registries_refuse_duplicates_and_list_names():
    from recipe_search.methods import METHODS, Method, register_method
    from recipe_search.methods.optimizers import OPTIMIZERS
    from recipe_search.runtime.selection import RULES, register

    with pytest.raises(ValueError, match="search method 'fitprune' is already registered"):
        register_method(Method("fitprune", "again", 0))
    with pytest.raises(ValueError, match="optimizer 'skopt' is already registered"):
        OPTIMIZERS.register("skopt", object())
    with pytest.raises(ValueError, match="selection rule 'dart' is already registered"):
        register(RULES["dart"])
    with pytest.raises(ValueError, match="unknown search method .magic.; known: auto, fastv, fitprune, gsearch"):
        METHODS.get("magic")
