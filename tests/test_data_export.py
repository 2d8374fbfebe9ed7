"""Hashed splits, rated JSONL/TFDS round trips, and all-or-nothing outputs."""

import json
import os
import random

import pytest

from xft_jax.data import export, synthetic, tfds_builder
from xft_jax.atomic import atomic_open as atomic_write
from xft_jax.data.readers import DataError
from xft_jax.data.readers import read_rated_jsonl
from xft_jax.data.splits import build_datasets, sample_split, split_of


@pytest.fixture(scope="module")
def rated():
    return synthetic.generate(30, seed=4)


def test_split_by_hashed_id_is_stable_and_keeps_groups():
    ids = [f"src:{i}" for i in range(3000)]
    splits = [split_of(i) for i in ids]
    assert 0.30 < splits.count("test") / 3000 < 0.36
    assert [split_of(i) for i in ids] == splits
    for i in ids[:200]:  # both responses to one prompt land together
        assert split_of(i + "#a") == split_of(i + "#b") == split_of(i)

    class Item:
        def __init__(self, id):
            self.id = id

    items = [Item(i) for i in ids]
    a = sample_split(items, 100, 50)
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    b = sample_split(shuffled, 100, 50)
    assert [x.id for x in a["train"]] == [x.id for x in b["train"]]
    more = sample_split(items + [Item(f"src:new{i}") for i in range(300)], 100, 50)
    kept = {x.id for x in a["test"]} & {x.id for x in more["test"]}
    assert len(kept) > 40  # growing a source mostly keeps the sample
    assert not {x.id for x in a["train"]} & {x.id for x in a["test"]}


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with atomic_write(str(target)) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []
    with atomic_write(str(target)) as f:
        f.write("whole\n")
    assert target.read_text() == "whole\n" and os.listdir(tmp_path) == ["out.jsonl"]


def test_export_round_trip_and_failed_runs_change_nothing(tmp_path, rated, monkeypatch,
                                                           capfd):
    train, test = rated[:20], rated[20:]
    summary = export.split_summary(train, test)
    assert summary["num_train"] == 20 and sum(summary["labels"]["test"]["on_topic"].values()) == 10
    assert set(summary["target_lengths"]["naturalness"]) == {
        "label_only", "explanation", "shuffled", "bag_of_words", "random_vocab"}
    export.export(str(tmp_path), "synthetic", train, test, summary)
    out, err = capfd.readouterr()
    assert "Downloading and preparing" not in out + err          # we build, not download
    assert "nothing is downloaded" in err and "TFDS dataset xft_rated/synthetic written" in err
    d = build_datasets("synthetic", str(tmp_path))
    t = build_datasets("synthetic", str(tmp_path / "tfds"))
    v = build_datasets("synthetic", tfds_builder.dataset_dir(str(tmp_path / "tfds"), "synthetic"))
    assert sorted(d.train, key=lambda e: e.id) == sorted(train, key=lambda e: e.id)
    assert d.train == t.train == v.train and d.test == t.test
    assert build_datasets("synthetic", str(tmp_path), num_train=5).train == d.train[:5]
    before = {p: open(p, "rb").read() for p in _files(tmp_path)}

    def broken_build(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tfds_builder, "build", broken_build)
    with pytest.raises(OSError, match="disk full"):
        export.export(str(tmp_path), "synthetic", rated[:5], rated[5:7], {})
    assert {p: open(p, "rb").read() for p in _files(tmp_path)} == before
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError):
        export.export(str(fresh), "synthetic", train, test, {})
    assert _files(fresh) == []


def _files(root):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs)


def test_rated_jsonl_errors_name_file_and_line(tmp_path, rated):
    good = json.dumps(rated[0].to_dict())
    bad = rated[1].to_dict()
    bad["ratings"]["on_topic"]["label"] = 9
    p = tmp_path / "train.jsonl"
    p.write_text(good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=rf"^{p}:2: invalid item: .*label 9 is not an integer"):
        read_rated_jsonl(str(p))
    assert len(read_rated_jsonl(str(p), on_error="skip")) == 1


def test_build_datasets_errors(tmp_path, rated):
    with pytest.raises(DataError, match="data.path is required"):
        build_datasets("coqa")
    with pytest.raises(FileNotFoundError, match="no xft_rated/coqa TFDS dataset"):
        build_datasets("coqa", str(tmp_path))
    export.export(str(tmp_path), "coqa", rated[:3], rated[3:4], {}, with_tfds=False)
    with pytest.raises(DataError, match="is from 'synthetic', not 'coqa'"):
        build_datasets("coqa", str(tmp_path))
