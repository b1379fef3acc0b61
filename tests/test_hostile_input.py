"""Hostile input to the command line: one clear line (exit 2) or a healed run, never a traceback."""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from recipe_search.calibration import demo_samples
from recipe_search.cli import main


def _one_line_error(capsys, code, message):
    out = capsys.readouterr()
    assert code == 2, out.err
    assert message in out.err
    assert "Traceback" not in out.err and out.err.count("\n") == 1


def _quick(checkpoint, tmp_path, *extra):
    return ["--model", str(checkpoint), "--method", "fitprune", "--num-samples", "4", "--eval", "none", "--quiet",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra]


@pytest.mark.parametrize("argv,message", [
    (["--budget", ""], "empty budget"),
    (["--start-layer", "-1"], "--start-layer must be 0 or more"),
    (["--num-samples", "1000000000"], "more than 100,000"),
])
def test_bad_values_are_refused_before_work(capsys, tmp_path, argv, message):
    _one_line_error(capsys, main([*argv, "--out", str(tmp_path / "o")]), message)


def test_unwritable_outputs_fail_before_any_work(capsys, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("x")
    _one_line_error(capsys, main(["--out", str(taken)]), "exists and is not a folder")
    _one_line_error(capsys, main(["--out", "/proc/recipe-search-out"]), "cannot write there")
    _one_line_error(capsys, main(["--out", str(tmp_path / "o"), "--plot", "/proc/x/plot.png"]),
                    "--plot /proc/x: cannot write there")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.json"))


def test_unreadable_weights_are_one_line(capsys, tmp_path, random_checkpoint):
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(random_checkpoint / "config.json", only_config)
    _one_line_error(capsys, main(["--model", str(only_config), "--out", str(tmp_path / "o")]), "cannot load its weights")
    truncated = tmp_path / "truncated"
    shutil.copytree(random_checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _one_line_error(capsys, main(["--model", str(truncated), "--out", str(tmp_path / "o")]), "cannot load its weights")


def test_decompression_bomb_is_refused(capsys, tmp_path):
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # tiny file, 400 M pixels claimed
    (tmp_path / "c.jsonl").write_text('{"image": "bomb.png", "prompt": "what colour is the circle ?"}\n')
    _one_line_error(capsys, main(["--calib", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o")]),
                    "too large to decode safely")


def test_prompt_longer_than_the_context_is_refused(capsys, tmp_path, random_checkpoint):
    demo_samples("calib", 1).samples[0].image.save(tmp_path / "a.png")
    words = " ".join(["circle"] * 5000)
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "prompt": words}) + "\n")
    _one_line_error(capsys, main(_quick(random_checkpoint, tmp_path, "--calib", str(tmp_path / "c.jsonl"))),
                    "longer than the model's context of 512 tokens")


def _entry(tmp_path) -> Path:
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    return entry


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip", "meta-list", "meta-missing"])
def test_damaged_cache_entry_heals(capsys, tmp_path, random_checkpoint, damage):
    argv = _quick(random_checkpoint, tmp_path)
    assert main(argv) == 0
    entry = _entry(tmp_path)
    npz, meta = entry / "stats.npz", entry / "meta.json"
    data = npz.read_bytes()
    if damage == "truncate":
        npz.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        npz.write_bytes(b"")
    elif damage == "flip":
        middle = len(data) // 2
        npz.write_bytes(data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:])
    elif damage == "meta-list":
        meta.write_text("[]")
    else:
        meta.unlink()
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "was damaged" in out and "recomputed" in out and "statistics from cache" not in out
    assert main(argv) == 0  # the entry was replaced: now it is served
    assert "statistics from cache" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["file", "proc"])
def test_unusable_cache_folder_costs_only_the_cache(capsys, tmp_path, random_checkpoint, where):
    if where == "file":
        cache = tmp_path / "cache-file"
        cache.write_text("not a folder")
    else:
        cache = Path("/proc/recipe-search-cache")
    argv = _quick(random_checkpoint, tmp_path)
    argv[argv.index("--cache-dir") + 1] = str(cache)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"cache folder {cache} is not usable" in out and "statistics not cached" in out
    assert list((tmp_path / "out").glob("*.json"))
