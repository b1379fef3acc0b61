"""Devices and dtypes: bf16 on the CPU, accelerate's device maps with offloaded layers, CUDA when present."""
import json

import numpy as np
import pytest
import torch

from recipe_search.calibration import collect_stats, demo_samples
from recipe_search.cli import main
from recipe_search.models import get_adapter
from recipe_search.models.loading import load_model
from recipe_search.runtime import PruningHandle, PruningPlan, make_rule
from checks import assert_cached_decode_equals_reforward, extend_inputs
from tiny_models import llava_inputs, tiny_llava

PLAN = ((64, 40, 40, 20, 10, 10), 64)


def _plan(rule="fitprune"):
    return PruningPlan(PLAN[0], PLAN[1], make_rule(rule))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bfloat16_on_cpu(attn):
    """Keep-all stays bit-identical, counts hold, and every cached greedy step picks the token a
    pruned re-forward picks (bf16 rounding differs between one-row and full logits, so values are
    not compared)."""
    model = tiny_llava(attn).to(torch.bfloat16)
    inputs = get_adapter(model).to_model(llava_inputs([[11, 12, 13], [14, 15]], seed=1))
    assert inputs["pixel_values"].dtype == torch.bfloat16
    base = model(**inputs).logits
    with PruningHandle(model, PruningPlan.keep_all(6, 64, make_rule("fitprune"))):
        assert torch.equal(model(**inputs).logits, base)
    with PruningHandle(model, _plan()) as handle:
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True)
        assert handle.last_counts == list(PLAN[0])
        handle.prompt_len = prompt = inputs["input_ids"].shape[1]
        for t in range(4):
            ref = model(**extend_inputs(inputs, out.sequences[:, :prompt + t]), use_cache=False).logits[:, -1]
            assert torch.equal(ref.argmax(-1), out.sequences[:, prompt + t])


def test_bfloat16_calibration_and_cli(random_checkpoint, tmp_path, capsys):
    model, processor, adapter = load_model(random_checkpoint, dtype="bf16")
    assert model.dtype == torch.bfloat16
    data = demo_samples("calib", 4)
    low = collect_stats(model, processor, adapter, data, progress=False)
    full_model, _, full_adapter = load_model(random_checkpoint)
    full = collect_stats(full_model, processor, full_adapter, data, progress=False)
    for name in ("cross", "selfv", "last"):  # same statistics, to bf16's precision (8 bits of mantissa)
        np.testing.assert_allclose(getattr(low, name), getattr(full, name), atol=2e-2)
    assert main(["--model", str(random_checkpoint), "--dtype", "bf16", "--num-samples", "4", "--n-trials", "4", "--eval", "none",
                 "--quiet", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 0
    (recipe,) = (tmp_path / "o").glob("*.json")
    assert json.loads(recipe.read_text())["budget"]["achieved"]["full"] <= 0.5


def _offloaded(tmp_path, model):
    """`model` saved, then loaded with layers 1 and 3 offloaded to disk and the rest on the CPU."""
    from transformers import LlavaForConditionalGeneration

    pytest.importorskip("accelerate")
    model.save_pretrained(tmp_path / "ckpt")
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                  "model.language_model.embed_tokens": "cpu", "model.language_model.rotary_emb": "cpu",
                  "model.language_model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.language_model.layers.{i}": "disk" if i in (1, 3) else "cpu" for i in range(6)}}
    return LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=str(tmp_path / "offload"),
        attn_implementation="sdpa").eval()


def test_device_map_with_offloaded_layers_prunes_like_the_plain_model(tmp_path, llava_sdpa):
    offloaded = _offloaded(tmp_path, llava_sdpa)
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # really offloaded
    inputs = llava_inputs([[11, 12, 13], [14, 15]], seed=1)
    for rule in ("fitprune", "dart"):
        with torch.no_grad(), PruningHandle(llava_sdpa, _plan(rule)):
            plain = llava_sdpa(**inputs).logits
        with torch.no_grad(), PruningHandle(offloaded, _plan(rule)) as handle:
            moved = offloaded(**inputs).logits
        assert handle.last_counts == list(PLAN[0])
        assert (plain - moved).abs().max().item() <= 1e-5
    assert_cached_decode_equals_reforward(offloaded, _plan())


def test_device_map_calibration_matches_the_plain_model(tmp_path, random_demo):
    model, processor, adapter = random_demo
    from transformers import LlavaForConditionalGeneration

    pytest.importorskip("accelerate")
    model.save_pretrained(tmp_path / "ckpt")
    layers = model.config.text_config.num_hidden_layers
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                  "model.language_model.embed_tokens": "cpu", "model.language_model.rotary_emb": "cpu",
                  "model.language_model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.language_model.layers.{i}": "disk" if i % 3 == 1 else "cpu" for i in range(layers)}}
    offloaded = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=str(tmp_path / "offload")).eval()
    data = demo_samples("calib", 3)
    plain = collect_stats(model, processor, adapter, data, progress=False)
    moved = collect_stats(offloaded, processor, get_adapter(offloaded), data, progress=False)
    for name in ("cross", "selfv", "last"):
        np.testing.assert_allclose(getattr(moved, name), getattr(plain, name), atol=1e-6)


@pytest.mark.parametrize("device,message", [("warp-drive", "device 'warp-drive' is not usable here")])
def test_bad_device_is_one_line(capsys, tmp_path, device, message):
    code = main(["--device", device, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_runtime_on_cuda():
    model = tiny_llava("sdpa").cuda()
    inputs = get_adapter(model).to_model(llava_inputs([[11, 12, 13], [14, 15]], seed=1))
    base = model(**inputs).logits
    with PruningHandle(model, PruningPlan.keep_all(6, 64, make_rule("fitprune"))):
        assert torch.equal(model(**inputs).logits, base)
    assert_cached_decode_equals_reforward(model, _plan(), inputs)
