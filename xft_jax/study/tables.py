"""The paper's results tables from a sweep directory.

Rows are the source x axis settings, columns the target variants, cells mean +- std over
seeds. Each variant is compared with ``label_only`` by a paired hierarchical bootstrap
(seeds, then test examples within them; ``bootstrap.py``), which gives a 95% interval and
a p-value for the difference of accuracy; a variant's wins over ``label_only`` are counted
as they are and after Holm's correction across the settings compared. A missing cell
stays missing.
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


@dataclasses.dataclass
class CellResult:
    cell: Cell
    metrics: dict
    correct: dict[str, float]   # example id -> 1.0 if the prediction was right


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
    correct = {}
    with open(ppath, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.DictReader(f), start=2):
            try:
                correct[row["id"]] = float(int(row["gold"]) == int(row["predicted"]))
            except (KeyError, ValueError) as e:
                raise ConfigValueError(f"{ppath}:{lineno}: bad prediction row {row!r} ({e})") from e
    return CellResult(cell, metrics, correct)


def collect(sweep_dir: str, cell_list: Sequence[Cell]) -> dict[Cell, CellResult]:
    out = {}
    for c in cell_list:
        r = load_cell(sweep_dir, c)
        if r is not None:
            out[c] = r
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def build_tables(results: dict[Cell, CellResult], settings: Sequence[tuple[str, str]],
                 variants: Sequence[str], seeds: Sequence[int], n_boot: int = 2000,
                 alpha: float = bootstrap.ALPHA) -> dict:
    """Everything the report prints, as plain data."""
    tables = {m: {} for m in TABLE_METRICS}
    diffs: dict[str, dict] = {v: {} for v in variants if v != BASELINE}
    for s in settings:
        base = {k: results[c].correct for k in seeds
                if (c := Cell(s[0], s[1], BASELINE, k)) in results}
        for v in variants:
            runs = {k: results[c] for k in seeds if (c := Cell(s[0], s[1], v, k)) in results}
            for m in TABLE_METRICS:
                tables[m][(s, v)] = (mean_std([r.metrics.get(m) for r in runs.values()])
                                     if runs else None)
            if v != BASELINE:
                diffs[v][s] = bootstrap.paired_difference(
                    base, {k: r.correct for k, r in runs.items()}, n_boot, alpha=alpha)
    wins = {}
    for v, per in diffs.items():
        compared = [d for d in per.values() if d is not None]
        rejected, adjusted = bootstrap.holm([d["p_value"] for d in compared], alpha)
        for d, r, p in zip(compared, rejected, adjusted):
            d["p_holm"], d["significant_holm"] = p, r
        wins[v] = {"wins": sum(d["diff"] > 0 for d in compared),
                   "significant_wins": sum(d["ci_low"] > 0 for d in compared),
                   "holm_wins": sum(d["diff"] > 0 and d["significant_holm"] for d in compared),
                   "holm_losses": sum(d["diff"] < 0 and d["significant_holm"]
                                      for d in compared),
                   "compared": len(compared), "settings": len(settings)}
    return {"tables": tables, "diffs": diffs, "wins": wins, "alpha": alpha}


# ------------------------------------------------------------------ rendering
def _fmt(ms, digits=3):
    if ms is None:
        return "missing"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


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
    lines = [head, rule, *rows, "",
             f"Interval: {100 * (1 - alpha):.0f}% paired hierarchical bootstrap (seeds, then "
             f"examples within them); p: two-sided bootstrap p-value; * significant after "
             f"Holm's correction across the settings compared (family-wise {alpha:g}).", ""]
    for v in others:
        w = data["wins"][v]
        missing = (f"; {w['settings'] - w['compared']} of the {w['settings']} settings lack "
                   f"a run of either variant" if w["compared"] < w["settings"] else "")
        lines.append(f"- {v} beats {BASELINE} in {w['wins']}/{w['compared']} "
                     f"({w['holm_wins']} after correction; significantly worse in "
                     f"{w['holm_losses']} after correction{missing})")
    return "\n".join(lines)


def csv_rows(data: dict, settings, variants) -> list[dict]:
    rows = []
    for s in settings:
        for v in variants:
            row = {"source": s[0], "axis": s[1], "variant": v}
            for m in TABLE_METRICS:
                ms = data["tables"][m][(s, v)]
                row[f"{m}_mean"] = "" if ms is None else ms[0]
                row[f"{m}_std"] = "" if ms is None else ms[1]
            d = data["diffs"].get(v, {}).get(s)
            for k in ("diff", "ci_low", "ci_high", "p_value", "p_holm"):
                row[f"acc_{k}_vs_{BASELINE}"] = "" if d is None else d[k]
            rows.append(row)
    return rows
