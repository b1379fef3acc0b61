"""An offline lmms-eval task for the embedded demo world: local files only, no hub.

`write_demo_task(out, n)` writes, for the first `n` held-out questions of the demo world, i.e.
exactly `recipe_search.calibration.load_samples("demo", n, split="eval")`, the questions
`search-recipe eval --eval-samples n` measures:

    out/demo_vqa/demo_vqa.yaml         the task (dataset_path json, data_files -> the local JSONL)
    out/demo_vqa/demo_vqa_choice.yaml  the same questions as multiple choice (loglikelihood requests)
    out/demo_vqa/utils.py              the task's functions (from this module; images found beside it)
    out/demo_vqa/data/test.jsonl       a row per question: id, image, question, answer, qtype, choices
    out/demo_vqa/images/*.png          the images (PNG: lossless, the pixels `search-recipe eval` sees)

Paths are relative to the folder (lmms-eval >= 0.7 resolves a local `data_files` path against
the YAML's folder), so the folder can be moved. Run it with

    HF_DATASETS_OFFLINE=1 lmms-eval --model recipe_search --model_args pretrained=demo,recipe=R.json \\
        --include_path out/demo_vqa --tasks demo_vqa --batch_size 16

The prompt is the question itself (the adapter renders it with the checkpoint's chat template,
as `search-recipe eval` does), decoding is greedy, and the score is an exact match of the first
answer word, lower case: the normalisation of `recipe_search.eval.accuracy`. The metric
`demo_accuracy` is the share of correct answers; `demo_correct` their number.

Nothing here imports lmms_eval or datasets, so the main test suite exercises it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from .runner import first_word

TASK_NAME = "demo_vqa"

#: Generation settings of the task. The demo answers with one word (one token); a few more tokens
#: let the run exercise the pruned KV cache in decoding, and only the first word is scored.
GENERATION = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "num_beams": 1, "until": ["\n"]}

_YAML = """\
# Offline lmms-eval task for recipe_search's demo world (written by recipe_search.integrations.demo_task).
# {n} held-out questions = recipe_search.calibration.load_samples("demo", {n}, split="eval").
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/test.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  num_beams: 1
  until:
    - "\\n"
process_results: !function utils.process_results
metric_list:
  - metric: demo_accuracy
    aggregation: mean
    higher_is_better: true
  - metric: demo_correct
    aggregation: !function utils.count
    higher_is_better: true
metadata:
  - version: 1.0
"""

_CHOICE_YAML = """\
# Multiple-choice variant (loglikelihood requests: run with --force_simple). The choices of a
# question are the words of its type (colours, shapes, counts, yes/no); the pick is the choice of
# highest log-likelihood.
task: {task}_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/test.jsonl
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: choices
doc_to_target: !function utils.doc_to_target_index
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 1.0
"""

_UTILS = '''\
"""Functions of the demo_vqa task (written by recipe_search.integrations.demo_task)."""
from pathlib import Path

from recipe_search.integrations.demo_task import (  # noqa: F401
    count, doc_to_target_index, doc_to_text, open_image, process_results,
)

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [open_image(HERE, doc)]
'''


def open_image(folder: str | Path, doc: dict) -> Image.Image:
    """The RGB image of a task row; its path is relative to the task folder."""
    with Image.open(Path(folder) / doc["image"]) as image:
        return image.convert("RGB")


def count(values: list[float]) -> int:
    """Aggregation of `demo_correct`: the number of correct answers."""
    return int(sum(values))


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target_index(doc: dict) -> int:
    return doc["choices"].index(doc["answer"])


def choices_for(qtype: str | None) -> list[str]:
    """The words a question of `qtype` can be answered with."""
    from ..demo import world

    words = {"colour": list(world.COLOURS), "shape": list(world.SHAPES), "count": list(world.COUNT_WORDS),
             "exist": ["yes", "no"]}
    if qtype not in words:
        raise ValueError(f"demo question type {qtype!r} has no choice list")
    return words[qtype]


def score(response: str, answer: str) -> bool:
    """Exact match of the first word, lower case (as `recipe_search.eval.accuracy`)."""
    return first_word(response) == str(answer).strip().lower()


def process_results(doc: dict, results: list[Any]) -> dict[str, float]:
    response = results[0] if results else ""
    hit = float(score(response if isinstance(response, str) else str(response), doc["answer"]))
    return {"demo_accuracy": hit, "demo_correct": hit}


def task_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The rows of the task (without images): the first `n` held-out demo questions."""
    from ..calibration import load_samples

    data = load_samples("demo", n, split="eval", seed=seed)
    return [{"id": i, "question": s.prompt, "answer": str(s.answer), "qtype": s.qtype,
             "choices": choices_for(s.qtype), "_image": s.image}
            for i, s in enumerate(data.samples)]


def write_demo_task(out: str | Path, n: int, seed: int = 0) -> Path:
    """Write the task folder `out/demo_vqa` (see the module docstring); returns it."""
    folder = Path(out).expanduser().resolve() / TASK_NAME
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    lines = []
    for row in task_rows(n, seed):
        name = f"images/q{row['id']:05d}.png"
        row.pop("_image").save(folder / name, format="PNG")
        lines.append(json.dumps({**row, "image": name}))
    data = folder / "data" / "test.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / f"{TASK_NAME}.yaml").write_text(
        _YAML.format(task=TASK_NAME, n=n, max_new_tokens=GENERATION["max_new_tokens"]),
        encoding="utf-8")
    (folder / f"{TASK_NAME}_choice.yaml").write_text(_CHOICE_YAML.format(task=TASK_NAME), encoding="utf-8")
    (folder / "utils.py").write_text(_UTILS, encoding="utf-8")
    return folder
