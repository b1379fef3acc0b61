"""The trained models the quality scripts measure: "demo", or a folder written by
scripts/train_second_model.py (a checkpoint plus calib.jsonl and eval.jsonl)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_model_options(parser: argparse.ArgumentParser, calib_samples: int) -> None:
    """The options every quality script shares: which model, budgets, sample counts, threads."""
    parser.add_argument("--model", default="demo", help="'demo' or a scripts/train_second_model.py folder")
    parser.add_argument("--budgets", default="50%,25%,12.5%")
    parser.add_argument("--calib-samples", type=int, default=calib_samples)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RECIPE_SEARCH_THREADS", "1")))


def data_for(spec: str, calib_n: int, eval_n: int) -> tuple[Any, Any]:
    """(calibration samples, held-out samples with answers) of the model `spec`."""
    from recipe_search.calibration import load_samples

    if spec == "demo":
        return load_samples("demo", calib_n, split="calib"), load_samples("demo", eval_n, split="eval")
    folder = Path(spec).expanduser()
    return (load_samples(str(folder / "calib.jsonl"), calib_n, split="calib"),
            load_samples(str(folder / "eval.jsonl"), eval_n, split="eval"))


def model_and_data(spec: str, calib_n: int, eval_n: int) -> tuple[Any, Any, Any]:
    """(loaded model, calibration samples, held-out samples) of the model `spec`."""
    from recipe_search.api import load

    loaded = load("demo" if spec == "demo" else str(Path(spec).expanduser()))
    return (loaded, *data_for(spec, calib_n, eval_n))
