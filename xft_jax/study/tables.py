"""The paper's results tables from a sweep directory.

Rows are the source x axis settings, columns the target variants, cells mean +- std over
seeds ("n/a (1 seed)" where one seed leaves no spread). Each variant is compared with
``label_only`` by a paired hierarchical bootstrap (seeds, then test examples within them;
``bootstrap.py``), which gives a 95% interval and a p-value for the difference of
accuracy. A variant "beats" ``label_only`` in a setting only where that interval lies above
zero, counted as it is and after Holm's correction across the settings compared; a point
estimate above zero alone is no win. Each run's predicted labels are kept too, for the
confusion matrices and the collapse check (``collapse``). A missing cell stays missing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Sequence

import numpy as np

from xft_jax.errors import ConfigValueError
from xft_jax.study import bootstrap
from xft_jax.study.grid import Cell

TABLE_METRICS = ("accuracy", "qwk", "macro_f1", "ece")
BASELINE = "label_only"
RATINGS = (1, 2, 3, 4, 5)
# A run has collapsed when its predictions crowd onto one or two ratings that the test
# labels do not crowd onto: >= 60% on one rating or >= 90% on two, and that share at least
# 20 points above the test labels' share of the same ratings (a skewed test set alone does
# not trigger it).
COLLAPSE_ONE, COLLAPSE_TWO, COLLAPSE_EXCESS = 0.6, 0.9, 0.2
COLLAPSE_RULE = (f"a run counts as collapsed when at least {COLLAPSE_ONE:.0%} of its "
                 f"predictions fall on one rating or at least {COLLAPSE_TWO:.0%} on two, "
                 f"and the test labels put at least {COLLAPSE_EXCESS * 100:.0f} percentage "
                 f"points less on those ratings")


@dataclasses.dataclass
class CellResult:
    cell: Cell
    metrics: dict
    correct: dict[str, float]   # example id -> 1.0 if the prediction was right
    # (gold, predicted) rating 1..5 of each example, in file order
    labels: list[tuple[int, int]] = dataclasses.field(default_factory=list)


def load_cell(sweep_dir: str, cell: Cell) -> CellResult | None:
    """Metrics and per-example correctness of a finished cell; None if it has none."""
    eval_dir = os.path.join(sweep_dir, cell.rel, "eval")
    mpath = os.path.join(eval_dir, "metrics.json")
    ppath = os.path.join(eval_dir, "predictions.csv")
    if not (os.path.exists(mpath) and os.path.exists(ppath)):
        return None
    with open(mpath, encoding="utf-8") as f:
        doc = json.load(f)
    metrics = doc["metrics"] if isinstance(doc.get("metrics"), dict) else doc
    correct, labels = {}, []
    with open(ppath, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.DictReader(f), start=2):
            try:
                gold, pred = int(row["gold"]), int(row["predicted"])
                if gold not in RATINGS or pred not in RATINGS:
                    raise ValueError(f"ratings must be in {RATINGS[0]}..{RATINGS[-1]}")
            except (KeyError, ValueError, TypeError) as e:
                raise ConfigValueError(f"{ppath}:{lineno}: bad prediction row {row!r} ({e})") from e
            correct[row["id"]] = float(gold == pred)
            labels.append((gold, pred))
    return CellResult(cell, metrics, correct, labels)


def collect(sweep_dir: str, cell_list: Sequence[Cell]) -> dict[Cell, CellResult]:
    out = {}
    for c in cell_list:
        r = load_cell(sweep_dir, c)
        if r is not None:
            out[c] = r
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float | None] | None:
    """(mean, sample std) over seeds; the std is None with one value (no spread to show)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None


def confusion(pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """[5, 5] counts, rows the gold rating, columns the predicted one."""
    m = np.zeros((len(RATINGS), len(RATINGS)), np.int64)
    for g, p in pairs:
        m[g - RATINGS[0], p - RATINGS[0]] += 1
    return m


def collapse(pairs: Sequence[tuple[int, int]]) -> dict | None:
    """The ratings a run crowds onto, with their share of its predictions and of the test
    labels, when it has collapsed by ``COLLAPSE_RULE``; else None."""
    m = confusion(pairs)
    n = m.sum()
    if n == 0:
        return None
    pred, gold = m.sum(0) / n, m.sum(1) / n
    order = np.argsort(-pred, kind="stable")
    # one rating alone over the two-rating limit, else two, else one over its own limit
    for k, limit in ((1, COLLAPSE_TWO), (2, COLLAPSE_TWO), (1, COLLAPSE_ONE)):
        top = order[:k]
        share, gold_share = float(pred[top].sum()), float(gold[top].sum())
        if share >= limit and share - gold_share >= COLLAPSE_EXCESS:
            return {"ratings": sorted(int(RATINGS[i]) for i in top), "share": share,
                    "gold_share": gold_share}
    return None


def accuracy_interval(runs: Sequence[CellResult], n_boot: int, alpha: float):
    """``1 - alpha`` hierarchical bootstrap interval (seeds, then examples) of the mean
    accuracy of ``runs`` on the examples all of them scored; None if they share none."""
    ids = sorted(set.intersection(*[set(r.correct) for r in runs])) if runs else []
    if not ids:
        return None
    x = np.array([[r.correct[i] for i in ids] for r in runs], np.float64)
    boot = bootstrap.hierarchical_bootstrap(x, n_boot, seed=0)
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def build_tables(results: dict[Cell, CellResult], settings: Sequence[tuple[str, str]],
                 variants: Sequence[str], seeds: Sequence[int], n_boot: int = 2000,
                 alpha: float = bootstrap.ALPHA) -> dict:
    """Everything the report prints, as plain data."""
    tables = {m: {} for m in TABLE_METRICS}
    diffs: dict[str, dict] = {v: {} for v in variants if v != BASELINE}
    acc_ci, labels, majority, collapsed = {}, {}, {}, {}
    for s in settings:
        base = {k: results[c].correct for k in seeds
                if (c := Cell(s[0], s[1], BASELINE, k)) in results}
        for v in variants:
            runs = {k: results[c] for k in seeds if (c := Cell(s[0], s[1], v, k)) in results}
            for m in TABLE_METRICS:
                tables[m][(s, v)] = (mean_std([r.metrics.get(m) for r in runs.values()])
                                     if runs else None)
            acc_ci[(s, v)] = accuracy_interval(list(runs.values()), n_boot, alpha)
            pairs = [p for r in runs.values() for p in r.labels]
            labels[(s, v)] = confusion(pairs) if pairs else None
            for k, r in runs.items():
                if (flag := collapse(r.labels)) is not None:
                    collapsed[(s, v, k)] = flag
            if pairs and s not in majority:     # every run of a setting scores one test set
                first = next(r for r in runs.values() if r.labels)
                majority[s] = float(confusion(first.labels).sum(1).max() / len(first.labels))
            if v != BASELINE:
                diffs[v][s] = bootstrap.paired_difference(
                    base, {k: r.correct for k, r in runs.items()}, n_boot, alpha=alpha)
    wins = {}
    for v, per in diffs.items():
        compared = [d for d in per.values() if d is not None]
        rejected, adjusted = bootstrap.holm([d["p_value"] for d in compared], alpha)
        for d, r, p in zip(compared, rejected, adjusted):
            d["p_holm"], d["significant_holm"] = p, r
        wins[v] = {"higher": sum(d["diff"] > 0 for d in compared),   # point estimate only
                   "significant_wins": sum(d["ci_low"] > 0 for d in compared),
                   "significant_losses": sum(d["ci_high"] < 0 for d in compared),
                   "holm_wins": sum(d["ci_low"] > 0 and d["significant_holm"]
                                    for d in compared),
                   "holm_losses": sum(d["ci_high"] < 0 and d["significant_holm"]
                                      for d in compared),
                   "compared": len(compared), "settings": len(settings)}
    return {"tables": tables, "diffs": diffs, "wins": wins, "alpha": alpha,
            "acc_ci": acc_ci, "labels": labels, "majority": majority,
            "collapsed": collapsed, "seeds": list(seeds)}


def differs(d: dict | None) -> bool:
    """A difference the report calls one: its interval excludes zero and it stays
    significant after Holm's correction."""
    return (d is not None and d.get("significant_holm", False)
            and (d["ci_low"] > 0 or d["ci_high"] < 0))


# ------------------------------------------------------------------ rendering
def _fmt(ms, digits=3):
    if ms is None:
        return "missing"
    spread = "n/a (1 seed)" if ms[1] is None else f"{ms[1]:.{digits}f}"
    return f"{ms[0]:.{digits}f} ± {spread}"


def fmt_diff(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def markdown_table(data: dict, metric: str, settings, variants) -> str:
    head = "| setting | " + " | ".join(variants) + " |"
    rule = "|---" * (len(variants) + 1) + "|"
    rows = [f"| {s[0]} / {s[1]} | " + " | ".join(_fmt(data["tables"][metric][(s, v)])
                                               for v in variants) + " |" for s in settings]
    return "\n".join([head, rule, *rows])


def markdown_diffs(data: dict, settings, variants) -> str:
    others = [v for v in variants if v != BASELINE]
    head = "| setting | " + " | ".join(f"{v} − {BASELINE}" for v in others) + " |"
    rule = "|---" * (len(others) + 1) + "|"

    def cell(d):
        if d is None:
            return "missing"
        mark = "*" if d["significant_holm"] else ""
        return (f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
                f"p={d['p_value']:.3f}{mark}")

    rows = [f"| {s[0]} / {s[1]} | " + " | ".join(cell(data["diffs"][v].get(s)) for v in others)
            + " |" for s in settings]
    alpha = data.get("alpha", bootstrap.ALPHA)
    level = f"{100 * (1 - alpha):.0f}%"
    lines = [head, rule, *rows, "",
             f"Interval: {level} paired hierarchical bootstrap (seeds, then "
             f"examples within them); p: two-sided bootstrap p-value; * significant after "
             f"Holm's correction across the settings compared (family-wise {alpha:g}). "
             f"A variant beats (or trails) {BASELINE} in a setting only where the interval "
             f"lies above (below) zero.", ""]
    lines += [wins_line(data, v, settings) for v in others]
    return "\n".join(lines)


def wins_line(data: dict, v: str, settings, max_listed: int = 6) -> str:
    """A variant's wins and losses against the baseline, each backed by its interval,
    counted before and after Holm's correction (with the intervals when few)."""
    w = data["wins"][v]
    level = f"{100 * (1 - data.get('alpha', bootstrap.ALPHA)):.0f}%"
    n = w["compared"]
    text = (f"- {v} beats {BASELINE} in {w['significant_wins']}/{n} settings "
            f"({level} CI above zero; {w['holm_wins']} after Holm's correction) and trails "
            f"it in {w['significant_losses']}/{n} ({w['holm_losses']} after correction)")
    per = [(s, d) for s in settings if (d := data["diffs"][v].get(s)) is not None]
    if per and len(per) <= max_listed:
        text += ": " + "; ".join(f"{s[0]}/{s[1]} {fmt_diff(d)}" for s, d in per)
    if n < w["settings"]:
        text += (f" ({w['settings'] - n} of the {w['settings']} settings lack a run of "
                 f"either variant)")
    return text


def csv_rows(data: dict, settings, variants) -> list[dict]:
    rows = []
    for s in settings:
        for v in variants:
            row = {"source": s[0], "axis": s[1], "variant": v}
            for m in TABLE_METRICS:
                ms = data["tables"][m][(s, v)]
                row[f"{m}_mean"] = "" if ms is None else ms[0]
                row[f"{m}_std"] = "" if ms is None or ms[1] is None else ms[1]
            ci = data["acc_ci"].get((s, v))
            row["accuracy_ci_low"] = "" if ci is None else ci[0]
            row["accuracy_ci_high"] = "" if ci is None else ci[1]
            cm = data["labels"].get((s, v))
            for k, r in enumerate(RATINGS):
                row[f"predicted_{r}_share"] = "" if cm is None else cm[:, k].sum() / cm.sum()
            row["collapsed_seeds"] = " ".join(
                str(k) for k in data["seeds"] if (s, v, k) in data["collapsed"])
            d = data["diffs"].get(v, {}).get(s)
            for k in ("diff", "ci_low", "ci_high", "p_value", "p_holm"):
                row[f"acc_{k}_vs_{BASELINE}"] = "" if d is None else d[k]
            rows.append(row)
    return rows


def _share(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown_predicted(data: dict, settings, variants) -> str:
    """Share of predictions on each rating per setting and variant (all seeds pooled),
    under the test labels' own shares, with the collapsed seeds named."""
    head = ("| setting | predictions of | " + " | ".join(f"{r}" for r in RATINGS)
            + " | collapsed (seeds) |")
    rule = "|---" * (len(RATINGS) + 3) + "|"
    rows = []
    for s in settings:
        gold = next((cm for v in variants if (cm := data["labels"].get((s, v))) is not None),
                    None)
        if gold is None:
            continue
        g = gold.sum(1) / gold.sum()
        rows.append(f"| {s[0]} / {s[1]} | *test labels* | "
                    + " | ".join(_share(x) for x in g) + " | |")
        for v in variants:
            cm = data["labels"].get((s, v))
            if cm is None:
                rows.append(f"| {s[0]} / {s[1]} | {v} | " + " | ".join(["missing"] * 5)
                            + " | |")
                continue
            p = cm.sum(0) / cm.sum()
            bad = [k for k in data["seeds"] if (s, v, k) in data["collapsed"]]
            flag = ", ".join(
                f"seed {k}: {_share(c['share'])} on {'+'.join(map(str, c['ratings']))}"
                for k in bad for c in [data["collapsed"][(s, v, k)]]) or "no"
            rows.append(f"| {s[0]} / {s[1]} | {v} | " + " | ".join(_share(x) for x in p)
                        + f" | {flag} |")
    return "\n".join([head, rule, *rows])


def markdown_confusion(data: dict, s, v) -> str:
    """One setting and variant's confusion matrix, seeds pooled."""
    cm = data["labels"].get((s, v))
    if cm is None:
        return f"**{s[0]} / {s[1]}, {v}**: missing"
    head = "| gold \\ predicted | " + " | ".join(map(str, RATINGS)) + " | n |"
    rule = "|---" * (len(RATINGS) + 2) + "|"
    rows = [f"| {r} | " + " | ".join(str(int(x)) for x in cm[i]) + f" | {int(cm[i].sum())} |"
            for i, r in enumerate(RATINGS)]
    return "\n".join([f"**{s[0]} / {s[1]}, {v}** ({int(cm.sum())} predictions)", "",
                      head, rule, *rows])
