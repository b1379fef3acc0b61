"""How the cost of recipe-search grows (issue 12, part 4), and what a 7B model would cost on one GPU.

Every number in the "cost growth" part of docs/performance.md comes from this script:

1. calibration time vs samples (64 / 256 / 1024) on the embedded demo model (trained weights, batch 16 as
   search-recipe calibrates), against plain forwards of the same batches; CPU seconds, one thread;
2. FitPrune, G-Search and P-Sigmoid search time vs decoder layers (8 / 32): `search-recipe` runs (subprocesses,
   one thread) on random-weight checkpoints of the demo architecture with 8 and 32 decoder layers, calibration
   cached beforehand; the search's own seconds are read from the recipe (method.result.search_seconds), with
   G-Search's evaluations and layer runs;
3. G-Search evaluations vs layers from its algorithm run on a counting scorer (a monotone pass/fail metric), next
   to the bound 2 + 7 (L - start_layer);
4. a LLaVA-1.5-7B (576 visual tokens) estimate on one GPU: prefill FLOPs from recipe_search/flops.py times an
   assumed sustained throughput (--gpu-tflops x --gpu-mfu), multiplied by the measured ratios of step 1 and the
   evaluation counts of steps 2-3.

    python scripts/bench_cost_growth.py [--samples 64,256,1024] [--layers 8,32] [--search-samples 16]
                                        [--quick] [--out docs/cost-growth-output.md]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's recipe_search, whatever is installed
LLAVA_7B = {"lm": dict(num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                       head_dim=128),
            "vision": dict(num_layers=24, hidden_size=1024, intermediate_size=4096, feature_index=23, has_cls=True,
                           patches=576, projector_macs_per_token=1024 * 4096 + 4096 * 4096)}
TEXT_TOKENS_7B = 40  # LLaVA-1.5's system prompt is longer; 40 keeps the estimate on the safe (cheap) side of it


def calibration_vs_samples(counts: list[int], emit: Callable[[str], None]) -> dict[int, tuple[float, float]]:
    """CPU seconds of collect_stats and of plain forwards over the same demo batches (batch 16)."""
    from recipe_search.calibration import collect_stats, demo_samples
    from recipe_search.calibration.data import batches
    from recipe_search.demo import demo_checkpoint
    from recipe_search.models.loading import load_model

    model, processor, adapter = load_model(demo_checkpoint())
    emit("## Calibration time vs samples (demo model, trained weights, batch 16, CPU seconds, 1 thread)")
    emit()
    emit("| samples | plain forward s | calibration s | ratio | calibration ms per sample |")
    emit("|---:|---:|---:|---:|---:|")
    out: dict[int, tuple[float, float]] = {}
    for count in counts:
        data = demo_samples("calib", count)

        def plain(data: Any = data) -> None:
            with torch.no_grad():
                for chunk in batches(data.samples, 16):
                    model(**adapter.inputs(processor, [s.image for s in chunk], [s.prompt for s in chunk]),
                          use_cache=False)

        def calib(data: Any = data) -> None:
            collect_stats(model, processor, adapter, data, batch_size=16, progress=False)

        rounds = 3 if count <= 256 else 1
        plain_s, calib_s = [], []
        for r in range(rounds):  # interleaved, the order flipping every round
            for fn, sink in ((plain, plain_s), (calib, calib_s))[:: 1 if r % 2 == 0 else -1]:
                t = time.process_time()
                fn()
                sink.append(time.process_time() - t)
        p, c = statistics.median(plain_s), statistics.median(calib_s)
        out[count] = (p, c)
        emit(f"| {count} | {p:.2f} | {c:.2f} | {c / p:.2f}x | {c / count * 1000:.1f} |")
    return out


def random_checkpoint(layers: int, folder: Path) -> Path:
    """The demo architecture with `layers` decoder layers and random weights, saved with the demo processor."""
    from recipe_search.demo import build

    tokenizer = build.build_tokenizer()
    processor = build.build_processor(tokenizer)
    config = build.build_config(tokenizer, layers)
    torch.manual_seed(0)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = folder / f"random-{layers}"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def search_run(checkpoint: Path, method: str, samples: int, cache: Path, out: Path,
               extra: list[str]) -> dict[str, Any]:
    """One `search-recipe` subprocess at 50 %: wall and CPU seconds, and what its recipe says about the search."""
    budget = [] if method == "gsearch" else ["--budget", "50%"]  # G-Search finds the least cost without loss
    cmd = [sys.executable, "-m", "recipe_search.cli", "--model", str(checkpoint), "--method", method, *budget,
           "--eval", "none", "--no-timing", "--num-samples", str(samples), "--threads", "1", "--quiet",
           "--cache-dir", str(cache), "--out", str(out), *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    recipe = json.loads(next(out.glob(f"*-{method}-*.json")).read_text())
    result = recipe["method"]["result"]
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "search": float(result.get("search_seconds", float("nan"))),
            "evaluations": result.get("evaluations", result.get("trials")),  # P-Sigmoid: one evaluation per trial
            "layers_run": result.get("layers_run")}


def search_vs_layers(layers: list[int], samples: int, methods: list[str], log: Callable[[str], None],
                     emit: Callable[[str], None]) -> dict[tuple[str, int], dict[str, Any]]:
    emit()
    emit(f"## Search time vs decoder layers (random-weight demo architecture, {samples} calibration = search "
         "samples, 1 thread)")
    emit()
    emit("`search-recipe --model random-L --method M --budget 50% --eval none --no-timing --num-samples "
         f"{samples}` (G-Search takes no budget: it finds the least cost without loss) after a run that filled the "
         "calibration cache; 'search s' is the method's own time from the "
         "recipe, 'run' the whole subprocess (model load, cached calibration, search, writing).")
    emit()
    emit("| method | layers | search s | run wall s | run CPU s | evaluations | layer runs per batch |")
    emit("|---|---:|---:|---:|---:|---:|---:|")
    found: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for count in layers:
            ckpt = random_checkpoint(count, root)
            cache = root / f"cache-{count}"
            search_run(ckpt, "fitprune", samples, cache, root / f"warm-{count}", [])  # fills the calibration cache
            for method in methods:
                log(f"  {method}, {count} layers")
                got = search_run(ckpt, method, samples, cache, root / f"{method}-{count}", [])
                found[(method, count)] = got
                emit(f"| {method} | {count} | {got['search']:.2f} | {got['wall']:.1f} | {got['cpu']:.1f} | "
                     f"{got['evaluations'] if got['evaluations'] is not None else ''} | "
                     f"{got['layers_run'] if got['layers_run'] is not None else ''} |")
    return found


class CountingScorer:
    """Stands in for ScheduleScorer in G-Search: a monotone pass/fail metric (a schedule passes when every layer
    keeps at least `need[l]`), counting evaluations."""

    metric = "agreement"

    def __init__(self, need: list[int], visual_tokens: int) -> None:
        self.need, self.visual_tokens = need, visual_tokens
        self.layers = list(range(len(need)))
        self.evaluations = self.layers_run = 0

    def evaluate(self, counts: Any) -> Any:
        self.evaluations += 1
        ok = all(int(c) >= n for c, n in zip(counts, self.need))
        return SimpleNamespace(value=float(ok), agreement=float(ok), kl=0.0, accuracy=None)

    def reference(self) -> Any:
        return self.evaluate((self.visual_tokens,) * len(self.layers))

    def rule_plan(self, counts: Any, name: str) -> Any:
        rule = SimpleNamespace(name=name, params=dict)
        return SimpleNamespace(counts=tuple(int(c) for c in counts), rule=rule, score_layer="same", vision=None)

    def evaluate_plan(self, plan: Any) -> Any:
        return self.evaluate(plan.counts)


def gsearch_evaluations(layers: list[int], emit: Callable[[str], None]) -> None:
    from recipe_search.flops import CostModel
    from recipe_search.methods.gsearch import search_gsearch
    from recipe_search.models.base import ModelDims

    emit()
    emit("## G-Search evaluations vs layers (its algorithm on a counting scorer, N = 576)")
    emit()
    emit("Each layer from start_layer (2) bisects a grid of 65 counts (N/64 steps) no higher than the previous "
         "layer's: at most ceil(log2 65) = 7 evaluations per layer, plus the reference and a final check. 'need' "
         "is the fewest tokens per layer that pass.")
    emit()
    emit("| layers | need | evaluations | bound 2 + 7 (L - 2) |")
    emit("|---:|---|---:|---:|")
    for count in layers:
        dims = ModelDims(num_layers=count, hidden_size=1024, intermediate_size=2752, num_heads=16, num_kv_heads=16,
                         head_dim=64)
        costs = CostModel(dims, 576, (40,))
        for shape, need in (("falls to 25 % by mid-depth",
                             [576 if i < 2 else max(144, int(576 * (1 - 0.75 * min(1.0, i / (count / 2)))))
                              for i in range(count)]),
                            ("flat 50 % from layer 2", [576, 576] + [288] * (count - 2))):
            scorer = CountingScorer(need, 576)
            search_gsearch(scorer, costs, start_layer=2)  # type: ignore[arg-type]
            emit(f"| {count} | {shape} | {scorer.evaluations} | {2 + 7 * (count - 2)} |")


def estimate_7b(args: argparse.Namespace, calib: dict[int, tuple[float, float]],
                searches: dict[tuple[str, int], dict[str, Any]], emit: Callable[[str], None]) -> None:
    from recipe_search.flops import CostModel, VisionCost
    from recipe_search.models.base import ModelDims, VisionLayout

    dims = ModelDims(**LLAVA_7B["lm"])
    lm = CostModel(dims, 576, (TEXT_TOKENS_7B,)).unpruned("full")
    vision = VisionCost(VisionLayout(**LLAVA_7B["vision"])).unpruned()
    flop_s = args.gpu_tflops * 1e12 * args.gpu_mfu
    prefill = 2 * (lm + vision) / flop_s  # MAC = 1 in flops.py: x2 for FLOPs
    ratio = max(c / p for p, c in calib.values()) if calib else 1.3
    evals = {m: searches[(m, 32)]["evaluations"] for m in ("gsearch", "psigmoid") if (m, 32) in searches}
    g_bound = 2 + 7 * 30  # a 32-layer G-Search never makes more (see the counting-scorer table)
    g_run = evals.get("gsearch") or g_bound
    p_evals = evals.get("psigmoid") or 48
    emit()
    emit("## Estimate: LLaVA-1.5-7B, 576 visual tokens, one GPU")
    emit()
    emit(f"How: prefill MACs from recipe_search/flops.py with LLaVA-1.5-7B's sizes (LM 32 layers, hidden 4096, MLP "
         f"11008, 32 heads; CLIP-L/14-336, 24 layers, hidden 1024; two-layer projector) and {TEXT_TOKENS_7B} text "
         f"tokens: LM {lm / 1e12:.2f} TMAC + vision {vision / 1e9:.0f} GMAC = {2 * (lm + vision) / 1e12:.1f} TFLOP "
         f"per sample. Assumed sustained throughput: {args.gpu_tflops:.0f} TFLOP/s dense bf16 peak (A100) x "
         f"{args.gpu_mfu:.0%} utilisation = {flop_s / 1e12:.0f} TFLOP/s, so {prefill * 1000:.0f} ms per sample "
         f"prefill. Calibration: x {ratio:.2f} (the largest calibration / plain-forward ratio measured above). "
         f"Search evaluations: G-Search {g_run} (the 32-layer random-weight run above) up to its bound {g_bound}, "
         f"P-Sigmoid {p_evals} (its trials), each a "
         "full prefill of the search samples (the prefix cache is ignored: on a 7B, 64 samples' hidden states at "
         "one layer take 64 x 616 x 4096 x 2 B = 0.3 GB, so little fits in the default 512 MB). FitPrune's search "
         "works on the statistics only (numpy, independent of the model's width): the 32-layer time above.")
    emit()
    emit("| step | work | estimate |")
    emit("|---|---|---:|")
    for n in (64, 256, 1024):
        emit(f"| calibration, {n} samples | {n} prefills x {ratio:.2f} | {n * prefill * ratio:.0f} s |")
    if ("fitprune", 32) in searches:
        emit(f"| FitPrune search | statistics only | {searches[('fitprune', 32)]['search']:.1f} s |")
    emit(f"| G-Search, 64 search samples | {g_run}-{g_bound} evaluations x 64 prefills | "
         f"{g_run * 64 * prefill / 60:.1f}-{g_bound * 64 * prefill / 60:.1f} min |")
    emit(f"| P-Sigmoid, 64 search samples | {p_evals} evaluations x 64 prefills | {p_evals * 64 * prefill / 60:.1f} min |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="64,256,1024", help="calibration sample counts")
    parser.add_argument("--layers", default="8,32", help="decoder layers of the random-weight search models")
    parser.add_argument("--search-samples", type=int, default=16)
    parser.add_argument("--methods", default="fitprune,gsearch,psigmoid")
    parser.add_argument("--gpu-tflops", type=float, default=312.0, help="7B estimate: GPU dense bf16 peak TFLOP/s")
    parser.add_argument("--gpu-mfu", type=float, default=0.4, help="7B estimate: share of the peak a prefill sustains")
    parser.add_argument("--quick", action="store_true", help="64 samples only, 8 and 16 layers, 8 search samples")
    parser.add_argument("--out", default="docs/cost-growth-output.md")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.layers, args.search_samples = "64", "8,16", 8
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    out: list[str] = []

    def emit(text: str = "") -> None:
        out.append(text)
        print(text, flush=True)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    emit("# bench_cost_growth: how the cost of recipe-search grows")
    emit()
    emit(f"`python scripts/bench_cost_growth.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    emit()
    emit(f"- machine: {os.cpu_count()} CPUs (shared with other jobs), torch {torch.__version__}, 1 thread; load "
         f"average at start {os.getloadavg()[0]:.1f}")
    emit()
    calib = calibration_vs_samples([int(c) for c in args.samples.split(",") if c], emit)
    layers = [int(c) for c in args.layers.split(",") if c]
    searches = search_vs_layers(layers, args.search_samples, [m for m in args.methods.split(",") if m], log, emit)
    gsearch_evaluations(layers, emit)
    estimate_7b(args, calib, searches, emit)
    emit()
    emit(f"Total run time {time.perf_counter() - started:.0f} s.")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
