"""One measure() for the CLI, compare and the benchmarks: the same figures however it is called."""
import pytest

from recipe_search import save_recipe
from recipe_search.calibration import demo_samples
from recipe_search.eval import accuracy, greedy_answers
from recipe_search.measure import measure
from recipe_search.runtime.apply import plan_from_recipe


@pytest.fixture(scope="module")
def recipe(random_demo, tmp_path_factory):
    import recipe_search

    model, processor, _ = random_demo
    (found,) = recipe_search.search(model, demo_samples("calib", 6), "25%", processor=processor, method="fitprune",
                                    cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    return found


def test_measure_takes_a_recipe_a_path_or_a_plan_alike(random_demo, recipe, tmp_path):
    model, processor, adapter = random_demo
    held_out = demo_samples("eval", 12)
    base = measure(model, None, held_out, processor=processor)
    by_recipe = measure(model, recipe, held_out, processor=processor, reference=base)
    by_path = measure(model, save_recipe(recipe, tmp_path / "r.json"), held_out, processor=processor, reference=base)
    by_plan = measure(model, plan_from_recipe(recipe), held_out, processor=processor, reference=base)
    assert by_recipe == by_path == by_plan
    direct = greedy_answers(model, processor, adapter, held_out, plan_from_recipe(recipe))
    assert list(by_recipe.answers) == direct and by_recipe.accuracy == accuracy(direct, held_out)
    assert by_recipe.agreement == sum(a == b for a, b in zip(direct, base.answers)) / len(direct)
    assert base.agreement is None and by_recipe.prefill_seconds is None  # no timing asked


def test_measure_times_prefill_only_when_asked(random_demo, recipe):
    model, processor, _ = random_demo
    got = measure(model, recipe, None, processor=processor, timing=demo_samples("eval", 2))
    assert got.prefill_seconds > 0 and got.accuracy is None and got.answers == ()


def test_timing_can_be_turned_off(random_checkpoint, tmp_path, capsys):
    from recipe_search.cli import main

    argv = ["--model", str(random_checkpoint), "--method", "fitprune", "--num-samples", "4", "--eval", "demo", "--eval-samples", "8",
            "--quiet", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    assert main(argv + ["--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "prefill wall-clock" not in out
    assert main(argv) == 0
    assert "prefill wall-clock" in capsys.readouterr().out


def test_kv_cache_bytes_follow_the_schedule(random_demo, recipe):
    """The cache a pruned prefill leaves holds, per layer, the tokens that entered it: keys and values
    of (text + kept visual) tokens x kv heads x head dim x 2 x 4 bytes."""
    model, processor, adapter = random_demo
    timing = demo_samples("eval", 2)
    base = measure(model, None, None, processor=processor, timing=timing)
    pruned = measure(model, recipe, None, processor=processor, timing=timing)
    inputs = adapter.inputs(processor, [s.image for s in timing.samples], [s.prompt for s in timing.samples])
    dims, width = adapter.dims(), inputs["input_ids"].shape[1]
    n = recipe.schedule.visual_tokens
    per_token = 2 * dims.num_kv_heads * dims.head_dim * 4 * len(timing)
    assert base.kv_cache_bytes == per_token * width * dims.num_layers
    assert pruned.kv_cache_bytes == per_token * sum(width - n + c for c in recipe.schedule.counts)
    assert base.peak_bytes is not None and pruned.peak_bytes is not None
