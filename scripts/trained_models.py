"""The trained models the quality scripts measure: "demo", a folder written by
scripts/train_second_model.py (a checkpoint plus calib.jsonl and eval.jsonl), or one written by
scripts/train_demo_model.py --out (e.g. --layers 24): a model of the demo world, measured on its data."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_model_options(parser: argparse.ArgumentParser, calib_samples: int) -> None:
    """The options every quality script shares: which model, budgets, sample counts, threads."""
    parser.add_argument("--model", default="demo",
                        help="'demo', a scripts/train_second_model.py folder or a scripts/train_demo_model.py one")
    parser.add_argument("--budgets", default="50%,25%,12.5%")
    parser.add_argument("--calib-samples", type=int, default=calib_samples)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RECIPE_SEARCH_THREADS", "1")))


def data_for(spec: str, calib_n: int, eval_n: int) -> tuple[Any, Any]:
    """(calibration samples, held-out samples with answers) of the model `spec`."""
    from recipe_search.calibration import load_samples

    if spec == "demo" or demo_world(spec):
        return load_samples("demo", calib_n, split="calib"), load_samples("demo", eval_n, split="eval")
    folder = Path(spec).expanduser()
    if not (folder / "calib.jsonl").is_file():
        raise SystemExit(f"{spec}: no calib.jsonl, and not a demo-world model (its tokenizer is not the demo's)")
    return (load_samples(str(folder / "calib.jsonl"), calib_n, split="calib"),
            load_samples(str(folder / "eval.jsonl"), eval_n, split="eval"))


def demo_world(spec: str) -> bool:
    """Whether `spec` is a folder from scripts/train_demo_model.py: the demo's tokenizer, no data of its own."""
    from recipe_search.demo import demo_checkpoint

    folder = Path(spec).expanduser()
    tokenizer = folder / "tokenizer.json"
    return (not (folder / "calib.jsonl").exists() and tokenizer.is_file()
            and tokenizer.read_bytes() == (Path(demo_checkpoint()) / "tokenizer.json").read_bytes())


def model_and_data(spec: str, calib_n: int, eval_n: int) -> tuple[Any, Any, Any]:
    """(loaded model, calibration samples, held-out samples) of the model `spec`."""
    from recipe_search.api import load

    loaded = load("demo" if spec == "demo" else str(Path(spec).expanduser()))
    return (loaded, *data_for(spec, calib_n, eval_n))
