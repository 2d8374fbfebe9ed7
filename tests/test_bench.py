"""The bench scripts run end to end at a tiny size, so they cannot rot.

Speed targets are not asserted (CI machines vary); what is asserted is that every script
runs, writes its JSON, leaves bench/RESULTS.md alone under --no_record, and that both
sides of each comparison computed the same thing (same first-step loss, same label
log-probs), which is what makes the ratios meaningful.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
from bench import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, timeout=600):
    env = dict(os.environ, XFT_BENCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    return out


def _rows(path):
    with open(path) as f:
        return json.load(f)["rows"]


def _row(rows, metric):
    found = [r for r in rows if r["metric"].startswith(metric)]
    assert found, (metric, [r["metric"] for r in rows])
    return found


def test_run_all_smoke(tmp_path):
    md_before = (open(common.RESULTS_MD).read() if os.path.exists(common.RESULTS_MD)
                 else None)
    out = _run(["bench/run_all.py", "--size=smoke", "--no_record", f"--out={tmp_path}"],
               tmp_path)
    md_after = (open(common.RESULTS_MD).read() if os.path.exists(common.RESULTS_MD)
                else None)
    assert md_after == md_before, "--no_record must leave bench/RESULTS.md untouched"
    files = {b: glob.glob(str(tmp_path / f"*_{b}_smoke.json"))
             for b in ("train_step", "eval_scoring", "load", "summary")}
    assert all(len(v) == 1 for v in files.values()), files
    # The ratio table comes last.
    assert out.rstrip().splitlines()[-1].startswith("| load ")

    train = _rows(files["train_step"][0])
    assert all(r["met"] for r in _row(train, "loss at step 1")), train
    tok = _row(train, "tokens/s")[0]
    assert float(tok["ours"]) > 0 and float(tok["peer"]) > 0 and tok["ratio"] > 0

    ev = _rows(files["eval_scoring"][0])
    assert all(r["met"] for r in _row(ev, "max abs log-prob diff")), ev
    assert _row(ev, "examples/s vs full-logits")[0]["ratio"] > 0

    with open(files["load"][0]) as f:
        load = json.load(f)["details"]
    assert load["bytes"] == common.checkpoint_bytes(load["checkpoint"]) > 0
    for k in ("raw", "ours", "hf"):
        assert load["raw"][k]["seconds"] > 0 and load["raw"][k]["peak_rss"] > 0

    summary = _rows(files["summary"][0])
    assert {r["case"].split()[0] for r in summary} == {"train_step", "eval_scoring", "load"}


def test_train_step_gpu_path_on_cpu(tmp_path):
    """The GPU mode's code path (bf16, remat, two sequence lengths) at a tiny shape."""
    _run(["bench/train_step.py", "--size=gpu_smoke", "--no_record", "--nobefore", "--nonf4",
          f"--out={tmp_path}"], tmp_path)
    (path,) = glob.glob(str(tmp_path / "*_train_step_gpu_smoke.json"))
    rows = _rows(path)
    assert {r["case"] for r in rows} == {"B=2 T=32", "B=1 T=64"}
    assert all(r["met"] for r in _row(rows, "loss at step 1")), rows
    # Each attention implementation is timed on its own; cuDNN needs a GPU, and a run
    # without one reports it as failed instead of stopping.
    assert len(_row(rows, "tokens/s, attention=xla")) == 2
    for r in _row(rows, "tokens/s, attention=cudnn"):
        if not jax_has_gpu():
            assert r["ours"].startswith("failed: ") and "cuDNN" in r["ours"], r


def test_eval_scoring_gpu_path_on_cpu(tmp_path):
    """The GPU mode of the scoring bench (bf16, one child per attention implementation)."""
    _run(["bench/eval_scoring.py", "--size=gpu_smoke", "--no_record", f"--out={tmp_path}"],
         tmp_path)
    (path,) = glob.glob(str(tmp_path / "*_eval_scoring_gpu_smoke.json"))
    rows = _rows(path)
    assert all(r["met"] for r in _row(rows, "max abs log-prob diff")), rows
    assert _row(rows, "examples/s vs full-logits forward, attention=xla")[0]["ratio"] > 0
    (cudnn,) = _row(rows, "examples/s vs full-logits forward, attention=cudnn")
    if not jax_has_gpu():
        assert cudnn["ours"].startswith("failed: ") and "cuDNN" in cudnn["ours"], cudnn


def jax_has_gpu() -> bool:
    import jax
    return any(d.platform == "gpu" for d in jax.devices())


def test_train_flops_by_hand():
    m = dict(model_type="llama", vocab_size=10, hidden_size=4, intermediate_size=6,
             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    f = common.train_flops(m, batch=3, seq=5, rank=2)
    # per layer: q 4x4, k 4x2, v 4x2, o 4x4, gate/up 4x6, down 6x4
    n_layer = 16 + 8 + 8 + 16 + 24 + 24 + 24
    assert f["n_matmul"] == 2 * n_layer + 4 * 10
    assert f["dense"] == 4 * f["n_matmul"] * 15
    assert f["attention"] == 12 * 2 * 5 * 2 * 2 * 15
    in_out = 8 + 6 + 6 + 8 + 10 + 10 + 10
    assert f["lora"] == 6 * 2 * 2 * in_out * 15
    assert f["total"] == f["dense"] + f["attention"] + f["lora"]


def test_torch_labels_match_targets():
    b = common.train_batch(vocab=50, batch=2, seq=16, target_frac=0.25)
    labels = common.torch_labels(b)
    # HF predicts labels[t] from position t-1: our target at t is labels[t+1].
    rows, cols = np.nonzero(b["loss_mask"])
    np.testing.assert_array_equal(labels[rows, cols + 1], b["targets"][rows, cols])
    assert (labels != -100).sum() == b["loss_mask"].sum()
    np.testing.assert_array_equal(b["targets"][:, :-1], b["input_ids"][:, 1:])


def test_peak_rss_resets():
    common.reset_peak_rss()
    x = np.ones(64 * 2**20 // 8)          # 64 MB touched
    high = common.peak_rss()
    del x
    before = common.reset_peak_rss()
    assert high - before > 48 * 2**20
    assert common.peak_rss() - before < 48 * 2**20


def test_demo_label_check_prints_the_validation_curve(tmp_path):
    """bench/demo_label_check.py at the demo's smoke size: one label_only run with an
    override, its training label loss per step and its validation curve."""
    out = subprocess.run(
        [sys.executable, "bench/demo_label_check.py", f"--out={tmp_path}", "--arg=smoke",
         "--lr=2e-3", "--rubric=true", "--max_len=256", "--num_items=150"], cwd=REPO, capture_output=True,
        text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    lines = lines[next(i for i, l in enumerate(lines) if l.startswith("done at step")):]
    assert lines[0].startswith("done at step 2 in ")
    assert lines[0].endswith('{"optim.lr": 0.002, "data.max_len": 256, "data.rubric": true, "num_items": 150}')
    assert lines[1].startswith("step    1  train label loss ")
    assert "validation accuracy" in lines[2] and lines[3].startswith("best validation step 2")
    cfg = json.load(open(os.path.join(tmp_path, "chitchat_degraded", "naturalness",
                                      "label_only", "seed0", "train", "config.json")))
    assert cfg["optim"]["lr"] == 2e-3 and cfg["data"]["target"] == "label_only"
    assert cfg["data"]["rubric"] is True and cfg["data"]["num_synthetic"] == 150
    assert cfg["data"]["max_len"] == 256


def test_demo_linear_probe_reports_train_and_validation_accuracy():
    """bench/demo_linear_probe.py at the demo's smoke size: frozen-base features of the
    training and validation splits, one logistic regression per strength."""
    out = subprocess.run(
        [sys.executable, "bench/demo_linear_probe.py", "--arg=smoke", "--c=0.1"], cwd=REPO,
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    head = next(l for l in lines if l.startswith("chitchat_degraded/naturalness: "))
    assert " training, " in head and "validation majority-class rate 0." in head
    row = next(l for l in lines if l.startswith("C=0.1: "))
    acc = float(row.rsplit(" ", 1)[1])
    assert 0.0 <= acc <= 1.0 and "train accuracy" in row
