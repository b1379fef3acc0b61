"""`--rule` for the main search and the `compare` subcommand, end to end on the random demo model."""
import pytest

from recipe_search import load_recipe
from recipe_search.cli import main
from recipe_search.compare import pareto_front


def _common(folder, tmp_path):
    return ["--model", str(folder), "--num-samples", "4", "--eval", "demo", "--eval-samples", "8",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]


@pytest.mark.parametrize("method,rule,budget", [("fitprune", "ficoco-l", "25%"), ("uniform", "freepruner", "25%"),
                                                    ("fastv", "dart", "60%")])
def test_rule_overrides_the_rule_and_is_recorded(random_checkpoint, tmp_path, capsys, method, rule, budget):
    argv = ["--budget", budget, "--method", method, "--rule", rule, "--out", str(tmp_path / "out")]
    assert main(argv + _common(random_checkpoint, tmp_path)) == 0
    out = capsys.readouterr().out
    (path,) = (tmp_path / "out").glob("*.json")
    recipe = load_recipe(path)
    assert rule in path.name and recipe.method.name == method
    if rule == "freepruner":
        assert recipe.vision.rule == "freepruner" and recipe.schedule.counts[0] < 144
        assert "pre-LLM stage: freepruner keeps" in out and "vision encoder FLOPs" in out
    else:
        assert recipe.selection.rule == rule and recipe.selection.score_layer == "same"
    assert recipe.method.result["searched_with_rule"] in ("fitprune", "attention")
    assert "held-out accuracy" in out


def test_compare_runs_rules_by_budgets(random_checkpoint, tmp_path, capsys):
    png = tmp_path / "pareto.png"
    argv = ["compare", "--budget", "50%,25%", "--rules", "attention,ficoco-l,dart,ficoco-v,freepruner",
            "--plot", str(png)]
    assert main(argv + _common(random_checkpoint, tmp_path)) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| uniform | ")]
    assert len(rows) == 10 and "| - | - | unpruned |" in out
    assert sum("pre-LLM" in r for r in rows) == 4
    assert png.stat().st_size > 1000


def test_compare_rejects_unknown_rule(capsys):
    assert main(["compare", "--rules", "attention,best"]) == 2
    err = capsys.readouterr().err
    assert "unknown selection rule 'best'" in err and err.count("\n") == 1


def test_pareto_front():
    points = [(0.5, 0.6), (0.3, 0.7), (0.3, 0.5), (0.8, 0.65), (1.0, 0.9)]
    assert pareto_front(points) == [(0.3, 0.7), (1.0, 0.9)]
