"""The lmms-eval integration, in the main environment (no lmms-eval here).

The real harness runs in its own virtualenv (.ci/lmms_eval_stage.sh); these tests cover what it
relies on: recipe_search imports without lmms_eval, the offline demo task holds exactly the
questions and pixels `search-recipe eval` measures, the task's functions score like
`recipe_search.eval.accuracy`, and `PrunedModel` (which the lmms-eval model wraps) answers every
question as `greedy_answers` does under the same recipe.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recipe_search.calibration import load_samples
from recipe_search.integrations import demo_task
from recipe_search.integrations.runner import (
    PrunedModel,
    clean_context,
    cut_at_stops,
    first_word,
    resolve_dtype,
    split_messages,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo-fitprune-50pct.json"


def test_recipe_search_and_its_integrations_import_without_lmms_eval():
    code = ("import sys, recipe_search, recipe_search.integrations, recipe_search.integrations.runner, "
            "recipe_search.integrations.demo_task, recipe_search.integrations.demo_check; "
            "assert 'lmms_eval' not in sys.modules, 'lmms_eval was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_lmms_eval_module_is_the_only_one_importing_lmms_eval():
    package = ROOT / "recipe_search"
    pattern = re.compile(r"^\s*(import lmms_eval|from lmms_eval[ .])", re.MULTILINE)
    importers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if pattern.search(p.read_text()))
    assert importers == ["integrations/lmms_eval.py"]


def _load_utils(folder: Path):
    spec = importlib.util.spec_from_file_location("demo_vqa_utils_under_test", folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_task_holds_the_questions_and_pixels_search_recipe_eval_measures(tmp_path):
    yaml = pytest.importorskip("yaml")
    n = 12
    folder = demo_task.write_demo_task(tmp_path / "tasks", n)
    assert folder == (tmp_path / "tasks" / "demo_vqa").resolve()
    rows = [json.loads(line) for line in (folder / "data" / "test.jsonl").read_text().splitlines()]
    reference = load_samples("demo", n, split="eval")
    assert [r["question"] for r in rows] == [s.prompt for s in reference.samples]
    assert [r["answer"] for r in rows] == [s.answer for s in reference.samples]
    assert [r["id"] for r in rows] == list(range(n))
    utils = _load_utils(folder)
    for row, sample in zip(rows, reference.samples):
        assert not Path(row["image"]).is_absolute()  # the folder can move
        (image,) = utils.doc_to_visual(row)
        assert np.array_equal(np.asarray(image), np.asarray(sample.image.convert("RGB")))  # PNG is lossless
        assert utils.doc_to_text(row) == sample.prompt
        assert row["answer"] in row["choices"]
        assert utils.doc_to_target_index(row) == row["choices"].index(row["answer"])

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    for name, output_type in (("demo_vqa", "generate_until"), ("demo_vqa_choice", "multiple_choice")):
        config = yaml.load((folder / f"{name}.yaml").read_text(), Loader=Loader)
        assert config["task"] == name and config["output_type"] == output_type
        assert config["dataset_path"] == "json"
        assert config["dataset_kwargs"]["data_files"]["test"] == "data/test.jsonl"
        for key, value in config.items():
            if isinstance(value, tuple) and value[0] == "function":
                assert hasattr(utils, value[1].split(".", 1)[1]), f"{name}.yaml {key}: {value[1]} missing"
        for metric in config["metric_list"]:
            if isinstance(metric["aggregation"], tuple):
                assert hasattr(utils, metric["aggregation"][1].split(".", 1)[1])
    generation = yaml.load((folder / "demo_vqa.yaml").read_text(), Loader=Loader)["generation_kwargs"]
    assert generation["do_sample"] is False and generation["temperature"] == 0


def test_demo_task_scores_like_recipe_search_accuracy():
    doc = {"answer": "Red"}
    assert demo_task.process_results(doc, ["red"]) == {"demo_accuracy": 1.0, "demo_correct": 1.0}
    assert demo_task.process_results(doc, ["  RED purple cross\n"])["demo_accuracy"] == 1.0
    assert demo_task.process_results(doc, ["blue red"])["demo_accuracy"] == 0.0
    assert demo_task.process_results(doc, [""])["demo_accuracy"] == 0.0
    assert demo_task.count([1.0, 0.0, 1.0]) == 2
    with pytest.raises(ValueError, match="no choice list"):
        demo_task.choices_for("nonsense")


def test_prompt_helpers():
    assert first_word("  Yes, it is") == "yes,"
    assert first_word("") == ""
    assert cut_at_stops("red\nblue", ["\n"]) == "red"
    assert cut_at_stops("red blue", None) == "red blue"
    assert clean_context("<image>\nwhat colour is the cross ?") == "what colour is the cross ?"
    assert clean_context("<image> <image>\nq") == "q"
    from PIL import Image

    image = Image.new("RGB", (4, 4), (1, 2, 3))
    images, text = split_messages([{"role": "user", "content": [{"type": "image", "url": image},
                                                                 {"type": "text", "text": "is there a cross ?"}]}])
    assert text == "is there a cross ?" and len(images) == 1 and images[0].getpixel((0, 0)) == (1, 2, 3)
    assert split_messages([{"role": "system", "content": []}, {"role": "user", "content": "hi"}]) == ([], "hi")
    with pytest.raises(ValueError, match="one user turn"):
        split_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}])
    with pytest.raises(ValueError, match="'video' is not supported"):
        split_messages([{"role": "user", "content": [{"type": "video", "url": "v.mp4"}]}])
    assert resolve_dtype(None) is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8")


@pytest.fixture(scope="module")
def pruned_demo():
    model = PrunedModel("demo", str(RECIPE))
    yield model
    model.close()


def test_pruned_model_answers_as_search_recipe_eval(pruned_demo):
    from recipe_search.eval import greedy_answers
    from recipe_search.recipe import load_recipe
    from recipe_search.runtime.apply import plan_from_recipe

    data = load_samples("demo", 32, split="eval")
    texts = []
    for start in range(0, len(data), 16):  # the task's batches and generation settings
        chunk = data.samples[start:start + 16]
        texts += pruned_demo.generate([[s.image] for s in chunk], [s.prompt for s in chunk],
                                      max_new_tokens=demo_task.GENERATION["max_new_tokens"],
                                      until=demo_task.GENERATION["until"])
    assert pruned_demo.handle is not None
    pruned_demo.handle.remove()  # greedy_answers attaches the same plan itself
    try:
        reference = greedy_answers(pruned_demo.model, pruned_demo.processor, pruned_demo.adapter, data,
                                   plan_from_recipe(load_recipe(RECIPE)), batch_size=16)
    finally:
        from recipe_search.runtime.apply import apply_recipe

        pruned_demo.handle = apply_recipe(pruned_demo.model, RECIPE)
    assert [first_word(t) for t in texts] == [r.lower() for r in reference]
    correct = sum(demo_task.score(t, s.answer) for t, s in zip(texts, data.samples))
    assert correct == sum(r.lower() == s.answer for r, s in zip(reference, data.samples))


def test_pruned_model_loglikelihood_ranks_the_greedy_answer_first(pruned_demo):
    data = load_samples("demo", 4, split="eval")
    for sample in data.samples:
        choices = demo_task.choices_for(sample.qtype)
        scored = {c: pruned_demo.loglikelihood([sample.image], sample.prompt, " " + c) for c in choices}
        greedy = [c for c, ll in scored.items() if ll.greedy]
        assert len(greedy) <= 1
        best = min(scored, key=lambda c: scored[c].loss)  # lmms-eval's multiple_choice picks the least loss
        (answer,) = pruned_demo.generate([[sample.image]], [sample.prompt], max_new_tokens=1)
        if answer.strip() in choices:
            assert greedy == [answer.strip()] and best == answer.strip()
        for ll in scored.values():
            assert ll.tokens == 1 and ll.loss == pytest.approx(-ll.logprob)


def test_unpruned_model_has_no_handle_and_bad_arguments_fail_in_one_line():
    model = PrunedModel("demo")
    assert model.handle is None
    model.close()
    with pytest.raises(Exception, match="not found locally"):
        PrunedModel("/nonexistent/checkpoint")


def test_lmms_eval_model_registers_when_lmms_eval_is_installed():
    pytest.importorskip("lmms_eval", reason="lmms-eval runs in its own venv (.ci/lmms_eval_stage.sh)")
    from recipe_search.integrations import lmms_eval as plugin

    manifest = plugin.manifest()
    assert manifest.model_id == "recipe_search"
    assert plugin.RecipeSearchChat.is_simple is False and plugin.RecipeSearchSimple.is_simple is True


def test_stage_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "lmms_eval_stage.sh")], check=True)
