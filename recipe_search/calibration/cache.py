"""On-disk cache of calibration statistics, keyed by model fingerprint and data hash."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from ..models import ModelAdapter
from ..stats import STATS_VERSION, CalibrationStats
from .collect import collect_stats
from .data import SampleSet


def default_cache_dir() -> Path:
    env = os.environ.get("RECIPE_SEARCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "recipe-search" / "stats"


def calibrate(model: Any, processor: Any, adapter: ModelAdapter, data: SampleSet, *,
              cache_dir: Path | None = None, batch_size: int = 8,
              progress: bool = True) -> tuple[CalibrationStats, bool]:
    """Statistics for (model, data), from the cache when present; returns (stats, was_cached).

    A new entry is written to a temporary folder and renamed into place, so an interrupted run
    leaves no half-written entry behind.
    """
    fingerprint = adapter.fingerprint()
    data_hash = data.content_hash()
    key = hashlib.sha256(f"{STATS_VERSION}:{fingerprint}:{data_hash}".encode()).hexdigest()[:20]
    root = cache_dir or default_cache_dir()
    folder = root / key
    if (folder / "meta.json").is_file():
        try:
            return CalibrationStats.load(folder), True
        except (OSError, ValueError, KeyError):
            shutil.rmtree(folder, ignore_errors=True)  # unreadable entry: recompute it
    stats = collect_stats(model, processor, adapter, data, batch_size=batch_size, progress=progress)
    stats.meta = {"model_fingerprint": fingerprint, "data_hash": data_hash, "source": data.source,
                  "num_samples": len(data)}
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    stats.save(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
    return stats, False
