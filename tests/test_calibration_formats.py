"""Calibration data in the forms people have: LLaVA instruction JSON, Hugging Face datasets (folders,
parquet / json / arrow files, cached names), column mappings, and seeded stratified sampling."""
import json
import shutil
import socket
from collections import Counter

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from recipe_search.calibration import DataError, demo_samples, load_samples  # noqa: E402
from recipe_search.calibration.data import stratified_indices  # noqa: E402
from recipe_search.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Datasets' cache in the test's folder, and no network: a connection attempt fails the test."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield cache
    assert not attempts, f"tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Six demo images saved as PNG in their own folder, with their prompts and answers."""
    folder = tmp_path_factory.mktemp("images")
    demo = demo_samples("calib", 6).samples
    for i, s in enumerate(demo):
        s.image.save(folder / f"{i}.png")
    return folder, demo


def _same_pixels(a, b):
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def _llava_entries(demo):
    entries = []
    for i, s in enumerate(demo):
        turns = [{"from": "human", "value": f"<image>\n{s.prompt}"}, {"from": "gpt", "value": s.answer}]
        if i % 2 == 0:
            turns += [{"from": "human", "value": f"follow-up {i}?"}, {"from": "gpt", "value": f"answer {i}"}]
        entries.append({"id": f"e{i}", "image": f"{i}.png", "conversations": turns})
    entries.insert(2, {"id": "text-only", "conversations": [{"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": "hello"}]})
    entries.append({"id": "empty", "image": None, "conversations": []})
    return entries


def test_llava_first_turn_and_skipped_entries(tmp_path, pictures):
    folder, demo = pictures
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(_llava_entries(demo)))
    data = load_samples(str(path), 100, image_folder=folder)
    assert [s.prompt for s in data.samples] == [s.prompt for s in demo]  # the <image> marker is removed
    assert [s.answer for s in data.samples] == [s.answer for s in demo]
    assert all(_same_pixels(a.image, b.image) for a, b in zip(data.samples, demo))
    assert data.notes == ("skipped 2 of 8 entries without an image",)
    # default image folder: the JSON file's own folder
    for i in range(len(demo)):
        shutil.copy(folder / f"{i}.png", tmp_path / f"{i}.png")
    assert load_samples(str(path), 100).content_hash() == data.content_hash()


def test_llava_all_turns(tmp_path, pictures):
    folder, demo = pictures
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(_llava_entries(demo)))
    data = load_samples(str(path), 100, image_folder=folder, turns="all")
    assert len(data) == len(demo) + 3  # entries 0, 2 and 4 have a second turn
    assert [s.prompt for s in data.samples[:3]] == [demo[0].prompt, "follow-up 0?", demo[1].prompt]
    assert data.samples[1].answer == "answer 0"
    assert data.samples[1].image is data.samples[0].image  # a later turn carries the entry's image
    assert "skipped 2 of 8 entries without an image" in data.notes


def test_llava_errors_are_one_line(tmp_path, pictures):
    folder, demo = pictures
    path = tmp_path / "llava.json"
    entries = _llava_entries(demo)
    entries[0]["image"] = "missing.png"
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 0 \(id 'e0'\): cannot open image") as info:
        load_samples(str(path), 100, image_folder=folder)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="columns do not apply"):
        load_samples(str(path), 4, columns="prompt=question")
    with pytest.raises(DataError, match="image folder .*: no such folder"):
        load_samples(str(path), 4, image_folder=tmp_path / "nope")


def _hf_dataset(folder, demo, image_feature=True):
    """Columns named otherwise than the defaults: img, question, answers (a list), question_type."""
    images = [str(folder / f"{i}.png") for i in range(len(demo))]
    return datasets.Dataset.from_dict(
        {"img": images if image_feature else [f"{i}.png" for i in range(len(demo))],
         "question": [s.prompt for s in demo],
         "answers": [[s.answer, "other"] for s in demo],
         "question_type": [s.qtype for s in demo]},
        features=datasets.Features({"img": datasets.Image() if image_feature else datasets.Value("string"),
                                    "question": datasets.Value("string"),
                                    "answers": datasets.List(datasets.Value("string")),
                                    "question_type": datasets.Value("string")}),
    )


COLUMNS = "image=img,prompt=question,answer=answers"


@pytest.mark.parametrize("form,image_feature", [(form, True) for form in ("save_to_disk", "parquet", "arrow")]
                         + [(form, False) for form in ("save_to_disk", "parquet", "arrow", "json")])
def test_hf_dataset_forms(tmp_path, pictures, form, image_feature):
    """Image-feature columns (embedded images) and path columns; JSON holds paths only."""
    folder, demo = pictures
    ds = _hf_dataset(folder, demo, image_feature)
    if form == "save_to_disk":
        spec = tmp_path / "ds"
        ds.save_to_disk(str(spec))
    elif form == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        spec = tmp_path / "data.arrow"
        shutil.copy(next((tmp_path / "saved").glob("*.arrow")), spec)
    else:
        spec = tmp_path / f"data.{form}"
        getattr(ds, f"to_{form}")(str(spec))
    # path columns are relative to the data file (a dataset folder: the folder itself) unless told otherwise
    image_folder = None if image_feature else folder
    data = load_samples(str(spec), 100, columns=COLUMNS, image_folder=image_folder)
    assert [s.prompt for s in data.samples] == [s.prompt for s in demo]
    assert [s.answer for s in data.samples] == [s.answer for s in demo]  # the first of each answer list
    assert [s.qtype for s in data.samples] == [s.qtype for s in demo]  # read from question_type
    assert all(_same_pixels(a.image, b.image) for a, b in zip(data.samples, demo))
    assert data.notes == ()


def test_columns_as_mapping_and_paths_beside_the_file(tmp_path, pictures):
    folder, demo = pictures
    for i in range(len(demo)):
        shutil.copy(folder / f"{i}.png", tmp_path / f"{i}.png")
    _hf_dataset(folder, demo, image_feature=False).to_parquet(str(tmp_path / "d.parquet"))
    data = load_samples(str(tmp_path / "d.parquet"), 3,
                        columns={"image": "img", "prompt": "question", "qtype": "question_type"})
    assert len(data) == 3 and not data.has_answers


def test_missing_column_names_it_and_the_existing_ones(tmp_path, pictures, capsys):
    folder, demo = pictures
    path = tmp_path / "d.parquet"
    _hf_dataset(folder, demo).to_parquet(str(path))
    with pytest.raises(DataError) as info:
        load_samples(str(path), 4)
    message = str(info.value)
    assert "no column 'image'" in message and "has: img, question, answers, question_type" in message
    assert "\n" not in message
    with pytest.raises(DataError, match="no column 'answer_text' for the answer .*has: img, question"):
        load_samples(str(path), 4, columns="image=img,prompt=question,answer=answer_text")
    with pytest.raises(DataError, match="unknown field 'picture'"):
        load_samples(str(path), 4, columns="picture=img")
    with pytest.raises(DataError, match="expected FIELD=COLUMN"):
        load_samples(str(path), 4, columns="img")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"img": "0.png", "question": "q"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: each line needs 'image' and 'prompt' fields "
                                        r"\(has: img, question\)"):
        load_samples(str(jsonl), 4)
    capsys.readouterr()  # datasets' own progress bars from writing the file
    code = main(["--calib", str(path), "--columns", "image=picture", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "no column 'picture'" in err and err.count("\n") == 1 and "Traceback" not in err


def test_stratified_indices_follow_labels_and_seed():
    labels = ["yes"] * 60 + ["no"] * 30 + ["two"] * 10
    picked = stratified_indices(labels, 20, seed=3)
    assert picked == stratified_indices(labels, 20, seed=3) == sorted(picked)
    assert Counter(labels[i] for i in picked) == {"yes": 12, "no": 6, "two": 2}
    assert picked != stratified_indices(labels, 20, seed=4)
    assert stratified_indices(labels, 100) == list(range(100))
    even = ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    odd = stratified_indices(even, 4, seed=0)  # 4/3 each: remainders decide which label gets a second
    assert len(set(odd)) == 4 and sorted(Counter(even[i] for i in odd).values()) == [1, 1, 2]


def test_sampling_is_seeded_and_stratified(tmp_path, pictures):
    folder, demo = pictures
    answers = ["yes"] * 30 + ["no"] * 15 + ["3"] * 5
    qtypes = ["yes/no"] * 10 + ["count"] * 40
    rows = [{"image": f"{i % len(demo)}.png", "prompt": f"question {i}", "answer": a} for i, a in enumerate(answers)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    first = load_samples(str(path), 10, image_folder=folder, seed=1)
    assert [s.prompt for s in first.samples] == [s.prompt for s in load_samples(str(path), 10, image_folder=folder,
                                                                                seed=1).samples]
    assert Counter(s.answer for s in first.samples) == {"yes": 6, "no": 3, "3": 1}
    assert [s.prompt for s in first.samples] != [f"question {i}" for i in range(10)]  # not the first ten
    assert "drew 10 of 50 samples (seed 1; stratified by answer)" in first.notes
    other = load_samples(str(path), 10, image_folder=folder, seed=2)
    assert [s.prompt for s in other.samples] != [s.prompt for s in first.samples]
    # a question-type column takes precedence over the answer
    path.write_text("\n".join(json.dumps({**r, "question_type": q}) for r, q in zip(rows, qtypes)))
    by_type = load_samples(str(path), 10, image_folder=folder, seed=1)
    assert Counter(s.qtype for s in by_type.samples) == {"yes/no": 2, "count": 8}
    assert "stratified by question_type" in by_type.notes[-1]
    # the same through a dataset: only drawn rows' images are decoded
    ds = datasets.Dataset.from_list([{**r, "qtype": q} for r, q in zip(rows, qtypes)])
    ds.save_to_disk(str(tmp_path / "ds"))
    drawn = load_samples(str(tmp_path / "ds"), 10, image_folder=folder, seed=1)
    assert Counter(s.qtype for s in drawn.samples) == {"yes/no": 2, "count": 8}


def test_rows_without_images_are_skipped_and_counted(tmp_path, pictures):
    folder, demo = pictures
    ds = datasets.Dataset.from_dict({"image": [str(folder / "0.png"), None, str(folder / "1.png")],
                                     "prompt": ["a", "b", "c"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "prompt": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    data = load_samples(str(tmp_path / "d.parquet"), 8)
    assert [s.prompt for s in data.samples] == ["a", "c"]
    assert data.notes == ("skipped 1 of 3 rows without an image",)


def _cache_as(cache, name, parquet):
    """Put a dataset in datasets' cache as `load_dataset(name)` would have left it (config 'default')."""
    probe = datasets.load_dataset_builder("parquet", data_files=str(parquet), cache_dir=str(cache))
    builder = type(probe)(cache_dir=str(cache), dataset_name=name.split("/")[-1], config_name="default",
                          data_files=probe.config.data_files, hash=probe.hash)
    builder.download_and_prepare()
    made = next((cache / name.split("/")[-1]).iterdir())
    target = cache / name.replace("/", "___") / "default"
    target.parent.mkdir(parents=True, exist_ok=True)
    made.rename(target)


def test_dataset_name_from_the_local_cache(tmp_path, pictures, hf_cache):
    folder, demo = pictures
    _hf_dataset(folder, demo).to_parquet(str(tmp_path / "d.parquet"))
    _cache_as(hf_cache, "someone/tiny_vqa", tmp_path / "d.parquet")
    data = load_samples("someone/tiny_vqa", 4, columns=COLUMNS, seed=0)
    assert len(data) == 4 and data.source == "someone/tiny_vqa" and data.has_answers
    assert {s.prompt for s in data.samples} <= {s.prompt for s in demo}


def test_dataset_name_not_cached_is_one_line(tmp_path, capsys):
    with pytest.raises(DataError) as info:
        load_samples("someone/not-cached", 4)
    message = str(info.value)
    assert "not-cached" in message and "local Hugging Face cache" in message and "nothing is downloaded" in message
    assert "\n" not in message
    code = main(["--calib", "someone/not-cached", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "local Hugging Face cache" in err and err.count("\n") == 1
    with pytest.raises(DataError, match="no such file or folder"):
        load_samples(str(tmp_path / "nope.parquet"), 4)


def test_cli_llava_json_end_to_end(tmp_path, pictures, capsys):
    folder, demo = pictures
    data = tmp_path / "data"
    data.mkdir()
    (data / "llava.json").write_text(json.dumps(_llava_entries(demo)))
    argv = ["--calib", str(data / "llava.json"), "--image-folder", str(folder), "--budget", "50%", "--method", "fitprune",
            "--num-samples", "4", "--eval", "none", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"calibration: 4 samples from {data / 'llava.json'}" in out
    assert "  skipped 2 of 8 entries without an image\n" in out
    assert "  drew 4 of 6 samples (seed 0; stratified by answer)\n" in out
    assert list((tmp_path / "out").glob("*-fitprune-50pct.json"))
