"""On-disk cache of calibration statistics, keyed by model fingerprint and data hash.

An entry is a folder with `stats.npz` and `meta.json`; the metadata records the SHA-256 of the
arrays file, so a truncated, emptied or bit-flipped entry is detected, recomputed and replaced
atomically instead of failing every later run. A cache folder that cannot be used (read-only, or a
file in its place) costs the cache, not the run: statistics are computed and the reason is reported.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models import ModelAdapter
from ..recipe.io import unwritable
from ..stats import STATS_VERSION, CalibrationStats
from .collect import collect_stats
from .data import SampleSet


def default_cache_dir() -> Path:
    env = os.environ.get("RECIPE_SEARCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "recipe-search" / "stats"


@dataclass(frozen=True)
class CacheOutcome:
    """How the statistics were obtained: `cached`, or computed (and why the cache was not written)."""

    cached: bool
    note: str = ""  # e.g. "entry was corrupt: recomputed", "cache folder ... is read-only: not cached"

    def __bool__(self) -> bool:  # `stats, cached = calibrate(...)` keeps working
        return self.cached


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_verified(folder: Path, fingerprint: str, data_hash: str) -> CalibrationStats:
    """The entry's statistics, or ValueError when anything about it is off."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("npz_sha256") != _file_hash(folder / "stats.npz"):
        raise ValueError("arrays do not match their recorded checksum")
    if meta.get("model_fingerprint") != fingerprint or meta.get("data_hash") != data_hash:
        raise ValueError("entry belongs to another model or data")
    try:
        stats = CalibrationStats.load(folder)
    except Exception as exc:  # noqa: BLE001  (numpy and zipfile raise many types on damaged files)
        raise ValueError(f"unreadable arrays ({type(exc).__name__})") from None
    s, layers, n = stats.cross.shape
    if stats.selfv.shape != stats.cross.shape or stats.last.shape != stats.cross.shape or \
            stats.text_tokens.shape != (s,) or stats.kendall_tau.shape != (layers, layers) or not n:
        raise ValueError("arrays of inconsistent shapes")
    return stats


def _usable_root(root: Path) -> str:
    """'' when entries can be written under `root`, else the reason they cannot."""
    reason = unwritable(root)
    return f"cache folder {root} is not usable ({reason})" if reason else ""


def calibrate(model: Any, processor: Any, adapter: ModelAdapter, data: SampleSet, *,
              cache_dir: Path | None = None, batch_size: int = 8,
              progress: bool = True) -> tuple[CalibrationStats, CacheOutcome]:
    """Statistics for (model, data), from the cache when a verified entry exists.

    A new entry is written to a temporary folder and renamed into place, so an interrupted run
    leaves no half-written entry behind; a damaged entry is replaced the same way.
    """
    fingerprint = adapter.fingerprint()
    data_hash = data.content_hash()
    key = hashlib.sha256(f"{STATS_VERSION}:{fingerprint}:{data_hash}".encode()).hexdigest()[:20]
    root = cache_dir or default_cache_dir()
    folder = root / key
    note = ""
    if folder.exists():
        try:
            return _load_verified(folder, fingerprint, data_hash), CacheOutcome(True)
        except (ValueError, OSError) as exc:
            note = f"cache entry {folder.name} was damaged ({exc}): recomputed"
    stats = collect_stats(model, processor, adapter, data, batch_size=batch_size, progress=progress)
    stats.meta = {**stats.meta, "model_fingerprint": fingerprint, "data_hash": data_hash, "source": data.source,
                  "num_samples": len(data)}
    problem = _usable_root(root)
    if problem:
        return stats, CacheOutcome(False, f"{problem}: statistics not cached")
    tmp = root / f".{key}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        stats.save(tmp)
        meta_path = tmp / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["npz_sha256"] = _file_hash(tmp / "stats.npz")
        meta_path.write_text(json.dumps(meta, indent=2))
        if folder.exists() or folder.is_symlink():  # a damaged entry: move it aside, then swap
            old = root / f".{key}.old-{os.getpid()}"
            os.replace(folder, old) if folder.is_dir() and not folder.is_symlink() else folder.unlink()
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():  # not another process finishing the same entry first
            return stats, CacheOutcome(False, f"cache entry {folder} could not be written "
                                              f"({exc.strerror or type(exc).__name__}): statistics not cached")
    return stats, CacheOutcome(False, note)
