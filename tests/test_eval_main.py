"""End to end: a real (tiny) training run evaluated as a workdir, as base + PEFT adapter
and as a merged checkpoint; the evaluate CLI with generation; the probe over runs."""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.batch_checks import assert_padded_to_step
from xft_jax.eval import evaluation as eval_lib, probe as probe_lib, probe_runs as probe_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from configs import tiny
    from xft_jax.training.trainer import train

    c = tiny.get_config("synthetic,naturalness,explanation")
    c.train.steps = 2
    c.train.checkpoint_every = 2
    c.data.num_synthetic = 40
    c.data.max_len = 320
    wd = str(tmp_path_factory.mktemp("run"))
    train(c, wd, devices=jax.devices()[:1])
    return wd


def _config(**model):
    from configs import eval as eval_config

    c = eval_config.get_config()
    c.eval.batch_size = 8
    c.data.max_examples = 11                     # 8 + 3: the last batch is partial
    for k, v in model.items():
        setattr(c.model, k, v)
    return c


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_workdir_adapter_and_merged_agree(run_dir, tmp_path):
    from xft_jax import lora as lora_lib
    from xft_jax.training.restore import load_trained

    doc = eval_lib.run_evaluation(_config(workdir=run_dir), str(tmp_path / "wd"))
    m = doc["metrics"]
    assert m["n"] == 11 and doc["data"]["target"] == "explanation"   # the run's own data
    rows = _read_csv(tmp_path / "wd" / "predictions.csv")
    assert len(rows) == 11 and len({r["id"] for r in rows}) == 11
    probs = np.array([[float(r[f"p{k}"]) for k in range(1, 6)] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [int(r["predicted"]) for r in rows] == list(probs.argmax(1) + 1)
    with open(tmp_path / "wd" / "metrics.json") as f:
        assert json.load(f)["metrics"]["accuracy"] == pytest.approx(m["accuracy"])
    assert doc["timing"]["examples_per_s"] > 0

    model, meta, _ = load_trained(run_dir)
    base = meta["lora"]["base_model_path"]
    lora_lib.save_peft_adapter(model, str(tmp_path / "adapter"), base)
    lora_lib.save_merged(model, str(tmp_path / "merged"))
    others = {
        "adapter": _config(path=base, adapter=str(tmp_path / "adapter")),
        "merged": _config(path=str(tmp_path / "merged"), tokenizer=base),
        "base": _config(path=base)}
    for name, c in others.items():
        c.data.target = "explanation"              # same prompts as the run's own eval
        c.data.num_synthetic = 40
        c.data.max_len = 320
        eval_lib.run_evaluation(c, str(tmp_path / name))
    ref = np.array([[float(r[f"p{k}"]) for k in range(1, 6)] for r in rows])
    got = {n: _read_csv(tmp_path / n / "predictions.csv") for n in others}
    for n in ("adapter", "merged"):
        assert [r["id"] for r in got[n]] == [r["id"] for r in rows]
        p = np.array([[float(r[f"p{k}"]) for k in range(1, 6)] for r in got[n]])
        np.testing.assert_allclose(p, ref, atol=2e-5, err_msg=n)
    base_p = np.array([[float(r[f"p{k}"]) for k in range(1, 6)] for r in got["base"]])
    assert np.abs(base_p - ref).max() > 1e-5     # the trained adapters do change the answer


def test_eval_rows_are_prompt_and_label_whatever_the_variant(mistral_tokenizer):
    """Runs trained on any target are scored on the same rows: prompt + label + eos."""
    d = eval_lib.resolve_data(_config().data, None)
    d.num_synthetic, d.max_len, d.max_examples = 40, 240, 12   # tight: long prompts cut
    rows = {}
    for target in ("label_only", "explanation", "shuffled"):
        d.target = target
        batches, info = eval_lib.eval_batches(d, mistral_tokenizer, 4)
        assert info["target"] == target and info["scored_target"] == "label_only"
        rows[target] = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
    for target in ("explanation", "shuffled"):
        for a, b in zip(rows["label_only"], rows[target], strict=True):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{target}: {k}")
    for b in rows["explanation"]:
        length = b["segment_ids"].sum(axis=1)
        real = b["valid"] > 0
        # input_ids end at the label token: label_pos + 1 (label) + 1 (eos target) ...
        np.testing.assert_array_equal(length[real], b["label_pos"][real] + 2)


def test_eval_prompts_are_cut_as_in_training(mistral_tokenizer):
    """An eval row's prompt is the one the run trained on for that example: cut to the
    one target room of the training split (``data.prompt_room`` variants, by default the
    paper's, at ``data.prompt_room_percentile``)."""
    from xft_jax.data.encode import Encoder
    from xft_jax.data.targets import PAPER_VARIANTS
    from xft_jax.data.encode import run_target_room as target_room
    from xft_jax.data.splits import build_splits
    from xft_jax.data.targets import explanation_vocab

    d = eval_lib.resolve_data(_config().data, None)
    d.num_synthetic, d.max_len, d.max_examples = 40, 240, 12
    assert tuple(d.prompt_room) == PAPER_VARIANTS
    splits = build_splits(d)
    examples = splits.test[:12]
    vocab = explanation_vocab(splits, d.axis, PAPER_VARIANTS)

    def eval_prompts():
        batches, info = eval_lib.eval_batches(d, mistral_tokenizer, 4)
        out = {}
        for b in batches:
            for row in np.flatnonzero(b["valid"]):
                first = int(np.flatnonzero(b["loss_mask"][row])[0])
                out[batches.example_ids[b["example_index"][row]]] = tuple(
                    b["input_ids"][row][:first + 1])
        return out, info

    def train_prompts(room):
        enc = Encoder(mistral_tokenizer, axis=d.axis, variant="explanation",
                      max_len=int(d.max_len), seed=int(d.seed), vocab=vocab,
                      prompt_room=PAPER_VARIANTS, target_room=room)
        rows, stats = enc.encode_all(examples)
        return {examples[int(r["index"])].id: tuple(r["input_ids"][
            :int(np.flatnonzero(r["loss_mask"])[0]) + 1]) for r in rows}, stats

    room = target_room(d, splits, mistral_tokenizer, vocab)
    trained, stats = train_prompts(room)
    assert stats.truncated > 0                           # the prompts really are cut
    prompts, info = eval_prompts()
    assert prompts == trained and info["target_room"] == room
    d.prompt_room = ()                                   # room for the label alone
    assert eval_prompts()[0] != trained


def test_evaluate_cli_with_generation(run_dir, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "xft_jax.evaluate", "--config=configs/eval.py",
           f"--out={out}", f"--config.model.workdir={run_dir}", "--config.eval.batch_size=8",
           "--config.data.max_examples=5", "--config.eval.generate=True",
           "--config.eval.max_new_tokens=6"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("checkpoint_manager.py", "xla_bridge.py", "PyTorch was not found"):
        assert noise not in proc.stderr, noise            # third-party INFO stays hidden
    assert "evaluate.py" in proc.stderr and "accuracy=" in proc.stderr   # our own line
    with open(out / "metrics.json") as f:
        doc = json.load(f)
    rows = _read_csv(out / "predictions.csv")
    assert doc["metrics"]["n"] == len(rows) == 5
    g = doc["generation"]
    parsed = [int(r["generated_label"]) if r["generated_label"] else None for r in rows]
    assert g["parse_rate"] == pytest.approx(np.mean([p is not None for p in parsed]))
    assert g["agreement_with_scored"] == pytest.approx(
        np.mean([p == int(r["predicted"]) for p, r in zip(parsed, rows)]))


def test_probe_over_runs_writes_json_csv_and_plots(run_dir, tmp_path):
    c = _config()
    c.data.max_examples = 6
    doc = probe_report.run_probes(c, str(tmp_path), [run_dir, run_dir], ["v1", "v2"])
    layers = doc["runs"][0]["num_layers"] + 1
    with open(tmp_path / "probe.json") as f:
        saved = json.load(f)
    assert set(saved["variants"]) == {"v1", "v2"}
    for k in probe_lib.METRICS:
        assert len(saved["variants"]["v1"][k]["mean"]) == layers
        if k != "attn_entropy":
            assert all(np.isfinite(saved["variants"]["v1"][k]["mean"]))
    assert saved["variants"]["v1"]["attn_entropy"]["mean"][0] is None   # no attention at 0
    rows = _read_csv(tmp_path / "probe.csv")
    assert len(rows) == 2 * len(probe_lib.METRICS) * layers
    for k in probe_lib.METRICS:
        with open(tmp_path / f"probe_{k}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the probe's own scores are the evaluator's: same accuracy on the same examples
    ev = eval_lib.run_evaluation(_config(workdir=run_dir), str(tmp_path / "ev"))
    ev6 = _read_csv(tmp_path / "ev" / "predictions.csv")[:6]
    acc6 = np.mean([r["gold"] == r["predicted"] for r in ev6])
    assert doc["runs"][0]["accuracy"] == pytest.approx(acc6)
    assert ev["metrics"]["n"] == 11


def test_eval_takes_the_runs_prompt_rubric_setting(mistral_tokenizer):
    """A run trained without the rubric in its prompt is scored on prompts without it."""
    from xft_jax import config_defaults
    run = config_defaults.base_config()
    run.data.rubric = False
    d = eval_lib.resolve_data(_config().data, run)
    assert d.rubric is False
    assert eval_lib.resolve_data(_config().data, None).rubric is True   # the default
    d.num_synthetic, d.max_len, d.max_examples = 40, 240, 4
    short, _ = eval_lib.eval_batches(d, mistral_tokenizer, 4)
    d.rubric = True
    full, _ = eval_lib.eval_batches(d, mistral_tokenizer, 4)
    lengths = [np.sort(next(iter(b))["segment_ids"].sum(axis=1)) for b in (short, full)]
    assert (lengths[0] < lengths[1] - 20).all()


def test_eval_pads_as_the_run_did(mistral_tokenizer):
    """Evaluation takes the run's data.bucket_step (0 for a run saved before the key, or
    for a base model), so its rows pad to the next multiple; the scored rows are the same
    either way, padding aside."""
    from xft_jax import config_defaults
    run = config_defaults.base_config()
    run.data.bucket_step = 16
    d = eval_lib.resolve_data(_config().data, run)
    assert d.bucket_step == 16
    assert eval_lib.resolve_data(_config().data, None).bucket_step == 0
    del run.data["bucket_step"]                           # a run from before the key
    assert eval_lib.resolve_data(_config().data, run).bucket_step == 0
    d.num_synthetic, d.max_len, d.max_examples = 40, 320, 12
    fine = [dict(b) for b in eval_lib.eval_batches(d, mistral_tokenizer, 4)[0]]
    d.bucket_step = 0
    coarse = [dict(b) for b in eval_lib.eval_batches(d, mistral_tokenizer, 4)[0]]
    assert_padded_to_step(coarse, fine, step=16)
    assert any(a["input_ids"].shape[1] > b["input_ids"].shape[1] for a, b in zip(coarse, fine))
