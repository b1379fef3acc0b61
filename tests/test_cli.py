import copy
import json
import subprocess
import sys

import pytest
import torch

from recipe_search import load_recipe
from recipe_search.cli import main


def _one_line_error(capsys, code, message):
    out = capsys.readouterr()
    assert code == 2
    assert message in out.err
    assert "Traceback" not in out.err and out.err.count("\n") == 1


@pytest.mark.parametrize("argv,message", [
    (["--budget", "150%"], "budget '150%' is out of range"),
    (["--budget", "lots"], "budget 'lots' is not understood"),
    (["--model", "/no/such/model"], "model '/no/such/model' not found locally: no such folder"),
    (["--num-samples", "0"], "must be positive"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    _one_line_error(capsys, main(argv), message)


def test_plot_of_malformed_recipe(tmp_path, capsys):
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    _one_line_error(capsys, main(["plot", str(bad)]), "malformed JSON at line 1")


def test_help_teaches():
    out = subprocess.run([sys.executable, "-m", "recipe_search.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for needle in ("--budget", "64tok", "examples:", "full sequence", "plot RECIPE"):
        assert needle in out.stdout


def test_search_end_to_end_and_cache(random_checkpoint, tmp_path, capsys):
    argv = ["--model", str(random_checkpoint), "--budget", "50%,25%", "--num-samples", "8", "--n-trials", "6", "--eval", "demo",
            "--eval-samples", "16", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    recipes = sorted((tmp_path / "out").glob("*.json"))
    assert [p.name for p in recipes] == ["ckpt0-auto-25pct.json", "ckpt0-auto-50pct.json"]  # the default search
    for path, budget in zip(recipes, (0.25, 0.5)):
        recipe = load_recipe(path)
        assert recipe.budget.achieved["full"] <= budget
        assert "pruned" in out and f"{recipe.budget.achieved['full']:.1%}" in out
    assert (tmp_path / "out" / "ckpt0-auto-retention.png").stat().st_size > 1000
    assert "winner of" in out and "valid. agree" in out  # the runners-up table
    assert "held-out accuracy (demo:eval, 16 q)" in out and "prefill wall-clock" in out
    assert "statistics computed and cached" in out
    assert main(argv + ["--eval", "none"]) == 0
    out = capsys.readouterr().out
    assert "statistics from cache" in out and "held-out accuracy" not in out
    png = tmp_path / "both.png"
    assert main(["plot", *map(str, recipes), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert json.loads(recipes[0].read_text())["format"] == "recipe-search/recipe"


def test_eval_existing_recipe_checks_checkpoint(random_checkpoint, random_demo, tmp_path, capsys):
    common = ["--eval", "demo", "--eval-samples", "8", "--quiet"]
    assert main(["--model", str(random_checkpoint), "--budget", "25%", "--method", "fitprune", "--num-samples", "4", "--out", str(tmp_path),
                 "--cache-dir", str(tmp_path / "cache"), *common]) == 0
    recipe = next(tmp_path.glob("*.json"))
    capsys.readouterr()
    assert main(["eval", str(recipe), "--model", str(random_checkpoint), *common]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy (demo:eval, 8 q)" in out and "budget 25%" in out

    other = tmp_path / "other"
    model, processor, _ = random_demo
    tuned = copy.deepcopy(model)  # "a fine-tune": same architecture, other weights
    with torch.no_grad():
        tuned.get_decoder().layers[0].self_attn.q_proj.weight.add_(0.01)
    tuned.save_pretrained(other)
    processor.save_pretrained(other)
    _one_line_error(capsys, main(["eval", str(recipe), "--model", str(other), *common]), "allow-other-checkpoint")
    assert main(["eval", str(recipe), "--model", str(other), "--allow-other-checkpoint", *common]) == 0


def test_interrupt_writes_nothing(random_checkpoint, tmp_path, capsys, monkeypatch):
    import recipe_search.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "calibrate", interrupted)
    code = main(["--model", str(random_checkpoint), "--eval", "none", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.json"))


def test_infeasible_budget_is_refused_before_any_evaluation(random_checkpoint, tmp_path, capsys, monkeypatch):
    """The held-out evaluation of the unpruned model can take minutes on a large model: a budget the text
    tokens alone exceed must be refused from the calibration's costs, before that evaluation runs."""
    import recipe_search.measure as measure_module

    measured = []
    monkeypatch.setattr(measure_module, "measure", lambda *a, **k: measured.append(a) or pytest.fail("evaluated"))
    code = main(["--model", str(random_checkpoint), "--budget", "1%", "--num-samples", "4", "--eval", "demo",
                 "--eval-samples", "8", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                 "--quiet"])
    _one_line_error(capsys, code, "budget 1% cannot be met: the text tokens alone cost")
    assert measured == []


def test_merge_threshold_goes_into_any_methods_recipes(random_checkpoint, tmp_path, capsys):
    common = ["--model", str(random_checkpoint), "--budget", "25%", "--method", "fitprune", "--num-samples", "4",
              "--cache-dir", str(tmp_path / "cache"), "--eval", "none", "--no-timing", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert load_recipe(next((tmp_path / "plain").glob("*.json"))).selection.merge_threshold is None
    assert main([*common, "--out", str(tmp_path / "merged"), "--merge-threshold", "0.8"]) == 0
    assert load_recipe(next((tmp_path / "merged").glob("*.json"))).selection.merge_threshold == 0.8
    capsys.readouterr()
    _one_line_error(capsys, main([*common, "--out", str(tmp_path / "x"), "--rule", "ficoco-l", "--merge-threshold",
                                  "0.8"]), "--merge-threshold: rule 'ficoco-l' merges by its own weights")
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error: usage, then the one line naming it
        main([*common, "--merge-threshold", "1.5"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].endswith("--merge-threshold: expected a cosine similarity in (0, 1] or 'off', got '1.5'")


def test_min_cut_reaches_fitprune_and_is_refused_elsewhere(random_checkpoint, tmp_path, capsys):
    common = ["--model", str(random_checkpoint), "--budget", "25%", "--num-samples", "4",
              "--cache-dir", str(tmp_path / "cache"), "--eval", "none", "--no-timing", "--quiet"]
    for value, folder in ((None, "default"), ("0", "published"), ("0.5", "coarse")):
        extra = [] if value is None else ["--min-cut", value]
        assert main([*common, "--method", "fitprune", "--out", str(tmp_path / folder), *extra]) == 0
    recipes = {f: load_recipe(next((tmp_path / f).glob("*.json"))) for f in ("default", "published", "coarse")}
    assert [recipes[f].method.params["min_cut"] for f in recipes] == [0.1, 0.0, 0.5]
    coarse = recipes["coarse"].schedule.counts
    before = (recipes["coarse"].schedule.visual_tokens, *coarse[:-1])
    assert all(b - c >= 0.5 * b for b, c in zip(before, coarse) if c < b)
    capsys.readouterr()
    _one_line_error(capsys, main([*common, "--method", "uniform", "--min-cut", "0.2", "--out", str(tmp_path / "u")]),
                    "--min-cut is read by --method auto, fitprune, gsearch or psigmoid only, not by uniform")
    with pytest.raises(SystemExit) as exc:
        main([*common, "--min-cut", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].endswith("--min-cut: expected a share of the live tokens in [0, 1), e.g. 0.1, not '1'")
