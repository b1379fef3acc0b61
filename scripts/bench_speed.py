"""Speed benchmark on a medium LLaVA-1.5-shaped model with random weights, built in code.

Timing needs no trained weights, so the model is built from a config and never downloaded:

  vision   CLIP tower at 336 px, patch 14 -> 576 patches (+ CLS, dropped as LLaVA-1.5 does), hidden 384,
           2 layers (a cheaper tower than CLIP-L: about the same share of the total FLOPs as CLIP-L has
           in LLaVA-1.5-7B), two-layer GELU projector to the LM width
  LM       Llama decoder, hidden 1024, 16 heads (MHA), SwiGLU MLP 2752 (LLaVA-7B's 11008/4096 ratio),
           8 layers by default (--layers), vocabulary 32064
  prompt   LLaVA-1.5 shape: 5 tokens, 576 image tokens, 35 question tokens (616 in all)

Schedules (how each was made, no calibration of the medium model is needed for timing):
  keep-all  576 visual tokens at every layer, FitPrune rule (the hooks run, nothing drops)
  fitprune  FitPrune's search (recipe_search.methods.search_fitprune) at the budget, with the medium
            model's CostModel (formula 'full'), on *real* attention statistics: the embedded demo model's
            calibration (64 samples, trained weights), each layer's per-token statistics resampled to
            576 tokens with the calibration's mass-preserving resampling and the demo's 8 layers mapped
            onto this model's layers (nearest layer); FitPrune rule, scored at the same layer
  uniform   the same count at every layer from layer 0, largest count meeting the budget
            (recipe_search.methods.search_uniform); FitPrune rule, scored at the same layer
Budgets are shares of the unpruned LM's full-sequence prefill FLOPs (recipe_search/flops.py). The
predicted speed-up is (LM full + vision encoder and projector FLOPs, unpruned) / (the same, pruned),
formulas in recipe_search/flops.py; "meas/pred" divides the measured speed-up by it.

Prefill timing: one forward of a batch (pixel values and input ids; use_cache=False, logits_to_keep=1),
after one warm-up of every configuration. Runs are interleaved: every round runs the bare model and
each configuration once, the order rotating between rounds and reversed in odd rounds; each timed run
directly follows an untimed run of the same configuration (without it, a full-size run that followed
a small one paid for regrowing the heap: keep-all measured 4-7 % slower than bare at batch 8 although
alternating the two alone showed no difference). Each row gives
the median over rounds, min and max; its speed-up is median bare / median configuration, and "paired"
is the median over rounds of the speed-up against that round's bare run.

Decode: greedy generate() of exactly 128 new tokens (batch 1 by default), bare and pruned interleaved;
tokens/s counts decode steps only (total generate time minus a timed prefill); KV-cache bytes are the
cache's key and value tensors after prefill; peak memory is tracemalloc's peak of Python allocations
plus the process's max RSS growth (resource.getrusage), per configuration.

    python scripts/bench_speed.py [--layers 8] [--rounds 7] [--rounds-b8 3] [--batches 1,8]
                                  [--budgets 50%,25%,12.5%] [--decode-tokens 128] [--decode-rounds 2]
                                  [--quick] [--out docs/bench-speed-output.md]

--quick: 4 layers, batch 1 only, 3 rounds, 32 decode tokens (about a minute), for development.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_TOKEN = 32000
PREFIX = [1, 3148, 1001, 29901, 29871]          # "<s> USER:" shaped
QUESTION_TOKENS = 35


def build_model(layers: int = 8, seed: int = 0) -> Any:
    """The medium LLaVA-1.5-shaped model with random weights (see module docstring)."""
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
def demo_statistics(num_layers: int, visual_tokens: int) -> Any:
    """The demo model's calibration statistics (trained weights, 64 samples), resampled to this
    model's visual tokens (mass-preserving, as calibration does) and layers (nearest demo layer)."""
    import tempfile

    from recipe_search.calibration import calibrate, demo_samples
    from recipe_search.calibration.collect import resample_tokens
    from recipe_search.demo import demo_checkpoint
    from recipe_search.models.loading import load_model
    from recipe_search.stats import CalibrationStats

    model, processor, adapter = load_model(demo_checkpoint())
    with tempfile.TemporaryDirectory() as tmp:
        stats, _ = calibrate(model, processor, adapter, demo_samples("calib", 64), cache_dir=Path(tmp), progress=False)
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


def schedules(adapter: Any, budgets: list[str]) -> tuple[list[Config], Any, Any]:
    from recipe_search.budget import parse_budget
    from recipe_search.flops import CostModel, VisionCost
    try:
        from recipe_search.methods import search_fitprune, search_uniform
    except ImportError:  # before the package was renamed
        from recipe_search.methods import search_fitprune, search_uniform  # type: ignore[no-redef]

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
    for c in out:
        c.predicted = predicted(c.counts)
    return out, costs, vision


def plan_for(counts: tuple[int, ...], n: int, rule: str = "fitprune") -> Any:
    from recipe_search.runtime import PruningPlan, make_rule

    return PruningPlan(tuple(counts), n, make_rule(rule, {"heads": "max"} if rule == "fitprune" else {}), "same")


# -- measuring ------------------------------------------------------------------------------------
def _forward(model: Any, inputs: dict) -> None:
    with torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)


def timed(model: Any, adapter: Any, plan: Any, fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of fn() with `plan` attached (None: bare); attaching is not timed, the
    garbage collector is run before and paused during the call."""
    from recipe_search.runtime import PruningHandle

    handle = PruningHandle(model, plan, adapter) if plan is not None else None
    gc.collect()
    gc.disable()  # as timeit does: a collection of the model's object graph must not land in one run only
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        gc.enable()
        if handle is not None:
            handle.remove()


@dataclass
class Row:
    config: Config
    wall: list[float]
    cpu: list[float]


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
            w, c = timed(model, adapter, plans[row.config.name], fn)
            row.wall.append(w)
            row.cpu.append(c)
        log(f"  round {r + 1}/{rounds}: bare {bare.wall[-1]:.3f} s")


def prefill_table(rows: list[Row]) -> tuple[list[str], dict[str, float]]:
    bare = rows[0]
    med_bare, cpu_bare = statistics.median(bare.wall), statistics.median(bare.cpu)
    lines = ["| configuration | median ms | min | max | speed-up | paired | predicted | meas/pred | CPU speed-up | CPU meas/pred |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios: dict[str, float] = {}
    for row in rows:
        med, cpu = statistics.median(row.wall), statistics.median(row.cpu)
        speed = med_bare / med
        paired = statistics.median(b / x for b, x in zip(bare.wall, row.wall))
        cpu_speed = cpu_bare / cpu
        pred = row.config.predicted
        ratios[row.config.name] = speed / pred
        ratios[row.config.name + " cpu"] = cpu_speed / pred
        lines.append(f"| {row.config.name} | {med * 1000:.0f} | {min(row.wall) * 1000:.0f} | {max(row.wall) * 1000:.0f} | "
                     f"{speed:.3f}x | {paired:.3f}x | {pred:.3f}x | {speed / pred:.3f} | {cpu_speed:.3f}x | "
                     f"{cpu_speed / pred:.3f} |")
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

    wall, _ = timed(model, adapter, plan, run)
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
        w, c = timed(model, adapter, None, plain)
        out[0].append(w), out[1].append(c)
        w, c = timed(model, adapter, None, calib)
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


def run_profile(args: argparse.Namespace, emit: Callable[[str], None]) -> None:
    from recipe_search.calibration import demo_samples
    from recipe_search.demo import demo_checkpoint
    from recipe_search.models import get_adapter
    from recipe_search.models.loading import load_model
    from recipe_search.recipe import load_recipe
    from recipe_search.runtime.apply import plan_from_recipe

    model = build_model(args.layers)
    adapter = get_adapter(model)
    n = adapter.visual_tokens_per_image()
    configs, _, _ = schedules(adapter, ["50%"])
    inputs = make_inputs(1)
    emit(f"## Profile: medium model ({args.layers} layers), batch 1, {args.profile_repeats} forwards")
    profile(model, adapter, {c.name: plan_for(c.counts, n) for c in configs}, lambda: _forward(model, inputs),
            args.profile_repeats, args.profile_top, emit)
    demo, processor, dadapter = load_model(demo_checkpoint())
    data = demo_samples("eval", 16, seed=1)
    dinputs = dadapter.inputs(processor, [s.image for s in data.samples], [s.prompt for s in data.samples])
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo-fitprune-50pct.json"
    dplans = {"keep-all": plan_for((144,) * 8, 144), "fitprune 50% (recipes/demo-fitprune-50pct.json)":
              plan_from_recipe(load_recipe(recipe))}
    emit(f"\n## Profile: demo model, batch 16 (the search-recipe timing batch), {10 * args.profile_repeats} forwards")
    profile(demo, dadapter, dplans, lambda: _forward(demo, dinputs), 10 * args.profile_repeats, args.profile_top, emit)
    steps = 32
    fit = next(c for c in configs if c.name == "fitprune 50%")
    for batch in (1, 8):
        emit(f"\n## Profile: medium model, cached decode, batch {batch}, {steps} steps after one prefill")
        profile_decode(model, adapter, {"bare": None, fit.name: plan_for(fit.counts, n)}, make_inputs(batch, seed=1),
                       steps, args.profile_top, emit)


def profile_decode(model: Any, adapter: Any, plans: dict[str, Any], inputs: dict, steps: int, top: int,
                   emit: Callable[[str], None]) -> None:
    """pyinstrument over `steps` cached greedy decode steps (the prefill is not profiled)."""
    from pyinstrument import Profiler
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
                prof = Profiler(interval=0.0005)
                prof.start()
                for _ in range(steps):
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    out = model(input_ids=token, attention_mask=mask, use_cache=True, logits_to_keep=1, **{arg: cache})
                    token = out.logits[:, -1:].argmax(-1)
                prof.stop()
        finally:
            if handle is not None:
                handle.remove()
        root = prof.last_session.root_frame()
        total = root.time if root is not None else 0.0
        emit(f"\n{name}: {total / steps * 1000:.1f} ms per decode step (under the profiler)")
        emit("```")
        body = [line for line in prof.output_text(unicode=False, color=False, flat=True).splitlines()
                if line[:1].isdigit()]
        for line in body[:top]:
            emit(line.replace(str(Path.cwd()) + "/", "").replace("../", ""))
        emit("```")


# -- how cost grows (part 4 of issue 12) ---------------------------------------------------------
LLAVA_7B = {"lm": dict(num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                       head_dim=128),
            "vision": dict(num_layers=24, hidden_size=1024, intermediate_size=4096, feature_index=23, has_cls=True,
                           patches=576, projector_macs_per_token=1024 * 4096 + 4096 * 4096)}


def synthetic_stats(samples: int, layers: int, tokens: int, seed: int = 0) -> Any:
    """CalibrationStats of the right shapes: per-token attention shares drawn from a Dirichlet(0.3) per
    sample and layer (a few tokens take most of the mass, as in trained models)."""
    from recipe_search.stats import CalibrationStats

    rng = np.random.default_rng(seed)

    def draw() -> np.ndarray:
        return rng.dirichlet(np.full(tokens, 0.3), size=(samples, layers)).astype(np.float32)

    return CalibrationStats(cross=draw(), selfv=draw(), last=draw(),
                            text_tokens=np.full(samples, text_tokens(), dtype=np.int64),
                            kendall_tau=np.eye(layers, dtype=np.float32))


class _CountingScorer:
    """Stands in for ScheduleScorer in G-Search: a monotone pass/fail metric (a schedule passes when
    every layer keeps at least `need[l]`), counting evaluations and the decoder layers the real scorer
    would run with its prefix cache (unbounded here)."""

    metric = "agreement"

    def __init__(self, need: list[int], visual_tokens: int) -> None:
        self.need, self.visual_tokens = need, visual_tokens
        self.layers = list(range(len(need)))
        self.evaluations = self.layers_run = 0
        self._prefixes: set[tuple[int, ...]] = set()

    def evaluate(self, counts: Any) -> Any:
        from types import SimpleNamespace

        counts = tuple(int(c) for c in counts)
        self.evaluations += 1
        start = next((d for d in range(len(counts) - 1, 0, -1) if counts[:d] in self._prefixes), 0)
        self.layers_run += len(counts) - start
        self._prefixes.update(counts[:d] for d in range(1, len(counts)))
        ok = all(c >= n for c, n in zip(counts, self.need))
        return SimpleNamespace(value=float(ok), agreement=float(ok), kl=0.0, accuracy=None)

    def reference(self) -> Any:
        return self.evaluate((self.visual_tokens,) * len(self.layers))


def run_growth(args: argparse.Namespace, emit: Callable[[str], None], log: Callable[[str], None]) -> None:
    import tempfile

    from recipe_search.budget import parse_budget
    from recipe_search.calibration import collect_stats, demo_samples
    from recipe_search.calibration.data import batches
    from recipe_search.demo import demo_checkpoint
    from recipe_search.flops import CostModel, VisionCost
    from recipe_search.models.base import ModelDims, VisionLayout
    from recipe_search.models.loading import load_model
    try:
        from recipe_search.methods import search_fitprune
        from recipe_search.methods.gsearch import search_gsearch
    except ImportError:  # before the package was renamed
        from recipe_search.search import search_fitprune  # type: ignore[no-redef]
        from recipe_search.search.gsearch import search_gsearch  # type: ignore[no-redef]

    model, processor, adapter = load_model(demo_checkpoint())

    # 1. calibration time vs samples (demo model, batch 8 as search-recipe calibrates)
    emit("## Calibration time vs samples (demo model, batch 8, CPU time, 1 thread)")
    emit()
    emit("| samples | plain forward s | calibration s | ratio | calibration ms per sample |")
    emit("|---:|---:|---:|---:|---:|")
    per_sample: dict[int, float] = {}
    for count in [int(c) for c in args.growth_samples.split(",")]:
        data = demo_samples("calib", count)

        def plain() -> None:
            with torch.no_grad():
                for chunk in batches(data.samples, 8):
                    model(**adapter.inputs(processor, [s.image for s in chunk], [s.prompt for s in chunk]),
                          use_cache=False)

        def calib() -> None:
            collect_stats(model, processor, adapter, data, batch_size=8, progress=False)

        rounds = 3 if count <= 256 else 1
        pl, ca = [], []
        plain() if count <= 256 else None
        for _ in range(rounds):
            t = time.process_time()
            plain()
            pl.append(time.process_time() - t)
            t = time.process_time()
            calib()
            ca.append(time.process_time() - t)
        p, c = statistics.median(pl), statistics.median(ca)
        per_sample[count] = c / count
        emit(f"| {count} | {p:.2f} | {c:.2f} | {c / p:.2f}x | {c / count * 1000:.1f} |")
        log(f"  calibration {count} samples: {c:.2f} s")
    emit()
    emit("Calibration is linear in the samples: one forward per batch plus per-layer statistics, then "
         "numpy reductions per sample (the Kendall-tau matrix is O(L^2 + L N^2) per sample).")

    # 2. FitPrune search time vs layers, synthetic statistics
    emit()
    emit("## FitPrune search time vs layers (synthetic statistics, N = 576 visual tokens)")
    emit()
    emit("| layers | samples | budget | search ms (median of 3) | alpha iterations |")
    emit("|---:|---:|---|---:|---:|")
    fit_ms: dict[tuple[int, int], float] = {}
    for layers in (8, 32):
        dims = ModelDims(num_layers=layers, hidden_size=1024, intermediate_size=2752, num_heads=16,
                         num_kv_heads=16, head_dim=64)
        for samples in (64, 1024):
            stats = synthetic_stats(samples, layers, 576)
            costs = CostModel(dims, 576, tuple(int(t) for t in stats.text_tokens))
            for text in ("50%", "12.5%"):
                budget = parse_budget(text)
                times, result = [], None
                for _ in range(3):
                    t = time.perf_counter()
                    result = search_fitprune(stats, budget, costs)
                    times.append(time.perf_counter() - t)
                fit_ms[(layers, samples)] = max(fit_ms.get((layers, samples), 0.0), statistics.median(times) * 1000)
                emit(f"| {layers} | {samples} | {text} | {statistics.median(times) * 1000:.0f} | "
                     f"{result.result['iterations']} |")

    # 3. G-Search evaluations vs layers, counted by running its algorithm on a counting scorer
    emit()
    emit("## G-Search evaluations vs layers (its algorithm run on a counting scorer)")
    emit()
    emit("Each layer from start_layer (2) bisects the grid of 65 counts (N/64 steps) no higher than the "
         "previous layer's: at most ceil(log2 65) = 7 evaluations per layer, plus the reference and the final "
         "check. 'need' is the pass/fail threshold per layer the counting scorer uses (the fewest tokens that "
         "keep the answers); 'layers run' counts decoder layers with the scorer's prefix cache (unbounded).")
    emit()
    emit("| layers | need (shape) | evaluations | bound 2 + 7 (L - 2) | layers run | layers run without prefix cache |")
    emit("|---:|---|---:|---:|---:|---:|")
    dummy_costs = {}
    for layers in (8, 32):
        dims = ModelDims(num_layers=layers, hidden_size=1024, intermediate_size=2752, num_heads=16,
                         num_kv_heads=16, head_dim=64)
        dummy_costs[layers] = CostModel(dims, 576, (text_tokens(),))
        for shape, need in (("falls to 25 % by mid-depth",
                             [576 if l < 2 else max(144, int(576 * (1 - 0.75 * min(1.0, l / (layers / 2)))))
                              for l in range(layers)]),
                            ("flat 50 %", [576, 576] + [288] * (layers - 2))):
            scorer = _CountingScorer(need, 576)
            search_gsearch(scorer, dummy_costs[layers], start_layer=2)  # type: ignore[arg-type]
            emit(f"| {layers} | {shape} | {scorer.evaluations} | {2 + 7 * (layers - 2)} | {scorer.layers_run} | "
                 f"{scorer.evaluations * layers} |")

    # measured: one G-Search evaluation on the demo (8 layers, 64 search samples)
    from recipe_search.methods import gsearch as gs_mod
    from recipe_search.methods.objective import ScheduleScorer
    from recipe_search.pipeline import LoadedModel
    from recipe_search.runtime import make_rule

    loaded = LoadedModel(model, processor, adapter, "demo")
    search_set = demo_samples("calib", 64)
    scorer = ScheduleScorer(loaded, search_set, make_rule(gs_mod.RULE, gs_mod.RULE_PARAMS), gs_mod.SCORE_LAYER,
                            batch_size=16, visual_tokens=144)
    scorer.evaluate((144,) * 8)
    t = time.perf_counter()
    fresh = 0
    for k in (120, 96, 72, 48):
        scorer._cache.clear()  # a schedule that shares no prefix: all 8 layers run
        scorer.evaluate((144, 144) + (k,) * 6)
        fresh += 1
    per_eval = (time.perf_counter() - t) / fresh
    t = time.perf_counter()
    demo_costs = CostModel(adapter.dims(), 144, (11,) * 64)
    scorer2 = ScheduleScorer(loaded, search_set, make_rule(gs_mod.RULE, gs_mod.RULE_PARAMS), gs_mod.SCORE_LAYER,
                             batch_size=16, visual_tokens=144)
    res = search_gsearch(scorer2, demo_costs, start_layer=2)
    gs_seconds = time.perf_counter() - t
    per_batch = res.result["layers_run"] / len(scorer2.batches)
    emit()
    emit(f"Measured on the demo (8 layers, 64 search samples in {len(scorer2.batches)} batches of 16): one evaluation "
         f"with no cached prefix takes {per_eval:.2f} s (8 layers x 64 samples); a whole G-Search took "
         f"{gs_seconds:.1f} s with {res.result['evaluations']} evaluations and {per_batch:.0f} layer runs per batch "
         f"({per_batch / max(1, res.result['evaluations']):.1f} per evaluation, against 8 without the prefix "
         f"cache). P-Sigmoid makes n_trials (default 48) evaluations of schedules that share few prefixes: about "
         f"48 x {per_eval:.2f} s = {48 * per_eval:.0f} s on the demo; both grow linearly with the search samples "
         f"and, per evaluation, with the layers (G-Search's evaluations grow with the layers too: quadratic in all).")

    # 4. a 7B model with 576 visual tokens on one GPU, from the FLOPs formula and an assumed throughput
    dims7 = ModelDims(**LLAVA_7B["lm"])
    costs7 = CostModel(dims7, 576, (text_tokens(),))
    vis7 = VisionCost(VisionLayout(**LLAVA_7B["vision"]))
    macs7 = costs7.unpruned("full") + vis7.unpruned()
    flop_s = args.gpu_tflops * 1e12 * args.gpu_mfu
    sample_s = 2 * macs7 / flop_s
    ratio = args.calib_ratio or 1.1
    emit()
    emit("## Estimate: LLaVA-1.5-7B (576 visual tokens) on one GPU")
    emit()
    emit(f"From the FLOPs formulas (recipe_search/flops.py, MAC = 1, x2 for FLOPs) with LLaVA-1.5-7B's sizes (LM 32 "
         f"layers, hidden 4096, MLP 11008, 32 heads; CLIP-L/14-336 24 layers, hidden 1024; 2-layer projector) and "
         f"{text_tokens()} text tokens: one prefill is {macs7 / 1e12:.2f} TMAC = {2 * macs7 / 1e12:.1f} TFLOP "
         f"(LM {costs7.unpruned('full') / 1e12:.2f} TMAC, vision {vis7.unpruned() / 1e9:.0f} GMAC). Assumed GPU "
         f"throughput: {args.gpu_tflops:.0f} TFLOP/s dense bf16 peak (A100) at {args.gpu_mfu:.0%} utilisation = "
         f"{flop_s / 1e12:.0f} TFLOP/s, so {sample_s * 1000:.0f} ms per sample; calibration costs "
         f"{ratio:.2f}x a plain forward (measured on the medium model, `python scripts/bench_speed.py`). Prefix "
         f"caching in the scorer keeps hidden states of every sample at a layer (616 x 4096 x 2 bytes = "
         f"{616 * 4096 * 2 / 2**20:.1f} MB per sample in bf16): 64 samples need {64 * 616 * 4096 * 2 / 2**30:.2f} GB "
         f"per cached prefix, more than the default 512 MB cache, so on a 7B the estimate assumes no prefix reuse "
         f"(every evaluation runs all 32 layers).")
    emit()
    emit("| step | work | estimate |")
    emit("|---|---|---:|")
    for n in (64, 256, 1024):
        emit(f"| calibration, {n} samples | {n} prefills x {ratio:.2f} | {n * sample_s * ratio:.0f} s |")
    ev32 = 2 + 7 * 30
    emit(f"| FitPrune search, 64 / 1024 samples | numpy on the statistics (measured above, 32 layers; CPU, "
         f"independent of the model's width) | {fit_ms[(32, 64)] / 1000:.1f} s / {fit_ms[(32, 1024)] / 1000:.1f} s |")
    emit(f"| G-Search, 64 search samples | up to {ev32} evaluations x 64 prefills | "
         f"{ev32 * 64 * sample_s / 60:.0f} min |")
    emit(f"| P-Sigmoid, 48 trials, 64 search samples | 48 evaluations x 64 prefills | {48 * 64 * sample_s / 60:.1f} min |")
    emit(f"| search-recipe timing (batch 16; bare and pruned at 50 %, 1 warm-up + 5 runs each) | 6 + 6 x 0.52 "
         f"prefills of 16 samples | {(6 + 6 * 0.52) * 16 * sample_s:.0f} s |")

    # 5. share of a search-recipe --budget 50% demo run that its prefill timing takes
    emit()
    emit("## Share of a `search-recipe --budget 50%` demo run spent timing the prefill")
    emit()
    import importlib

    from recipe_search import cli

    spent = {"timing": 0.0}
    patched: list[tuple[Any, str, Any]] = []
    for mod_name in ("recipe_search.eval", "recipe_search.measure"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for fn_name in ("prefill_seconds", "prefill_timing", "prefill_memory"):
            fn = getattr(mod, fn_name, None)
            if fn is None:
                continue

            def wrapped(*a: Any, _fn: Any = fn, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    spent["timing"] += time.perf_counter() - t

            patched.append((mod, fn_name, fn))
            setattr(mod, fn_name, wrapped)
    emit("| run | total s | prefill timing and memory s | share |")
    emit("|---|---:|---:|---:|")
    try:
        for label, fresh_cache, extra in (("calibration computed", True, []), ("calibration cached", False, []),
                                          ("calibration cached, --no-timing", False, ["--no-timing"])):
            with tempfile.TemporaryDirectory() as tmp:
                cache = Path(tmp) / "cache"
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    if not fresh_cache:
                        cli.main(["--budget", "50%", "--out", str(Path(tmp) / "warm"), "--cache-dir", str(cache),
                                  "--quiet", "--threads", "1"])
                    spent["timing"] = 0.0
                    t = time.perf_counter()
                    try:
                        cli.main(["--budget", "50%", "--out", str(Path(tmp) / "out"), "--cache-dir", str(cache),
                                  "--quiet", "--threads", "1", *extra])
                    except SystemExit:
                        continue  # this search-recipe has no such flag
                    total = time.perf_counter() - t
                emit(f"| {label} | {total:.1f} | {spent['timing']:.1f} | {spent['timing'] / total:.1%} |")
    finally:
        for mod, fn_name, fn in patched:
            setattr(mod, fn_name, fn)

    # 6. does the printed speed-up repeat? prefill_timing five times on the demo's 50 % recipe
    from recipe_search.eval import prefill_timing
    from recipe_search.recipe import load_recipe
    from recipe_search.runtime.apply import plan_from_recipe

    plan = plan_from_recipe(load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "demo-fitprune-50pct.json"))
    timing = demo_samples("eval", 16, seed=1)
    speedups = []
    emit()
    emit("## Repeatability of the printed speed-up (recipe_search.eval.prefill_timing, demo 50 % recipe, batch 16)")
    emit()
    for _ in range(5):
        got = prefill_timing(model, processor, adapter, timing, plan)
        speedups.append(got.speedup)
        emit(f"- {got.describe()}")
    mid = statistics.median(speedups)
    emit(f"\nFive calls: median speed-up {mid:.2f}x, range {min(speedups):.2f}x-{max(speedups):.2f}x "
         f"({(min(speedups) / mid - 1):+.0%} / {(max(speedups) / mid - 1):+.0%} of the median).")


# -- main -----------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds at batch 1")
    parser.add_argument("--rounds-b8", type=int, default=3, help="interleaved rounds at batches above 1")
    parser.add_argument("--budgets", default="50%,25%,12.5%")
    parser.add_argument("--bounds", default="50%,25%",
                        help="budgets whose schedules are also timed with the random rule (no scoring cost), batch 1")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-batches", default="1,8")
    parser.add_argument("--decode-rounds", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="4 layers, batch 1, 3 rounds, 32 decode tokens")
    parser.add_argument("--out", default="docs/bench-speed-output.md")
    parser.add_argument("--profile", action="store_true",
                        help="only profile (pyinstrument) keep-all and the 50%% schedules, medium and demo models")
    parser.add_argument("--profile-repeats", type=int, default=3)
    parser.add_argument("--growth", action="store_true",
                        help="only how cost grows: calibration vs samples, search time vs layers, a 7B estimate, "
                             "the share of a search-recipe run spent timing")
    parser.add_argument("--growth-samples", default="64,256,1024")
    parser.add_argument("--gpu-tflops", type=float, default=312.0, help="7B estimate: GPU peak dense bf16 TFLOP/s")
    parser.add_argument("--gpu-mfu", type=float, default=0.4, help="7B estimate: share of peak a prefill reaches")
    parser.add_argument("--calib-ratio", type=float, default=None,
                        help="7B estimate: calibration / plain forward (default: 1.1)")
    parser.add_argument("--profile-top", type=int, default=15)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.batches, args.rounds, args.decode_tokens = 4, "1", 3, 32
        args.decode_batches, args.calib_rounds, args.calib_samples = "1", 1, 4
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

    if args.growth:
        run_growth(args, emit, log)
        if args.out:
            Path(args.out).write_text("\n".join(out) + "\n")
        return 0
    if args.profile:
        run_profile(args, emit)
        if args.out:
            Path(args.out).write_text("\n".join(out) + "\n")
        return 0
    model = build_model(args.layers)
    adapter = get_adapter(model)
    dims = adapter.dims()
    n = adapter.visual_tokens_per_image()
    configs, costs, vision = schedules(adapter, [b for b in args.budgets.split(",") if b])
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
    emit("| configuration | visual tokens entering each layer | LM FLOPs (full) | predicted speed-up | how it was made |")
    emit("|---|---|---:|---:|---|")
    for c in configs:
        emit(f"| {c.name} | {' '.join(map(str, c.counts))} | {costs.fraction(c.counts, 'full'):.1%} | "
             f"{c.predicted:.3f}x | {c.how} |")
    emit()
    emit("Selection rule: FitPrune (head-max text->visual times visual->visual attention), scored at the layer "
         "that cuts. Rows marked `(random rule)` run the same schedule with the seeded random rule, whose "
         "selection costs nothing: the speed-up the hardware gives that schedule without any scoring.")
    plans: dict[str, Any] = {"bare": None}
    for c in configs:
        plans[c.name] = plan_for(c.counts, n)
    bound_names = {f"fitprune {b}" for b in args.bounds.split(",") if b} | {f"uniform {b}" for b in args.bounds.split(",") if b}
    bounds = [Config(c.name + " (random rule)", c.counts, "", c.predicted) for c in configs if c.name in bound_names]
    for c in bounds:
        plans[c.name] = plan_for(c.counts, n, "random")
    floors: dict[str, float] = {}
    for batch in [int(b) for b in args.batches.split(",") if b]:
        rounds = args.rounds if batch == 1 else args.rounds_b8
        inputs = make_inputs(batch)
        timed_configs = [Config("bare", None, "", 1.0), *configs, *(bounds if batch == 1 else [])]
        rows = [Row(c, [], []) for c in timed_configs]
        log(f"prefill, batch {batch}: {len(rows)} configurations x {rounds} rounds")
        interleaved(model, adapter, rows, plans, lambda: _forward(model, inputs), rounds, log)
        lines, ratios = prefill_table(rows)
        emit()
        emit(f"## Prefill, batch {batch} ({rounds} interleaved rounds; wall clock, CPU time alongside)")
        emit()
        for line in lines:
            emit(line)
        scoring = [(r, next((b for b in rows if b.config.name == r.config.name + " (random rule)"), None)) for r in rows]
        scoring = [(r, b) for r, b in scoring if b is not None]
        if scoring:
            emit()
            emit("What the FitPrune rule's selection costs (its row minus the same schedule with the random rule; "
                 "cuts = layers where the count drops):")
            emit()
            emit("| schedule | cuts | selection ms (median) | share of the configuration's time |")
            emit("|---|---:|---:|---:|")
            for r, b in scoring:
                cuts = sum(1 for i, c in enumerate(r.config.counts) if c < (r.config.counts[i - 1] if i else n))
                extra = statistics.median(r.wall) - statistics.median(b.wall)
                emit(f"| {r.config.name} | {cuts} | {extra * 1000:.0f} | {extra / statistics.median(r.wall):.1%} |")
        floors[f"b{batch} keep-all overhead"] = 1 / (ratios["keep-all"]) - 1
        floors[f"b{batch} keep-all overhead cpu"] = 1 / (ratios["keep-all cpu"]) - 1
        for name in ("fitprune 50%", "fitprune 25%", "uniform 50%", "uniform 25%"):
            if name in ratios:
                floors[f"b{batch} {name} meas/pred"] = ratios[name]
                floors[f"b{batch} {name} meas/pred cpu"] = ratios[name + " cpu"]

    # decode
    decode_cfgs = [c for c in configs if c.name in ("fitprune 50%", "uniform 25%")]
    emit()
    emit(f"## Decode: greedy generate() of {args.decode_tokens} new tokens ({args.decode_rounds} interleaved rounds)")
    emit()
    emit("tokens/s counts decode steps only (timestamps of the logits processor, prefill excluded); KV bytes after "
         "prefill; peak = the process's peak RSS during generate() above its RSS before it (Linux VmHWM, reset "
         "per run after malloc_trim).")
    emit()
    emit("| batch | configuration | KV-cache MB | KV ratio | tokens/s (median) | min | max | speed-up | "
         "0.8 / KV ratio | peak MB above model |")
    emit("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in [int(b) for b in args.decode_batches.split(",") if b]:
        inputs = make_inputs(batch, seed=1)
        inputs_kv = make_inputs(batch, seed=1)
        rates: dict[str, list[float]] = {"bare": []}
        peaks: dict[str, list[float]] = {"bare": []}
        kv = {"bare": kv_bytes(model, adapter, None, inputs_kv)}
        for c in decode_cfgs:
            rates[c.name], peaks[c.name] = [], []
            kv[c.name] = kv_bytes(model, adapter, plans[c.name], inputs_kv)
        log(f"decode, batch {batch}")
        decode_run(model, adapter, None, inputs, 4)  # warm-up
        for r in range(args.decode_rounds):
            for name in rates:
                res = decode_run(model, adapter, plans[name], inputs, args.decode_tokens)
                rates[name].append(res["tokens_per_s"])
                peaks[name].append(res["peak_mb"])
            log(f"  decode round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rates.items()))
        base = statistics.median(rates["bare"])
        for name in rates:
            ratio = kv[name] / kv["bare"]
            speed = statistics.median(rates[name]) / base
            emit(f"| {batch} | {name} | {kv[name] / 2**20:.1f} | {ratio:.3f} | {statistics.median(rates[name]):.1f} | "
                 f"{min(rates[name]):.1f} | {max(rates[name]):.1f} | {speed:.3f}x | "
                 f"{'' if name == 'bare' else f'{0.8 / ratio:.3f}x'} | {max(peaks[name]):.0f} |")
            if name != "bare":
                floors[f"decode b{batch} {name} speed-up / (0.8 / KV ratio)"] = speed / (0.8 / ratio)

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

    emit()
    emit("## Floors (issue 12)")
    emit()
    emit("| measure | value | floor |")
    emit("|---|---:|---|")
    for key, value in floors.items():
        if "overhead" in key:
            floor = "<= 2 %"
            text = f"{value:+.1%}"
        elif "meas/pred" in key:
            floor, text = ">= 0.93", f"{value:.3f}"
        elif key.startswith("calibration"):
            floor, text = "<= 1.3x", f"{value:.3f}x"
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
