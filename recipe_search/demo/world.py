"""Deterministic synthetic visual-QA world for the demo model.

Images are 96x96 RGB on a mildly textured background; each object is a coloured shape drawn
inside one 8x8 cell of a 12x12 grid, so every object lives in exactly one patch of the vision
tower (patch size 8, 144 patches). Aligning objects to the patch grid keeps the vision side easy
to learn on a CPU, while a busy scene (5-8 objects) makes every visual token that holds an object
matter: dropping tokens at random drops objects.

Splits are drawn from disjoint seed streams and, in addition, every scene layout is assigned to
exactly one split by a hash of its content, so no layout (hence no image) can occur in two splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw

T = TypeVar("T")
S = TypeVar("S")

IMAGE_SIZE = 96
CELL = 8
GRID = IMAGE_SIZE // CELL  # 12 cells per side -> 144 patches
MIN_OBJECTS, MAX_OBJECTS = 5, 8

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 70, 230),
    "yellow": (235, 220, 30),
    "purple": (150, 40, 200),
    "orange": (245, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
SIDES: tuple[str, ...] = ("left", "right")
BLANK = "blank"  # label of a patch without an object (used by the training aux loss only)

QUESTION_TYPES: tuple[str, ...] = ("colour", "count", "exist", "shape")
SPLITS: tuple[str, ...] = ("train", "calib", "eval")
# Share of the layout-hash space owned by each split (out of 10 buckets).
_SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 8), "calib": range(8, 9), "eval": range(9, 10)}

TEMPLATE_WORDS: tuple[str, ...] = (
    "what", "colour", "is", "the", "how", "many", "shapes", "are", "there", "a", "which", "shape", "?",
)


def vocabulary() -> list[str]:
    """Every word a question, an answer or a patch label can contain (tokenizer vocabulary)."""
    words = [*TEMPLATE_WORDS, *COLOURS, *SHAPES, *COUNT_WORDS, *SIDES, "yes", "no", BLANK]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class SceneObject:
    cell: int  # row * GRID + col, i.e. the index of the patch that holds the object
    shape: str
    colour: str

    @property
    def side(self) -> str:
        return SIDES[0] if self.cell % GRID < GRID // 2 else SIDES[1]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    texture_seed: int

    def layout_key(self) -> str:
        """Content hash of the layout; decides which split may own the scene."""
        text = ";".join(f"{o.cell},{o.shape},{o.colour}" for o in sorted(self.objects, key=lambda o: o.cell))
        return hashlib.sha256(text.encode()).hexdigest()

    def patch_labels(self) -> list[tuple[str, ...]]:
        """Per patch, the words describing its content (shape, colour, side) or ("blank",)."""
        labels: list[tuple[str, ...]] = [(BLANK,)] * (GRID * GRID)
        for o in self.objects:
            labels[o.cell] = (o.shape, o.colour, o.side)
        return labels

    def render(self) -> Image.Image:
        rng = np.random.default_rng(self.texture_seed)
        # Mild texture: low-contrast noise plus faint diagonal stripes of random phase and tint.
        base = rng.integers(95, 150, size=3)
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        period = int(rng.integers(5, 11))
        stripes = ((xx + yy + int(rng.integers(0, period))) % period < period // 2) * rng.integers(-14, 15, size=3)[:, None, None]
        noise = rng.integers(-12, 13, size=(3, IMAGE_SIZE, IMAGE_SIZE))
        pixels = np.clip(base[:, None, None] + stripes + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")
        draw = ImageDraw.Draw(image)
        for o in self.objects:
            x0, y0 = (o.cell % GRID) * CELL, (o.cell // GRID) * CELL
            jitter = rng.integers(-20, 21, size=3)
            fill = tuple(int(v) for v in np.clip(np.array(COLOURS[o.colour]) + jitter, 0, 255))
            _draw_shape(draw, o.shape, x0, y0, fill)
        return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, fill: tuple[int, ...]) -> None:
    if shape == "circle":
        draw.ellipse((x0 + 1, y0 + 1, x0 + 6, y0 + 6), fill=fill)
    elif shape == "square":
        draw.rectangle((x0 + 1, y0 + 1, x0 + 6, y0 + 6), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + 3.5, y0 + 0.5), (x0 + 7, y0 + 7), (x0, y0 + 7)], fill=fill)
    else:  # cross
        draw.rectangle((x0 + 3, y0, x0 + 4, y0 + 7), fill=fill)
        draw.rectangle((x0, y0 + 3, x0 + 7, y0 + 4), fill=fill)


@dataclass(frozen=True)
class VQASample:
    image: Image.Image  # RGB
    question: str
    answer: str  # a single word that is one token of the demo tokenizer
    qtype: str
    image_id: str  # stable, unique across splits


def split_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """Independent generator for item `index` of `split`; disjoint streams per split and seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def sample_scene(split: str, rng: np.random.Generator, n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS)) -> Scene:
    """Random scene whose layout hash belongs to `split`; distinct (shape, colour) per object.

    `n_objects` (inclusive range) is narrowed only by the training curriculum.
    """
    buckets = _SPLIT_BUCKETS[split]
    colours = list(COLOURS)
    while True:
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        cells = rng.choice(GRID * GRID, size=n, replace=False)
        combos = rng.choice(len(SHAPES) * len(colours), size=n, replace=False)
        objects = tuple(
            SceneObject(int(c), SHAPES[int(k) % len(SHAPES)], colours[int(k) // len(SHAPES)])
            for c, k in zip(cells, combos)
        )
        scene = Scene(objects, int(rng.integers(0, 2**31)))
        if int(scene.layout_key(), 16) % 10 in buckets:
            return scene


def pick_unique(objs: Sequence[T], attr: str, rng: np.random.Generator) -> T | None:
    """A random object whose `attr` (e.g. shape or colour) no other object shares, so a question can
    name it (shared with the second model's world, world2.py)."""
    values = [getattr(o, attr) for o in objs]
    unique = [o for o, v in zip(objs, values) if values.count(v) == 1]
    return unique[int(rng.integers(len(unique)))] if unique else None


def ask(scene: Scene, qtype: str, rng: np.random.Generator, u: float) -> tuple[str, str] | None:
    """A (question, answer) of type `qtype` about `scene`, or None if the scene has none.

    Every template names its one key word (a shape or a colour) right before "?",
    i.e. at a fixed distance from the answer position; this keeps the question-to-image binding
    learnable from scratch on a CPU budget. The object a colour or shape question refers to is
    unique in the scene; a count names a shape and needs every object of that shape.

    `u` in [0, 1) picks the answer class (count 0-3, yes/no) and is kept by callers
    across scene resamples, so answers stay balanced and the question alone gives only chance;
    colours are uniform by construction.
    """
    objs = scene.objects
    if qtype == "colour":
        o = pick_unique(objs, "shape", rng)
        return None if o is None else (f"what colour is the {o.shape} ?", o.colour)
    if qtype == "count":
        target = int(u * len(COUNT_WORDS))
        matching = [s for s in SHAPES if sum(o.shape == s for o in objs) == target]
        if not matching:
            return None
        shape = matching[int(rng.integers(len(matching)))]
        return f"how many shapes are a {shape} ?", COUNT_WORDS[target]
    if qtype == "exist":
        present = sorted({o.shape for o in objs}, key=SHAPES.index)
        pool = present if u < 0.5 else [s for s in SHAPES if s not in present]
        if not pool:
            return None
        return f"is there a {pool[int(rng.integers(len(pool)))]} ?", "yes" if u < 0.5 else "no"
    if qtype == "shape":
        o = pick_unique(objs, "colour", rng)
        return None if o is None else (f"which shape is {o.colour} ?", o.shape)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def answerable(split: str, rng: np.random.Generator, qtype: str, scene_of: Callable[[str, np.random.Generator], S],
               ask_of: Callable[[S, str, np.random.Generator, float], tuple[str, str] | None]) -> tuple[S, str, str]:
    """A scene plus one question of `qtype`: the answer class `u` is drawn once and kept while the
    scene is resampled until the question exists (so answers stay balanced). Shared with world2.py."""
    u = float(rng.random())
    while True:
        scene = scene_of(split, rng)
        qa = ask_of(scene, qtype, rng, u)
        if qa is not None:
            return scene, qa[0], qa[1]


def sample_item(split: str, seed: int, index: int, qtype: str) -> tuple[Scene, str, str]:
    """Scene plus one question of `qtype`; resamples the scene until the question exists."""
    return answerable(split, split_rng(split, seed, index), qtype, sample_scene, ask)


def draw_split(split: str, n: int, seed: int, item: Callable[[str, int, int, str], tuple[Any, str, str]],
               qtypes: Sequence[str]) -> list[VQASample]:
    """`n` deterministic samples of `split` made by `item`, one question per image, types in
    round-robin. Item i depends only on (split, seed, i), so a longer split extends a shorter one."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    samples = []
    for i in range(n):
        qtype = qtypes[i % len(qtypes)]
        scene, question, answer = item(split, seed, i, qtype)
        samples.append(VQASample(scene.render(), question, answer, qtype, f"{split}-s{seed}-{i:06d}"))
    return samples


def make_split(split: str, n: int, seed: int = 0) -> list[VQASample]:
    """`n` deterministic samples of `split`, one question per image, types in round-robin."""
    return draw_split(split, n, seed, sample_item, QUESTION_TYPES)
