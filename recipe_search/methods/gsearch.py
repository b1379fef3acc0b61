"""G-Search (arXiv 2412.00556, our design in methods.md §2): the least cost without loss.

Shallow to deep, each layer keeps the fewest visual tokens (on a grid of N/64) such that the
metric on the search set stays within `tolerance` of the unpruned model, with every later layer
tied to the same count while a layer is searched, so counts never grow with depth. The premise
is that visual-token rankings agree across layers (after the first), which the calibration's
Kendall-tau matrix lets a user check. Tokens are ranked by the last prompt token's attention at
the previous layer, so layer 0's attention is never used when start_layer >= 2. A layer's count
either stays or drops by at least `min_cut` of its live tokens (cuts.py): a deep model would
otherwise cut a few tokens at many layers, each cut paying a selection pass.
"""
from __future__ import annotations

import time
from typing import Any

from ..flops import CostModel
from .cuts import worth_a_cut
from .fitprune import SearchResult
from .objective import ScheduleScorer

RULE, RULE_PARAMS, SCORE_LAYER = "attention", {"query": "last", "heads": "mean"}, "previous"


def token_grid(visual_tokens: int, steps: int = 64) -> list[int]:
    """Candidate counts 0..N on a grid of N/steps tokens."""
    return sorted({round(k * visual_tokens / steps) for k in range(steps + 1)})


def search_gsearch(scorer: ScheduleScorer, costs: CostModel, *, start_layer: int = 2, tolerance: float = 0.0,
                   steps: int = 64, rule: str = RULE, deadline: float | None = None,
                   validation: ScheduleScorer | None = None, min_cut: float = 0.0) -> SearchResult:
    """Greedy bisection per layer; the metric is assumed monotone in the count (as the paper does).
    Tokens are chosen by `rule` where it reads (`ScheduleScorer.rule_plan`). Past `deadline`
    (time.monotonic()) no further layer is searched: the layers left keep the last count found,
    which passed, and the result says `"stopped_at_layer"`. With `validation`, a count passes only if
    the validation samples keep their metric too (within `tolerance`): a handful of search samples
    that do not change is weak evidence that nothing changes."""
    if start_layer < 2:
        raise ValueError("G-Search never ranks with layer-0 attention: --start-layer must be at least 2")
    started = time.perf_counter()
    n, layers = scorer.visual_tokens, len(scorer.layers)
    if start_layer >= layers:
        raise ValueError(f"--start-layer {start_layer} is past the model's last layer ({layers - 1})")
    grid = token_grid(n, steps)
    base = scorer.reference()
    floor = base.value - tolerance
    val_floor = validation.reference().value - tolerance if validation is not None else 0.0
    counts = [n] * layers
    history: list[dict[str, Any]] = []
    stopped = None
    for layer in range(start_layer, layers):
        if deadline is not None and time.monotonic() > deadline:
            stopped = layer
            break
        live = counts[layer - 1]
        candidates = [g for g in grid if worth_a_cut(live - g, live, min_cut)] + [live]
        lo, hi = 0, len(candidates) - 1  # candidates[hi] is the previous layer's count: known to pass
        while lo < hi:
            mid = (lo + hi) // 2
            trial = counts[:layer] + [candidates[mid]] * (layers - layer)
            plan = scorer.rule_plan(trial, rule)
            ev = scorer.evaluate_plan(plan)
            ok = ev.value >= floor and (validation is None or validation.evaluate_plan(plan).value >= val_floor)
            history.append({"layer": layer, "count": candidates[mid], "value": ev.value, "kl": ev.kl, "passed": ok})
            lo, hi = (lo, mid) if ok else (mid + 1, hi)
        counts[layer:] = [candidates[hi]] * (layers - layer)
        if candidates[hi] == 0:
            break
    plan = scorer.rule_plan(counts, rule)
    final = scorer.evaluate_plan(plan)
    checked = validation.evaluate_plan(plan) if validation is not None else None
    picked = {} if checked is None else {"validation_value": checked.value, "validation_agreement": checked.agreement,
                                         "validation_samples": len(validation.data)}
    return SearchResult(
        tuple(counts), "gsearch",
        {"start_layer": start_layer, "tolerance": tolerance, "grid_steps": steps, "metric": scorer.metric,
         "min_cut": min_cut},
        plan.rule.name, plan.rule.params(), plan.score_layer,
        {"unpruned_value": base.value, "value": final.value, "agreement": final.agreement, "kl": final.kl,
         "evaluations": scorer.evaluations, "layers_run": scorer.layers_run, "stopped_at_layer": stopped,
         "flops_full": costs.fraction(counts, "full"), **picked, "history": history},
        time.perf_counter() - started, vision_rule=plan.vision.name if plan.vision else None,
    )
