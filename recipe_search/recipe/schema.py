"""The recipe: a portable, versioned JSON record of what to prune, found how, for which model.

Every field is plain JSON. Loading checks each one and names the first bad field, so a recipe
that was hand-edited or truncated fails with one clear line instead of pruning wrongly.
"""
from __future__ import annotations

import reprlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FORMAT = "recipe-search/recipe"
FORMAT_VERSION = 3
#: Versions this tool reads: 1 is 2 without the optional `vision` section, 2 is 3 without
#: `selection.merge_threshold`.
READABLE_VERSIONS = (1, 2, 3)


#: Longest error message: whatever a file holds, its error stays one readable line.
MAX_MESSAGE = 500
#: Longest excerpt of a recipe value that an error message echoes.
MAX_ECHO = 80


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` with every non-printable character escaped repr-style (newlines, ANSI escapes) and cut
    to `limit` characters, so printing it can neither flood nor repaint a terminal."""
    text = text[:limit * 4]  # bound the work on a huge message before escaping
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else safe[:limit - 3] + "..."


_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxdict, _ECHO.maxlist = 2, 4, 6
_ECHO.maxstring = _ECHO.maxlong = _ECHO.maxother = MAX_ECHO


def echo(value: Any) -> str:
    """A recipe value as error messages quote it: repr-style, escaped, at most MAX_ECHO characters."""
    return one_line(_ECHO.repr(value), MAX_ECHO)


class RecipeError(ValueError):
    """A recipe file or object that cannot be used; the message names the field.

    The message is forced to one escaped, bounded line: it often quotes the file's own contents.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(str(message)))


@dataclass(frozen=True)
class ModelIdentity:
    name_or_path: str
    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    visual_tokens_per_image: int | None
    fingerprint: str

    def architecture_key(self) -> tuple:
        """Everything but the name and weights: two checkpoints with equal keys can share a recipe."""
        d = asdict(self)
        return tuple(v for k, v in sorted(d.items()) if k not in _NOT_ARCHITECTURE)

    def architecture_mismatch(self, other: "ModelIdentity") -> str | None:
        """The first architecture field on which `other` differs (None: they can share a recipe)."""
        return next((f.name for f in fields(self) if f.name not in _NOT_ARCHITECTURE
                     and getattr(self, f.name) != getattr(other, f.name)), None)


#: ModelIdentity fields that name a checkpoint rather than describe its architecture.
_NOT_ARCHITECTURE = ("name_or_path", "fingerprint")


@dataclass(frozen=True)
class BudgetRecord:
    asked: str                      # as the user typed it
    kind: str                       # "flops", "tokens", or "none" (method finds its own cost)
    value: float
    formula: str                    # the formula a FLOPs budget is measured with
    achieved: dict[str, float]      # {"full": f, "visual": f, "mean_visual_tokens": t}
    formulas: dict[str, str]        # formula id -> exact definition
    text_tokens_mean: float         # mean non-visual tokens of the calibration prompts (n for "full")


@dataclass(frozen=True)
class Schedule:
    visual_tokens: int              # N the counts refer to
    counts: list[int]               # visual tokens kept entering each decoder layer
    fractions: list[float]          # counts / N, for images with another token count


@dataclass(frozen=True)
class Selection:
    rule: str
    params: dict[str, Any]
    score_layer: str                # "same" or "previous"
    images: str = "per-image"       # several images in a prompt: each keeps its share, or "pooled"
    merge_threshold: float | None = None  # format 3: near-duplicate drops merge (runtime/plan.py), else dropped


@dataclass(frozen=True)
class VisionSelection:
    """The pre-LLM stage (format 2): `rule` keeps schedule.counts[0] patches inside the vision tower,
    at the input of encoder layer `encoder_layer`, before the projector."""

    rule: str
    params: dict[str, Any]
    encoder_layer: int


@dataclass(frozen=True)
class MethodRecord:
    name: str
    params: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CalibrationRecord:
    source: str
    num_samples: int
    data_hash: str
    description: str = ""


@dataclass(frozen=True)
class Recipe:
    model: ModelIdentity
    budget: BudgetRecord
    schedule: Schedule
    selection: Selection
    method: MethodRecord
    calibration: CalibrationRecord
    tool_version: str
    created: str
    vision: VisionSelection | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # The two header fields first, so `head recipe.json` tells what the file is; the pre-LLM
        # stage right after the LLM-side selection.
        out = {"format": d.pop("format"), "format_version": d.pop("format_version")}
        vision = d.pop("vision")
        for key, value in d.items():
            out[key] = value
            if key == "selection":
                out["vision"] = vision
        return out
