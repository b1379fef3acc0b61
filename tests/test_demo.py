"""The shipped demo: checkpoint floors, disjoint data splits, shipped recipes, the default command."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from recipe_search import apply_recipe, load_recipe
from recipe_search.calibration import demo_samples
from recipe_search.cli import main
from recipe_search.demo import demo_checkpoint, world
from recipe_search.models.loading import load_model
from recipe_search.runtime.apply import check_recipe_matches

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.json"))


@pytest.fixture(scope="module")
def demo():
    return load_model(demo_checkpoint())


def test_checkpoint_meets_the_floors(demo):
    _model, processor, adapter = demo
    assert adapter.visual_tokens_per_image() >= 144
    assert adapter.dims().num_layers >= 6
    sample = demo_samples("eval", 1).samples[0]
    inputs = adapter.build_inputs(processor, [sample.image], [sample.prompt])
    assert int((inputs["input_ids"] == adapter.image_token_id).sum()) == adapter.visual_tokens_per_image()


def test_splits_never_share_an_image():
    def digests(split, n):
        return {hashlib.sha256(np.asarray(s.image).tobytes()).hexdigest() for s in demo_samples(split, n).samples}

    train, calib, evaluation = digests("train", 400), digests("calib", 200), digests("eval", 400)
    assert not (train & calib) and not (train & evaluation) and not (calib & evaluation)
    again = demo_samples("eval", 3).samples
    assert [s.prompt for s in again] == [s.prompt for s in demo_samples("eval", 3).samples]


def test_shipped_recipes_belong_to_the_shipped_model(demo):
    model, processor, adapter = demo
    assert {r.name for r in RECIPES} >= {"demo-fitprune-50pct.json", "demo-fitprune-25pct.json",
                                         "demo-fitprune-12.5pct.json"}
    samples = demo_samples("eval", 4).samples
    inputs = adapter.build_inputs(processor, [s.image for s in samples], [s.prompt for s in samples])
    for path in RECIPES:
        recipe = load_recipe(path)
        check_recipe_matches(adapter, recipe)
        assert recipe.budget.kind == "none" or recipe.budget.achieved[recipe.budget.formula] <= recipe.budget.value
        with torch.no_grad(), apply_recipe(model, recipe) as handle:
            model(**inputs, use_cache=False)
            assert handle.last_counts == recipe.schedule.counts


def test_default_command_runs_end_to_end(tmp_path, capsys):
    argv = ["--budget", "50%", "--num-samples", "16", "--n-trials", "8", "--eval-samples", "40", "--out", str(tmp_path),
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(argv) == 0
    recipe = load_recipe(tmp_path / "demo-auto-50pct.json")
    assert recipe.budget.achieved["full"] <= 0.5 and recipe.model.name_or_path == "demo"
    assert recipe.method.name == "auto" and recipe.method.result["candidates_scored"] > 1
    out = capsys.readouterr().out
    assert "held-out accuracy (demo:eval, 40 q)" in out and "prefill wall-clock" in out


@pytest.mark.parametrize("qtype", world.QUESTION_TYPES)
def test_demo_answers_follow_from_the_scene_and_are_balanced(qtype):
    answers = []
    for i in range(120):
        scene, question, answer = world.sample_item("eval", 0, i, qtype)
        key = question.split()[-2]  # every template names its key word right before "?"
        by_shape = [o for o in scene.objects if o.shape == key]
        by_colour = [o for o in scene.objects if o.colour == key]
        expected = {
            "colour": by_shape[0].colour if len(by_shape) == 1 else None,
            "count": world.COUNT_WORDS[len(by_shape)] if len(by_shape) < len(world.COUNT_WORDS) else None,
            "exist": "yes" if by_shape else "no",
            "shape": by_colour[0].shape if len(by_colour) == 1 else None,
        }[qtype]
        assert answer == expected, (question, answer, scene)
        answers.append(answer)
    classes = set(answers)
    assert len(classes) >= {"colour": 5, "count": 4, "exist": 2, "shape": 4}[qtype]
    assert max(answers.count(c) for c in classes) <= 0.6 * len(answers)  # no class dominates


@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
def test_demo_architecture_builds_on_each_backbone(backbone):
    """scripts/train_demo_model.py --backbone trains the demo world on another decoder family: the model it
    builds must be that family's, keep the demo's visual-token layout, and run through the product."""
    from recipe_search.demo import build
    from recipe_search.models import get_adapter

    torch.manual_seed(0)
    tokenizer = build.build_tokenizer()
    model = build.build_model(tokenizer, layers=2, backbone=backbone).eval()
    assert model.config.text_config.model_type == backbone
    sample = world.make_split("calib", 1)[0]
    processor = build.build_processor(tokenizer)
    inputs = get_adapter(model).inputs(processor, [sample.image], [sample.question])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == build.NUM_VISUAL_TOKENS
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape
