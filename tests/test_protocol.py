"""The study protocol: validation carved from train and never touching test; the trainer's
periodic eval reads validation; the best-validation checkpoint is kept, recorded and
evaluated; a cut prompt's length carries nothing about its gold label."""

import collections
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from xft_jax.data import splits as splits_lib, synthetic
from xft_jax.data.encode import Encoder, target_room
from xft_jax.data.targets import PAPER_VARIANTS, ExplanationVocab
from xft_jax.training import selection

AXIS = "naturalness"


def test_validation_is_carved_from_train_by_hashed_id():
    items = synthetic.generate(900, seed=0)
    d = splits_lib.build_datasets("synthetic", num_synthetic=900, validation_fraction=0.1)
    train, val, test = ({x.id for x in part} for part in (d.train, d.validation, d.test))
    assert not (train & val) and not (val & test) and not (train & test)
    assert len(train | val | test) == len(items)
    assert 0.06 < len(val) / (len(train) + len(val)) < 0.14
    # by id only: the same items are validation whatever else is read, and groups stay whole
    again = splits_lib.build_datasets("synthetic", num_synthetic=900, num_train=300,
                                      validation_fraction=0.1)
    assert {x.id for x in again.validation} <= val
    rest, carved = splits_lib.carve_validation([f"g{i}#{k}" for i in range(200)
                                                for k in range(3)], 0.3, key=lambda x: x)
    groups = collections.Counter(x.split("#")[0] for x in carved)
    assert set(groups.values()) == {3} and 0 < len(groups) < 200 and len(rest) % 3 == 0
    assert splits_lib.build_datasets("synthetic", num_synthetic=90).validation == []
    with pytest.raises(ValueError, match="validation_fraction"):
        splits_lib.carve_validation([], 1.0)


def test_trainer_eval_reads_validation_never_test(mistral_tokenizer):
    from configs import tiny
    from xft_jax.data.splits import build_splits
    from xft_jax.training import batches as data_lib

    c = tiny.get_config("synthetic,naturalness,label_only")
    c.data.num_synthetic, c.train.eval_every = 120, 1
    run = data_lib.build(c, mistral_tokenizer)
    s = build_splits(c.data)
    evaluated = set(run.eval.example_ids)
    assert evaluated and evaluated <= {x.id for x in s.validation}
    assert not evaluated & {x.id for x in s.test}
    assert not {x.id for x in s.validation} & set(run.train.example_ids)
    assert run.info["num_validation"] == len(s.validation)


def test_steps_follow_from_epochs():
    import ml_collections

    from xft_jax.training.batches import train_steps

    t = ml_collections.ConfigDict({"epochs": 3.0, "steps": None})
    assert train_steps(t, 1000, 16) == 187           # 3 * 1000 // 16
    t.steps = 20                                     # an explicit length replaces epochs
    assert train_steps(t, 1000, 16) == 20
    t.epochs, t.steps = None, None
    with pytest.raises(ValueError, match="set config.train.epochs"):
        train_steps(t, 1000, 16)
    t.epochs, t.steps = 0.001, None
    with pytest.raises(ValueError, match="less than one step"):
        train_steps(t, 1000, 16)


def test_validation_curve_best_and_ties():
    curve = selection.ValidationCurve()
    assert curve.best is None and curve.to_dict()["best_step"] is None
    assert curve.add(2, 0.3, 1.0, 10)
    assert curve.add(4, 0.5, 0.9, 10)
    assert not curve.add(6, 0.5, 0.8, 10)            # a tie keeps the earlier step
    assert not curve.add(8, 0.4, 0.7, 10)
    doc = curve.to_dict()
    assert doc["best_step"] == 4 and doc["best_accuracy"] == 0.5
    assert [p["step"] for p in doc["curve"]] == [2, 4, 6, 8]
    assert selection.ValidationCurve.from_dict(doc).best["step"] == 4
    with pytest.raises(ValueError, match="after step 8"):
        curve.add(8, 0.9, 0.1, 10)
    acc, nll = selection.rating_accuracy(np.array([0, 4]), np.log(np.array(
        [[0.6, 0.1, 0.1, 0.1, 0.1], [0.5, 0.1, 0.1, 0.1, 0.2]])))
    assert acc == 0.5 and nll == pytest.approx(-(np.log(0.6) + np.log(0.2)) / 2)


def test_best_validation_checkpoint_is_kept_recorded_and_evaluated(tmp_path, monkeypatch):
    """Scripted validation accuracies make step 2 the best (tied later by step 4): it
    survives keep_checkpoints=1, validation.json names it with the curve, and evaluate
    loads it by default (and the latest only when asked)."""
    from configs import eval as eval_configs, tiny
    from xft_jax import sharding
    from xft_jax.eval import evaluation as eval_lib
    from xft_jax.training import trainer
    from xft_jax.training.checkpoint import Checkpoints

    script = iter([0.2, 0.5, 0.4, 0.5, 0.3])
    seen = []

    def scripted(eval_fn, lora, base, run_data, mesh, max_batches=None):
        seen.append(sorted(run_data.eval.example_ids))
        return ({"accuracy": next(script), "nll": 1.0, "n": len(run_data.eval.example_ids)},
                {"eval_loss": 1.0})

    monkeypatch.setattr(trainer, "validate", scripted)
    c = tiny.get_config("synthetic,naturalness,label_only")
    c.data.num_synthetic, c.data.eval_examples = 60, 4
    c.train.steps, c.train.eval_every = 5, 1
    c.train.checkpoint_every, c.train.keep_checkpoints = 5, 1
    wd = str(tmp_path / "run")
    trainer.train(c, wd, devices=jax.devices()[:1])
    doc = selection.read(wd)
    assert doc["best_step"] == 2 and doc["best_accuracy"] == 0.5
    assert [p["accuracy"] for p in doc["curve"]] == [0.2, 0.5, 0.4, 0.5, 0.3]
    assert len(seen) == 5 and all(s == seen[0] for s in seen)
    ckpts = Checkpoints(os.path.join(wd, "checkpoints"), 1)
    try:
        assert ckpts.all_steps() == [2, 5]
        assert ckpts.read_meta(5)["validation"]["best_step"] == 2
    finally:
        ckpts.close()
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if '"val_accuracy"' in line]
    assert [r["val_accuracy"] for r in logged] == [0.2, 0.5, 0.4, 0.5, 0.3]
    assert eval_lib.checkpoint_step(wd, None)[0] == 2
    assert eval_lib.checkpoint_step(wd, 5) == (5, "config.model.step")
    ec = eval_configs.get_config()                   # what evaluate and the probe load
    ec.model.workdir = wd
    loaded = eval_lib.load_model(ec.model, sharding.mesh_from_config(ec.mesh))
    assert loaded.info["step"] == 2 and "best validation" in loaded.info["selected_by"]
    assert ec.data.split == "test"


# ---------------------------------------------------------------- prompt room vs label
def _label_length_examples(n=80, seed=5):
    """Synthetic examples whose explanation length grows with the gold label (as real
    explanations' length goes with their label), with contexts long enough (each repeated
    four times) that every prompt is cut."""
    out = []
    for ex in synthetic.generate(n, seed=seed):
        r = ex.ratings[AXIS]
        words = " ".join(["reason"] * (6 * r.label))
        conv = dataclasses.replace(ex.conversation, context=ex.conversation.context * 4)
        out.append(dataclasses.replace(
            ex, conversation=conv,
            ratings={**ex.ratings, AXIS: dataclasses.replace(r, explanation=words)}))
    return out


def _cut_prompt_lengths(tok, examples, room, vocab, max_len):
    """{id: (prompt length, cut?)} of eval rows (prompt + label) for the study's variants."""
    enc = Encoder(tok, axis=AXIS, variant="label_only", max_len=max_len, vocab=vocab,
                  prompt_room=PAPER_VARIANTS, target_room=room)
    rows, stats = enc.encode_all(examples)
    return {examples[int(r["index"])].id: int(r["label_pos"]) for r in rows}, stats


def _lookup_accuracy(lengths: dict, examples) -> float:
    """Accuracy of predicting the gold label from the cut prompt's length (the best
    lookup, fitted on the same rows: an upper bound on what the length reveals)."""
    gold = {ex.id: ex.label(AXIS) for ex in examples}
    by_len = collections.defaultdict(collections.Counter)
    for i, n in lengths.items():
        by_len[n][gold[i]] += 1
    return sum(c.most_common(1)[0][1] for c in by_len.values()) / len(lengths)


def test_cut_prompt_length_is_independent_of_the_gold_label(mistral_tokenizer):
    tok, max_len = mistral_tokenizer, 240
    exs = _label_length_examples()
    train, test = exs[:40], exs[40:]
    vocab = ExplanationVocab.from_examples(train, AXIS)
    room = target_room(train, tok, axis=AXIS, variants=PAPER_VARIANTS, percentile=99.0,
                       vocab=vocab)
    labels = collections.Counter(ex.label(AXIS) for ex in test)
    majority = max(labels.values()) / len(test)
    assert len(labels) >= 3

    # Per-example room (the old behaviour): the cut prompt's length gives the label away.
    leaky, stats = _cut_prompt_lengths(tok, test, None, vocab, max_len)
    assert stats.truncated == stats.kept == len(test)          # every prompt is cut
    assert _lookup_accuracy(leaky, test) > majority + 0.3

    # One room from the training split: every cut prompt has the same length.
    fixed, stats = _cut_prompt_lengths(tok, test, room, vocab, max_len)
    assert stats.truncated == stats.kept == len(test) and stats.target_room == room
    assert len(set(fixed.values())) == 1
    assert _lookup_accuracy(fixed, test) == pytest.approx(majority)
    # ... and the prompts do not change when the test labels and explanations do.
    permuted = [dataclasses.replace(ex, ratings=test[(i + 7) % len(test)].ratings)
                for i, ex in enumerate(test)]
    assert _cut_prompt_lengths(tok, permuted, room, vocab, max_len)[0] == fixed
    assert _cut_prompt_lengths(tok, permuted, None, vocab, max_len)[0] != leaky


def test_training_targets_longer_than_the_room_lose_their_tail(mistral_tokenizer):
    exs = _label_length_examples(20)
    vocab = ExplanationVocab.from_examples(exs, AXIS)
    room = target_room(exs, mistral_tokenizer, axis=AXIS, variants=PAPER_VARIANTS,
                       percentile=50.0, vocab=vocab)
    full = Encoder(mistral_tokenizer, axis=AXIS, variant="explanation", max_len=4096,
                   vocab=vocab).encode_all(exs)[0]
    enc = Encoder(mistral_tokenizer, axis=AXIS, variant="explanation", max_len=300,
                  vocab=vocab, prompt_room=PAPER_VARIANTS, target_room=room)
    rows, stats = enc.encode_all(exs)
    assert stats.target_cut > 0 and len(rows) == len(exs)
    for r, f in zip(rows, full):
        n = int(r["loss_mask"].sum())
        assert n <= room + 1 and len(r["input_ids"]) <= 300
        tgt = r["targets"][r["loss_mask"] > 0]
        ftgt = f["targets"][f["loss_mask"] > 0]
        np.testing.assert_array_equal(tgt, ftgt[:n])        # a prefix: the label kept
        assert r["label"] == f["label"]
    with pytest.raises(ValueError, match="target_room"):
        Encoder(mistral_tokenizer, axis=AXIS, variant="label_only", max_len=300,
                target_room=2)


def test_config_check_takes_the_run_length_from_epochs_when_steps_is_unset():
    from configs import tiny
    from xft_jax.training.config_checks import check_train_config

    c = tiny.get_config()
    c.train.steps, c.train.epochs = None, 1.0        # the paper's configs: epochs only
    check_train_config(c)
    c.train.epochs = 0.0
    with pytest.raises(ValueError, match="config.train.epochs=0.0"):
        check_train_config(c)
