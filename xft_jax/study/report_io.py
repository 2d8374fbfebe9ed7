"""Writes a study's report directory: Markdown, CSV and PNGs, each file atomically."""

from __future__ import annotations

import csv
import json
import os
from typing import Sequence

from xft_jax import atomic
from xft_jax.errors import MissingPathError
from xft_jax.study import plots, tables
from xft_jax.study.grid import cells


def grid_of(sweep_dir: str) -> dict:
    """The grid recorded by the sweep (sweep.json), so the report needs no flags."""
    path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.exists(path):
        raise MissingPathError(f"{path}: not found; pass the grid (sources, axes, variants, "
                               f"seeds) explicitly or run the sweep first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_report(sweep_dir: str, out_dir: str, sources: Sequence[str], axes: Sequence[str],
                 variants: Sequence[str], seeds: Sequence[int], n_boot: int = 2000,
                 probe_summary=None) -> str:
    """Builds every table and figure; returns the Markdown text (also written)."""
    os.makedirs(out_dir, exist_ok=True)
    settings = [(s, a) for s in sources for a in axes]
    results = tables.collect(sweep_dir, cells(sources, axes, variants, seeds))
    data = tables.build_tables(results, settings, variants, seeds, n_boot)
    parts = [f"# Results: {len(results)} of {len(settings) * len(variants) * len(seeds)} runs "
             f"found in {sweep_dir}", "",
             f"Seeds: {list(seeds)}. Cells: mean ± std over seeds; 'missing' = no finished run.",
             "", "## Accuracy", "", tables.markdown_table(data, "accuracy", settings, variants),
             "", f"## Accuracy difference to {tables.BASELINE} (paired hierarchical bootstrap, "
             f"Holm-corrected)", "",
             tables.markdown_diffs(data, settings, variants)]
    for m in tables.TABLE_METRICS[1:]:
        parts += ["", f"## {m}", "", tables.markdown_table(data, m, settings, variants)]
    plots.accuracy_bars(data, settings, variants, os.path.join(out_dir, "accuracy.png"))
    plots.difference_intervals(data, settings, variants, os.path.join(out_dir, "differences.png"))
    if probe_summary is not None:
        parts += ["", probe_summary(sweep_dir, out_dir, sources, axes, variants, seeds)]
    text = "\n".join(parts) + "\n"
    atomic.write_text(os.path.join(out_dir, "report.md"), text)
    rows = tables.csv_rows(data, settings, variants)
    with atomic.atomic_open(os.path.join(out_dir, "results.csv"), newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return text


__all__ = ["write_report", "grid_of"]
