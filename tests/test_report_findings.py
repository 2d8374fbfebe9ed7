"""What the report says it found, on hand-made cells: one seed shows no fake spread, a
small difference with an interval across zero is no win, collapsed runs are flagged with
their confusion matrices, the baselines and timing section comes from the sweep directory
alone (a re-run keeps the first complete run's wall time), and every output is readable."""

import csv
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from xft_jax import atomic
from xft_jax.study import grid, report_io, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["label_only", "explanation", "shuffled"]


def _write(root, cell, gold, pred, metrics=None):
    d = os.path.join(root, cell.rel, "eval")
    os.makedirs(d, exist_ok=True)
    gold, pred = np.asarray(gold), np.asarray(pred)
    m = {"accuracy": float(np.mean(gold == pred)), "qwk": 0.1, "macro_f1": 0.2, "ece": 0.05,
         "gold_distribution": (np.bincount(gold - 1, minlength=5) / gold.size).tolist()}
    m.update(metrics or {})
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump({"metrics": m}, f)
    with open(os.path.join(d, "predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "gold", "predicted"])
        w.writerows([f"e{i}", g, p] for i, (g, p) in enumerate(zip(gold, pred)))


def _one_seed_sweep(root, n=500):
    """label_only collapsed onto ratings 2 and 4; shuffled (as collapsed) = label_only with
    3 examples more and 1 fewer right (+0.004, an interval across zero); explanation
    clearly better and not collapsed."""
    rng = np.random.default_rng(0)
    gold = np.tile([1, 2, 3, 4, 5], n // 5)
    base = np.where(gold <= 3, 2, 4)                          # right on 2 and 4 only: 0.4
    expl = np.where(rng.random(n) < 0.8, gold, base)
    shuf = base.copy()
    shuf[np.flatnonzero(gold == 3)[:3]] = 3                   # three more right,
    shuf[np.flatnonzero(gold == 2)[:1]] = 1                   # one fewer: +2 of 500
    for v, pred in zip(VARIANTS, (base, expl, shuf)):
        _write(root, grid.Cell("synthetic", "naturalness", v, 0), gold, pred)
    return gold, base, expl, shuf


def test_one_seed_small_difference_and_collapse(tmp_path):
    root = str(tmp_path)
    gold, base, expl, shuf = _one_seed_sweep(root)
    text = report_io.write_report(root, os.path.join(root, "report"), ["synthetic"],
                                  ["naturalness"], VARIANTS, [0], n_boot=1000)
    assert "± 0.000" not in text
    assert f"| synthetic / naturalness | {np.mean(base == gold):.3f} ± n/a (1 seed) |" in text
    summary = text.split("## Accuracy")[0]
    d = [line for line in summary.splitlines() if line.startswith("- Differs")][0]
    same = [line for line in summary.splitlines() if line.startswith("- No difference")][0]
    assert "explanation +" in d and "shuffled" not in d
    assert "shuffled +0.004 [" in same                       # +0.004, CI across zero
    assert "shuffled beats label_only in 0/1 settings" in text
    assert "shuffled beats label_only in 1" not in text
    assert "Majority-class baseline (always the most common test rating): 0.200" in summary
    assert ("Collapse warning: label_only seed 0: 100% of predictions on ratings 2 and 4 "
            "(test labels: 40%)") in summary
    warn = [line for line in summary.splitlines() if "Collapse warning" in line][0]
    assert "explanation seed" not in warn and "shuffled seed 0: 99% of predictions" in warn
    # predicted-label shares and the confusion matrix, counted by hand
    assert "| synthetic / naturalness | label_only | 0% | 60% | 0% | 40% | 0% | seed 0: " in text
    cm = tables.confusion(list(zip(gold, base)))
    assert cm[0, 1] == cm[1, 1] == cm[2, 1] == 100 and cm[3, 3] == cm[4, 3] == 100
    block = text.split("**synthetic / naturalness, label_only**")[1].split("**")[0]
    assert "| 3 | 0 | 100 | 0 | 0 | 0 | 100 |" in block
    rows = {r["variant"]: r for r in csv.DictReader(open(os.path.join(root, "report",
                                                                       "results.csv")))}
    assert rows["label_only"]["accuracy_std"] == "" and rows["label_only"]["collapsed_seeds"] == "0"
    assert rows["explanation"]["collapsed_seeds"] == ""
    lo, hi = float(rows["explanation"]["accuracy_ci_low"]), float(rows["explanation"]["accuracy_ci_high"])
    assert lo < float(rows["explanation"]["accuracy_mean"]) < hi


def test_collapse_rule_allows_a_skewed_test_set():
    skewed = [(4, 4)] * 70 + [(3, 3)] * 20 + [(5, 4)] * 10     # 80% predicted 4, gold 70%
    assert tables.collapse(skewed) is None
    one = [(g, 3) for g in (1, 2, 3, 4, 5)] * 20 + [(1, 1)] * 10
    c = tables.collapse(one)
    assert c["ratings"] == [3] and c["share"] == pytest.approx(100 / 110)
    assert tables.collapse([(g, g) for g in (1, 2, 3, 4, 5)] * 10) is None


def test_several_seeds_show_their_spread(tmp_path):
    root = str(tmp_path)
    gold = np.tile([1, 2, 3, 4, 5], 20)
    accs = []
    for k in (0, 1):
        pred = gold.copy()
        pred[: 10 + 10 * k] = 1 + (gold[: 10 + 10 * k] % 5)    # 10 or 20 wrong
        accs.append(np.mean(pred == gold))
        for v in VARIANTS[:2]:
            _write(root, grid.Cell("coqa", "on_topic", v, k), gold, pred)
    text = report_io.write_report(root, os.path.join(root, "r"), ["coqa"], ["on_topic"],
                                  VARIANTS[:2], [0, 1], n_boot=200)
    assert f"{np.mean(accs):.3f} ± {np.std(accs, ddof=1):.3f}" in text and "n/a" not in text
    assert "No run collapsed" in text


def _fake_training(root, cell, best=20, last=40):
    d = os.path.join(root, cell.rel, "train")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "validation.json"), "w") as f:
        json.dump({"curve": [{"step": best, "accuracy": 0.5}, {"step": last, "accuracy": 0.4}],
                   "best_step": best, "best_accuracy": 0.5}, f)


def test_report_main_keeps_baselines_and_first_complete_timing(tmp_path):
    """``python -m xft_jax.report --sweep_dir=<demo>/runs`` has the demo's section; a
    2 s re-run is stated beside, not instead of, the run that trained everything."""
    root = str(tmp_path / "runs")
    _one_seed_sweep(root)
    cell_list = grid.cells(["synthetic"], ["naturalness"], VARIANTS, [0])
    for c in cell_list:
        _fake_training(root, c)
    base = str(tmp_path / "base_model")
    os.makedirs(base)
    with open(os.path.join(base, "pretrain.json"), "w") as f:
        json.dump({"first_loss": 9.5, "last_loss": 3.25, "seconds": 40.0,
                   "recipe": {"steps": 200}}, f)
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump({"sources": ["synthetic"], "axes": ["naturalness"], "variants": VARIANTS,
                   "seeds": [0]}, f)
    import time

    now = time.time()
    first = report_io.record_timing(root, cell_list, now - 300.0, 41.0, base)
    assert first["invocations"][0]["runs_trained"] == 3 and first["invocations"][0]["complete"]
    for c in cell_list:                                      # a re-run trains nothing
        p = os.path.join(root, c.rel, "eval", "predictions.csv")
        os.utime(p, (now - 400, now - 400))
    report_io.record_timing(root, cell_list, now - 2.0, 0.5, base)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "xft_jax.report", f"--sweep_dir={root}",
                        "--n_boot=200"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    text = open(os.path.join(root, "report", "report.md"), encoding="utf-8").read()
    section = text.split("## Baselines and timing")[1]
    assert "majority-class rate on the evaluated naturalness examples: 0.200" in section
    assert "selected by validation accuracy: label_only seed 0: step 20 of 40" in section
    assert "LM loss 9.50 -> 3.25 (200 steps, 40 s when it ran" in section
    assert "wall time of the demo that completed the grid: 300 s" in section
    assert "3 of 3 runs trained" in section
    assert "latest re-run" in section and ": 2 s, 0 of 3 runs trained, the rest reused" in section


def test_incomplete_grid_timing_says_so(tmp_path):
    root = str(tmp_path)
    _one_seed_sweep(root)
    cell_list = grid.cells(["synthetic"], ["naturalness"], VARIANTS + ["random_vocab"], [0])
    import time

    report_io.record_timing(root, cell_list, time.time() - 10, 1.0)
    lines = report_io.timing_lines(root)
    assert lines == [lines[0]] and "not complete yet" in lines[0] and "3 of 4 runs" in lines[0]


def test_report_files_respect_the_umask(tmp_path):
    root = str(tmp_path)
    _one_seed_sweep(root)
    old = os.umask(0o022)
    try:
        report_io.write_report(root, os.path.join(root, "report"), ["synthetic"],
                               ["naturalness"], VARIANTS, [0], n_boot=100)
    finally:
        os.umask(old)
    for name in ("report.md", "results.csv", "accuracy.png"):
        mode = stat.S_IMODE(os.stat(os.path.join(root, "report", name)).st_mode)
        assert mode == 0o644, (name, oct(mode))


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_umask_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic.write_text(str(tmp_path / "a.txt"), "x")
        staging = __import__("tempfile").mkdtemp(dir=str(tmp_path))
        atomic.write_json(os.path.join(staging, "b.json"), {"k": 1})
        atomic.replace_dir(staging, str(tmp_path / "out"))
        assert atomic.umask() == mask
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o777 & ~mask
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "b.json").st_mode) == 0o666 & ~mask
