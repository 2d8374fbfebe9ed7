"""Which config changes a resume or a finished study cell tolerates."""

import pytest

from configs import tiny
from xft_jax.training import run_identity as ri

DELETE = object()


def _config(**changes):
    """configs/tiny.py as JSON-like data, with dotted-key changes."""
    import json

    c = json.loads(tiny.get_config().to_json_best_effort())
    for key, value in changes.items():
        *path, leaf = key.split(".")
        node = c
        for p in path:
            node = node[p]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return c


def test_differences_name_each_changed_key_and_ignore_operational_ones():
    old = _config()
    assert ri.differences(old, _config()) == []
    new = _config(**{"optim.lr": 1.0, "data.prompt_room": ["label_only"],
                     "mesh.fsdp": 8, "train.log_every": 7, "model.path": "/moved"})
    assert ri.differences(old, new) == [
        "data.prompt_room: ['label_only', 'explanation', 'shuffled', 'bag_of_words', "
        "'random_vocab'] -> "
        "['label_only']",
        "optim.lr: 0.003 -> 1.0"]
    # a key on one side only counts (a config written before the key existed)
    gone = _config(**{"data.prompt_room": DELETE})
    assert ri.differences(old, gone) == [
        "data.prompt_room: ['label_only', 'explanation', 'shuffled', 'bag_of_words', "
        "'random_vocab'] -> "
        "(absent)"]
    # prefixes match whole path parts only
    assert ri.differences({"meshy": 1}, {"meshy": 2}) == ["meshy: 1 -> 2"]
    assert ri.differences({"mesh": {"data": 1}}, {"mesh": {"data": 2}}) == []


def test_check_resume_config_raises_with_the_checkpoint_and_notes_moved_paths():
    old = _config()
    notes = ri.check_resume_config(old, _config(**{"model.path": "/elsewhere",
                                                   "train.log_every": 3}), "/w/ckpt/4")
    assert notes == [f"model.path: {old['model']['path']!r} -> '/elsewhere' "
                     f"(a location; the run continues)"]
    with pytest.raises(ri.RunMismatchError, match=r"/w/ckpt/4: this run was started with a "
                                                  r"different config(.|\n)*train\.steps: 20 -> 21"):
        ri.check_resume_config(old, _config(**{"train.steps": 21}), "/w/ckpt/4")
    with pytest.raises(ri.RunMismatchError, match="records no config"):
        ri.check_resume_config(None, old, "/w/ckpt/4")


def test_check_resume_data_compares_digests():
    info = {"train_digest": "a" * 64, "origin": "/data/x"}
    ri.check_resume_data({"train_digest": "a" * 64}, info, "/w/ckpt/4")
    with pytest.raises(ri.RunMismatchError, match=r"training data differs(.|\n)*bbbbbbbbbbbb "
                                                  r"in the checkpoint, aaaaaaaaaaaa now"):
        ri.check_resume_data({"train_digest": "b" * 64}, info, "/w/ckpt/4")
    with pytest.raises(ri.RunMismatchError, match="no training-data digest"):
        ri.check_resume_data({}, info, "/w/ckpt/4")


def test_cell_differences_leave_out_each_steps_operational_keys():
    old = {"train": _config(), "evaluate": {"model": {"workdir": "/a"}, "eval": {"seed": 0,
                                                                               "batch_size": 8}},
           "base_model": {"steps": 200}}
    new = {"train": _config(**{"mesh.fsdp": 4, "optim.lr": 0.5}),
           "evaluate": {"model": {"workdir": "/b"}, "eval": {"seed": 1, "batch_size": 64}},
           "base_model": {"steps": 300}}
    assert ri.cell_differences(old, new) == ["base_model.steps: 200 -> 300",
                                             "evaluate.eval.seed: 0 -> 1",
                                             "train.optim.lr: 0.003 -> 0.5"]


@pytest.mark.parametrize("key,kept,other", [("optim.lora_plus_ratio", 1.0, 16.0),
                                             ("data.bucket_step", 0, 16)])
def test_a_key_added_later_equals_its_absence_at_the_value_that_keeps_old_runs(key, kept,
                                                                              other):
    """Keys that came after runs were saved without them: absent equals the value those
    runs computed with, so they resume and their cells count as done; any other value is
    a different run."""
    section, leaf = key.split(".")
    new = _config()
    assert new[section][leaf] == kept
    old = _config(**{key: DELETE})
    assert ri.differences(old, new) == []
    assert ri.differences(old, _config(**{key: other})) == [f"{key}: {kept!r} -> {other!r}"]
    assert ri.cell_differences({"train": old}, {"train": new}) == []
    assert ri.cell_differences({"train": old}, {"train": _config(**{key: other})}) == [
        f"train.{key}: {kept!r} -> {other!r}"]
    ri.check_resume_config(old, new, "/w/ckpt/4")
