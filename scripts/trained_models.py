"""The trained models the quality scripts measure: "demo", or a folder written by
scripts/train_second_model.py (a checkpoint plus calib.jsonl and eval.jsonl)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


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
