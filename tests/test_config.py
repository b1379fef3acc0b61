"""YAML configs: every option a key, flags win, the resolved options reproduce a run."""
import json

import pytest
import yaml

from recipe_search.cli import main


def _one_line_error(capsys, code, message):
    out = capsys.readouterr()
    assert code == 2, out.err
    assert message in out.err and "Traceback" not in out.err and out.err.count("\n") == 1


def _comparable(path):
    data = json.loads(path.read_text())
    data.pop("created")
    data["method"]["result"].pop("search_seconds")
    return data


def test_resolved_config_reproduces_the_run(tmp_path, capsys, random_checkpoint):
    first = tmp_path / "first"
    argv = ["--model", str(random_checkpoint), "--budget", "50%,25%", "--method", "uniform", "--num-samples", "4",
            "--eval", "none", "--quiet", "--out", str(first), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    config = first / "search.yaml"
    resolved = yaml.safe_load(config.read_text())
    assert resolved["budget"] == "50%,25%" and resolved["method"] == "uniform" and resolved["num-samples"] == 4
    assert "search.yaml" in capsys.readouterr().out
    second = tmp_path / "second"
    assert main(["--config", str(config), "--out", str(second)]) == 0  # a flag wins over the file
    names = sorted(p.name for p in first.glob("*.json"))
    assert names == sorted(p.name for p in second.glob("*.json")) and len(names) == 2
    for name in names:
        assert _comparable(first / name) == _comparable(second / name)


def test_print_config_shows_defaults_and_file_values(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("budget: 25%\nnum_samples: 8\n")
    assert main(["--print-config"]) == 0
    defaults = yaml.safe_load(capsys.readouterr().out)
    assert defaults["budget"] is None and defaults["method"] == "auto" and defaults["num-samples"] is None
    assert main(["--config", str(config), "--num-samples", "16", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["budget"] == "25%" and resolved["num-samples"] == 16


@pytest.mark.parametrize("text,message", [
    ("budgett: 50%\n", "unknown key 'budgett'"),
    ("num-samples: many\n", "num-samples must be an integer, not 'many'"),
    ("method: magic\n", "method must be one of auto, fitprune"),
    ("quiet: 3\n", "quiet must be true or false"),
    ("- budget\n", "expected a mapping"),
    ("budget: [50%\n", "not YAML"),
    ("!!python/object/apply:os.system [echo hi]\n", "not YAML"),  # safe_load refuses object tags
])
def test_bad_config_is_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    _one_line_error(capsys, main(["--config", str(config)]), message)


def test_missing_config_file_is_one_line(tmp_path, capsys):
    _one_line_error(capsys, main(["--config", str(tmp_path / "none.yaml")]), "cannot read")
