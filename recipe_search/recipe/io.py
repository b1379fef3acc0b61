"""Load, validate and atomically save recipes."""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from .schema import (
    FORMAT,
    READABLE_VERSIONS,
    BudgetRecord,
    CalibrationRecord,
    MethodRecord,
    ModelIdentity,
    Recipe,
    RecipeError,
    Schedule,
    Selection,
    VisionSelection,
)

_SECTIONS = {
    "model": ModelIdentity,
    "budget": BudgetRecord,
    "schedule": Schedule,
    "selection": Selection,
    "method": MethodRecord,
    "calibration": CalibrationRecord,
}


IMAGE_POLICIES = ("per-image", "pooled")


def _check_type(value: Any, hint: Any, where: str) -> None:
    origin = get_origin(hint)
    if hint is Any:
        return
    if origin is Union or type(hint).__name__ == "UnionType":
        for option in get_args(hint):
            try:
                _check_type(value, option, where)
                return
            except RecipeError:
                continue
        raise RecipeError(f"{where}: unexpected value {value!r}")
    if hint is type(None):
        if value is not None:
            raise RecipeError(f"{where}: expected null, got {value!r}")
        return
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = get_args(hint)
        for i, v in enumerate(value):
            _check_type(v, item, f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected an object, got {type(value).__name__}")
        _, item = get_args(hint)
        for k, v in value.items():
            _check_type(v, item, f"{where}.{k}")
        return
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecipeError(f"{where}: expected a finite number, got {value!r}")
        return
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return
    if not isinstance(value, hint):
        raise RecipeError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected an object, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecipeError(f"{where}.{unknown[0]}: unknown field")
    values = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise RecipeError(f"{where}.{f.name}: missing field")
            continue
        _check_type(data[f.name], hints[f.name], f"{where}.{f.name}")
        values[f.name] = data[f.name]
    return cls(**values)


def _validate(recipe: Recipe) -> None:
    m, s, b = recipe.model, recipe.schedule, recipe.budget
    if m.num_layers <= 0:
        raise RecipeError("model.num_layers: must be positive")
    if s.visual_tokens <= 0:
        raise RecipeError("schedule.visual_tokens: must be positive")
    if len(s.counts) != m.num_layers:
        raise RecipeError(f"schedule.counts: {len(s.counts)} layers, model.num_layers says {m.num_layers}")
    if len(s.fractions) != len(s.counts):
        raise RecipeError("schedule.fractions: must have one entry per layer")
    for i, c in enumerate(s.counts):
        if not 0 <= c <= s.visual_tokens:
            raise RecipeError(f"schedule.counts[{i}]: {c} is outside [0, {s.visual_tokens}]")
        if i and c > s.counts[i - 1]:
            raise RecipeError(f"schedule.counts[{i}]: {c} > {s.counts[i - 1]}; the schedule must never increase")
        if abs(s.fractions[i] - c / s.visual_tokens) > 1e-6:
            raise RecipeError(f"schedule.fractions[{i}]: does not equal counts[{i}] / visual_tokens")
    if b.kind not in ("flops", "tokens", "none"):
        raise RecipeError(f"budget.kind: {b.kind!r} is not 'flops', 'tokens' or 'none'")
    if recipe.selection.score_layer not in ("same", "previous"):
        raise RecipeError(f"selection.score_layer: {recipe.selection.score_layer!r} is not 'same' or 'previous'")
    if recipe.selection.images not in IMAGE_POLICIES:
        raise RecipeError(f"selection.images: {recipe.selection.images!r} is not one of {', '.join(IMAGE_POLICIES)}")
    _check_rule("selection", recipe.selection.rule, recipe.selection.params, "llm")
    if recipe.vision is not None:
        _check_rule("vision", recipe.vision.rule, recipe.vision.params, "vision")
        if recipe.vision.encoder_layer < 0:
            raise RecipeError("vision.encoder_layer: must not be negative")


def _check_rule(section: str, name: str, params: dict[str, Any], stage: str) -> None:
    """The rule exists, runs at `stage` and accepts its parameters."""
    from ..runtime.selection import RULES, make_rule

    if name not in RULES:
        raise RecipeError(f"{section}.rule: unknown selection rule {name!r}; known: {', '.join(sorted(RULES))}")
    if RULES[name].stage != stage:
        where = "in the vision tower" if stage == "llm" else "in the LLM"
        raise RecipeError(f"{section}.rule: {name!r} runs {where}; "
                          f"{'put it in the vision section' if stage == 'llm' else 'put it in the selection section'}")
    try:
        make_rule(name, params)
    except ValueError as exc:
        raise RecipeError(f"{section}.params: {exc}") from None


def recipe_from_dict(data: Any) -> Recipe:
    """Build and validate a recipe from parsed JSON; raises RecipeError naming the field."""
    if not isinstance(data, dict):
        raise RecipeError("recipe: expected a JSON object at the top level")
    if data.get("format") != FORMAT:
        raise RecipeError(f"format: expected {FORMAT!r}, got {data.get('format')!r} (not a recipe-search recipe?)")
    version = data.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise RecipeError(f"format_version: {version!r} is not supported (this tool reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    sections = {name: _build(cls, data.get(name), name) for name, cls in _SECTIONS.items()}
    known = {*_SECTIONS, "format", "format_version", "tool_version", "created"} | ({"vision"} if version >= 2 else set())
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{unknown[0]}: unknown field" + (" in format_version 1" if unknown[0] == "vision" else ""))
    for key in ("tool_version", "created"):
        if not isinstance(data.get(key), str):
            raise RecipeError(f"{key}: expected a string")
    vision = None if data.get("vision") is None else _build(VisionSelection, data["vision"], "vision")
    recipe = Recipe(**sections, tool_version=data["tool_version"], created=data["created"], vision=vision)
    _validate(recipe)
    return recipe


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe JSON file; every problem is a RecipeError with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    try:
        return recipe_from_dict(data)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Validate, then write the recipe as indented JSON atomically."""
    data = recipe.to_dict()
    recipe_from_dict(json.loads(json.dumps(data)))  # never write what we could not read back
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
    return Path(path)

