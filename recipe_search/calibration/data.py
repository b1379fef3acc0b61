"""Calibration and evaluation samples: the demo world, a JSONL file, a LLaVA instruction JSON, or a
Hugging Face dataset (a `save_to_disk` folder, parquet / json / arrow / csv files, or a cached name)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Hashable, Iterator, Mapping, Protocol, Sequence

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
    """Samples, where they came from, and one-line notes on how they were read (skipped rows, sampling)."""

    samples: tuple[Sample, ...]
    source: str
    notes: tuple[str, ...] = ()

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

    def split(self, share: float) -> tuple["SampleSet", "SampleSet"]:
        """(search part, validation part) with about `share` of the samples in validation, drawn per
        question type (seeded), so both parts keep the data's mix: every k-th sample of a periodic
        order (the demo's cycles through four question types) would put whole types in one part.
        Order is kept within each part; each part gets at least one sample."""
        if len(self) < 2:
            raise DataError(f"{self.source}: a validation part needs at least 2 samples, got {len(self)}")
        if not 0 < share < 1:
            raise DataError(f"validation share must be between 0 and 1, got {share}")
        groups: dict[str | None, list[int]] = {}
        for i, sample in enumerate(self.samples):
            groups.setdefault(sample.qtype, []).append(i)
        rng = np.random.default_rng(0)
        to_validation: set[int] = set()
        owed = 0.0  # carried rounding, so many small groups still add up to `share`
        for members in groups.values():
            owed += share * len(members)
            take = min(len(members), int(round(owed)))
            owed -= take
            to_validation.update(rng.permutation(members)[:take].tolist())
        if not to_validation:
            to_validation.add(len(self) - 1)
        elif len(to_validation) == len(self):
            to_validation.discard(0)
        search = tuple(x for i, x in enumerate(self.samples) if i not in to_validation)
        val = tuple(x for i, x in enumerate(self.samples) if i in to_validation)
        return (SampleSet(search, f"{self.source} (search part)", self.notes),
                SampleSet(val, f"{self.source} (validation part)", self.notes))


def demo_samples(split: str, n: int, seed: int = 0) -> SampleSet:
    from ..demo.world import make_split

    items = make_split(split, n, seed)
    samples = tuple(Sample(it.image, it.question, it.answer, it.qtype) for it in items)
    return SampleSet(samples, f"demo:{split}")


#: More samples than any calibration or evaluation needs; the bound keeps memory bounded too.
MAX_SAMPLES = 100_000

#: The fields a sample is read from; `--columns field=column` maps them to a dataset's column names.
FIELDS = ("image", "prompt", "answer", "qtype")
#: Columns used as the stratification label when present (before the answer).
QTYPE_COLUMNS = ("qtype", "question_type")
#: Data files read through `datasets.load_dataset(BUILDER, data_files=...)`, by suffix.
DATASET_FILES = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".csv": "csv"}
IMAGE_MARKER = "<image>"


def open_image(path: Path | str | IO[bytes], name: str | None = None) -> Image.Image:
    """An RGB image from a path or a byte stream (`name` says which in messages), or a DataError:
    unreadable files and decompression bombs (a header claiming more pixels than PIL's limit) are
    refused before any pixel is decoded."""
    label = name or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image {label} is too large to decode safely ({_first_line(exc)})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot open image {label} ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def parse_columns(columns: str | Mapping[str, str] | None) -> dict[str, str]:
    """`"image=img,prompt=question"` (or a mapping) as {field: column}, checked against FIELDS."""
    if not columns:
        return {}
    if isinstance(columns, str):
        pairs = [part.partition("=") for part in columns.split(",") if part.strip()]
        if any(not sep or not key.strip() or not value.strip() for key, sep, value in pairs):
            raise DataError(f"columns {columns!r}: expected FIELD=COLUMN[,FIELD=COLUMN...], "
                            "e.g. image=img,prompt=question")
        columns = {key.strip(): value.strip() for key, _, value in pairs}
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise DataError(f"columns: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    return dict(columns)


def _resolve_fields(mapping: dict[str, str], present: Sequence[str], where: str,
                    unit: str = "column") -> dict[str, str]:
    """{field: column} for the fields this data has: image and prompt are required, answer is optional,
    qtype falls back to a `qtype` / `question_type` column. A missing column is a one-line DataError
    naming it and the ones that exist."""
    fields = {"image": "image", "prompt": "prompt", "answer": "answer", **mapping}
    if "qtype" not in fields:
        fields["qtype"] = next((c for c in QTYPE_COLUMNS if c in present), "qtype")
    for field, column in fields.items():
        if column not in present and (field in ("image", "prompt") or field in mapping):
            hint = "" if field in mapping else f"; map it with --columns {field}=NAME"
            has = ", ".join(map(str, present)) or "none"
            raise DataError(f"{where}: no {unit} {column!r} for the {field} (has: {has}){hint}")
    return {field: column for field, column in fields.items() if column in present}


def _answer_text(value: Any) -> str | None:
    """An answer as text: lists give their first element, {"answer": ...} records their answer."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("answer", value.get("text"))
    return None if value is None else str(value)


def stratified_indices(labels: Sequence[Hashable], n: int, seed: int = 0) -> list[int]:
    """`n` positions out of `len(labels)`, drawn with `seed`, each label getting its share of the draw
    (largest remainder; ties broken at random), returned in their original order. All when n covers them."""
    if n >= len(labels):
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    groups: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    members = list(groups.values())
    exact = np.array([len(m) * n / len(labels) for m in members])
    quota = np.floor(exact).astype(int)
    order = rng.permutation(len(members))
    order = order[np.argsort(-(exact - quota)[order], kind="stable")]
    quota[order[: n - int(quota.sum())]] += 1
    chosen = [int(i) for m, q in zip(members, quota) for i in rng.choice(m, size=int(q), replace=False)]
    return sorted(chosen)


class _Table(Protocol):
    """Rows of some source, read column-wise for labels and row-wise only for the rows drawn."""

    def present(self, column: str) -> list[bool]: ...
    def values(self, column: str) -> list[Any]: ...
    def rows(self, indices: Sequence[int]) -> list[Mapping[str, Any]]: ...
    def where(self, index: int) -> str: ...


@dataclass
class _ListTable:
    """Rows already in memory (a JSONL file, LLaVA conversations)."""

    data: list[Mapping[str, Any]]
    places: list[str]

    def present(self, column: str) -> list[bool]:
        return [row.get(column) not in (None, "", []) for row in self.data]

    def values(self, column: str) -> list[Any]:
        return [row.get(column) for row in self.data]

    def rows(self, indices: Sequence[int]) -> list[Mapping[str, Any]]:
        return [self.data[i] for i in indices]

    def where(self, index: int) -> str:
        return self.places[index]


@dataclass
class _DatasetTable:
    """A `datasets.Dataset`, read as Arrow so that only drawn rows' images are ever decoded."""

    ds: Any
    name: str

    def present(self, column: str) -> list[bool]:
        return self.ds.with_format("arrow")[column].is_valid().to_pylist()

    def values(self, column: str) -> list[Any]:
        return self.ds.with_format("arrow")[column].to_pylist()

    def rows(self, indices: Sequence[int]) -> list[Mapping[str, Any]]:
        return self.ds.select(indices).with_format("arrow")[:].to_pylist() if indices else []

    def where(self, index: int) -> str:
        return f"{self.name} row {index}"


class _Images:
    """Opens image references (paths relative to `base`, `{"bytes", "path"}` records, raw bytes, PIL
    images), each path once."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.opened: dict[Path, Image.Image] = {}

    def open(self, ref: Any, where: str) -> Image.Image | tuple[Image.Image, ...]:
        refs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
        if not refs:
            raise DataError(f"{where}: the image list is empty")
        try:
            images = tuple(self._one(r) for r in refs)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        return images[0] if len(images) == 1 else images

    def _one(self, ref: Any) -> Image.Image:
        if isinstance(ref, Image.Image):
            return ref.convert("RGB")
        if isinstance(ref, dict):
            if ref.get("bytes") is not None:
                return open_image(io.BytesIO(ref["bytes"]), ref.get("path") or "(embedded bytes)")
            ref = ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            return open_image(io.BytesIO(ref), "(embedded bytes)")
        if not isinstance(ref, (str, os.PathLike)) or not str(ref):
            raise DataError(f"not an image or image path: {str(ref)[:80]!r}")
        path = (self.base / ref).resolve()
        if path not in self.opened:
            self.opened[path] = open_image(path)
        return self.opened[path]


def _draw(table: _Table, fields: dict[str, str], n: int, seed: int, base: Path,
          unit: str = "rows") -> tuple[list[Sample], list[str]]:
    """Samples from a table: rows without an image are skipped (and counted), and when more rows remain
    than `n`, a seeded draw stratified by qtype (or answer) picks them; only drawn rows are decoded."""
    has_image = table.present(fields["image"])
    candidates = [i for i, ok in enumerate(has_image) if ok]
    notes = []
    if len(candidates) < len(has_image):
        notes.append(f"skipped {len(has_image) - len(candidates):,} of {len(has_image):,} {unit} without an image")
    label_field = next((f for f in ("qtype", "answer") if f in fields), None)
    labels = table.values(fields[label_field]) if label_field else [None] * len(has_image)
    picked = [candidates[j] for j in stratified_indices([_answer_text(labels[i]) for i in candidates], n, seed)]
    if len(picked) < len(candidates):
        how = f"stratified by {fields[label_field]}" if label_field else "no labels to stratify by"
        notes.append(f"drew {len(picked):,} of {len(candidates):,} samples (seed {seed}; {how})")
    images = _Images(base)
    samples = []
    for index, row in zip(picked, table.rows(picked)):
        where = table.where(index)
        prompt = row.get(fields["prompt"])
        if prompt is None:
            raise DataError(f"{where}: the prompt ({fields['prompt']!r}) is empty")
        qtype = row.get(fields["qtype"]) if "qtype" in fields else None
        samples.append(Sample(images.open(row[fields["image"]], where), str(prompt),
                              _answer_text(row.get(fields["answer"])) if "answer" in fields else None,
                              None if qtype is None else str(qtype)))
    return samples, notes


def _jsonl_table(path: Path, mapping: dict[str, str]) -> tuple[_ListTable, dict[str, str]]:
    """Every line of a JSONL file; each needs the image and prompt fields (as mapped)."""
    image, prompt = mapping.get("image", "image"), mapping.get("prompt", "prompt")
    rows: list[Mapping[str, Any]] = []
    places: list[str] = []
    keys: dict[str, None] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict) or image not in row or prompt not in row:
                has = ", ".join(row) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
                raise DataError(f"{path}:{lineno}: each line needs {image!r} and {prompt!r} fields "
                                f"(has: {has or 'none'})")
            rows.append(row)
            places.append(f"{path}:{lineno}")
            keys.update(dict.fromkeys(row))
    return _ListTable(rows, places), _resolve_fields(mapping, list(keys), str(path), unit="field")


def _llava_table(entries: list[Any], path: Path, turns: str) -> tuple[_ListTable, int]:
    """One row per sample: the entry's first human/gpt pair, or every pair with turns='all'. Returns the
    rows and the number of entries skipped for having no image."""
    rows: list[Mapping[str, Any]] = []
    places: list[str] = []
    skipped = 0
    for number, entry in enumerate(entries):
        where = f"{path} entry {number}"
        if isinstance(entry, dict) and "id" in entry:
            where += f" (id {str(entry['id'])[:60]!r})"
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            raise DataError(f"{where}: expected an object with a 'conversations' list")
        if entry.get("image") in (None, "", []):
            skipped += 1
            continue
        turns_seen = entry["conversations"]
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns_seen):
            raise DataError(f"{where}: each conversation turn needs 'from' and a text 'value'")
        pairs = [(q["value"], a["value"]) for q, a in zip(turns_seen, turns_seen[1:])
                 if q.get("from") in ("human", "user") and a.get("from") in ("gpt", "assistant")]
        if not pairs:
            raise DataError(f"{where}: no human turn followed by a gpt answer")
        for question, answer in pairs if turns == "all" else pairs[:1]:
            rows.append({"image": entry["image"], "prompt": question.replace(IMAGE_MARKER, "").strip(),
                         "answer": answer})
            places.append(where)
    return _ListTable(rows, places), skipped


def _read_llava(path: Path) -> list[Any] | None:
    """The entries of a LLaVA instruction JSON (a list of objects with "conversations"), else None."""
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # left to datasets' json loader, which also reads JSON lines
    if isinstance(data, list) and data and isinstance(data[0], dict) and "conversations" in data[0]:
        return data
    return None


@contextlib.contextmanager
def _offline_datasets() -> Iterator[Any]:
    """`datasets`, quiet and offline (HF_DATASETS_OFFLINE) for the duration: local files and the local
    cache only, never a download."""
    try:
        import datasets
        from datasets.utils import logging as ds_logging
        from huggingface_hub import constants as hub_constants
    except ImportError:
        raise DataError("reading Hugging Face datasets needs the `datasets` package (pip install datasets)") from None
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE, ds_logging.get_verbosity(),
             not datasets.are_progress_bars_disabled(), os.environ.get("HF_DATASETS_OFFLINE"))
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # its loaders log failures we report in one line
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved[0], saved[1]
        ds_logging.set_verbosity(saved[2])
        if saved[3]:
            datasets.enable_progress_bars()
        if saved[4] is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = saved[4]


def _pick_split(ds: Any, split: str) -> Any:
    """One split of a DatasetDict: `split` itself, else train for calibration and validation/test for
    evaluation, else the first."""
    if not hasattr(ds, "keys"):
        return ds
    preferred = (split,) + (("validation", "test", "val") if split == "eval" else ("train",))
    return ds[next((s for s in preferred if s in ds), next(iter(ds)))]


def _load_dataset(spec: str, path: Path | None) -> Any:
    """A Dataset from a save_to_disk folder, a data file, or a name in the local HF cache."""
    with _offline_datasets() as datasets:
        try:
            if path is None:
                return datasets.load_dataset(spec)
            if path.is_dir():
                return datasets.load_from_disk(str(path))
            return datasets.load_dataset(DATASET_FILES[path.suffix.lower()], data_files=str(path))
        except Exception as exc:  # datasets and pyarrow raise many kinds; each becomes one line
            if path is None and isinstance(exc, (ConnectionError, FileNotFoundError)):
                raise DataError(f"{spec}: no such file or folder, and no dataset by that name in the local Hugging "
                                f"Face cache ({datasets.config.HF_DATASETS_CACHE}); nothing is downloaded") from None
            what = ("cannot read the cached dataset" if path is None else "not a dataset saved with save_to_disk"
                    if path.is_dir() else "cannot read it as a dataset")
            while exc.__cause__ is not None:  # "An error occurred while generating the dataset" wraps the cause
                exc = exc.__cause__
            raise DataError(f"{spec}: {what} ({_first_line(exc)})") from None


def _looks_like_name(spec: str) -> bool:
    """`name` or `owner/name`, as on the Hugging Face Hub, and not a data file's name."""
    file_types = (*DATASET_FILES, ".jsonl", ".ndjson")
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec)) and Path(spec).suffix.lower() not in file_types


def load_samples(spec: str, n: int, split: str = "calib", seed: int = 0, *, image_folder: str | Path | None = None,
                 turns: str = "first", columns: str | Mapping[str, str] | None = None) -> SampleSet:
    """Up to `n` samples from `spec`:

    * `demo`: the embedded world's `split`;
    * a `.jsonl` of {image, prompt[, answer]} (`image`: a path, or a list of them for a multi-image prompt);
    * a LLaVA instruction `.json` (a list of {"id", "image", "conversations"}): the first human/gpt turn of
      each entry, or every turn with `turns="all"`; entries without an image are skipped and counted;
    * a Hugging Face dataset: a `save_to_disk` folder, a .parquet / .json / .arrow / .csv file, or a dataset
      name already in the local cache (offline: nothing is downloaded). Image columns hold images
      (the `Image` feature) or paths; answer lists give their first answer.

    Image paths are relative to `image_folder`, else to the data file's folder (a dataset folder itself,
    the working directory for a cached name). `columns` maps fields to column names
    (`"image=img,prompt=question,answer=answers"`); a `qtype` or `question_type` column is read as the
    question type. With more rows than `n`, a draw seeded by `seed` and stratified by question type (else
    answer) is taken instead of the first `n`. Every problem is a one-line DataError.
    """
    if n <= 0:
        raise DataError(f"number of samples must be positive, got {n}")
    if n > MAX_SAMPLES:
        raise DataError(f"number of samples {n} is more than {MAX_SAMPLES:,}; calibration needs a few hundred")
    if turns not in ("first", "all"):
        raise DataError(f"turns must be 'first' or 'all', got {str(turns)[:40]!r}")
    mapping = parse_columns(columns)
    if spec == "demo":
        if image_folder is not None or mapping or turns != "first":
            raise DataError("demo data takes no image folder, columns or turns")
        return demo_samples(split, n, seed)
    if image_folder is not None and not Path(image_folder).is_dir():
        raise DataError(f"image folder {image_folder}: no such folder")
    path = Path(spec)
    if not path.exists() and not _looks_like_name(spec):
        raise DataError(f"{spec}: no such file or folder (expected 'demo', a .jsonl, .json, .parquet, .arrow or "
                        f".csv file, a dataset folder or a cached dataset name)")
    local = path if path.exists() else None
    base = Path(image_folder) if image_folder is not None else (
        Path.cwd() if local is None else local if local.is_dir() else local.parent)
    notes: list[str] = []
    entries = _read_llava(path) if local is not None and local.suffix.lower() == ".json" else None
    if entries is not None:
        if mapping:
            raise DataError(f"{path}: LLaVA conversation JSON has fixed fields; columns do not apply")
        table, skipped = _llava_table(entries, path, turns)
        if skipped:
            notes.append(f"skipped {skipped:,} of {len(entries):,} entries without an image")
        samples, drawn = _draw(table, {"image": "image", "prompt": "prompt", "answer": "answer"}, n, seed, base)
    elif turns != "first":
        raise DataError(f"{spec}: turns='all' applies to LLaVA conversation JSON only")
    elif local is not None and local.is_file() and local.suffix.lower() in (".jsonl", ".ndjson"):
        table, fields = _jsonl_table(local, mapping)
        samples, drawn = _draw(table, fields, n, seed, base)
    else:
        if local is not None and local.is_file() and local.suffix.lower() not in DATASET_FILES:
            raise DataError(f"{path}: unknown file type {local.suffix or '(none)'!r} (expected .jsonl, .json, "
                            f".parquet, .arrow or .csv, or a dataset folder)")
        ds = _pick_split(_load_dataset(spec, local), split)
        fields = _resolve_fields(mapping, ds.column_names, spec)
        samples, drawn = _draw(_DatasetTable(ds, spec), fields, n, seed, base)
    if not samples:
        raise DataError(f"{spec}: no samples found" + (f" ({'; '.join(notes + drawn)})" if notes or drawn else ""))
    return SampleSet(tuple(samples), str(path) if local is not None else spec, tuple(notes + drawn))


def batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]
