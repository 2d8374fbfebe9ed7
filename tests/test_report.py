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

    # the point estimate by hand: mean over seeds of the per-example difference
    d = (expl[0].astype(float) + expl[1]) / 2 - (base[0].astype(float) + base[1]) / 2
    from xft_jax.study import bootstrap

    by_seed = {k: {f"ex{i}": float(v[i]) for i in range(n)} for k, v in base.items()}
    other = {k: {f"ex{i}": float(v[i]) for i in range(n)} for k, v in expl.items()}
    ref = bootstrap.paired_difference(by_seed, other, n_boot=500)
    assert ref["diff"] == pytest.approx(d.mean())
    assert (f"{ref['diff']:+.3f} [{ref['ci_low']:+.3f}, {ref['ci_high']:+.3f}] "
            f"p={ref['p_value']:.3f}") in text
    # a win is one whose interval lies above zero (not a point estimate above zero)
    wins = int(ref["ci_low"] > 0)
    holm_wins = int(ref["ci_low"] > 0 and ref["p_value"] <= 0.05)  # one setting: Holm = plain
    assert (f"explanation beats label_only in {wins}/1 settings (95% CI above zero; "
            f"{holm_wins} after Holm's correction)") in text
    assert "1 of the 2 settings lack a run of either variant" in text
    assert text.index("## Summary") < text.index("## Accuracy")
    for png in ("accuracy.png", "differences.png", "predicted_labels.png"):
        assert f"]({png})" in text                       # embedded, not only written
    rows = list(csv.DictReader(open(os.path.join(root, "report", "results.csv"))))
    row = [r for r in rows if r["variant"] == "explanation" and r["axis"] == "naturalness"][0]
    assert float(row["acc_diff_vs_label_only"]) == pytest.approx(d.mean())
    missing = [r for r in rows if r["variant"] == "explanation" and r["axis"] == "on_topic"][0]
    assert missing["accuracy_mean"] == "" and missing["acc_diff_vs_label_only"] == ""
    for f in ("report.md", "results.csv", "accuracy.png", "differences.png",
              "predicted_labels.png"):
        assert os.path.getsize(os.path.join(root, "report", f)) > 0


def test_wins_are_counted_before_and_after_holm_correction():
    """Three settings: a clear win, a marginal win (p about 0.03: significant alone, not
    after Holm's correction over three settings, which asks p <= 0.05 / 2 of it) and a
    small loss; the same examples go right and wrong for every seed."""
    res = {}
    n = 200
    settings = [("coqa", "naturalness"), ("coqa", "on_topic"), ("coqa", "comprehensiveness")]
    gain_loss = {settings[0]: (80, 0), settings[1]: (24, 16), settings[2]: (10, 12)}
    for s in settings:
        gain, loss = gain_loss[s]
        base = np.zeros(n)
        base[: n // 2] = 1
        other = base.copy()
        other[n // 2: n // 2 + gain] = 1       # examples only the variant gets right
        other[:loss] = 0                       # examples only label_only gets right
        for k in (0, 1, 2):
            for v, arr in (("label_only", base), ("explanation", other)):
                c = grid.Cell(s[0], s[1], v, k)
                res[c] = tables.CellResult(c, {"accuracy": float(arr.mean())},
                                           {f"e{i}": float(x) for i, x in enumerate(arr)})
    data = tables.build_tables(res, settings, ["label_only", "explanation"], [0, 1, 2],
                               n_boot=2000)
    d = data["diffs"]["explanation"]
    assert [d[s]["diff"] for s in settings] == pytest.approx([0.4, 0.04, -0.01])
    assert d[settings[0]]["significant_holm"] and not d[settings[1]]["significant_holm"]
    assert 0.025 < d[settings[1]]["p_value"] < 0.05
    assert not d[settings[2]]["significant_holm"]
    w = data["wins"]["explanation"]
    # the marginal win's interval lies above zero, the small loss's does not lie below it
    assert (w["significant_wins"], w["holm_wins"], w["holm_losses"], w["compared"]) == (2, 1, 0, 3)
    assert w["higher"] == 2 and w["significant_losses"] == 0
    text = tables.markdown_diffs(data, settings, ["label_only", "explanation"])
    assert ("explanation beats label_only in 2/3 settings (95% CI above zero; 1 after "
            "Holm's correction)") in text
    assert [tables.differs(d[s]) for s in settings] == [True, False, False]


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
                       for m in ("act_entropy", "act_entropy_norm", "act_entropy_trim",
                                 "act_entropy_prompt", "lens_entropy", "lens_label_maxprob",
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
        out_cell = f"{last.mean():.4f} ± {last.std():.4f}"       # the three output columns
        mid_cell = f"{mid.mean():.4f} ± {mid.std():.4f}"         # the three middle columns
        assert (f"| {v} | 2 | " + " | ".join([out_cell] * 3 + [mid_cell] * 3) + " |") in text
    assert "| shuffled | 0 | " + " | ".join(["missing"] * 6) + " |" in text
    assert os.path.getsize(os.path.join(out, "probe_act_entropy.png")) > 0


def test_the_accuracy_figure_says_where_its_y_axis_starts(tmp_path):
    """The text under the accuracy bars says the axis is cut only when it is."""
    texts = {}
    for name, correct in (("high", [True] * 6 + [False] * 4), ("zero", [False] * 10)):
        root = str(tmp_path / name)
        _write_cell(root, grid.Cell("coqa", "naturalness", "label_only", 0), correct)
        texts[name] = report_io.write_report(root, os.path.join(root, "report"), ["coqa"],
                                             ["naturalness"], ["label_only"], [0], n_boot=50)
    assert "the y-axis starts at 0." in texts["zero"] and "not 0" not in texts["zero"]
    start = float(texts["high"].split("the y-axis starts at ")[1].split(",")[0])
    assert 0.0 < start < 0.6 and "not proportional to accuracy" in texts["high"]
