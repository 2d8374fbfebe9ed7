"""The demo end to end at smoke size: every report file appears; a second run reuses the
cached base model and skips the finished runs; a run under changed settings stops before
it rebuilds or overwrites anything."""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(out, *extra):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "xft_jax.demo", "--config=configs/demo.py:smoke",
         f"--config.out={out}", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)


def test_smoke_demo_writes_every_report_file(tmp_path):
    out = str(tmp_path / "demo")
    first = _demo(out)
    assert first.returncode == 0, first.stderr[-3000:]
    report = os.path.join(out, "report")
    for name in ("report.md", "results.csv", "accuracy.png", "differences.png",
                 "probe_act_entropy.png", "probe_lens_label_mass.png", "probe_attn_entropy.png"):
        assert os.path.getsize(os.path.join(report, name)) > 0, name
    text = open(os.path.join(report, "report.md"), encoding="utf-8").read()
    assert "| synthetic / naturalness |" in text and "| missing" not in text.split("## Probe")[0]
    assert "majority-class rate on the evaluated naturalness examples" in text
    assert "selected by validation accuracy: label_only seed 0: step " in text
    assert "## Accuracy" in text and text in first.stdout  # the table is printed too
    rows = list(csv.DictReader(open(os.path.join(report, "results.csv"), encoding="utf-8")))
    assert {r["variant"] for r in rows} == {"label_only", "explanation"}
    assert all(0.0 <= float(r["accuracy_mean"]) <= 1.0 for r in rows)
    for v in ("label_only", "explanation"):
        cell = os.path.join(out, "runs", "synthetic", "naturalness", v, "seed0")
        for f in ("eval/metrics.json", "eval/predictions.csv", "probe/probe.json",
                  "train/metrics.jsonl", "train/validation.json"):
            assert os.path.exists(os.path.join(cell, f)), f
    second = _demo(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing cached base model" in second.stderr
    assert second.stderr.count("finished earlier, skipped") == 2
    assert "[demo] done: synthetic/naturalness/label_only/seed0: accuracy " in first.stderr
    for noise in ("checkpoint_manager.py", "xla_bridge.py", "PyTorch was not found"):
        assert noise not in first.stderr, noise          # third-party INFO stays hidden
    kept = {f: open(os.path.join(out, f), "rb").read()
            for f in ("base_model/pretrain.json", "base_model/model.safetensors",
                      "runs/synthetic/naturalness/explanation/seed0/eval/metrics.json")}
    changed = _demo(out, "--config.train.optim.lr=0.05", "--config.pretrain.steps=7")
    assert changed.returncode == 2                     # a user error: one line, no traceback
    err = changed.stderr
    assert "Traceback" not in err and "finished under other settings" in err
    assert "train.optim.lr: " in err and "-> 0.05" in err and "base_model.steps: " in err
    assert "naturalness/label_only/seed0/cell.json" in err
    for f, data in kept.items():                       # nothing rebuilt or overwritten
        assert open(os.path.join(out, f), "rb").read() == data, f
