"""How small a cut may be, shared by every method that makes a schedule.

Each layer where the count drops pays a selection pass over all its live tokens (the FitPrune rule
reads their N x N attention rows) and a gather, however few tokens it drops. A schedule that cuts
a handful of tokens at many layers of a deep model pays that many times for little (on a 32-layer
model FitPrune's published fit cut 12 times, docs/performance.md); with `min_cut` a layer cuts only
when it drops at least that share of its live tokens, and the budget is met with the cuts that remain.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: The default share of its live tokens a layer must drop to cut; 0 gives each method's published schedule.
MIN_CUT = 0.1


def check_min_cut(value: Any) -> float:
    """A min_cut as a float in [0, 1); one-line error otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"min_cut must be a share of the live tokens in [0, 1), not {value!r}")
    return float(value)


def worth_a_cut(drop: int, live: int, min_cut: float) -> bool:
    """Whether dropping `drop` of `live` tokens at one layer is a cut the schedule makes."""
    return drop > 0 and drop >= min_cut * live


def held_counts(ratios: Iterable[float], visual_tokens: int, min_cut: float = 0.0) -> tuple[int, ...]:
    """Per layer round(N * ratio), never growing with depth; a smaller count is taken only when the
    drop is `worth_a_cut`, otherwise the live tokens stay until a later layer's drop is."""
    counts, current = [], visual_tokens
    for ratio in ratios:
        target = min(current, round(visual_tokens * ratio))
        if worth_a_cut(current - target, current, min_cut):
            current = target
        counts.append(current)
    return tuple(counts)
