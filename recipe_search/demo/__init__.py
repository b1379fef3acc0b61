"""Tiny trained LLaVA-class demo model and the synthetic visual-QA world it was trained on."""

from __future__ import annotations

import pathlib

DEMO_CHECKPOINT: pathlib.Path = pathlib.Path(__file__).resolve().parent / "checkpoint"


def demo_checkpoint() -> pathlib.Path:
    """Path of the shipped demo checkpoint; fails early and clearly when the weights are absent."""
    if not (DEMO_CHECKPOINT / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"demo weights missing at {DEMO_CHECKPOINT}; run `python scripts/train_demo_model.py`"
        )
    return DEMO_CHECKPOINT
