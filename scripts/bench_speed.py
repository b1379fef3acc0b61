"""Speed benchmark on a medium LLaVA-1.5-shaped model with random weights, built in code.

Timing needs no trained weights, so the model is built from a config and never downloaded:

  vision   CLIP tower at 336 px, patch 14 -> 576 patches (+ CLS, dropped as LLaVA-1.5 does), hidden 384,
           2 layers (a cheaper tower than CLIP-L: about the same share of the total FLOPs as CLIP-L has
           in LLaVA-1.5-7B), two-layer GELU projector to the LM width
  LM       Llama decoder, hidden 1024, 16 heads (MHA), SwiGLU MLP 2752 (LLaVA-7B's 11008/4096 ratio),
           8 layers by default (--layers), vocabulary 32064
  prompt   LLaVA-1.5 shape: 5 tokens, 576 image tokens, 35 question tokens (616 in all)

Schedules (how each was made, no calibration of the medium model is needed for timing):
  keep-all  576 visual tokens at every layer, FitPrune rule (only the top-level hook runs, nothing drops)
  fitprune  FitPrune's search (recipe_search.methods.search_fitprune, its default min_cut) at the budget,
            with the medium model's CostModel (formula 'full'), on *real* attention statistics: the embedded demo model's
            calibration (64 samples, trained weights), each layer's per-token statistics resampled to
            576 tokens with the calibration's mass-preserving resampling and the demo's 8 layers mapped
            onto this model's layers (nearest layer); FitPrune rule, scored at the same layer
  uniform   the same count at every layer from layer 0, largest count meeting the budget
            (recipe_search.methods.search_uniform); FitPrune rule, scored at the same layer
  default   what search-recipe's default method (auto) picks on the demo, searched at the start of the run
            (recipe_search.search("demo", "demo", ...)): its rule (and merging) as picked, its schedule's
            per-layer shares (nearest demo layer) scaled to the budget here (methods/auto.scaled_schedule)
  psigmoid  P-Sigmoid's pick on the demo (BO over slope, midpoint, start layer and rule): its curve stretched
            to this model's depth (start, midpoint and slope scaled by layers / 8), the floor re-fitted to
            the budget here as in its trials (psigmoid.fit_proposal); with its picked rule
  (min_cut 0)  the default's and P-Sigmoid's picks carried with min_cut 0 (every drop of the curve is a
            cut), where that differs: what methods/cuts.py's min_cut saves
  (random rule)  the fitprune and uniform schedules with the seeded random rule: no scoring cost
Budgets are shares of the unpruned LM's full-sequence prefill FLOPs (recipe_search/flops.py). The
predicted speed-up is (LM full + vision encoder and projector FLOPs, unpruned) / (the same, pruned),
formulas in recipe_search/flops.py; "meas/pred" divides the measured speed-up by it.

Prefill timing: one forward of a batch (pixel values and input ids; use_cache=False, logits_to_keep=1),
after one warm-up of every configuration. Runs are interleaved: every round runs the bare model and
each configuration once, the order rotating between rounds and reversed in odd rounds; each timed run
directly follows an untimed run of the same configuration (without it, a full-size run that followed
a small one paid for regrowing the heap). Each row gives the median over rounds, min and max, wall and
CPU time; its speed-up is median bare / median configuration, and "paired" is the median over rounds of
the speed-up against that round's bare run.

Hardware bound: after each prefill table's rounds, the model's own decoder layers are called directly on
the first text + count tokens of the bare prefill's layer inputs, for every schedule (causal kernel, no
hooks, nothing scored or gathered), interleaved with bare forwards; the bare forward minus the full-length
stack is the rest (vision tower, projector, embeddings, head). "hw bound" = bare / (rest + the schedule's
stack): the speed-up this machine gives those token counts when choosing them costs nothing, and
"meas/bound" the share of it a configuration gets. meas/pred = (bound/pred) x (meas/bound): the first factor
is the hardware's, the second the runtime's and its rule's.

Deep: batch-1 prefills of the same configurations on the same shape at 32 layers (LLaVA-1.5-7B's
depth; --deep-layers, --deep-rounds): a cut's scoring pass is paid once whatever the depth, so its
share of the prefill, and the number of cuts FitPrune's schedule makes, depend on it.

Decode: greedy generate() of exactly 128 new tokens at batch 1 and 8, bare and pruned interleaved;
tokens/s counts decode steps only; KV-cache bytes after prefill; peak memory (VmHWM); and the bytes a
step must read (weights + KV cache), whose ratio bounds the speed-up of a memory-bound step.

Also: calibration against plain forwards; the share of a `search-recipe --eval none` demo run spent on
its prefill timing (runs with and without --no-timing); the repeatability of the speed-up it prints.
The cost-growth tables and the 7B estimate are scripts/bench_cost_growth.py.

    python scripts/bench_speed.py [--layers 8] [--rounds 7] [--rounds-b8 3] [--batches 1,8]
                                  [--budgets 50%,25%,12.5%] [--decode-tokens 128] [--decode-rounds 2]
                                  [--quick] [--profile] [--out docs/bench-speed-output.md]

--quick: a smoke run of every part (4 layers, batch 1, 2 rounds, 16 decode tokens, short demo searches;
a few minutes).
--profile: pyinstrument profiles only (medium model prefill and decode, demo prefill).
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's recipe_search, whatever is installed

IMAGE_TOKEN = 32000
PREFIX = [1, 3148, 1001, 29901, 29871]          # "<s> USER:" shaped
QUESTION_TOKENS = 35


def build_model(layers: int = 8, seed: int = 0) -> Any:
    """The medium LLaVA-1.5-shaped model with random weights (see module docstring).

    Hidden 1536 and 2048 were tried too (docs/performance.md): per multiply-add they run the 164-token layers of
    a 25 % schedule about as (in)efficiently as hidden 1024, so a wider model would only make the bench slower."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=6,
                              image_size=336, patch_size=14, projection_dim=384)
    text = LlamaConfig(hidden_size=1024, intermediate_size=2752, num_hidden_layers=layers, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.suppress_tokens = [IMAGE_TOKEN]
    model.generation_config.pad_token_id = 0
    return model


def make_inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-free LLaVA-1.5-shaped inputs: a different random question and image per row."""
    gen = torch.Generator().manual_seed(seed)
    rows = [PREFIX + [IMAGE_TOKEN] * 576 + torch.randint(100, 30000, (QUESTION_TOKENS,), generator=gen).tolist()
            for _ in range(batch)]
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 336, 336, generator=gen)}


def text_tokens() -> int:
    return len(PREFIX) + QUESTION_TOKENS


# -- schedules ------------------------------------------------------------------------------------
@functools.cache
def demo_calibration() -> Any:
    """The demo model's calibration statistics (trained weights, 64 samples), computed once per run:
    every depth and token count resamples the same ones."""
    import tempfile

    from recipe_search.calibration import calibrate, demo_samples
    from recipe_search.demo import demo_checkpoint
    from recipe_search.models.loading import load_model

    model, processor, adapter = load_model(demo_checkpoint())
    with tempfile.TemporaryDirectory() as tmp:
        stats, _ = calibrate(model, processor, adapter, demo_samples("calib", 64), cache_dir=Path(tmp), progress=False)
    return stats


def demo_statistics(num_layers: int, visual_tokens: int) -> Any:
    """`demo_calibration()` resampled to this model's visual tokens (mass-preserving, as calibration
    does) and layers (nearest demo layer)."""
    from recipe_search.calibration.collect import resample_tokens
    from recipe_search.stats import CalibrationStats

    stats = demo_calibration()
    src = stats.num_layers
    pick = [min(src - 1, int(i * src / num_layers)) for i in range(num_layers)]

    def convert(a: np.ndarray) -> np.ndarray:
        return np.stack([resample_tokens(s[pick], visual_tokens) for s in a]).astype(np.float32)

    return CalibrationStats(cross=convert(stats.cross), selfv=convert(stats.selfv), last=convert(stats.last),
                            text_tokens=np.full(stats.num_samples, text_tokens(), dtype=np.int64),
                            kendall_tau=np.eye(num_layers, dtype=np.float32))


@dataclass
class Config:
    name: str
    counts: tuple[int, ...] | None      # None: the bare model
    how: str
    predicted: float = 1.0              # (LM full + vision) unpruned / pruned
    rule: str = "fitprune"
    merge_threshold: float | None = None  # near-duplicate drops merged into survivors (runtime/plan.py)
    rule_params: dict[str, Any] | None = None  # None: the rule's recipe defaults (FitPrune: heads max)
    score_layer: str = "same"


@dataclass(frozen=True)
class DemoPick:
    """What a search picked on the demo model (8 layers, 144 visual tokens), to be carried to this model."""

    counts: tuple[int, ...]
    visual_tokens: int
    rule: str
    rule_params: dict[str, Any]
    score_layer: str
    merge_threshold: float | None
    how: str                            # the demo's schedule name, e.g. "fitprune" or "uniform from layer 0"
    curve: dict[str, float] | None = None  # P-Sigmoid: slope, midpoint, start (demo layers)


def demo_picks(auto_budgets: list[str], psigmoid_budgets: list[str], time_budget: float,
               n_trials: int) -> dict[str, DemoPick]:
    """Run search-recipe's default (auto) and P-Sigmoid on the demo model, as a user would; keyed "auto 50%"."""
    import tempfile

    import recipe_search

    picks: dict[str, DemoPick] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("auto", auto_budgets, {"time_budget": time_budget}),
                ("psigmoid", psigmoid_budgets, {"n_trials": n_trials})]
        for method, budgets, extra in runs:
            if not budgets:
                continue
            recipes = recipe_search.search("demo", "demo", budgets, method=method, cache_dir=Path(tmp) / "cache",
                                           work_dir=Path(tmp) / method, progress=False, **extra)
            for text, r in zip(budgets, recipes):
                if r.vision is not None:
                    raise SystemExit(f"bench_speed: the demo's {method} {text} pick selects inside the vision tower "
                                     f"({r.vision.rule}); this benchmark times LLM-side rules only")
                res = r.method.result
                curve = None
                if method == "psigmoid":
                    curve = {"slope": res["slope"], "midpoint": res["midpoint"],
                             "start": r.method.params["start_layer"]}
                how = res["winner"]["schedule"] if method == "auto" else "P-Sigmoid"
                picks[f"{method} {text}"] = DemoPick(tuple(r.schedule.counts), r.schedule.visual_tokens,
                                                     r.selection.rule,
                                                     dict(r.selection.params), r.selection.score_layer,
                                                     r.selection.merge_threshold, how, curve)
    return picks


def carried(pick: DemoPick, n: int, layers: int, budget: Any, costs: Any,
            min_cut: float) -> tuple[tuple[int, ...] | None, str]:
    """The demo pick's schedule on this model, and how it was carried: a P-Sigmoid's curve stretched to
    `layers` (start, midpoint and slope scaled by layers / 8) with its floor re-fitted to the budget as
    each trial's is (`psigmoid.fit_proposal`: the midpoint moves earlier when no floor fits); any other
    schedule, or a curve that cannot meet the budget here, by its per-layer shares (nearest demo layer)
    scaled to the budget (`auto.scaled_schedule`). Drops under `min_cut` of the live tokens wait."""
    from recipe_search.methods import auto, psigmoid

    src = len(pick.counts)
    if pick.curve is not None:
        stretch = layers / src
        fitted = psigmoid.fit_proposal(n, layers, round(pick.curve["start"] * stretch), pick.curve["slope"] / stretch,
                                       pick.curve["midpoint"] * stretch, budget, costs, min_cut)
        if fitted is not None:
            return fitted[2], "curve stretched to this depth, floor re-fitted"
    shape = [round(pick.counts[min(src - 1, int(i * src / layers))] * n / pick.visual_tokens) for i in range(layers)]
    return auto.scaled_schedule(shape, n, budget, costs, min_cut), "per-layer shares scaled to the budget"


def schedules(adapter: Any, budgets: list[str], picks: dict[str, DemoPick]) -> tuple[list[Config], Any, Any]:
    """keep-all, then per budget FitPrune's and the uniform schedule, and the demo picks carried here
    (`carried`): the default (auto) recipe and P-Sigmoid's, each also with min_cut 0 when that changes it."""
    from recipe_search.budget import parse_budget
    from recipe_search.flops import CostModel, VisionCost
    from recipe_search.methods import search_fitprune, search_uniform
    from recipe_search.methods.cuts import MIN_CUT

    dims = adapter.dims()
    n = adapter.visual_tokens_per_image()
    costs = CostModel(dims, n, (text_tokens(),))
    vision = VisionCost(adapter.vision_layout())
    stats = demo_statistics(dims.num_layers, n)

    def predicted(counts: tuple[int, ...]) -> float:
        return (costs.unpruned("full") + vision.unpruned()) / (costs.total(counts, "full") + vision.total(counts[0]))

    out = [Config("keep-all", tuple([n] * dims.num_layers), "all tokens, fitprune rule")]
    for text in budgets:
        budget = parse_budget(text)
        fit = search_fitprune(stats, budget, costs)
        uni = search_uniform(stats, budget, costs)
        out.append(Config(f"fitprune {text}", fit.counts,
                          f"FitPrune fit (alpha {fit.result['alpha']:.3f}) on demo statistics; FLOPs "
                          f"{costs.fraction(fit.counts, 'full'):.1%}"))
        out.append(Config(f"uniform {text}", uni.counts,
                          f"one cut at layer 0 to {uni.counts[0]}; FLOPs {costs.fraction(uni.counts, 'full'):.1%}"))
        for method, label in (("auto", "default"), ("psigmoid", "psigmoid")):
            pick = picks.get(f"{method} {text}")
            if pick is None:
                continue
            rule = pick.rule + ("+merge" if pick.merge_threshold is not None else "")
            if pick.curve is None:
                what = f"search-recipe's default (auto) on the demo picked {pick.how} x {rule}"
            else:
                what = (f"P-Sigmoid (BO) on the demo picked slope {pick.curve['slope']:.2f}, midpoint "
                        f"{pick.curve['midpoint']:.2f}, start {pick.curve['start']:.0f} x {rule}")
            held, held_way = carried(pick, n, dims.num_layers, budget, costs, MIN_CUT)
            published, published_way = carried(pick, n, dims.num_layers, budget, costs, 0.0)
            for name, counts, way, note in ((f"{label} {text}", held, held_way, f"min_cut {MIN_CUT:g}"),
                                            (f"{label} {text} (min_cut 0)", published, published_way, "min_cut 0")):
                if counts is None or (note == "min_cut 0" and counts == held):
                    continue
                out.append(Config(name, counts, f"{what}; carried here: {way}, {note}; FLOPs "
                                  f"{costs.fraction(counts, 'full'):.1%}", rule=pick.rule,
                                  merge_threshold=pick.merge_threshold, rule_params=pick.rule_params,
                                  score_layer=pick.score_layer))
    for c in out:
        c.predicted = predicted(c.counts)
    return out, costs, vision


def scoring_share(config: Config, dims: Any, costs: Any, vision: Any) -> float:
    """MACs the rule spends selecting, over the MACs the prediction counts for the configuration: at each cut,
    the projections the rule reads that the layer does not reuse (the dropped tokens' queries and keys;
    DART reads keys only; with merging counted as if no projection were reused, an upper bound: reuse is
    lost only at cuts where a survivor absorbed a token and so has a new state),
    for FitPrune the logits of its query rows (visual rows over the keys before them, post-image text rows
    over every key), for DART the cosine similarity of its 8 pivots to the live tokens, and for merging
    the cosine similarity of every dropped token to every survivor."""
    if config.counts is None or config.rule == "random":
        return 0.0
    keys = dims.hidden_size * dims.num_kv_heads * dims.head_dim
    proj = keys if config.rule == "dart" else keys + dims.hidden_size * dims.num_heads * dims.head_dim
    width = dims.num_heads * dims.head_dim
    live, extra = costs.visual_tokens, 0.0
    for kept in config.counts:
        if kept < live:
            extra += (live if config.merge_threshold is not None else live - kept) * proj
            if config.rule == "fitprune":
                extra += width * (live * (len(PREFIX) + (live + 1) / 2) + QUESTION_TOKENS * (live + text_tokens()))
            if config.rule == "dart":
                extra += 8 * live * dims.hidden_size
            if config.merge_threshold is not None:
                extra += (live - kept) * kept * dims.hidden_size
            live = kept
    return extra / (costs.total(config.counts, "full") + vision.total(config.counts[0]))


def plan_for(counts: tuple[int, ...], n: int, rule: str = "fitprune", merge_threshold: float | None = None,
             rule_params: dict[str, Any] | None = None, score_layer: str = "same") -> Any:
    """The runtime plan of `counts` under `rule` (its recipe defaults unless `rule_params` are given)."""
    from recipe_search.runtime import PruningPlan, make_rule

    if rule_params is None:
        rule_params = {"heads": "max"} if rule == "fitprune" else {}
    return PruningPlan(tuple(counts), n, make_rule(rule, rule_params), score_layer, merge_threshold=merge_threshold)


# -- measuring ------------------------------------------------------------------------------------
_HOOK_SECONDS = [0.0]


def _time_hooks() -> None:
    """Count the seconds spent inside recipe_search's pre-forward hooks (top and per layer), so a
    configuration's own overhead is measured directly, not only as a difference of noisy totals."""
    from recipe_search.hooks import CallHook

    if getattr(CallHook, "_bench_timed", False):
        return
    inner = CallHook.pre_forward

    def pre_forward(self: Any, module: Any, args: tuple, kwargs: dict) -> Any:
        start = time.perf_counter()
        try:
            return inner(self, module, args, kwargs)
        finally:
            _HOOK_SECONDS[0] += time.perf_counter() - start

    CallHook.pre_forward = pre_forward  # type: ignore[method-assign]
    CallHook._bench_timed = True  # type: ignore[attr-defined]


def _forward(model: Any, inputs: dict) -> None:
    with torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)


def timed(model: Any, adapter: Any, plan: Any, fn: Callable[[], Any]) -> tuple[float, float, float]:
    """(wall, CPU, inside recipe_search's hooks) seconds of fn() with `plan` attached (None: bare);
    attaching is not timed, the garbage collector is paused during the call."""
    from recipe_search.runtime import PruningHandle

    handle = PruningHandle(model, plan, adapter) if plan is not None else None
    gc.disable()  # as timeit does: a full collection (~0.2 s with transformers loaded) must not land in one run
    try:
        _HOOK_SECONDS[0] = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu, _HOOK_SECONDS[0]
    finally:
        gc.enable()
        if handle is not None:
            handle.remove()


@dataclass
class Row:
    config: Config
    wall: list[float]
    cpu: list[float]
    hooks: list[float] = field(default_factory=list)


def interleaved(model: Any, adapter: Any, rows: list[Row], plans: dict[str, Any], fn: Callable[[], Any],
                rounds: int, log: Callable[[str], None]) -> None:
    """Round r: the bare model and every configuration (order rotated by r, reversed in odd rounds), each
    timed run after an untimed one of the same configuration. One warm-up each first."""
    bare, others = rows[0], rows[1:]
    for row in rows:
        timed(model, adapter, plans[row.config.name], fn)
    for r in range(rounds):
        k = r % max(1, len(others))
        order = [bare, *others[k:], *others[:k]]
        for row in (order if r % 2 == 0 else order[::-1]):  # odd rounds backwards: no one always follows bare
            timed(model, adapter, plans[row.config.name], fn)  # primer: the heap as this configuration leaves it
            w, c, h = timed(model, adapter, plans[row.config.name], fn)
            row.wall.append(w)
            row.cpu.append(c)
            row.hooks.append(h)
        log(f"  round {r + 1}/{rounds}: bare {bare.wall[-1]:.3f} s")


def hardware_bounds(model: Any, adapter: Any, configs: list[Config], inputs: dict, rounds: int,
                    log: Callable[[str], None]) -> dict[str, float]:
    """The speed-up this machine gives each schedule when choosing tokens costs nothing: the model's own
    decoder layers, called directly on the first `text + count` tokens of the bare prefill's inputs to
    each layer (its rotary tables and positions cut to that length; the causal kernel, as the bare model
    uses; no hooks), plus the rest of the bare prefill (vision tower, projector, embeddings, final norm,
    head: the bare forward minus the full-length stack, paired per round). Configurations with the same
    counts share one timing; the bare forward and every distinct stack are interleaved, `rounds` rounds."""
    from recipe_search.hooks import CallHook, HookSet
    from recipe_search.models.base import LayerCall

    layers = list(adapter.decoder_layers())
    calls: list[tuple[tuple, dict]] = []
    with torch.no_grad(), HookSet() as hooks:
        for layer in layers:
            hooks.add(layer, CallHook(lambda module, args, kwargs: calls.append((args, kwargs))))
        _forward(model, inputs)
    reads = [adapter.read_layer_call(*call) for call in calls]
    if any(r.mask is not None for r in reads):
        raise RuntimeError("hardware bound: the bare prefill did not use the causal kernel (a mask was passed)")
    full = (adapter.visual_tokens_per_image(),) * len(layers)
    stacks = list(dict.fromkeys([full, *(c.counts for c in configs if c.counts is not None)]))

    def stack(counts: tuple[int, ...]) -> None:
        with torch.no_grad():
            for layer, (args, kwargs), read, count in zip(layers, calls, reads, counts):
                m = count + text_tokens()
                rope = None if read.rope is None else (read.rope[0][:, :m], read.rope[1][:, :m])
                positions = None if read.position_ids is None else read.position_ids[..., :m]
                cut_args, cut_kwargs = adapter.write_layer_call(args, kwargs,
                                                                LayerCall(read.hidden[:, :m], rope, positions, None))
                layer(*cut_args, **cut_kwargs)

    def clock(fn: Callable[[], Any]) -> float:
        return timed(model, adapter, None, fn)[0]  # wall seconds, nothing attached

    bare: list[float] = []
    seconds: dict[tuple[int, ...], list[float]] = {c: [] for c in stacks}
    for counts in stacks:
        stack(counts)  # warm-up
    for r in range(rounds):
        order = stacks[r % len(stacks):] + stacks[:r % len(stacks)]
        bare.append(clock(lambda: _forward(model, inputs)))
        for counts in (order if r % 2 == 0 else order[::-1]):
            seconds[counts].append(clock(lambda c=counts: stack(c)))
        log(f"  hardware bound, round {r + 1}/{rounds}: bare {bare[-1]:.3f} s")
    rest = statistics.median(b - s for b, s in zip(bare, seconds[full]))
    base = rest + statistics.median(seconds[full])
    return {c.name: base / (rest + statistics.median(seconds[c.counts])) for c in configs if c.counts is not None}


def cut_count(counts: tuple[int, ...] | None, visual_tokens: int) -> int:
    """Layers where the count drops (each pays one scoring pass of the rule)."""
    return sum(1 for i, c in enumerate(counts or ()) if c < (counts[i - 1] if i else visual_tokens))


def make_plans(configs: list[Config], n: int, bounds_text: str) -> tuple[dict[str, Any], list[Config]]:
    """Plans of every configuration, and the random-rule twins of the `bounds_text` schedules (with theirs)."""
    plans: dict[str, Any] = {"bare": None}
    for c in configs:
        plans[c.name] = plan_for(c.counts, n, c.rule, c.merge_threshold, c.rule_params, c.score_layer)
    names = {f"{kind} {b}" for b in bounds_text.split(",") if b for kind in ("fitprune", "uniform")}
    bounds = [Config(c.name + " (random rule)", c.counts, "", c.predicted, "random") for c in configs if c.name in names]
    for c in bounds:
        plans[c.name] = plan_for(c.counts, n, "random")
    return plans, bounds


def twins(rows: list[Row], suffix: str) -> list[tuple[Config, Config]]:
    """Each timed configuration with its twin `<name><suffix>` (the same pick timed another way)."""
    names = {r.config.name: r.config for r in rows}
    return [(r.config, names[r.config.name + suffix]) for r in rows if r.config.name + suffix in names]


def emit_twins(emit: Callable[[str], None], pairs: list[tuple[Config, Config]], intro: str, header: str,
               line: Callable[[Config, Config], str]) -> None:
    """A table of one line per pair, under `intro`; nothing when there are no pairs."""
    if not pairs:
        return
    emit()
    emit(intro)
    emit()
    emit(header)
    emit("|---|" + "---:|" * (header.count("|") - 2))
    for a, b in pairs:
        emit(line(a, b))


def prefill_section(model: Any, adapter: Any, configs: list[Config], plans: dict[str, Any], bounds: list[Config],
                    n: int, batch: int, rounds: int, label: str, floors: dict[str, float],
                    log: Callable[[str], None], emit: Callable[[str], None]) -> None:
    """One interleaved prefill table (with the random-rule twins `bounds` at batch 1), the FitPrune rule's
    selection cost, and the section's floor values under keys "b{batch}{label} ..."."""
    inputs = make_inputs(batch)
    timed_configs = [Config("bare", None, "", 1.0), *configs, *(bounds if batch == 1 else [])]
    rows = [Row(c, [], []) for c in timed_configs]
    log(f"prefill{label}, batch {batch}: {len(rows)} configurations x {rounds} rounds")
    interleaved(model, adapter, rows, plans, lambda: _forward(model, inputs), rounds, log)
    hardware = hardware_bounds(model, adapter, timed_configs, inputs, rounds, log)
    lines, ratios = prefill_table(rows, hardware)
    emit()
    emit(f"## Prefill{label}, batch {batch} ({rounds} interleaved rounds; wall clock, CPU time alongside)")
    emit()
    for line in lines:
        emit(line)
    emit()
    emit("'hw bound' is the speed-up the same token counts get from this machine when choosing them costs nothing: "
         "the model's own layers called on that many tokens (causal kernel, no hooks) plus the rest of the bare "
         "prefill (`hardware_bounds`); 'meas/bound' divides the measured speed-up by it. Where the bound is below "
         "the FLOPs prediction, the hardware does not give the FLOPs ratio (fewer rows per matrix product); where "
         "a configuration is below its bound, the runtime and its rule spend the difference.")
    median = {r.config.name: statistics.median(r.wall) for r in rows}
    emit_twins(emit, twins(rows, " (random rule)"),
               "What the FitPrune rule's selection costs (its row minus the same schedule with the random rule; "
               "cuts = layers where the count drops):",
               "| schedule | cuts | selection ms (median) | share of the configuration's time |",
               lambda r, b: f"| {r.name} | {cut_count(r.counts, n)} | {(median[r.name] - median[b.name]) * 1000:.0f} | "
                            f"{(median[r.name] - median[b.name]) / median[r.name]:.1%} |")
    emit_twins(emit, twins(rows, " (min_cut 0)"),
               "What min_cut changes (the same pick carried here with min_cut 0, i.e. every drop of its curve is a cut):",
               "| configuration | cuts (min_cut 0 -> default) | meas/pred (min_cut 0 -> default) | median ms saved |",
               lambda r, p: f"| {r.name} | {cut_count(p.counts, n)} -> {cut_count(r.counts, n)} | "
                            f"{ratios[p.name]:.3f} -> {ratios[r.name]:.3f} | {(median[p.name] - median[r.name]) * 1000:.0f} |")
    key = f"b{batch}{label}"
    floors[f"{key} keep-all overhead: time in its hooks / bare"] = ratios["keep-all hooks"]
    floors[f"{key} keep-all overhead"] = 1 / (ratios["keep-all"]) - 1
    floors[f"{key} keep-all overhead cpu"] = 1 / (ratios["keep-all cpu"]) - 1
    for name in ("fitprune 50%", "fitprune 25%", "default 50%", "default 25%", "uniform 50%", "uniform 25%",
                 "fitprune 50% (random rule)", "fitprune 25% (random rule)", "psigmoid 50%", "psigmoid 25%"):
        if name in ratios:
            floors[f"{key} {name} meas/pred"] = ratios[name]
            floors[f"{key} {name} meas/pred cpu"] = ratios[name + " cpu"]
            floors[f"{key} {name} meas/bound"] = ratios[name + " bound"]
            floors[f"{key} {name} bound/pred"] = ratios[name + " bound/pred"]


def prefill_table(rows: list[Row], hardware: dict[str, float]) -> tuple[list[str], dict[str, float]]:
    """The table's lines and, per configuration, measured / predicted (wall; "<name> cpu": CPU time), time in
    hooks / bare ("<name> hooks"), measured / hardware bound ("<name> bound"), bound / predicted."""
    bare = rows[0]
    med_bare, cpu_bare = statistics.median(bare.wall), statistics.median(bare.cpu)
    lines = [("| configuration | median ms | min | max | in hooks ms | speed-up | paired | predicted | meas/pred | "
              "CPU speed-up | CPU meas/pred | hw bound | meas/bound |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios: dict[str, float] = {}
    for row in rows:
        med, cpu = statistics.median(row.wall), statistics.median(row.cpu)
        speed = med_bare / med
        paired = statistics.median(b / x for b, x in zip(bare.wall, row.wall))
        cpu_speed = cpu_bare / cpu
        pred = row.config.predicted
        ratios[row.config.name] = speed / pred
        ratios[row.config.name + " cpu"] = cpu_speed / pred
        ratios[row.config.name + " hooks"] = statistics.median(row.hooks) / med_bare
        bound = hardware.get(row.config.name, 1.0)
        ratios[row.config.name + " bound"] = speed / bound
        ratios[row.config.name + " bound/pred"] = bound / pred
        lines.append(f"| {row.config.name} | {med * 1000:.0f} | {min(row.wall) * 1000:.0f} | {max(row.wall) * 1000:.0f} | "
                     f"{statistics.median(row.hooks) * 1000:.2f} | "
                     f"{speed:.3f}x | {paired:.3f}x | {pred:.3f}x | {speed / pred:.3f} | {cpu_speed:.3f}x | "
                     f"{cpu_speed / pred:.3f} | {bound:.3f}x | {speed / bound:.3f} |")
    return lines, ratios


def kv_bytes(model: Any, adapter: Any, plan: Any, inputs: dict) -> int:
    """Bytes of the key and value tensors in the KV cache after one prefill."""
    from transformers import DynamicCache

    from recipe_search.runtime.applier import cache_argument

    cache = DynamicCache(config=adapter.text_config)

    def run() -> None:
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})

    timed(model, adapter, plan, run)
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Return freed heap to the OS and reset the process's peak RSS (Linux); False if unavailable."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def decode_run(model: Any, adapter: Any, plan: Any, inputs: dict, new_tokens: int) -> dict[str, float]:
    """Greedy generate() of exactly `new_tokens` tokens: decode steps/s (prefill excluded) and peak memory."""
    import resource

    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return scores

    gc.collect()
    exact = _reset_peak()
    before = _rss_kb("VmRSS:") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def run() -> None:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           logits_processor=LogitsProcessorList([Stamp()]))

    wall, _, _ = timed(model, adapter, plan, run)
    peak = (_rss_kb("VmHWM:") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) - before
    steps = len(stamps) - 1
    batch = inputs["input_ids"].shape[0]
    return {"steps_per_s": steps / (stamps[-1] - stamps[0]), "tokens_per_s": batch * steps / (stamps[-1] - stamps[0]),
            "prefill_s": wall - (stamps[-1] - stamps[0]), "peak_mb": peak / 1024, "exact_peak": float(exact)}


def calibration_ratio(model: Any, adapter: Any, samples: int, batch: int, rounds: int,
                      log: Callable[[str], None]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Wall and CPU seconds of collect_stats and of plain forwards over the same batches, interleaved."""
    from PIL import Image

    from recipe_search.calibration import collect_stats
    from recipe_search.calibration.data import Sample, SampleSet, batches

    base = type(adapter)

    class BenchAdapter(base):  # type: ignore[misc,valid-type]
        def inputs(self, processor: Any, images: Any, prompts: Any) -> dict[str, torch.Tensor]:
            return make_inputs(len(prompts), seed=int(prompts[0]))

    bench = BenchAdapter(model)
    image = Image.new("RGB", (336, 336))
    data = SampleSet(tuple(Sample(image, str(i)) for i in range(samples)), "bench")

    def plain() -> None:
        with torch.no_grad():
            for chunk in batches(data.samples, batch):
                model(**bench.inputs(None, [s.image for s in chunk], [s.prompt for s in chunk]), use_cache=False)

    def calib() -> None:
        collect_stats(model, None, bench, data, batch_size=batch, progress=False)

    out: tuple[list[float], list[float], list[float], list[float]] = ([], [], [], [])
    plain(), calib()  # warm-up
    for r in range(rounds):
        w, c, _ = timed(model, adapter, None, plain)
        out[0].append(w), out[1].append(c)
        w, c, _ = timed(model, adapter, None, calib)
        out[2].append(w), out[3].append(c)
        log(f"  calibration round {r + 1}/{rounds}: plain {out[0][-1]:.2f} s, calibration {out[2][-1]:.2f} s")
    return out


# -- profiling ------------------------------------------------------------------------------------
def _hook_share(frame: Any) -> float:
    """Inclusive seconds of the outermost recipe_search frames under `frame` (the hooks' own work)."""
    path = (frame.file_path or "").replace("\\", "/")
    if "/recipe_search/" in path and "/scripts/" not in path:
        return frame.time
    return sum(_hook_share(child) for child in frame.children)


def profile(model: Any, adapter: Any, plans: dict[str, Any], fn: Callable[[], Any], repeats: int, top: int,
            emit: Callable[[str], None]) -> None:
    """pyinstrument, flat by self time, for each plan over `repeats` forwards after a warm-up."""
    from pyinstrument import Profiler

    from recipe_search.runtime import PruningHandle

    for name, plan in plans.items():
        with PruningHandle(model, plan, adapter):
            fn()
            prof = Profiler(interval=0.0005)
            prof.start()
            for _ in range(repeats):
                fn()
            prof.stop()
        session = prof.last_session
        root = session.root_frame()
        total = root.time if root is not None else 0.0
        hooks = _hook_share(root) if root is not None else 0.0
        emit(f"\n{name}: {total / repeats * 1000:.1f} ms per forward (wall, under the profiler), recipe_search "
             f"hooks {hooks / max(total, 1e-9):.1%} of it")
        emit("```")
        text = prof.output_text(unicode=False, color=False, flat=True)
        body = [line for line in text.splitlines() if line[:1].isdigit()]
        for line in body[:top]:
            emit(line.replace(str(Path.cwd()) + "/", "").replace("../", ""))
        emit("```")


def rule_ops(model: Any, adapter: Any, counts: tuple[int, ...], batch: int, emit: Callable[[str], None],
             top: int = 12) -> None:
    """What the FitPrune rule adds to a prefill, by operator: torch.profiler self CPU time of one forward with
    `counts` selected by the FitPrune rule minus the same schedule with the random rule (no scoring), after a
    warm-up each. The rows say where its selection spends: projections of the tokens it drops (`mm`), rotary
    and copies, and the attention rows it reads (`bmm`, softmax, masks)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from recipe_search.runtime import PruningHandle

    inputs = make_inputs(batch)
    self_ms: dict[str, dict[str, tuple[float, int]]] = {}
    for rule in ("fitprune", "random"):
        with PruningHandle(model, plan_for(counts, adapter.visual_tokens_per_image(), rule), adapter):
            _forward(model, inputs)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                _forward(model, inputs)
        self_ms[rule] = {e.key: (e.self_cpu_time_total / 1000, e.count) for e in prof.key_averages()}
    total = {rule: sum(ms for ms, _ in ops.values()) for rule, ops in self_ms.items()}
    diff = sorted(((self_ms["fitprune"].get(k, (0.0, 0))[0] - self_ms["random"].get(k, (0.0, 0))[0], k)
                   for k in set(self_ms["fitprune"]) | set(self_ms["random"])), reverse=True)
    emit(f"\n## What the FitPrune rule adds, by operator (batch {batch}, schedule {' '.join(map(str, counts))}, "
         "one forward under torch.profiler, self CPU ms)")
    emit("")
    emit(f"FitPrune rule {total['fitprune']:.0f} ms, random rule {total['random']:.0f} ms: "
         f"{total['fitprune'] - total['random']:.0f} ms more.")
    emit("")
    emit("| operator | FitPrune rule ms (calls) | random rule ms (calls) | difference ms |")
    emit("|---|---:|---:|---:|")
    for delta, key in diff[:top]:
        (a, na), (b, nb) = self_ms["fitprune"].get(key, (0.0, 0)), self_ms["random"].get(key, (0.0, 0))
        emit(f"| {key} | {a:.1f} ({na}) | {b:.1f} ({nb}) | {delta:+.1f} |")


def layer_efficiency(emit: Callable[[str], None], rounds: int = 7) -> None:
    """Multiply-adds per CPU second of one Llama decoder layer (sdpa) at the token counts the schedules leave (616 =
    576 visual + 40 text, 321 ~ 50 %, 164 ~ 25 %, 83 ~ 12.5 %), for LM widths 1024 / 1536 / 2048, interleaved."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRotaryEmbedding,
    )

    shapes = [(1024, 16, 2752), (1536, 12, 4096), (2048, 16, 5504)]
    tokens = [616, 321, 164, 83]
    layers = {}
    for hidden, heads, mlp in shapes:
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                          num_key_value_heads=heads, num_hidden_layers=1)
        cfg._attn_implementation = "sdpa"
        layers[hidden] = (LlamaDecoderLayer(cfg, 0).eval(), LlamaRotaryEmbedding(cfg), mlp)
    seconds: dict[tuple[int, int], list[float]] = {(h, n): [] for h in layers for n in tokens}
    with torch.no_grad():
        for _ in range(rounds):
            for hidden, (layer, rotary, _) in layers.items():
                for n in tokens:
                    x, pos = torch.randn(1, n, hidden), torch.arange(n)[None]
                    rope = rotary(x, pos)
                    layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope)
                    start = time.process_time()
                    layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope)
                    seconds[(hidden, n)].append(time.process_time() - start)
    emit("\n## Throughput of one decoder layer vs the tokens it runs on (batch 1, CPU time, "
         f"median of {rounds} interleaved rounds)")
    emit("")
    emit("| LM hidden | " + " | ".join(f"{n} tokens GMAC/s (vs 616)" for n in tokens) + " |")
    emit("|---:|" + "---:|" * len(tokens))
    for hidden, (_, _, mlp) in layers.items():
        rate = {n: (4 * n * hidden * hidden + 2 * n * n * hidden + 3 * n * hidden * mlp)
                / statistics.median(seconds[(hidden, n)]) / 1e9 for n in tokens}
        emit(f"| {hidden} | " + " | ".join(f"{rate[n]:.1f} ({rate[n] / rate[616]:.2f})" for n in tokens) + " |")


def mask_cost(emit: Callable[[str], None], rounds: int = 7) -> None:
    """CPU time of one hidden-1024 Llama decoder layer (sdpa, batch 1) with no mask (the causal kernel, as the
    bare prefill and dropping plans run) against the same causal pattern passed as an additive float mask
    (as plans that merge pass it, to carry each survivor's log(mass)), interleaved."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRotaryEmbedding,
    )

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2752, num_attention_heads=16, num_key_value_heads=16,
                      num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    layer, rotary = LlamaDecoderLayer(cfg, 0).eval(), LlamaRotaryEmbedding(cfg)
    tokens = [616, 336, 200, 83]
    seconds: dict[tuple[int, bool], list[float]] = {(n, m): [] for n in tokens for m in (False, True)}
    with torch.no_grad():
        for _ in range(rounds):
            for n in tokens:
                x, pos = torch.randn(1, n, 1024), torch.arange(n)[None]
                rope = rotary(x, pos)
                float_mask = torch.full((n, n), float("-inf")).triu_(1)[None, None]
                for masked in (False, True):
                    mask = float_mask if masked else None
                    layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
                    start = time.process_time()
                    layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
                    seconds[(n, masked)].append(time.process_time() - start)
    emit(f"\n## One decoder layer, causal kernel vs a float mask (hidden 1024, batch 1, CPU ms, median of {rounds})")
    emit("")
    emit("| tokens | no mask (causal kernel) | float causal mask | mask / causal |")
    emit("|---:|---:|---:|---:|")
    for n in tokens:
        plain, masked = (statistics.median(seconds[(n, m)]) for m in (False, True))
        emit(f"| {n} | {plain * 1000:.1f} | {masked * 1000:.1f} | {masked / plain:.3f} |")


def run_profile(args: argparse.Namespace, emit: Callable[[str], None]) -> None:
    from recipe_search.calibration import demo_samples
    from recipe_search.demo import demo_checkpoint
    from recipe_search.models import get_adapter
    from recipe_search.models.loading import load_model
    from recipe_search.recipe import load_recipe
    from recipe_search.runtime.apply import plan_from_recipe

    layer_efficiency(emit)
    mask_cost(emit)
    model = build_model(args.layers)
    adapter = get_adapter(model)
    n = adapter.visual_tokens_per_image()
    configs, _, _ = schedules(adapter, ["50%", "25%"], {})
    inputs = make_inputs(1)
    emit(f"## Profile: medium model ({args.layers} layers), batch 1, {args.profile_repeats} forwards")
    profile(model, adapter, {c.name: plan_for(c.counts, n) for c in configs
                             if c.name in ("keep-all", "fitprune 50%", "uniform 25%")},
            lambda: _forward(model, inputs), args.profile_repeats, args.profile_top, emit)
    demo, processor, dadapter = load_model(demo_checkpoint())
    data = demo_samples("eval", 16, seed=1)
    dinputs = dadapter.inputs(processor, [s.image for s in data.samples], [s.prompt for s in data.samples])
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo-fitprune-50pct.json"
    dplans = {"keep-all": plan_for((144,) * 8, 144), "fitprune 50% (recipes/demo-fitprune-50pct.json)":
              plan_from_recipe(load_recipe(recipe))}
    emit(f"\n## Profile: demo model, batch 16 (the search-recipe timing batch), {10 * args.profile_repeats} forwards")
    profile(demo, dadapter, dplans, lambda: _forward(demo, dinputs), 10 * args.profile_repeats, args.profile_top, emit)
    fit25 = next(c for c in configs if c.name == "fitprune 25%")
    rule_ops(model, adapter, fit25.counts, 8, emit)
    steps = 32
    fit = next(c for c in configs if c.name == "fitprune 50%")
    for batch in (1, 8):
        emit(f"\n## Profile: medium model, cached decode, batch {batch}, {steps} steps after one prefill")
        profile_decode(model, adapter, {"bare": None, fit.name: plan_for(fit.counts, n)}, make_inputs(batch, seed=1),
                       steps, args.profile_top, emit)


def profile_decode(model: Any, adapter: Any, plans: dict[str, Any], inputs: dict, steps: int, top: int,
                   emit: Callable[[str], None]) -> None:
    """torch.profiler over `steps` cached greedy decode steps after one prefill: per operator, self CPU ms per step
    (weight-reading matrix products vs attention over the KV cache vs the rest)."""
    import torch.profiler as tp
    from transformers import DynamicCache

    from recipe_search.runtime import PruningHandle
    from recipe_search.runtime.applier import cache_argument

    arg = cache_argument(model)
    for name, plan in plans.items():
        handle = PruningHandle(model, plan, adapter) if plan is not None else None
        try:
            with torch.no_grad():
                cache = DynamicCache(config=adapter.text_config)
                out = model(**inputs, use_cache=True, logits_to_keep=1, **{arg: cache})
                token = out.logits[:, -1:].argmax(-1)
                mask = inputs["attention_mask"]
                with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
                    for _ in range(steps):
                        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                        out = model(input_ids=token, attention_mask=mask, use_cache=True, logits_to_keep=1,
                                    **{arg: cache})
                        token = out.logits[:, -1:].argmax(-1)
        finally:
            if handle is not None:
                handle.remove()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        emit(f"\n{name}: {total / steps / 1000:.1f} ms self CPU per decode step (under the profiler)")
        emit("")
        emit("| operator | ms per step | share | calls per step |")
        emit("|---|---:|---:|---:|")
        for e in events[:top]:
            emit(f"| {e.key} | {e.self_cpu_time_total / steps / 1000:.2f} | {e.self_cpu_time_total / total:.1%} | "
                 f"{e.count / steps:.0f} |")


# -- search-recipe's own timing -------------------------------------------------------------------
def search_recipe_share(rounds: int, log: Callable[[str], None], emit: Callable[[str], None]) -> float:
    """`search-recipe --budget 50% --eval none` on the demo, with and without --no-timing (subprocesses, calibration
    cached by a first run, then `rounds` interleaved pairs): the share of a run its prefill timing costs."""
    import resource
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent

    def run(folder: Path, cache: Path, extra: list[str]) -> tuple[float, float]:
        cmd = [sys.executable, "-m", "recipe_search.cli", "--budget", "50%", "--eval", "none", "--quiet",
               "--cache-dir", str(cache), "--out", str(folder), *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       env={**os.environ, "PYTHONPATH": str(root)})
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.perf_counter() - start, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        first = run(Path(tmp) / "first", cache, [])
        timed_runs: list[tuple[float, float]] = []
        untimed: list[tuple[float, float]] = []
        for r in range(rounds):
            for extra, sink in (([], timed_runs), (["--no-timing"], untimed))[:: 1 if r % 2 == 0 else -1]:
                sink.append(run(Path(tmp) / f"r{r}-{len(extra)}", cache, extra))
            log(f"  search-recipe round {r + 1}: with timing {timed_runs[-1][0]:.1f} s, without {untimed[-1][0]:.1f} s")
    wall_t, cpu_t = statistics.median(w for w, _ in timed_runs), statistics.median(c for _, c in timed_runs)
    wall_u, cpu_u = statistics.median(w for w, _ in untimed), statistics.median(c for _, c in untimed)
    emit()
    emit("## What search-recipe's prefill timing costs (demo, `search-recipe --budget 50% --eval none`)")
    emit()
    emit(f"Subprocesses, default method and threads; the first run computed the calibration ({first[0]:.0f} s wall, "
         f"{first[1]:.0f} s CPU); then {rounds} interleaved pairs with the statistics cached, medians:")
    emit()
    emit("| run | wall s | CPU s |")
    emit("|---|---:|---:|")
    emit(f"| with timing (default) | {wall_t:.1f} | {cpu_t:.1f} |")
    emit(f"| --no-timing | {wall_u:.1f} | {cpu_u:.1f} |")
    emit(f"| timing's share of a run | {(wall_t - wall_u) / wall_t:.1%} | {(cpu_t - cpu_u) / cpu_t:.1%} |")
    return (cpu_t - cpu_u) / cpu_t


def repeatability(calls: int, emit: Callable[[str], None]) -> tuple[float, float]:
    """recipe_search.eval.prefill_timing `calls` times on the demo's 50 % recipe (what search-recipe prints)."""
    from recipe_search.calibration import demo_samples
    from recipe_search.demo import demo_checkpoint
    from recipe_search.eval import prefill_timing
    from recipe_search.models.loading import load_model
    from recipe_search.recipe import load_recipe
    from recipe_search.runtime.apply import plan_from_recipe

    model, processor, adapter = load_model(demo_checkpoint())
    plan = plan_from_recipe(load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "demo-fitprune-50pct.json"))
    data = demo_samples("eval", 16, seed=1)
    emit()
    emit(f"## Repeatability of the printed speed-up (prefill_timing, demo 50 % recipe, batch 16, {calls} calls)")
    emit()
    speedups = []
    for _ in range(calls):
        got = prefill_timing(model, processor, adapter, data, plan)
        speedups.append(got.speedup)
        emit(f"- {got.describe()}")
    mid = statistics.median(speedups)
    low, high = min(speedups) / mid - 1, max(speedups) / mid - 1
    emit()
    emit(f"Median {mid:.2f}x, range {min(speedups):.2f}x-{max(speedups):.2f}x ({low:+.1%} / {high:+.1%} of the "
         "median; the floor asks for +-10 % on a quiet machine).")
    return low, high


# -- decode roofline ------------------------------------------------------------------------------
def weight_bytes_per_step(model: Any) -> int:
    """Bytes of weights one cached decode step reads: every decoder parameter, the final norm and the LM head
    (the embedding table is read one row per token)."""
    lm = model.get_decoder()
    decoder = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))
    head = model.get_output_embeddings().weight
    return decoder + head.numel() * head.element_size()


def kv_bytes_per_token(adapter: Any) -> int:
    d = adapter.dims()
    return 2 * d.num_layers * d.num_kv_heads * d.head_dim * 4  # keys and values, float32


# -- main -----------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds at batch 1")
    parser.add_argument("--rounds-b8", type=int, default=3, help="interleaved rounds at batches above 1")
    parser.add_argument("--budgets", default="50%,25%,12.5%")
    parser.add_argument("--defaults", default="50%,25%",
                        help="budgets at which search-recipe's default (auto) runs on the demo and its pick is timed")
    parser.add_argument("--psigmoid", default="50%,25%",
                        help="budgets at which P-Sigmoid runs on the demo and its curve is timed")
    parser.add_argument("--auto-time-budget", type=float, default=600.0, help="auto's --time-budget on the demo")
    parser.add_argument("--psigmoid-trials", type=int, default=48, help="P-Sigmoid's --n-trials on the demo")
    parser.add_argument("--bounds", default="50%,25%",
                        help="budgets whose schedules are also timed with the random rule (no scoring cost), batch 1")
    parser.add_argument("--deep-layers", type=int, default=32,
                        help="also time batch-1 prefills on a model this deep (LLaVA-1.5-7B's 32; 0: skip)")
    parser.add_argument("--deep-rounds", type=int, default=3, help="interleaved rounds on the deep model")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-batches", default="1,8")
    parser.add_argument("--decode-rounds", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-rounds", type=int, default=2)
    parser.add_argument("--share-rounds", type=int, default=1,
                        help="interleaved pairs of search-recipe runs with and without --no-timing (0: skip)")
    parser.add_argument("--repeat-calls", type=int, default=5, help="prefill_timing calls of the repeatability check")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of every part: 4 layers, batch 1, 2 rounds, 16 decode tokens, one "
                             "search-recipe pair, two repeat calls (a few minutes)")
    parser.add_argument("--out", default="docs/bench-speed-output.md")
    parser.add_argument("--profile", action="store_true",
                        help="only profile (pyinstrument) keep-all and the 50%% schedules, medium and demo models")
    parser.add_argument("--profile-repeats", type=int, default=3)
    parser.add_argument("--profile-top", type=int, default=15)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.batches, args.rounds, args.decode_tokens, args.budgets = 4, "1", 2, 16, "50%,25%"
        args.decode_batches, args.decode_rounds, args.calib_rounds, args.calib_samples = "1", 1, 1, 4
        args.share_rounds, args.repeat_calls, args.deep_layers, args.deep_rounds = 1, 2, 6, 1
        args.auto_time_budget, args.psigmoid_trials, args.psigmoid = 60.0, 8, "50%"
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from recipe_search.flops import layer_flops
    from recipe_search.models import get_adapter

    started = time.perf_counter()
    out: list[str] = []

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def emit(text: str = "") -> None:
        out.append(text)
        print(text, flush=True)

    if args.profile:
        run_profile(args, emit)
        if args.out:
            Path(args.out).write_text("\n".join(out) + "\n")
        return 0
    model = build_model(args.layers)
    adapter = get_adapter(model)
    _time_hooks()
    dims = adapter.dims()
    n = adapter.visual_tokens_per_image()
    log("searching the demo model: default (auto) and P-Sigmoid picks")
    picks = demo_picks([b for b in args.defaults.split(",") if b], [b for b in args.psigmoid.split(",") if b],
                       args.auto_time_budget, args.psigmoid_trials)
    configs, costs, vision = schedules(adapter, [b for b in args.budgets.split(",") if b], picks)
    lm_macs, vis_macs = costs.unpruned("full"), vision.unpruned()
    emit("# bench_speed: prefill, decode and calibration on a medium LLaVA-1.5-shaped model")
    emit()
    emit(f"`python scripts/bench_speed.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    emit()
    emit(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), "
         f"torch {torch.__version__}, {torch.get_num_threads()} thread; load average at start "
         f"{os.getloadavg()[0]:.1f}")
    emit(f"- model (random weights): LM {dims.num_layers} layers, hidden {dims.hidden_size}, {dims.num_heads} heads, "
         f"MLP {dims.intermediate_size}; CLIP 336/14 tower (hidden 384, 2 layers); {n} visual tokens, "
         f"{text_tokens()} text tokens per prompt")
    emit(f"- prefill MACs per prompt: LM {lm_macs / 1e9:.1f} G, vision encoder + projector {vis_macs / 1e9:.2f} G "
         f"({vis_macs / (lm_macs + vis_macs):.1%}); per layer at {n + text_tokens()} tokens "
         f"{layer_flops(n + text_tokens(), dims) / 1e9:.2f} G")
    emit()
    emit("## Schedules")
    emit()
    emit("| configuration | visual tokens entering each layer | rule | LM FLOPs (full) | predicted speed-up | "
         "scoring MACs / predicted MACs | how it was made |")
    emit("|---|---|---|---:|---:|---:|---|")
    for c in configs:
        emit(f"| {c.name} | {' '.join(map(str, c.counts))} | {c.rule} | {costs.fraction(c.counts, 'full'):.1%} | "
             f"{c.predicted:.3f}x | {scoring_share(c, dims, costs, vision):.1%} | {c.how} |")
    emit()
    emit("Rules score at the layer that cuts. The predicted speed-up is the FLOPs ratio (LM full + vision, "
         "recipe_search/flops.py); it leaves out what selecting costs, shown in 'scoring MACs': a rule that reads "
         "attention at the cut layer projects queries and keys for every live token there (the survivors' are "
         "reused by the layer, the dropped ones' are extra) and, for FitPrune, computes the attention rows of "
         "the visual and text queries. Rows marked `(random rule)` run the same schedule with the seeded random "
         "rule, whose selection costs nothing: what the hardware gives that schedule without any scoring.")
    plans, bounds = make_plans(configs, n, args.bounds)
    floors: dict[str, float] = {}
    for batch in [int(b) for b in args.batches.split(",") if b]:
        prefill_section(model, adapter, configs, plans, bounds, n, batch,
                        args.rounds if batch == 1 else args.rounds_b8, "", floors, log, emit)
    if args.deep_layers:
        deep = build_model(args.deep_layers)
        deep_adapter = get_adapter(deep)
        deep_configs, _, _ = schedules(deep_adapter, [b for b in args.budgets.split(",") if b], picks)
        emit()
        depth = " (LLaVA-1.5-7B's depth)" if args.deep_layers == 32 else ""
        emit(f"## Schedules of the {args.deep_layers}-layer model{depth}, otherwise the same shape")
        emit()
        emit("| configuration | visual tokens entering each layer | cuts | rule | predicted speed-up |")
        emit("|---|---|---:|---|---:|")
        for c in deep_configs:
            emit(f"| {c.name} | {' '.join(map(str, c.counts))} | {cut_count(c.counts, n)} | {c.rule} | "
                 f"{c.predicted:.3f}x |")
        prefill_section(deep, deep_adapter, deep_configs, *make_plans(deep_configs, n, args.bounds), n, 1,
                        args.deep_rounds, f" ({args.deep_layers} layers)", floors, log, emit)
        del deep, deep_adapter

    # decode
    decode_cfgs = [c for c in configs if c.name in ("fitprune 50%", "uniform 25%")]
    weights = weight_bytes_per_step(model)
    per_token = kv_bytes_per_token(adapter)
    emit()
    emit(f"## Decode: greedy generate() of {args.decode_tokens} new tokens ({args.decode_rounds} interleaved rounds)")
    emit()
    emit("tokens/s counts decode steps only (timestamps of the logits processor, prefill excluded); KV bytes after "
         "prefill; peak = the process's peak RSS during generate() above its RSS before it (Linux VmHWM, reset "
         "per run after malloc_trim). Bytes per step = the weights every step reads "
         f"({weights / 2**20:.0f} MB: decoder layers and LM head) + 3 x the KV cache, averaged over the steps "
         "(transformers' DynamicCache appends a step's keys and values with torch.cat, which reads and rewrites "
         "the layer's whole cache; attention then reads it); 'bytes-bound' is the speed-up a step limited by memory traffic would get: bare bytes / pruned "
         "bytes; 'GB/s' = bytes per step / seconds per step.")
    emit()
    emit("| batch | configuration | KV-cache MB | KV ratio | tokens/s (median) | min | max | speed-up | "
         "0.8 / KV ratio | MB per step | bytes-bound | speed-up / bytes-bound | GB/s | peak MB above model |")
    emit("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in [int(b) for b in args.decode_batches.split(",") if b]:
        inputs = make_inputs(batch, seed=1)
        rates: dict[str, list[float]] = {"bare": []}
        peaks: dict[str, list[float]] = {"bare": []}
        kv = {"bare": kv_bytes(model, adapter, None, inputs)}
        for c in decode_cfgs:
            rates[c.name], peaks[c.name] = [], []
            kv[c.name] = kv_bytes(model, adapter, plans[c.name], inputs)
        log(f"decode, batch {batch}")
        decode_run(model, adapter, None, inputs, 4)  # warm-up
        for r in range(args.decode_rounds):
            for name in (list(rates) if r % 2 == 0 else list(rates)[::-1]):
                res = decode_run(model, adapter, plans[name], inputs, args.decode_tokens)
                rates[name].append(res["tokens_per_s"])
                peaks[name].append(res["peak_mb"])
            log(f"  decode round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rates.items()))
        base = statistics.median(rates["bare"])
        grown = per_token * batch * args.decode_tokens / 2  # the cache grows by one token per step
        # DynamicCache appends with torch.cat: each step reads and rewrites the whole cache, then attention reads it
        step_bytes = {name: weights + 3 * (kv[name] + grown) for name in rates}
        for name, rate in rates.items():
            ratio = kv[name] / kv["bare"]
            speed = statistics.median(rate) / base
            bound = step_bytes["bare"] / step_bytes[name]
            gbs = step_bytes[name] * statistics.median(rate) / batch / 1e9
            emit(f"| {batch} | {name} | {kv[name] / 2**20:.1f} | {ratio:.3f} | {statistics.median(rate):.1f} | "
                 f"{min(rate):.1f} | {max(rate):.1f} | {speed:.3f}x | "
                 f"{'' if name == 'bare' else f'{0.8 / ratio:.3f}x'} | {step_bytes[name] / 2**20:.0f} | {bound:.3f}x | "
                 f"{speed / bound:.3f} | {gbs:.1f} | {max(peaks[name]):.0f} |")
            if name != "bare":
                floors[f"decode b{batch} {name} speed-up / (0.8 / KV ratio)"] = speed / (0.8 / ratio)
                floors[f"decode b{batch} {name} speed-up / bytes-bound speed-up"] = speed / bound

    # calibration
    if args.calib_samples:
        log("calibration")
        pw, pc, cw, cc = calibration_ratio(model, adapter, args.calib_samples, min(4, args.calib_samples),
                                           args.calib_rounds, log)
        emit()
        emit(f"## Calibration ({args.calib_samples} samples, batch {min(4, args.calib_samples)}, "
             f"{args.calib_rounds} interleaved rounds)")
        emit()
        emit("collect_stats (statistics cross, selfv, last at every layer) against plain forwards of the same batches "
             "(use_cache=False, no hooks); inputs are built the same way in both.")
        emit()
        emit("| | plain forward s (median) | calibration s (median) | ratio | CPU ratio |")
        emit("|---|---:|---:|---:|---:|")
        ratio = statistics.median(cw) / statistics.median(pw)
        cpu_ratio = statistics.median(cc) / statistics.median(pc)
        emit(f"| {args.calib_samples} samples | {statistics.median(pw):.2f} | {statistics.median(cw):.2f} | "
             f"{ratio:.3f}x | {cpu_ratio:.3f}x |")
        floors["calibration / plain forward"] = ratio
        floors["calibration / plain forward cpu"] = cpu_ratio
    if args.share_rounds:
        log("search-recipe share")
        floors["search-recipe timing share of a run (cpu)"] = search_recipe_share(args.share_rounds, log, emit)
    if args.repeat_calls:
        log("repeatability")
        low, high = repeatability(args.repeat_calls, emit)
        floors["printed speed-up, spread around its median"] = max(-low, high)

    emit()
    emit("## Floors (issue 12)")
    emit()
    emit(f"Load average now {os.getloadavg()[0]:.1f} (2 CPUs).")
    emit()
    emit("| measure | value | floor |")
    emit("|---|---:|---|")
    for key, value in floors.items():
        if "overhead: time in its hooks" in key:
            floor, text = "<= 2 %", f"{value:.3%}"
        elif "overhead" in key:
            floor, text = "<= 2 % (difference of two noisy medians)", f"{value:+.1%}"
        elif "bound/pred" in key:
            floor, text = "none: what this machine gives the FLOPs ratio (hw bound / predicted)", f"{value:.3f}"
        elif "meas/bound" in key:
            floor, text = "none: the share of that bound the configuration gets", f"{value:.3f}"
        elif "meas/pred" in key and "psigmoid" in key:
            floor, text = "none (the floor is for the default and FitPrune)", f"{value:.3f}"
        elif "meas/pred" in key:
            floor, text = ">= 0.93" + (" (reference: no scoring cost)" if "random" in key else ""), f"{value:.3f}"
        elif key.startswith("calibration"):
            floor, text = "<= 1.3x", f"{value:.3f}x"
        elif "bytes-bound" in key:
            floor, text = "explains the decode floor when near 1", f"{value:.3f}"
        elif "search-recipe" in key:
            floor, text = "<= 10 % (or --no-timing)", f"{value:.1%}"
        elif "spread" in key:
            floor, text = "<= 10 % (quiet machine)", f"{value:.1%}"
        else:
            floor, text = ">= 1 (else explained)", f"{value:.3f}"
        emit(f"| {key} | {text} | {floor} |")
    emit()
    emit(f"Total run time {time.perf_counter() - started:.0f} s.")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(out) + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
