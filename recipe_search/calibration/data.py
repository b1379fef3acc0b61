"""Calibration and evaluation samples: the demo world, a JSONL file, or a local HF dataset folder."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    """One prompt with its image, or with several images (a tuple) for multi-image prompts."""

    image: Image.Image | tuple[Image.Image, ...]
    prompt: str
    answer: str | None = None
    qtype: str | None = None

    @property
    def images(self) -> tuple[Image.Image, ...]:
        return self.image if isinstance(self.image, tuple) else (self.image,)


@dataclass(frozen=True)
class SampleSet:
    samples: tuple[Sample, ...]
    source: str

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_answers(self) -> bool:
        return all(s.answer is not None for s in self.samples)

    def content_hash(self) -> str:
        """Hash of every pixel, prompt and answer, so a cache never serves stats of other data."""
        digest = hashlib.sha256()
        for s in self.samples:
            for image in s.images:
                pixels = np.asarray(image.convert("RGB"))
                digest.update(str(pixels.shape).encode())
                digest.update(pixels.tobytes())
            digest.update(json.dumps([s.prompt, s.answer]).encode())
        return digest.hexdigest()[:16]


def demo_samples(split: str, n: int, seed: int = 0) -> SampleSet:
    from ..demo.world import make_split

    items = make_split(split, n, seed)
    samples = tuple(Sample(it.image, it.question, it.answer, it.qtype) for it in items)
    return SampleSet(samples, f"demo:{split}")


#: More samples than any calibration or evaluation needs; the bound keeps memory bounded too.
MAX_SAMPLES = 100_000


def open_image(path: Path) -> Image.Image:
    """An RGB image, or a DataError: unreadable files and decompression bombs (a header claiming
    more pixels than PIL's limit) are refused before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image {path} is too large to decode safely ({_first_line(exc)})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot open image {path} ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _jsonl_samples(path: Path, n: int) -> list[Sample]:
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict) or "image" not in row or "prompt" not in row:
                raise DataError(f"{path}:{lineno}: each line needs 'image' and 'prompt' fields")
            names = row["image"] if isinstance(row["image"], list) else [row["image"]]
            if not names:
                raise DataError(f"{path}:{lineno}: 'image' is an empty list")
            images = []
            for name in names:
                image_path = (path.parent / str(name)).resolve()
                try:
                    images.append(open_image(image_path))
                except DataError as exc:
                    raise DataError(f"{path}:{lineno}: {exc}") from None
            answer = row.get("answer")
            image = images[0] if len(images) == 1 else tuple(images)
            samples.append(Sample(image, str(row["prompt"]), None if answer is None else str(answer)))
            if len(samples) == n:
                break
    return samples


def _hf_dataset_samples(path: Path, n: int) -> list[Sample]:
    try:
        import datasets  # optional: pip install recipe-search[datasets]
    except ImportError:
        raise DataError(f"{path}: reading a Hugging Face dataset folder needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    missing = {"image", "prompt"} - set(ds.column_names)
    if missing:
        raise DataError(f"{path}: dataset lacks column(s) {', '.join(sorted(missing))}")
    rows = ds.select(range(min(n, len(ds))))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return [Sample(r["image"].convert("RGB"), str(r["prompt"]),
                           None if r.get("answer") is None else str(r["answer"])) for r in rows]
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: an image is too large to decode safely ({_first_line(exc)})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot decode an image ({_first_line(exc)})") from None


def load_samples(spec: str, n: int, split: str = "calib", seed: int = 0) -> SampleSet:
    """`demo` (the embedded world's `split`), a `.jsonl` of {image, prompt[, answer]} (`image`: a path
    relative to the file, or a list of them for a multi-image prompt), or a dataset folder."""
    if n <= 0:
        raise DataError(f"number of samples must be positive, got {n}")
    if n > MAX_SAMPLES:
        raise DataError(f"number of samples {n} is more than {MAX_SAMPLES:,}; calibration needs a few hundred")
    if spec == "demo":
        return demo_samples(split, n, seed)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec}: no such file or folder (expected 'demo', a .jsonl file or a dataset folder)")
    samples = _hf_dataset_samples(path, n) if path.is_dir() else _jsonl_samples(path, n)
    if not samples:
        raise DataError(f"{spec}: no samples found")
    return SampleSet(tuple(samples), str(path))


def batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]
