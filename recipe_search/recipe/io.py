"""Load, validate and atomically save recipes.

A recipe travels: it gets hand-edited, truncated, written by another version, or crafted. Loading
therefore accepts a file only if the runtime can apply it to a model of its architecture: every
constraint `apply_recipe` relies on is checked here (what only the model can tell, such as the
vision tower's depth, is checked by `apply_recipe`). Every problem, down to undecodable bytes, is a
RecipeError whose one line starts with the field concerned and quotes at most a short, escaped
excerpt of the value.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import secrets
import stat
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin, get_type_hints

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
    echo,
    one_line,
)

if TYPE_CHECKING:
    from ..runtime.selection import SelectionRule

_SECTIONS = {
    "model": ModelIdentity,
    "budget": BudgetRecord,
    "schedule": Schedule,
    "selection": Selection,
    "method": MethodRecord,
    "calibration": CalibrationRecord,
}


IMAGE_POLICIES = ("per-image", "pooled")
BUDGET_KINDS = ("flops", "tokens", "none")
#: Deepest nesting a recipe may have. Real ones reach 5 (method.result.trace[i].alpha); the bound
#: keeps json.loads, json.dumps and dataclasses.asdict (all recursive) far from Python's stack limit.
MAX_DEPTH = 32
#: Largest integer magnitude: every JSON reader represents integers up to 2**53 exactly, and Python
#: refuses to parse integers of more than 4300 digits at all.
MAX_INT = 2**53


def _field(where: str, key: Any) -> str:
    """The path of `key` inside `where`: `a.b` for plain names, `a['odd key']` (escaped, short) otherwise."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][\w-]{0,39}", key):
        return f"{where}.{key}" if where else key
    return f"{where or 'recipe'}[{echo(key)}]"


def _index(where: str, i: Any) -> str:
    return f"{where or 'recipe'}[{i}]"


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
        raise RecipeError(f"{where}: unexpected value {echo(value)}")
    if hint is type(None):
        if value is not None:
            raise RecipeError(f"{where}: expected null, got {echo(value)}")
        return
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = get_args(hint)
        for i, v in enumerate(value):
            _check_type(v, item, _index(where, i))
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected an object, got {type(value).__name__}")
        _, item = get_args(hint)
        for k, v in value.items():
            _check_type(v, item, _field(where, k))
        return
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecipeError(f"{where}: expected a finite number, got {echo(value)}")
        return
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {echo(value)}")
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
        raise RecipeError(f"{_field(where, unknown[0])}: unknown field")
    values = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise RecipeError(f"{where}.{f.name}: missing field")
            continue
        _check_type(data[f.name], hints[f.name], f"{where}.{f.name}")
        values[f.name] = data[f.name]
    return cls(**values)


# -- JSON that parses but is no recipe ---------------------------------------------------------------
class _Duplicates(dict):
    """A JSON object that repeated `key`: json.loads would silently keep the last value."""

    def __init__(self, pairs: list[tuple[str, Any]], key: str) -> None:
        super().__init__(pairs)
        self.key = key


class _HugeInt(str):
    """An integer literal too long to be a recipe value, kept as text so the field can be named."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return _Duplicates(pairs, key)
        seen.add(key)
    return dict(pairs)


def _integer(text: str) -> int | _HugeInt:
    return int(text) if len(text) <= 20 else _HugeInt(text)


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    """Refuse what JSON (or a Python object) can hold but a recipe must not: duplicate keys, NaN and
    infinities, integers beyond MAX_INT, nesting deeper than MAX_DEPTH, and non-JSON values."""
    if isinstance(value, _HugeInt) or (isinstance(value, int) and abs(value) > MAX_INT):
        shown = f"an integer of {len(value.lstrip('-'))} digits" if isinstance(value, _HugeInt) else echo(value)
        raise RecipeError(f"{where}: {shown} is out of range (integers are limited to +-2**53)")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{where}: {value} is not a finite number")
    if value is None or isinstance(value, (str, int, float)):
        return
    if isinstance(value, _Duplicates):
        raise RecipeError(f"{_field(where, value.key)}: duplicate key")
    if depth == MAX_DEPTH:
        raise RecipeError(f"{where or 'recipe'}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, _index(where, i), depth + 1)
        return
    if is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in fields(value)}
    if not isinstance(value, dict):
        raise RecipeError(f"{where or 'recipe'}: a {type(value).__name__} is not a JSON value")
    for key, item in value.items():
        if not isinstance(key, str):
            raise RecipeError(f"{where or 'recipe'}: key {echo(key)} is not a string")
        _check_json(item, _field(where, key), depth + 1)


_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[][{}:,]', re.DOTALL)


def _too_deep(text: str) -> str | None:
    """The field whose value nests deeper than MAX_DEPTH, or None. A flat scan, because json.loads
    itself recurses and would hit Python's recursion limit before any check could run."""
    frames: list[list[Any]] = []  # per open container: [is_array, current index or raw key]
    last = ""
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            if len(frames) == MAX_DEPTH:
                where = ""
                for is_array, label in frames:
                    where = _index(where, label) if is_array else _field(where, _json_key(label))
                return one_line(where, 120)
            frames.append([token == "[", 0 if token == "[" else '""'])
        elif token in ("]", "}"):
            if frames:
                frames.pop()
        elif token == ",":
            if frames and frames[-1][0]:
                frames[-1][1] += 1
        elif token == ":":
            if frames and not frames[-1][0]:
                frames[-1][1] = last
        else:
            last = token
    return None


def _json_key(token: str) -> str:
    try:
        return json.loads(token)
    except ValueError:
        return token[1:-1]


def _parse(text: str) -> Any:
    """Parse recipe JSON; problems json.loads would raise otherwise (or let through) are RecipeErrors."""
    deep = _too_deep(text)
    if deep is not None:
        raise RecipeError(f"{deep}: nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, object_pairs_hook=_object, parse_int=_integer)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


# -- the recipe's own rules --------------------------------------------------------------------------
def _positive(value: float, where: str) -> None:
    if value <= 0:
        raise RecipeError(f"{where}: {value} must be positive")


def _one_of(value: str, options: tuple[str, ...], where: str) -> None:
    if value not in options:
        raise RecipeError(f"{where}: {echo(value)} is not one of {', '.join(options)}")


def _validate(recipe: Recipe) -> None:
    """Every constraint the runtime relies on that the recipe alone can tell, each naming its field."""
    _validate_model(recipe.model)
    _validate_budget(recipe.budget)
    _validate_schedule(recipe.schedule, recipe.model)
    _positive(recipe.calibration.num_samples, "calibration.num_samples")
    _validate_selection(recipe)
    from ..runtime.apply import plan_from_recipe

    try:  # the runtime's own checks, should a new one not be mirrored above yet
        plan_from_recipe(recipe)
    except ValueError as exc:
        raise RecipeError(f"selection: {exc}") from None


def _validate_model(m: ModelIdentity) -> None:
    for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim"):
        _positive(getattr(m, name), f"model.{name}")
    if m.num_heads % m.num_kv_heads:
        raise RecipeError(f"model.num_kv_heads: {m.num_kv_heads} does not divide model.num_heads ({m.num_heads})")
    if m.visual_tokens_per_image is not None:
        _positive(m.visual_tokens_per_image, "model.visual_tokens_per_image")


def _validate_budget(b: BudgetRecord) -> None:
    from ..flops import FORMULAS

    _one_of(b.kind, BUDGET_KINDS, "budget.kind")
    if b.kind == "tokens":
        _positive(b.value, "budget.value")
    elif not 0 < b.value <= 1:
        raise RecipeError(f"budget.value: {b.value} is outside (0, 1], the FLOPs fraction a {b.kind!r} budget records")
    _one_of(b.formula, tuple(FORMULAS), "budget.formula")
    for key, value in b.achieved.items():
        if value < 0:
            raise RecipeError(f"{_field('budget.achieved', key)}: {value} is negative")
    if b.text_tokens_mean < 0:
        raise RecipeError(f"budget.text_tokens_mean: {b.text_tokens_mean} is negative")


def _validate_schedule(s: Schedule, m: ModelIdentity) -> None:
    _positive(s.visual_tokens, "schedule.visual_tokens")
    if m.visual_tokens_per_image is not None and s.visual_tokens != m.visual_tokens_per_image:
        raise RecipeError(f"schedule.visual_tokens: {s.visual_tokens}, but model.visual_tokens_per_image is "
                          f"{m.visual_tokens_per_image}; counts refer to one image of the model")
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


def _validate_selection(recipe: Recipe) -> None:
    from ..runtime.selection import ScoringRule
    from ..runtime.vision import VisionRule

    sel, vision, counts = recipe.selection, recipe.vision, recipe.schedule.counts
    _one_of(sel.score_layer, ("same", "previous"), "selection.score_layer")
    _one_of(sel.images, IMAGE_POLICIES, "selection.images")
    rule = _check_rule("selection", sel.rule, sel.params, "llm")
    if sel.merge_threshold is not None:
        from ..runtime.plan import check_merge_threshold

        try:
            check_merge_threshold(sel.merge_threshold)
        except ValueError as exc:
            raise RecipeError(f"selection.{exc}") from None
        if rule.merges:
            raise RecipeError(f"selection.merge_threshold: rule {sel.rule!r} merges by its own weights; remove it")
    if sel.score_layer == "previous":
        if not isinstance(rule, ScoringRule):
            raise RecipeError(f"selection.score_layer: 'previous' needs a rule that ranks tokens; {sel.rule!r} "
                              "does not (use 'same')")
        if vision is None and counts and counts[0] < recipe.schedule.visual_tokens:
            raise RecipeError(f"selection.score_layer: 'previous' cannot drop at layer 0 (schedule.counts[0] is "
                              f"{counts[0]} < {recipe.schedule.visual_tokens}): there is no earlier layer")
    if vision is not None:
        stage = _check_rule("vision", vision.rule, vision.params, "vision")
        if vision.encoder_layer < 0:
            raise RecipeError(f"vision.encoder_layer: {vision.encoder_layer} must not be negative")
        try:
            if isinstance(stage, VisionRule):
                stage.needs_layers(vision.encoder_layer)
        except ValueError as exc:
            raise RecipeError(f"vision.params: {exc}") from None


def _check_rule(section: str, name: str, params: dict[str, Any], stage: str) -> SelectionRule:
    """The rule exists, runs at `stage` and accepts its parameters (each typed as the rule declares)."""
    from ..runtime.selection import RULES, make_rule

    if name not in RULES:
        raise RecipeError(f"{section}.rule: unknown selection rule {echo(name)}; known: {', '.join(sorted(RULES))}")
    cls = RULES[name]
    if cls.stage != stage:
        where = "in the vision tower" if stage == "llm" else "in the LLM"
        raise RecipeError(f"{section}.rule: {name!r} runs {where}; "
                          f"{'put it in the vision section' if stage == 'llm' else 'put it in the selection section'}")
    signature = inspect.signature(cls.__init__).parameters
    accepted = [p for p in signature if p != "self"]
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    hints = get_type_hints(cls.__init__)
    for key, value in params.items():
        where = _field(f"{section}.params", key)
        if key not in accepted and not open_ended:
            raise RecipeError(f"{where}: not a parameter of the {name} rule (it takes {', '.join(accepted) or 'none'})")
        if key in hints:
            _check_type(value, hints[key], where)
        try:
            make_rule(name, {key: value})
        except ValueError as exc:
            raise RecipeError(f"{where}: {exc}") from None
    try:
        return make_rule(name, params)
    except ValueError as exc:  # a constraint between parameters
        raise RecipeError(f"{section}.params: {exc}") from None


def recipe_from_dict(data: Any) -> Recipe:
    """Build and validate a recipe from parsed JSON; raises RecipeError naming the field."""
    if not isinstance(data, dict):
        raise RecipeError("recipe: expected a JSON object at the top level")
    if data.get("format") != FORMAT:
        raise RecipeError(f"format: expected {FORMAT!r}, got {echo(data.get('format'))} (not a recipe-search recipe?)")
    version = data.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise RecipeError(f"format_version: {echo(version)} is not supported (this tool reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    _check_json(data, "")
    sections = {name: _build(cls, data.get(name), name) for name, cls in _SECTIONS.items()}
    known = {*_SECTIONS, "format", "format_version", "tool_version", "created"} | ({"vision"} if version >= 2 else set())
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{_field('', unknown[0])}: unknown field"
                          + (" in format_version 1" if unknown[0] == "vision" else ""))
    for key in ("tool_version", "created"):
        if not isinstance(data.get(key), str):
            raise RecipeError(f"{key}: expected a string")
    if version < 3 and isinstance(data.get("selection"), dict) and "merge_threshold" in data["selection"]:
        raise RecipeError(f"selection.merge_threshold: unknown field in format_version {version}")
    vision = None if data.get("vision") is None else _build(VisionSelection, data["vision"], "vision")
    recipe = Recipe(**sections, tool_version=data["tool_version"], created=data["created"], vision=vision)
    _validate(recipe)
    return recipe


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe JSON file; every problem is a RecipeError with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # editors on Windows often start with a BOM
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return recipe_from_dict(_parse(text))
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def _recipe_json(recipe: Recipe) -> str:
    """The recipe as indented JSON, checked to be exactly what `load_recipe` reads back."""
    _check_json(recipe, "")  # before to_dict(): asdict recurses without bound, json.dumps writes NaN
    text = json.dumps(recipe.to_dict(), indent=2) + "\n"
    recipe_from_dict(_parse(text))
    return text


def validate_recipe(recipe: Recipe) -> None:
    """Raise RecipeError unless `recipe` (e.g. built or edited in Python) is one `load_recipe` accepts."""
    _recipe_json(recipe)


def unwritable(folder: Path) -> str:
    """'' when files can be created in `folder` (made if missing), else the reason they cannot."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".recipe-search-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return ""


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file.

    The file ends up with the permissions a plain open() would give it: a new file 0666 minus the
    umask (not mkstemp's 0600, which would hide recipes from a team), an existing one its own mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Validate, then write the recipe as indented JSON atomically (never what could not be read back)."""
    write_atomic(path, _recipe_json(recipe).encode())
    return Path(path)
