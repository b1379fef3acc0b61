"""A pruning plan: the part of a recipe the runtime executes (how many tokens, chosen how)."""
from __future__ import annotations

from dataclasses import dataclass

from .selection import ScoringRule, SelectionRule


@dataclass(frozen=True)
class PruningPlan:
    """Visual tokens kept entering each decoder layer, and the rule that picks them.

    `counts` apply to images with exactly `visual_tokens` visual tokens; other images (e.g. a
    different resolution) use `fractions` of their own count, rounded and kept non-increasing.
    `score_layer` says whose attention ranks the drop at layer l: "same" (layer l) or
    "previous" (layer l-1, FastV-style). An optional `vision` rule selects `counts[0]` of the
    patches in the vision tower at the input of encoder layer `vision_layer` (None: the last layer
    whose output the LLM reads) before any decoder layer runs; `rule` handles later drops.
    `images` says how a prompt with several images (or video frames) shares the schedule:
    "per-image", each image keeps its own share (the counts of its own size), or "pooled", all
    visual tokens of the prompt compete for the counts of their total.
    """

    counts: tuple[int, ...]
    visual_tokens: int
    rule: SelectionRule
    score_layer: str = "same"
    vision: SelectionRule | None = None
    vision_layer: int | None = None
    images: str = "per-image"
    merge_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.images not in ("per-image", "pooled"):
            raise ValueError(f"images must be 'per-image' or 'pooled', not {self.images!r}")
        if self.score_layer not in ("same", "previous"):
            raise ValueError(f"score_layer must be 'same' or 'previous', not {self.score_layer!r}")
        if self.rule.stage != "llm":
            raise ValueError(f"selection rule {self.rule.name!r} runs in the vision tower: give it as the vision stage")
        if self.vision is not None and self.vision.stage != "vision":
            raise ValueError(f"selection rule {self.vision.name!r} runs in the LLM, not in the vision tower")
        if self.score_layer == "previous" and not isinstance(self.rule, ScoringRule):
            raise ValueError(f"selection rule {self.rule.name!r} does not rank tokens: it needs score_layer 'same'")
        if self.merge_threshold is not None:
            check_merge_threshold(self.merge_threshold)
            if self.rule.merges:
                raise ValueError(f"selection rule {self.rule.name!r} merges by its own weights: it takes no "
                                 "merge_threshold")
        if any(b > a for a, b in zip(self.counts, self.counts[1:])):
            raise ValueError("schedule increases with depth: visual tokens kept must never grow")
        if any(c < 0 or c > self.visual_tokens for c in self.counts):
            raise ValueError(f"schedule counts must lie in [0, {self.visual_tokens}]")
        if (self.score_layer == "previous" and self.vision is None and self.counts
                and self.counts[0] < self.visual_tokens):
            raise ValueError("score_layer 'previous' cannot drop at layer 0: there is no earlier layer")

    @property
    def fractions(self) -> tuple[float, ...]:
        return tuple(c / self.visual_tokens for c in self.counts)

    def counts_for(self, n_visual: int) -> list[int]:
        """Per-layer counts for an image that gives `n_visual` tokens."""
        if n_visual == self.visual_tokens:
            return list(self.counts)
        out: list[int] = []
        for f in self.fractions:
            c = min(n_visual, round(f * n_visual))
            out.append(min(c, out[-1]) if out else c)
        return out

    @classmethod
    def keep_all(cls, num_layers: int, visual_tokens: int, rule: SelectionRule) -> "PruningPlan":
        return cls(tuple([visual_tokens] * num_layers), visual_tokens, rule)


def check_merge_threshold(value: float) -> float:
    """A cosine-similarity threshold in (0, 1] (a lower one would merge unrelated tokens)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"merge_threshold: must be a cosine similarity in (0, 1], not {value!r}")
    return float(value)


def schedule_from_drops(num_layers: int, visual_tokens: int, drops: dict[int, int]) -> tuple[int, ...]:
    """Counts per layer from {layer: tokens kept from that layer on}, e.g. FastV's {2: 72}."""
    counts, current = [], visual_tokens
    for layer in range(num_layers):
        current = min(current, drops.get(layer, current))
        counts.append(current)
    return tuple(counts)


def pre_llm_counts(counts: tuple[int, ...] | list[int], visual_tokens: int) -> tuple[int, ...]:
    """`counts` with the first cut moved before the LLM, for a vision-side rule: the layers before the
    first reduced count get it too, which only lowers the cost, so a budget the schedule met still holds."""
    first = next((i for i, c in enumerate(counts) if c < visual_tokens), None)
    if first is None:
        return tuple(counts)
    return tuple(min(c, counts[first]) for c in counts)
