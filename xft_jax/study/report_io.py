"""Writes a study's report directory: Markdown, CSV and PNGs, each file atomically.

report.md opens with a plain-language summary generated from the numbers (what differs
from label_only after correction and what does not, the majority-class baseline, collapsed
runs), then the tables, the figures, the predicted labels and confusion matrices, and the
baselines and timing. The same report comes from ``python -m xft_jax.report`` and from the
demo: the demo records its wall time in ``<sweep_dir>/timing.json`` (``record_timing``).
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Sequence

import numpy as np

from xft_jax import atomic
from xft_jax.errors import ConfigValueError, MissingPathError
from xft_jax.study import plots, tables
from xft_jax.study.grid import cells
from xft_jax.training import selection

TIMING_FILE = "timing.json"
FIGURES = (("accuracy.png", "Test accuracy per setting and variant"),
           ("differences.png", f"Accuracy difference to {tables.BASELINE}"),
           ("predicted_labels.png", "Predicted rating distribution per variant"))
MAX_CONFUSION_INLINE = 12   # more matrices than this go to confusion.md
MAX_STEPS_LISTED = 12


def grid_of(sweep_dir: str) -> dict:
    """The grid recorded by the sweep (sweep.json), so the report needs no flags."""
    path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.exists(path):
        raise MissingPathError(f"{path}: not found; pass the grid (sources, axes, variants, "
                               f"seeds) explicitly or run the sweep first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ConfigValueError(f"{path}: not valid JSON ({e})") from e


# ------------------------------------------------------------ baselines and timing
def majority_rates(sweep_dir: str, cell_list) -> dict[str, float]:
    """Majority-class rate of each axis's evaluated examples (from gold_distribution)."""
    rates = {}
    for cell in cell_list:
        path = os.path.join(sweep_dir, cell.rel, "eval", "metrics.json")
        if os.path.exists(path) and cell.axis not in rates:
            doc = _read_json(path)
            m = doc.get("metrics", doc)
            if m.get("gold_distribution"):
                rates[cell.axis] = float(max(m["gold_distribution"]))
    return rates


def selected_steps(sweep_dir: str, cell_list) -> list[str]:
    """One line per run: the step selected on validation and its validation accuracy."""
    out = []
    for cell in cell_list:
        doc = selection.read(os.path.join(sweep_dir, cell.rel, "train"))
        if doc is not None and doc.get("best_step") is not None:
            out.append(f"{cell.variant} seed {cell.seed}: step {doc['best_step']} of "
                       f"{doc['curve'][-1]['step']} (validation accuracy "
                       f"{doc['best_accuracy']:.3f})")
    return out


def record_timing(sweep_dir: str, cell_list, started: float, pretrain_s: float,
                  base_dir: str | None = None) -> dict:
    """Appends this invocation's wall time to ``<sweep_dir>/timing.json``: how long it
    took, how many runs it trained (evaluated since ``started``) and whether the grid was
    then complete. Earlier entries are kept, so a re-run that reuses every run does not
    replace the time the study took."""
    path = os.path.join(sweep_dir, TIMING_FILE)
    doc = _read_json(path) if os.path.exists(path) else {}
    entries = list(doc.get("invocations", []))
    done = [c for c in cell_list
            if os.path.exists(os.path.join(sweep_dir, c.rel, "eval", "predictions.csv"))]
    ran = [c for c in done if os.path.getmtime(
        os.path.join(sweep_dir, c.rel, "eval", "predictions.csv")) >= started - 1.0]
    entries.append({"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                    "wall_s": time.time() - started, "pretrain_s": float(pretrain_s),
                    "runs_trained": len(ran), "runs": len(cell_list),
                    "complete": len(done) == len(cell_list)})
    first = next((i for i, e in enumerate(entries) if e["complete"]), None)
    keep = 20       # the entries up to the first complete one, and the latest others
    if len(entries) > keep:
        head = entries[: (first + 1) if first is not None else 0][:keep // 2]
        entries = head + entries[len(head):][-(keep - len(head)):]
    doc = {"invocations": entries, "base_model": base_dir or doc.get("base_model")}
    atomic.write_json(path, doc)
    return doc


def timing_lines(sweep_dir: str) -> list[str]:
    """The base model's pre-training and the wall time of the run that completed the
    grid (and of the latest re-run, when there was one), from ``TIMING_FILE``."""
    path = os.path.join(sweep_dir, TIMING_FILE)
    if not os.path.exists(path):
        return []
    doc = _read_json(path)
    entries = doc.get("invocations") or []
    lines = []
    base = doc.get("base_model")
    pre_path = os.path.join(base, "pretrain.json") if base else None
    if pre_path and os.path.exists(pre_path):
        pre = _read_json(pre_path)
        steps = (pre.get("recipe") or {}).get("steps")
        lines.append(f"- base model pre-training: LM loss {pre['first_loss']:.2f} -> "
                     f"{pre['last_loss']:.2f} ({steps} steps, {pre.get('seconds', 0):.0f} s "
                     f"when it ran; cached after the first run)")
    first = next((i for i, e in enumerate(entries) if e.get("complete")), None)
    if first is None:
        if entries:
            e = entries[-1]
            lines.append(f"- wall time: the grid is not complete yet (latest invocation "
                         f"{e['wall_s']:.0f} s, {e['runs_trained']} of {e['runs']} runs "
                         f"trained)")
        return lines
    used = entries[: first + 1]
    over = f", over {len(used)} invocations" if len(used) > 1 else ""
    lines.append(f"- wall time of the demo that completed the grid: "
                 f"{sum(e['wall_s'] for e in used):.0f} s up to the report (base model "
                 f"pre-training or cache check {sum(e['pretrain_s'] for e in used):.0f} s; "
                 f"{sum(e['runs_trained'] for e in used)} of {used[-1]['runs']} runs "
                 f"trained{over}; started {used[0]['started']})")
    if len(entries) > first + 1:
        e = entries[-1]
        lines.append(f"- latest re-run ({e['started']}): {e['wall_s']:.0f} s, "
                     f"{e['runs_trained']} of {e['runs']} runs trained, the rest reused")
    return lines


def baselines_and_timing(sweep_dir: str, cell_list, data: dict, settings) -> str:
    """The "Baselines and timing" section: majority-class rates, the checkpoints scored,
    the base model's pre-training and the wall time (when the demo recorded them)."""
    one_source = len({s[0] for s in settings}) == 1
    lines = ["## Baselines and timing", ""]
    for s in settings:
        if (m := data["majority"].get(s)) is not None:
            where = s[1] if one_source else f"{s[0]}/{s[1]}"
            lines.append(f"- majority-class rate on the evaluated {where} examples: {m:.3f} "
                         f"(accuracy of always predicting the most common test rating)")
    steps = selected_steps(sweep_dir, cell_list)
    if len(steps) > MAX_STEPS_LISTED:
        lines.append(f"- checkpoints scored on test, selected by validation accuracy: "
                     f"{len(steps)} runs (each run's train/{selection.VALIDATION_FILE})")
    elif steps:
        lines.append("- checkpoints scored on test, selected by validation accuracy: "
                     + "; ".join(steps))
    lines += timing_lines(sweep_dir)
    return "\n".join(lines)


# ------------------------------------------------------------------ summary
def _names(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "none"


def summary(data: dict, settings, variants, found: int, expected: int) -> str:
    """A plain-language account of what the numbers show, generated from them."""
    seeds = data["seeds"]
    alpha = data["alpha"]
    lines = ["## Summary", ""]
    seed_note = ("one seed, so there is no seed-to-seed spread (std n/a) and the intervals "
                 "cover test-example sampling only" if len(seeds) == 1
                 else f"{len(seeds)} seeds; intervals resample seeds, then test examples")
    lines.append(f"- {found} of {expected} runs found; {seed_note}.")
    maj = [data["majority"][s] for s in settings if s in data["majority"]]
    if maj:
        rng = f"{maj[0]:.3f}" if len(maj) == 1 else f"{min(maj):.3f}-{max(maj):.3f}"
        lines.append(f"- Majority-class baseline (always the most common test rating): "
                     f"{rng}.")
    accs = []
    for v in variants:
        vals = [ms[0] for s in settings if (ms := data["tables"]["accuracy"][(s, v)])]
        if vals:
            accs.append(f"{v} {np.mean(vals):.3f}")
    if accs:
        over = " (mean over settings)" if len(settings) > 1 else ""
        lines.append(f"- Test accuracy{over}: " + ", ".join(accs) + ".")
    near = []
    for s in settings:
        m = data["majority"].get(s)
        for v in variants:
            ci = data["acc_ci"].get((s, v))
            if m is not None and ci is not None and ci[0] <= m:
                near.append(f"{v} ({s[0]}/{s[1]})" if len(settings) > 1 else v)
    if near:
        lines.append(f"- Not clearly above the majority-class baseline (95% CI reaches it): "
                     f"{_names(near)}.")
    level = f"{100 * (1 - alpha):.0f}%"
    diff_v, same_v = [], []
    for v in variants:
        if v == tables.BASELINE:
            continue
        per = [(s, d) for s in settings if (d := data["diffs"][v].get(s)) is not None]
        if not per:
            continue
        hits = [d for _, d in per if tables.differs(d)]
        if len(per) == 1:           # one setting: the interval itself
            (diff_v if hits else same_v).append(f"{v} {tables.fmt_diff(per[0][1])}")
            continue
        if hits:
            up = sum(d["diff"] > 0 for d in hits)
            way = "higher" if up == len(hits) else "lower" if not up else "higher or lower"
            lo, hi = min(d["diff"] for d in hits), max(d["diff"] for d in hits)
            diff_v.append(f"{v} {way} in {len(hits)}/{len(per)} settings "
                          f"(by {lo:+.3f} to {hi:+.3f})")
        if len(hits) < len(per):
            same_v.append(f"{v} in {len(per) - len(hits)}/{len(per)} settings")
    if diff_v or same_v:
        lines.append(f"- Differs from {tables.BASELINE} ({level} CI excludes zero and "
                     f"significant after Holm's correction across settings): "
                     f"{_names(diff_v)}.")
        lines.append(f"- No difference from {tables.BASELINE} shown (CI includes zero, or "
                     f"not significant after correction): {_names(same_v)}.")
    lines.append(collapse_line(data, settings, variants))
    lines.append(f"- Collapse rule: {tables.COLLAPSE_RULE}.")
    return "\n".join(lines)


def _collapse_text(key, c, settings) -> str:
    (s, v, k) = key
    where = f" ({s[0]}/{s[1]})" if len(settings) > 1 else ""
    which = " and ".join(map(str, c["ratings"]))
    return (f"{v} seed {k}{where}: {100 * c['share']:.0f}% of predictions on "
            f"rating{'s' if len(c['ratings']) > 1 else ''} {which} (test labels: "
            f"{100 * c['gold_share']:.0f}%)")


def collapse_line(data: dict, settings, variants, max_listed: int = 3) -> str:
    """The collapsed runs, each named when few, else counted per variant."""
    bad = data["collapsed"]
    if not bad:
        return "- No run collapsed onto one or two ratings."
    if len(bad) <= max_listed:
        order = {v: i for i, v in enumerate(variants)}
        parts = [_collapse_text(key, bad[key], settings) for key in sorted(
            bad, key=lambda key: (settings.index(key[0]), order.get(key[1], 0), key[2]))]
    else:
        parts = []
        for v in variants:
            keys = sorted(key for key in bad if key[1] == v)
            if keys:
                runs = sum(1 for s in settings for k in data["seeds"]
                           if data["labels"].get((s, v)) is not None)
                worst = max(keys, key=lambda key: bad[key]["share"])
                parts.append(f"{v} in {len(keys)} of its {runs} runs (e.g. "
                             f"{_collapse_text(worst, bad[worst], settings)})")
    return (f"- Collapse warning: {'; '.join(parts)}. A collapsed run's accuracy mostly "
            f"reflects how often the test set has those ratings.")


# ------------------------------------------------------------------ the report
def write_report(sweep_dir: str, out_dir: str, sources: Sequence[str], axes: Sequence[str],
                 variants: Sequence[str], seeds: Sequence[int], n_boot: int = 2000,
                 probe_summary=None) -> str:
    """Builds every table and figure; returns the Markdown text (also written)."""
    os.makedirs(out_dir, exist_ok=True)
    settings = [(s, a) for s in sources for a in axes]
    cell_list = cells(sources, axes, variants, seeds)
    results = tables.collect(sweep_dir, cell_list)
    data = tables.build_tables(results, settings, variants, seeds, n_boot)
    expected = len(settings) * len(variants) * len(seeds)
    figs = {name: f"![{title}]({name})" for name, title in FIGURES}
    bottom = plots.accuracy_bars(data, settings, variants, os.path.join(out_dir, "accuracy.png"))
    plots.difference_intervals(data, settings, variants, os.path.join(out_dir, "differences.png"))
    plots.predicted_labels(data, settings, variants,
                           os.path.join(out_dir, "predicted_labels.png"))
    parts = [f"# Results: {len(results)} of {expected} runs found in {sweep_dir}", "",
             summary(data, settings, variants, len(results), expected), "",
             "## Accuracy", "",
             f"Seeds: {list(seeds)}. Cells: mean ± std over seeds; 'missing' = no finished "
             f"run. The 95% intervals of each cell (bootstrap over seeds and test examples) "
             f"are drawn below and listed in results.csv.", "",
             tables.markdown_table(data, "accuracy", settings, variants), "",
             figs["accuracy.png"], "",
             "Dashed line: the majority-class rate; " + (
                 f"the y-axis starts at {bottom:.2f}, not 0, so bar heights are not "
                 f"proportional to accuracy." if bottom > 0 else "the y-axis starts at 0."),
             "",
             f"## Accuracy difference to {tables.BASELINE} (paired hierarchical bootstrap, "
             f"Holm-corrected)", "",
             tables.markdown_diffs(data, settings, variants), "", figs["differences.png"],
             "", "## Predicted labels", "",
             f"Share of each run's test predictions on each rating (1-5), seeds pooled, "
             f"under the test labels' own shares. Collapse rule: {tables.COLLAPSE_RULE}.",
             "", tables.markdown_predicted(data, settings, variants), "",
             figs["predicted_labels.png"], ""]
    matrices = [tables.markdown_confusion(data, s, v) for s in settings for v in variants
                if data["labels"].get((s, v)) is not None]
    parts += ["## Confusion matrices", "",
              "Rows: the gold rating; columns: the predicted one; counts over all seeds.", ""]
    if len(matrices) <= MAX_CONFUSION_INLINE:
        parts += ["\n\n".join(matrices) if matrices else "No finished runs."]
    else:
        atomic.write_text(os.path.join(out_dir, "confusion.md"),
                          "# Confusion matrices\n\n" + "\n\n".join(matrices) + "\n")
        parts += [f"{len(matrices)} matrices: see [confusion.md](confusion.md)."]
    for m in tables.TABLE_METRICS[1:]:
        parts += ["", f"## {m}", "", tables.markdown_table(data, m, settings, variants)]
    parts += ["", baselines_and_timing(sweep_dir, cell_list, data, settings)]
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


__all__ = ["write_report", "grid_of", "record_timing", "majority_rates", "selected_steps",
           "baselines_and_timing", "summary", "TIMING_FILE"]
