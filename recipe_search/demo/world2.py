"""Second synthetic visual-QA world ("tiles"), for the second trained model (scripts/train_second_model.py).

Why a second world: a pruning benchmark built on one toy model says little; this one differs from
`world.py` in image size and grid, object vocabulary, rendering, distractors and question keys, so
that a recipe that only works for the demo world's quirks shows up.

Images are 160x160 RGB on a smooth two-colour gradient with speckle noise, cut into a 10x10 grid of
16x16 cells (100 cells). Each cell holds at most one thing:
- 4-6 *targets*: a coloured tile of one of four kinds (ring, disc, stripes, diamond) in one of five
  colours, drawn at a random 0-4 px offset inside its cell; (kind, colour) pairs are distinct;
- 2-4 *distractors*: small grey pebbles, never asked about, so "any non-background cell" is not the
  same as "a relevant cell".
A vision model whose visual tokens cover one 16x16 cell each therefore has every answer-relevant
object in exactly one token: dropping visual tokens at random drops objects.

Question types (every answer one word; the single key word sits right before "?"):
    colour  "what colour is the {kind} ?"         -> colour of the one tile of that kind
    count   "how many tiles are a {kind} ?"       -> zero/one/two/three tiles of that kind
    exist   "is there any {kind} ?"               -> yes/no
    kind    "which kind is {colour} ?"            -> kind of the one tile of that colour
Answers are balanced per type (count classes uniform, yes/no 50/50).

Splits: item i of split s with seed k comes from SeedSequence([k, 100 + s, i]) (streams disjoint from
each other and from world.py's), and each layout (targets and pebbles) is owned by exactly one split
through a hash of its content (80 % train, 10 % calib, 10 % eval), so no image occurs in two splits.
This module knows nothing of any model family.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .world import VQASample, answerable, draw_split, pick_unique

IMAGE_SIZE = 160
CELL = 16
GRID = IMAGE_SIZE // CELL  # 10 cells per side -> 100 cells
MIN_TARGETS, MAX_TARGETS = 4, 6
MIN_PEBBLES, MAX_PEBBLES = 2, 4
TILE = 12  # side of a target's bounding box, in pixels

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 185, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "magenta": (205, 50, 200),
}
KINDS: tuple[str, ...] = ("ring", "disc", "stripes", "diamond")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
PEBBLE, BLANK = "pebble", "blank"  # cell labels used by the training aux loss only

QUESTION_TYPES: tuple[str, ...] = ("colour", "count", "exist", "kind")
SPLITS: tuple[str, ...] = ("train", "calib", "eval")
_SPLIT_BUCKETS: dict[str, range] = {"train": range(8), "calib": range(8, 9), "eval": range(9, 10)}
_STREAM_OFFSET = 100  # keeps this world's seed streams apart from world.py's

TEMPLATE_WORDS: tuple[str, ...] = (
    "what", "colour", "is", "the", "how", "many", "tiles", "are", "a", "there", "any", "which", "kind", "?",
)


def vocabulary() -> list[str]:
    """Every word a question, an answer or a cell label can contain (the tokenizer's vocabulary)."""
    words = [*TEMPLATE_WORDS, *COLOURS, *KINDS, *COUNT_WORDS, "yes", "no", PEBBLE, BLANK]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class Tile:
    cell: int  # row * GRID + col
    kind: str
    colour: str
    dx: int  # offset of the tile inside its cell, 0..CELL-TILE
    dy: int


@dataclass(frozen=True)
class Scene:
    tiles: tuple[Tile, ...]
    pebbles: tuple[int, ...]  # cells holding a grey pebble
    texture_seed: int

    def layout_key(self) -> str:
        """Content hash of the layout (targets and pebbles); decides which split may own the scene."""
        parts = [f"{t.cell},{t.kind},{t.colour},{t.dx},{t.dy}" for t in sorted(self.tiles, key=lambda t: t.cell)]
        parts += [f"p{c}" for c in sorted(self.pebbles)]
        return hashlib.sha256(";".join(parts).encode()).hexdigest()

    def cell_labels(self) -> list[tuple[str, ...]]:
        """Per cell (row-major), the words describing it: (kind, colour), ("pebble",) or ("blank",)."""
        labels: list[tuple[str, ...]] = [(BLANK,)] * (GRID * GRID)
        for c in self.pebbles:
            labels[c] = (PEBBLE,)
        for t in self.tiles:
            labels[t.cell] = (t.kind, t.colour)
        return labels

    def render(self) -> Image.Image:
        rng = np.random.default_rng(self.texture_seed)
        top, bottom = rng.integers(70, 150, size=3), rng.integers(70, 150, size=3)
        ramp = np.linspace(0.0, 1.0, IMAGE_SIZE)[:, None, None]
        pixels = top * (1 - ramp) + bottom * ramp + np.zeros((1, IMAGE_SIZE, 3))
        speckle = rng.random((IMAGE_SIZE, IMAGE_SIZE)) < 0.04
        pixels[speckle] += rng.integers(-40, 41, size=(int(speckle.sum()), 1))
        pixels += rng.integers(-8, 9, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for c in self.pebbles:
            x0 = (c % GRID) * CELL + int(rng.integers(2, 9))
            y0 = (c // GRID) * CELL + int(rng.integers(2, 9))
            v = int(rng.choice([int(rng.integers(35, 65)), int(rng.integers(190, 225))]))
            draw.ellipse((x0, y0, x0 + int(rng.integers(3, 6)), y0 + int(rng.integers(3, 6))), fill=(v, v, v))
        for t in self.tiles:
            jitter = rng.integers(-18, 19, size=3)
            fill = tuple(int(v) for v in np.clip(np.array(COLOURS[t.colour]) + jitter, 0, 255))
            _draw_tile(draw, t.kind, (t.cell % GRID) * CELL + t.dx, (t.cell // GRID) * CELL + t.dy, fill)
        return image


def _draw_tile(draw: ImageDraw.ImageDraw, kind: str, x0: int, y0: int, fill: tuple[int, ...]) -> None:
    s = TILE - 1
    if kind == "ring":
        draw.ellipse((x0, y0, x0 + s, y0 + s), outline=fill, width=3)
    elif kind == "disc":
        draw.ellipse((x0 + 1, y0 + 1, x0 + s - 1, y0 + s - 1), fill=fill)
    elif kind == "stripes":
        for k in range(0, TILE, 4):
            draw.rectangle((x0, y0 + k, x0 + s, y0 + k + 1), fill=fill)
    else:  # diamond
        h = s / 2
        draw.polygon([(x0 + h, y0), (x0 + s, y0 + h), (x0 + h, y0 + s), (x0, y0 + h)], fill=fill)


def split_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """Independent generator for item `index` of `split`; disjoint streams per split and seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAM_OFFSET + SPLITS.index(split), index]))


def owner(scene: Scene) -> str:
    """The one split that owns this layout."""
    bucket = int(scene.layout_key(), 16) % 10
    return next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)


def sample_scene(split: str, rng: np.random.Generator,
                 n_targets: tuple[int, int] = (MIN_TARGETS, MAX_TARGETS)) -> Scene:
    """Random scene whose layout hash belongs to `split`. `n_targets` (inclusive) is narrowed only by
    a training curriculum."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    colours = list(COLOURS)
    while True:
        n = int(rng.integers(n_targets[0], n_targets[1] + 1))
        n_peb = int(rng.integers(MIN_PEBBLES, MAX_PEBBLES + 1))
        cells = rng.choice(GRID * GRID, size=n + n_peb, replace=False)
        combos = rng.choice(len(KINDS) * len(colours), size=n, replace=False)
        offsets = rng.integers(0, CELL - TILE + 1, size=(n, 2))
        tiles = tuple(
            Tile(int(c), KINDS[int(k) % len(KINDS)], colours[int(k) // len(KINDS)], int(o[0]), int(o[1]))
            for c, k, o in zip(cells[:n], combos, offsets)
        )
        scene = Scene(tiles, tuple(int(c) for c in cells[n:]), int(rng.integers(0, 2**31)))
        if owner(scene) == split:
            return scene


def ask(scene: Scene, qtype: str, rng: np.random.Generator, u: float) -> tuple[str, str] | None:
    """A (question, answer) of type `qtype` about `scene`, or None if the scene has none.

    `u` in [0, 1) picks the answer class (count 0-3, yes/no); callers keep it across scene
    resamples, so answers stay balanced and the question alone gives only chance.
    """
    tiles = scene.tiles
    if qtype == "colour":
        t = pick_unique(tiles, "kind", rng)
        return None if t is None else (f"what colour is the {t.kind} ?", t.colour)
    if qtype == "count":
        target = int(u * len(COUNT_WORDS))
        matching = [k for k in KINDS if sum(t.kind == k for t in tiles) == target]
        if not matching:
            return None
        return f"how many tiles are a {matching[int(rng.integers(len(matching)))]} ?", COUNT_WORDS[target]
    if qtype == "exist":
        present = sorted({t.kind for t in tiles}, key=KINDS.index)
        pool = present if u < 0.5 else [k for k in KINDS if k not in present]
        if not pool:
            return None
        return f"is there any {pool[int(rng.integers(len(pool)))]} ?", "yes" if u < 0.5 else "no"
    if qtype == "kind":
        t = pick_unique(tiles, "colour", rng)
        return None if t is None else (f"which kind is {t.colour} ?", t.kind)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def sample_item(split: str, seed: int, index: int, qtype: str) -> tuple[Scene, str, str]:
    """Scene plus one question of `qtype`; resamples the scene until the question exists."""
    return answerable(split, split_rng(split, seed, index), qtype, sample_scene, ask)


def make_split(split: str, n: int, seed: int = 0) -> list[VQASample]:
    """`n` deterministic samples of `split`, one question per image, types in round-robin."""
    return draw_split(split, n, seed, sample_item, QUESTION_TYPES)
