"""Run the real lmms-eval harness on the demo model and check it against `search-recipe eval`.

    python -m recipe_search.integrations.demo_check --recipe recipes/demo-fitprune-50pct.json \\
        --samples 64 --work /tmp/lmms-demo-check

Run it in an environment that has lmms-eval and recipe_search (with its `lmms_eval.models` entry
point) installed; `.ci/lmms_eval_stage.sh` builds one. It

1. writes the offline demo task (`demo_task.write_demo_task`) for the first N held-out questions;
2. runs the `lmms-eval` CLI (a subprocess, the real harness) on the demo model: the recipe through
   the chat class, the unpruned model, the recipe through the simple class (`--force_simple`), and
   the multiple-choice variant of the task (loglikelihood requests);
3. runs `search-recipe eval RECIPE --eval-samples N` (a subprocess, the real CLI) and, in-process,
   `recipe_search.eval.greedy_answers` on the same questions;
4. requires: lmms-eval's accuracy, pruned and unpruned, equals the one `search-recipe eval` prints
   (and its per-type accuracies), the number of correct answers equals recipe_search's own count,
   every question's first answer word equals recipe_search's greedy answer, and the
   multiple-choice pick equals the greedy answer wherever that answer is one of the choices.

Exits 0 when every check holds, 1 otherwise (2 when a run itself fails).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .demo_task import TASK_NAME, write_demo_task
from .runner import first_word

BATCH_SIZE = 16  # search-recipe eval's default --batch-size; the same batches give the same sums


class RunError(RuntimeError):
    pass


def _bin(name: str) -> str:
    """A console script of this environment (the one running this module)."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RunError(f"{name}: not found beside {sys.executable} nor on PATH")
    return found


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> str:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log.write_text(proc.stdout, encoding="utf-8")
    print(f"  {Path(cmd[0]).name} ... -> exit {proc.returncode} in {time.perf_counter() - start:.0f} s (log {log})",
          flush=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
        raise RunError(f"{' '.join(cmd)} exited {proc.returncode}; last lines:\n{tail}")
    return proc.stdout


def run_lmms_eval(name: str, task_dir: Path, task: str, model_args: str, work: Path, env: dict[str, str],
                  force_simple: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results of `task`, its logged samples by doc_id order) of one `lmms-eval` CLI run."""
    out = work / "lmms-eval" / name
    if out.exists():
        shutil.rmtree(out)
    cmd = [_bin("lmms-eval"), "--model", "recipe_search", "--model_args", model_args,
           "--include_path", str(task_dir), "--tasks", task, "--batch_size", str(BATCH_SIZE),
           "--output_path", str(out), "--log_samples"]
    if force_simple:
        cmd.append("--force_simple")
    text = _run(cmd, work / f"lmms-eval-{name}.log", env)
    if "Error during evaluation" in text:  # lmms-eval 0.7.3 reports a failed evaluation yet exits 0
        tail = "\n".join(line for line in text.strip().splitlines()[-25:] if "it/s]" not in line)
        raise RunError(f"lmms-eval {name} failed (exit status 0 notwithstanding); last lines:\n{tail}")
    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob(f"*_samples_{task}.jsonl"))
    if len(results) != 1 or len(samples) != 1:
        raise RunError(f"lmms-eval {name}: expected one results file and one samples file under {out}, "
                       f"found {len(results)} and {len(samples)}")
    result = json.loads(results[0].read_text(encoding="utf-8"))["results"][task]
    rows = [json.loads(line) for line in samples[0].read_text(encoding="utf-8").splitlines() if line.strip()]
    return result, sorted(rows, key=lambda r: int(r["doc_id"]))


_HELD_OUT = re.compile(r"held-out accuracy \(([^,]+), (\d+) q\): unpruned ([\d.]+)% -> pruned ([\d.]+)%")
_PER_TYPE = re.compile(r"^\s{4}(\S+)\s+([\d.]+)% -> ([\d.]+)%\s*$")


def run_search_recipe_eval(recipe: Path, n: int, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """What `search-recipe eval RECIPE --eval-samples n` prints: accuracies in percent, per type too."""
    text = _run([_bin("search-recipe"), "eval", str(recipe), "--eval-samples", str(n), "--quiet",
                 "--batch-size", str(BATCH_SIZE)], work / "search-recipe-eval.log", env)
    match = _HELD_OUT.search(text)
    if match is None:
        raise RunError("search-recipe eval printed no 'held-out accuracy (...): unpruned X% -> pruned Y%' line")
    per_type: dict[str, tuple[str, str]] = {}
    for line in text[match.end():].splitlines()[1:]:
        m = _PER_TYPE.match(line)
        if m is None:
            break
        per_type[m.group(1)] = (m.group(2), m.group(3))
    return {"source": match.group(1), "n": int(match.group(2)), "unpruned": match.group(3),
            "pruned": match.group(4), "per_type": per_type}


def reference_answers(recipe: Path, n: int) -> tuple[list[Any], list[str], list[str]]:
    """(samples, unpruned answers, pruned answers) from recipe_search's own evaluation code, with the
    settings `search-recipe eval` uses for the demo (sdpa, one thread, batch 16)."""
    import torch

    from ..calibration import load_samples
    from ..demo import demo_checkpoint
    from ..eval import greedy_answers
    from ..models.loading import load_model
    from ..recipe import load_recipe
    from ..runtime.apply import check_recipe_matches, plan_from_recipe

    torch.set_num_threads(1)
    data = load_samples("demo", n, split="eval")
    model, processor, adapter = load_model(demo_checkpoint())
    loaded = load_recipe(recipe)
    check_recipe_matches(adapter, loaded)
    base = greedy_answers(model, processor, adapter, data, batch_size=BATCH_SIZE)
    pruned = greedy_answers(model, processor, adapter, data, plan_from_recipe(loaded), batch_size=BATCH_SIZE)
    return list(data.samples), base, pruned


def _first_float(value: Any) -> float:
    while isinstance(value, (list, tuple)):
        value = value[0]
    if isinstance(value, dict):  # a serialised GenerationResult
        return _first_float(value.get("text"))
    return float(value)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.count = 0

    def expect(self, ok: bool, what: str) -> None:
        self.count += 1
        print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
        if not ok:
            self.failed.append(what)


def check(recipe: Path, n: int, work: Path) -> int:
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = recipe.resolve()
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf-datasets-cache"), "TOKENIZERS_PARALLELISM": "false"}
    task_dir = write_demo_task(work, n)
    print(f"demo task: {task_dir} ({n} questions)", flush=True)
    pruned_args = f"pretrained=demo,recipe={recipe}"
    print("running the harness and search-recipe eval:", flush=True)
    runs = {
        "pruned": run_lmms_eval("pruned", task_dir, TASK_NAME, pruned_args, work, env),
        "unpruned": run_lmms_eval("unpruned", task_dir, TASK_NAME, "pretrained=demo", work, env),
        "pruned-simple": run_lmms_eval("pruned-simple", task_dir, TASK_NAME, pruned_args, work, env,
                                       force_simple=True),
        "choice": run_lmms_eval("choice", task_dir, f"{TASK_NAME}_choice", pruned_args, work, env,
                                force_simple=True),
    }
    cli = run_search_recipe_eval(recipe, n, work, env)
    samples, base_ref, pruned_ref = reference_answers(recipe, n)
    answers = [str(s.answer).strip().lower() for s in samples]
    qtypes = [s.qtype or "all" for s in samples]

    checks = Checks()
    summary: dict[str, Any] = {"recipe": str(recipe), "samples": n, "search_recipe_eval": cli}
    print("checks:", flush=True)
    checks.expect(cli["n"] == n and cli["source"] == "demo:eval",
                  f"search-recipe eval measured {cli['source']}, {cli['n']} questions")
    for name, ref, printed in (("pruned", pruned_ref, cli["pruned"]), ("unpruned", base_ref, cli["unpruned"]),
                               ("pruned-simple", pruned_ref, cli["pruned"])):
        result, rows = runs[name]
        acc, correct = float(result["demo_accuracy,none"]), int(result["demo_correct,none"])
        words = [first_word(str(r["filtered_resps"][0] if isinstance(r["filtered_resps"], list)
                                else r["filtered_resps"])) for r in rows]
        own = sum(a.lower() == t for a, t in zip(ref, answers))
        summary[name] = {"lmms_eval_accuracy": acc, "lmms_eval_correct": correct, "recipe_search_correct": own,
                         "search_recipe_eval_printed": printed + "%"}
        checks.expect(len(rows) == n, f"{name}: lmms-eval answered {len(rows)} of {n} questions")
        checks.expect(_pct(acc) == printed,
                      f"{name}: lmms-eval accuracy {_pct(acc)}% == search-recipe eval {printed}%")
        checks.expect(correct == own and abs(acc - own / n) < 1e-12,
                      f"{name}: lmms-eval {correct}/{n} correct == recipe_search greedy_answers {own}/{n}")
        same = sum(w == a.lower() for w, a in zip(words, ref))
        checks.expect(same == n, f"{name}: first answer word == recipe_search's greedy answer on {same}/{n} questions")
        column = 0 if name == "unpruned" else 1
        for qtype, pair in cli["per_type"].items():
            idx = [i for i, q in enumerate(qtypes) if q == qtype]
            got = sum(words[i] == answers[i] for i in idx) / max(1, len(idx))
            checks.expect(_pct(got) == pair[column],
                          f"{name}: {qtype} accuracy {_pct(got)}% == search-recipe eval {pair[column]}%")

    result, rows = runs["choice"]
    picks = []
    for row, sample in zip(rows, samples):
        losses = [_first_float(r) for r in row["filtered_resps"]]  # (loss, is_greedy) per choice: least wins
        picks.append(min(range(len(losses)), key=losses.__getitem__))
    from .demo_task import choices_for

    comparable = [(choices_for(s.qtype)[p], g.lower()) for p, g, s in zip(picks, pruned_ref, samples)
                  if g.lower() in choices_for(s.qtype)]
    agree = sum(a == b for a, b in comparable)
    summary["choice"] = {"lmms_eval_acc": float(result["acc,none"]), "greedy_in_choices": len(comparable),
                         "pick_equals_greedy": agree}
    checks.expect(len(rows) == n, f"choice: lmms-eval scored {len(rows)} of {n} questions")
    checks.expect(agree == len(comparable) and len(comparable) > 0,
                  f"choice (loglikelihood): pick == greedy answer on {agree}/{len(comparable)} questions whose "
                  "greedy answer is a choice")
    summary["checks"] = {"count": checks.count, "failed": checks.failed}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    p, b = summary["pruned"], summary["unpruned"]
    verdict = "OK" if not checks.failed else f"FAILED ({len(checks.failed)} of {checks.count} checks)"
    print(f"lmms-eval demo check {verdict}: pruned {p['lmms_eval_correct']}/{n} in lmms-eval vs "
          f"{p['recipe_search_correct']}/{n} in recipe_search ({p['search_recipe_eval_printed']} printed by "
          f"search-recipe eval); unpruned {b['lmms_eval_correct']}/{n} vs {b['recipe_search_correct']}/{n}; "
          f"summary {work / 'summary.json'}")
    return 0 if not checks.failed else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe_search.integrations.demo_check",
                                description="Check lmms-eval's accuracy on the demo task against search-recipe eval.")
    p.add_argument("--recipe", default="recipes/demo-fitprune-50pct.json", help="a demo recipe")
    p.add_argument("--samples", type=int, default=64, help="held-out questions (default: 64)")
    p.add_argument("--work", default="lmms-eval-demo-check", help="folder for the task, logs and results")
    args = p.parse_args(argv)
    if args.samples <= 0:
        p.error(f"--samples must be positive, got {args.samples}")
    try:
        return check(Path(args.recipe), args.samples, Path(args.work))
    except RunError as exc:
        print(f"lmms-eval demo check: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
