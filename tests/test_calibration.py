from dataclasses import replace

import numpy as np
import pytest
import torch

from recipe_search.calibration import DataError, SampleSet, calibrate, collect_stats, demo_samples, load_samples
from recipe_search.calibration.collect import resample_tokens
from recipe_search.stats import CalibrationStats, kendall_tau_layers


def _eager_reference(model, processor, adapter, data):
    """The statistics computed the slow, obvious way: full eager attention maps."""
    model.set_attn_implementation("eager")
    try:
        inputs = adapter.build_inputs(processor, [s.image for s in data.samples], [s.prompt for s in data.samples])
        with torch.no_grad():
            maps = model(**inputs, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation("sdpa")
    ids = inputs["input_ids"]
    out = {"cross": [], "selfv": [], "last": []}
    for b in range(ids.shape[0]):
        vis = (ids[b] == adapter.image_token_id).nonzero()[:, 0]
        text = torch.arange(int(vis.max()) + 1, ids.shape[1])
        rows = {k: [] for k in out}
        for a in maps:
            amax, amean = a[b].amax(0), a[b].mean(0)
            rows["cross"].append(amax[text][:, vis].mean(0))
            rows["selfv"].append(amax[vis][:, vis].sum(0) / len(vis))
            rows["last"].append(amean[-1, vis])
        for k in out:
            out[k].append(torch.stack(rows[k]))
    return {k: torch.stack(v).numpy() for k, v in out.items()}


def test_sdpa_row_statistics_match_eager_maps(random_demo):
    model, processor, adapter = random_demo
    data = demo_samples("calib", 6)
    stats = collect_stats(model, processor, adapter, data, batch_size=3, progress=False)
    ref = _eager_reference(model, processor, adapter, data)
    for name in ("cross", "selfv", "last"):
        np.testing.assert_allclose(getattr(stats, name), ref[name], atol=1e-5)
    assert stats.cross.shape == (6, adapter.dims().num_layers, 144)
    assert (stats.text_tokens > 0).all()


def test_padding_does_not_change_statistics(random_demo):
    model, processor, adapter = random_demo
    data = demo_samples("calib", 8)
    lengths = {len(processor.tokenizer(s.prompt)["input_ids"]) for s in data.samples}
    assert len(lengths) > 1, "the demo prompts should differ in length so that batches get padded"
    together = collect_stats(model, processor, adapter, data, batch_size=8, progress=False)
    alone = collect_stats(model, processor, adapter, data, batch_size=1, progress=False)
    for name in ("cross", "selfv", "last"):
        np.testing.assert_allclose(getattr(together, name), getattr(alone, name), atol=1e-5)
    np.testing.assert_array_equal(together.text_tokens, alone.text_tokens)


def test_cache_is_reused_and_keyed_by_data(random_demo, tmp_path):
    model, processor, adapter = random_demo
    data = demo_samples("calib", 4)
    first, cached = calibrate(model, processor, adapter, data, cache_dir=tmp_path, progress=False)
    assert not cached
    second, cached = calibrate(model, processor, adapter, data, cache_dir=tmp_path, progress=False)
    assert cached
    np.testing.assert_array_equal(first.cross, second.cross)
    assert second.meta["data_hash"] == data.content_hash()
    _, cached = calibrate(model, processor, adapter, demo_samples("calib", 5), cache_dir=tmp_path, progress=False)
    assert not cached
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stats_files_load_without_pickle(random_demo, tmp_path):
    model, processor, adapter = random_demo
    stats = collect_stats(model, processor, adapter, demo_samples("calib", 2), progress=False)
    stats.save(tmp_path / "s")
    np.savez(tmp_path / "s" / "stats.npz", cross=np.array([object()], dtype=object))
    with pytest.raises(ValueError):
        CalibrationStats.load(tmp_path / "s")


def test_kendall_tau_matches_definition():
    rng = np.random.default_rng(0)
    base = rng.normal(size=30)
    scores = np.stack([base, base + rng.normal(scale=0.5, size=30), -base, np.round(base)])
    tau = kendall_tau_layers(scores)
    n = 30

    def tau_b(x, y):
        s = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i in range(n) for j in range(i + 1, n))
        tx = sum(abs(np.sign(x[i] - x[j])) for i in range(n) for j in range(i + 1, n))
        ty = sum(abs(np.sign(y[i] - y[j])) for i in range(n) for j in range(i + 1, n))
        return s / np.sqrt(tx * ty)

    for a in range(4):
        for b in range(4):
            assert tau[a, b] == pytest.approx(tau_b(scores[a], scores[b]), abs=1e-6)
    assert tau[0, 2] == pytest.approx(-1.0)


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_samples(str(tmp_path / "nope.jsonl"), 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: each line needs 'image' and 'prompt'"):
        load_samples(str(bad), 4)
    bad.write_text('{"image": "a.png", "prompt": "hi"}\n')
    with pytest.raises(DataError, match="cannot open image"):
        load_samples(str(bad), 4)


def test_jsonl_samples_round_trip(tmp_path):
    demo = demo_samples("calib", 2)
    lines = []
    for i, s in enumerate(demo.samples):
        s.image.save(tmp_path / f"{i}.png")
        lines.append(f'{{"image": "{i}.png", "prompt": "{s.prompt}", "answer": "{s.answer}"}}')
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    data = load_samples(str(tmp_path / "c.jsonl"), 10)
    assert len(data) == 2 and data.has_answers and data.content_hash() == SampleSet(demo.samples, "x").content_hash()


def test_resampling_keeps_mass_order_and_identity():
    rng = np.random.default_rng(1)
    values = rng.random((3, 288))
    half = resample_tokens(values, 144)
    np.testing.assert_allclose(half.sum(-1), values.sum(-1), rtol=1e-12)
    np.testing.assert_allclose(half, values[:, 0::2] + values[:, 1::2], rtol=1e-12)  # token i covers 2i, 2i+1
    assert resample_tokens(values, 288) is values


def test_mixed_visual_token_counts_are_normalised_per_sample(random_demo):
    """One- and two-image prompts in one batch: each sample's statistics equal its own run alone,
    resampled to one image's 144 tokens, and the counts seen are recorded."""
    model, processor, adapter = random_demo
    base = demo_samples("calib", 5).samples
    mixed = SampleSet(tuple([base[0], replace(base[1], image=(base[1].image, base[2].image)), base[3],
                             replace(base[4], image=(base[4].image, base[0].image))]), "mixed")
    stats = collect_stats(model, processor, adapter, mixed, batch_size=4, progress=False)
    assert stats.cross.shape == (4, adapter.dims().num_layers, 144)
    assert stats.meta["visual_token_counts"] == {"144": 2, "288": 2}
    for i, sample in enumerate(mixed.samples):
        alone = collect_stats(model, processor, adapter, SampleSet((sample,), "one"), progress=False)
        for name in ("cross", "selfv", "last"):
            np.testing.assert_allclose(getattr(stats, name)[i], getattr(alone, name)[0], atol=1e-5)
