"""The second model's world (recipe_search/demo/world2.py) and its training script's model: the world is
deterministic, its splits never share a layout, answers are balanced, and the Qwen2-VL model the script
builds runs a forward through its own processor (no training here)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from recipe_search.demo import world2


@pytest.fixture(scope="module")
def script(script_module):
    return script_module("train_second_model")


def test_world_is_deterministic_and_prefix_stable():
    a, b = world2.make_split("eval", 12, seed=3), world2.make_split("eval", 8, seed=3)
    for x, y in zip(a, b):
        assert (x.question, x.answer, x.qtype, x.image_id) == (y.question, y.answer, y.qtype, y.image_id)
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    assert a[0].image.size == (world2.IMAGE_SIZE, world2.IMAGE_SIZE)
    other = world2.make_split("eval", 1, seed=4)[0]  # another seed, another stream
    assert not np.array_equal(np.asarray(other.image), np.asarray(a[0].image))


def test_splits_are_disjoint_by_layout():
    keys: dict[str, set[str]] = {}
    for split in world2.SPLITS:
        scenes = [world2.sample_item(split, 0, i, world2.QUESTION_TYPES[i % 4])[0] for i in range(40)]
        assert all(world2.owner(s) == split for s in scenes)
        keys[split] = {s.layout_key() for s in scenes}
    assert not keys["train"] & keys["calib"] and not keys["train"] & keys["eval"] and not keys["calib"] & keys["eval"]
    with pytest.raises(ValueError):
        world2.make_split("test", 1)


def test_scenes_and_answers():
    samples = world2.make_split("calib", 80)
    assert Counter(s.qtype for s in samples) == {q: 20 for q in world2.QUESTION_TYPES}
    vocab = set(world2.vocabulary())
    for s in samples:
        assert s.answer in vocab and set(s.question.split()) <= vocab and s.question.endswith(" ?")
    counts = Counter(s.answer for s in samples if s.qtype == "count")
    assert set(counts) <= set(world2.COUNT_WORDS) and len(counts) >= 3
    scene = world2.sample_item("train", 0, 0, "colour")[0]
    assert world2.MIN_TARGETS <= len(scene.tiles) <= world2.MAX_TARGETS
    assert world2.MIN_PEBBLES <= len(scene.pebbles) <= world2.MAX_PEBBLES
    assert len({(t.kind, t.colour) for t in scene.tiles}) == len(scene.tiles)
    labels = scene.cell_labels()
    assert len(labels) == world2.GRID ** 2 and sum(lab != (world2.BLANK,) for lab in labels) == (
        len(scene.tiles) + len(scene.pebbles))


def test_script_model_builds_and_runs(script, tmp_path):
    from recipe_search.models import get_adapter

    torch.manual_seed(0)
    tokenizer = script.build_tokenizer()
    processor = script.build_processor(tokenizer)
    model = script.build_model(tokenizer).eval()
    vocab = script.Vocab(tokenizer)
    script.check_layout(vocab, processor, model)  # exits on a mismatch
    assert model.config.model_type == "qwen2_vl" and model.config.text_config.num_hidden_layers >= 6
    assert get_adapter(model).family == "qwen2_vl"
    samples = world2.make_split("eval", 2)
    inputs = get_adapter(model).build_inputs(processor, [s.image for s in samples], [s.question for s in samples])
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [script.NV, script.NV]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    # the training path's answer logits equal the model's own forward on the same prompt
    batch = script.eval_batches(vocab, "eval", 2, 0)[0]
    stage = script.Stage2(model, vocab)
    with torch.no_grad():
        states = script.tower_states(model, batch.pixels, 2)
        train_logits = stage.forward(batch, states, 1.0, None)[0]
    assert torch.allclose(train_logits, logits[:, -1], atol=1e-4)
