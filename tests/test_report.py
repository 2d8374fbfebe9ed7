"""The report on a hand-made sweep directory: tables and bootstrap CIs checked by hand."""

import csv
import json
import os

import numpy as np
import pytest

from xft_jax.study import grid, report_io, tables


def _write_cell(root, cell, correct, extra=None):
    d = os.path.join(root, cell.rel, "eval")
    os.makedirs(d, exist_ok=True)
    ids = [f"ex{i}" for i in range(len(correct))]
    metrics = {"accuracy": float(np.mean(correct)), "qwk": 0.5, "macro_f1": 0.4, "ece": 0.1}
    metrics.update(extra or {})
    with open(os.path.join(d, "metrics.json"), "w") as f:  # the evaluator's layout
        json.dump({"metrics": metrics, "timing": {"examples_per_s": 1.0}}, f)
    with open(os.path.join(d, "predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "gold", "predicted"])
        for i, c in zip(ids, correct):
            w.writerow([i, 3, 3 if c else 1])


def test_report_tables_and_bootstrap_by_hand(tmp_path):
    root = str(tmp_path)
    rng = np.random.default_rng(0)
    n = 40
    base = {0: rng.random(n) < 0.5, 1: rng.random(n) < 0.5}
    expl = {0: rng.random(n) < 0.7, 1: rng.random(n) < 0.8}
    for k in (0, 1):
        _write_cell(root, grid.Cell("coqa", "naturalness", "label_only", k), base[k])
        _write_cell(root, grid.Cell("coqa", "naturalness", "explanation", k), expl[k])
    # a second setting where explanation is missing for every seed
    _write_cell(root, grid.Cell("coqa", "on_topic", "label_only", 0), base[0])
    text = report_io.write_report(root, os.path.join(root, "report"), ["coqa"],
                                  ["naturalness", "on_topic"], ["label_only", "explanation"],
                                  [0, 1], n_boot=500)
    acc = [np.mean(expl[0]), np.mean(expl[1])]
    assert f"{np.mean(acc):.3f} ± {np.std(acc, ddof=1):.3f}" in text
    assert "| coqa / on_topic | " in text and "missing" in text

    # bootstrap by hand: per-example difference of seed-averaged correctness
    d = (expl[0].astype(float) + expl[1]) / 2 - (base[0].astype(float) + base[1]) / 2
    d = d[sorted(range(n), key=lambda i: f"ex{i}")]  # examples are taken in sorted-id order
    boot = d[np.random.default_rng(0).integers(0, n, size=(500, n))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]" in text
    wins = int(d.mean() > 0)
    assert f"explanation beats label_only in {wins}/2 settings" in text
    rows = list(csv.DictReader(open(os.path.join(root, "report", "results.csv"))))
    row = [r for r in rows if r["variant"] == "explanation" and r["axis"] == "naturalness"][0]
    assert float(row["acc_diff_vs_label_only"]) == pytest.approx(d.mean())
    missing = [r for r in rows if r["variant"] == "explanation" and r["axis"] == "on_topic"][0]
    assert missing["accuracy_mean"] == "" and missing["acc_diff_vs_label_only"] == ""
    for f in ("report.md", "results.csv", "accuracy.png", "differences.png"):
        assert os.path.getsize(os.path.join(root, "report", f)) > 0


def test_bootstrap_uses_only_common_examples():
    a = [{"x": 1.0, "y": 0.0, "z": 1.0}]
    b = [{"x": 1.0, "y": 1.0}]
    out = tables.paired_bootstrap(a, b, n_boot=50)
    assert out["n_examples"] == 2 and out["diff"] == pytest.approx(0.5)


def test_bad_prediction_row_names_file_and_line(tmp_path):
    cell = grid.Cell("coqa", "naturalness", "label_only", 0)
    _write_cell(str(tmp_path), cell, [True, False])
    p = os.path.join(str(tmp_path), cell.rel, "eval", "predictions.csv")
    with open(p, "a") as f:
        f.write("ex9,three,1\n")
    with pytest.raises(ValueError, match=r"predictions\.csv:4: bad prediction row"):
        tables.load_cell(str(tmp_path), cell)


def test_probe_summary_by_hand(tmp_path):
    from xft_jax.study import probe_summary

    root = str(tmp_path)
    curves = {}
    for v, shift in (("label_only", 0.0), ("explanation", 0.5)):
        for k in (0, 1):
            cell = grid.Cell("coqa", "naturalness", v, k)
            d = os.path.join(root, cell.rel, "probe")
            os.makedirs(d)
            act = [1.0 + shift + 0.1 * k + 0.01 * layer for layer in range(7)]  # 6 layers
            mass = [0.1 * layer + shift / 10 for layer in range(7)]
            curves[(v, k)] = (act, mass)
            summary = {m: {"mean": act if m.startswith("act") else mass, "std": [0.0] * 7}
                       for m in ("act_entropy", "act_entropy_prompt", "lens_entropy",
                                 "lens_label_mass", "lens_label_entropy", "attn_entropy")}
            with open(os.path.join(d, "probe.json"), "w") as f:
                json.dump({"runs": [{"summary": summary}]}, f)
    out = os.path.join(root, "report")
    os.makedirs(out)
    text = probe_summary.summarize(root, out, ["coqa"], ["naturalness"],
                                   ["label_only", "explanation", "shuffled"], [0, 1])
    assert probe_summary.middle_layers(7) == slice(3, 5)  # layers 3 and 4 of 1..6
    for v in ("label_only", "explanation"):
        mid = np.array([np.mean(curves[(v, k)][0][3:5]) for k in (0, 1)])
        last = np.array([curves[(v, k)][1][-1] for k in (0, 1)])
        assert (f"| {v} | 2 | {mid.mean():.4f} ± {mid.std():.4f} | "
                f"{last.mean():.4f} ± {last.std():.4f} |") in text
    assert "| shuffled | 0 | missing | missing | missing |" in text
    assert os.path.getsize(os.path.join(out, "probe_act_entropy.png")) > 0
