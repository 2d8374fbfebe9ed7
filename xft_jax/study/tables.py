"""The paper's results tables from a sweep directory.

Rows are the source x axis settings, columns the target variants, cells mean +- std over
seeds. Each variant is compared with ``label_only`` by a paired bootstrap over test
examples (the same resampled examples for both variants and every seed), which gives a 95%
interval for the difference of seed-averaged accuracy. A missing cell stays missing.
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


def paired_bootstrap(base: list[dict[str, float]], other: list[dict[str, float]],
                     n_boot: int = 2000, seed: int = 0) -> dict | None:
    """Difference of seed-averaged accuracy (other - base) with a 95% percentile interval,
    resampling the examples common to every run of both variants."""
    if not base or not other:
        return None
    ids = sorted(set.intersection(*[set(r) for r in base + other]))
    if not ids:
        return None
    b = np.mean([[r[i] for i in ids] for r in base], axis=0)
    o = np.mean([[r[i] for i in ids] for r in other], axis=0)
    d = o - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    boot = d[idx].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "n_examples": len(ids), "n_seeds_base": len(base), "n_seeds_other": len(other)}


def build_tables(results: dict[Cell, CellResult], settings: Sequence[tuple[str, str]],
                 variants: Sequence[str], seeds: Sequence[int], n_boot: int = 2000) -> dict:
    """Everything the report prints, as plain data."""
    tables = {m: {} for m in TABLE_METRICS}
    diffs: dict[str, dict] = {v: {} for v in variants if v != BASELINE}
    for s in settings:
        for v in variants:
            runs = [results.get(Cell(s[0], s[1], v, k)) for k in seeds]
            runs = [r for r in runs if r is not None]
            for m in TABLE_METRICS:
                tables[m][(s, v)] = mean_std([r.metrics.get(m) for r in runs]) if runs else None
            if v != BASELINE:
                base = [results[c].correct for c in (Cell(s[0], s[1], BASELINE, k) for k in seeds)
                        if c in results]
                diffs[v][s] = paired_bootstrap(base, [r.correct for r in runs], n_boot)
    wins = {}
    for v, per in diffs.items():
        compared = [d for d in per.values() if d is not None]
        wins[v] = {"wins": sum(d["diff"] > 0 for d in compared),
                   "significant_wins": sum(d["ci_low"] > 0 for d in compared),
                   "compared": len(compared), "settings": len(settings)}
    return {"tables": tables, "diffs": diffs, "wins": wins}


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
        return "missing" if d is None else f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"

    rows = [f"| {s[0]} / {s[1]} | " + " | ".join(cell(data["diffs"][v].get(s)) for v in others)
            + " |" for s in settings]
    lines = [head, rule, *rows, ""]
    for v in others:
        w = data["wins"][v]
        lines.append(f"- {v} beats {BASELINE} in {w['wins']}/{w['settings']} settings "
                     f"({w['significant_wins']} with the 95% CI above zero; "
                     f"{w['compared']} settings had both variants)")
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
            for k in ("diff", "ci_low", "ci_high"):
                row[f"acc_{k}_vs_{BASELINE}"] = "" if d is None else d[k]
            rows.append(row)
    return rows
