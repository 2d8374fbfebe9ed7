"""The probe section of a study report: per-layer curves per variant over all settings with
the untuned base model as the reference curve, the output's 5-label sharpness beside its
label-token mass (format), middle-layer activation entropies, and each variant's paired
difference to label_only in the middle layers (hierarchical bootstrap over seeds, then
examples paired across the two variants; Holm-corrected across settings).

The base reference of a setting lives in ``base_probe_dir(sweep_dir, source, axis)``,
written by ``probe_runs.run_base_probe`` (the sweep runs ``base_probe_command``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Mapping, Sequence

import numpy as np

from xft_jax import atomic
from xft_jax.eval import outputs
from xft_jax.eval.evaluation import DATA_KEYS
from xft_jax.eval.probe import OUTLIER_K, middle_layers
from xft_jax.eval.probe_runs import BASE
from xft_jax.study import bootstrap
from xft_jax.study.grid import cells

BASELINE = "label_only"
CURVES = ("act_entropy", "act_entropy_norm", "act_entropy_trim", "act_outlier_share",
          "act_entropy_prompt", "lens_entropy", "lens_label_entropy", "lens_label_maxprob",
          "lens_label_mass", "attn_entropy")
# (where, metric, column name): the run-level table; "last" = the last layer (output).
COLUMNS = (("last", "lens_label_entropy", "output 5-label entropy (nats)"),
           ("last", "lens_label_maxprob", "output max label prob"),
           ("last", "lens_label_mass", "format: label-token mass"),
           ("middle", "act_entropy", "middle act. entropy (nats)"),
           ("middle", "act_entropy_norm", "middle, after RMS norm (nats)"),
           ("middle", "act_entropy_trim", f"middle, without top-{OUTLIER_K} units (nats)"))
# Differences to label_only tested per example: the paper's middle-layer claim on the raw,
# normed and outlier-free entropy (and over the prompt), and the output's sharpness.
PAIRED = (("middle", "act_entropy"), ("middle", "act_entropy_norm"),
          ("middle", "act_entropy_trim"), ("middle", "act_entropy_prompt"),
          ("last", "lens_label_entropy"))
N_BOOT = 2000
_BOOT_CELLS = 4_000_000      # resampled indices held at once (memory of one chunk)


def base_probe_dir(sweep_dir: str, source: str, axis: str) -> str:
    """Where the untuned base's probe of one setting is written and read."""
    return os.path.join(sweep_dir, source, axis, BASE, "probe")


_BASE_MODEL_KEYS = ("path", "tokenizer", "dtype", "compute_dtype", "quantization",
                    "quant_block", "quant_double", "quant_dq_block", "quant_lm_head")
BASE_DEFINITION = "definition.json"   # what a finished base probe ran under


def base_probe_settings(train: Mapping) -> dict:
    """``{"model.path": ..., "data.axis": ..., ...}``: the eval-config keys that point a
    probe at the untuned base of a setting, from one of its runs' resolved training config
    ``train`` (JSON-like): the same base, dtype, quantisation and test data (prompt room
    included) as the runs. Unset keys are left out; lists become tuples."""
    m, d = train["model"], train["data"]
    out = {}
    for section, keys, values in (("model", _BASE_MODEL_KEYS, m), ("data", DATA_KEYS, d)):
        for k in keys:
            v = values.get(k)
            if v is not None and v != "":
                out[f"{section}.{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def base_probe_command(sweep_dir: str, source: str, axis: str, train: Mapping,
                       python: str = sys.executable,
                       eval_config: str = "configs/eval.py") -> list[str]:
    """argv of ``xft_jax.probe`` on the untuned base of a setting (``base_probe_settings``
    as flags), for the sweep's subprocesses and job scripts."""
    args = [python, "-m", "xft_jax.probe", f"--config={eval_config}",
            f"--out={base_probe_dir(sweep_dir, source, axis)}"]
    for key, v in base_probe_settings(train).items():
        args.append(f"--config.{key}={v!r}" if isinstance(v, tuple) else f"--config.{key}={v}")
    return args


def base_probe_done(out_dir: str, definition) -> bool:
    """The base probe in ``out_dir`` finished under ``definition`` (any JSON value: the
    demo's probe config, the sweep's command line); run it again otherwise."""
    marker = os.path.join(out_dir, BASE_DEFINITION)
    if not (os.path.exists(marker) and os.path.exists(os.path.join(out_dir, "probe.json"))):
        return False
    with open(marker, encoding="utf-8") as f:
        return json.load(f) == definition


def record_base_probe(out_dir: str, definition) -> None:
    """Marks the base probe in ``out_dir`` finished under ``definition``."""
    atomic.write_json(os.path.join(out_dir, BASE_DEFINITION), definition)


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("runs", [])


def load_runs(sweep_dir: str, cell_list, settings) -> list[tuple[tuple, str, dict]]:
    """[(setting, variant, run)] of every probed cell, then the base of each setting."""
    out = [(c.setting, c.variant, r) for c in cell_list
           for r in _read(os.path.join(sweep_dir, c.rel, "probe", "probe.json"))]
    for s in settings:
        out += [(s, BASE, r) for r in _read(os.path.join(base_probe_dir(sweep_dir, *s),
                                                         "probe.json"))]
    return out


def run_value(run: dict, where: str, metric: str) -> float | None:
    """A run's mean over examples at the last layer, or over the middle layers."""
    s = run["summary"].get(metric)
    if s is None:
        return None
    mu = np.array(s["mean"], np.float64)
    v = mu[-1] if where == "last" else np.nanmean(mu[middle_layers(mu.size)])
    return None if np.isnan(v) else float(v)


def per_example_values(runs: Sequence[dict], where: str, metric: str) -> dict:
    """{seed: {example id: value}} from runs' ``per_example`` (runs without it skipped)."""
    out: dict[int, dict[str, float]] = {}
    for r in runs:
        pe = r.get("per_example")
        if pe and metric in pe.get(where, {}):
            out[int(r["seed"])] = dict(zip(pe["ids"], pe[where][metric]))
    return out


def paired_bootstrap(d: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``bootstrap.hierarchical_bootstrap`` of d [seeds, examples], drawn in chunks of
    replicates so that at most ``_BOOT_CELLS`` resampled indices are held at once."""
    step = max(1, _BOOT_CELLS // d.size)
    return np.concatenate([bootstrap.hierarchical_bootstrap(d, min(step, n_boot - i), seed + i)
                           for i in range(0, n_boot, step)])


def paired_test(base: Mapping[int, Mapping[str, float]],
                other: Mapping[int, Mapping[str, float]], n_boot: int = N_BOOT,
                seed: int = 0, alpha: float = bootstrap.ALPHA) -> dict | None:
    """``other - base`` of per-example values, paired by seed and example id as in
    ``bootstrap.paired_difference``, with its hierarchical bootstrap run in chunks of
    replicates (continuous values resample indices, [n_boot, seeds, examples] at once
    otherwise). None when nothing pairs up."""
    seeds = sorted(set(base) & set(other))
    if not seeds:
        return None
    ids = sorted(set.intersection(*[set(base[k]) for k in seeds],
                                  *[set(other[k]) for k in seeds]))
    if not ids:
        return None
    d = np.array([[other[k][i] - base[k][i] for i in ids] for k in seeds], np.float64)
    boot = paired_bootstrap(d, n_boot, seed)
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "p_value": bootstrap.two_sided_p(boot), "n_examples": len(ids),
            "n_seeds": len(seeds)}


def paired_differences(entries, settings, variants, n_boot: int = N_BOOT) -> dict:
    """{(variant, where, metric): {setting: test dict with 'p_holm', 'significant_holm'}}:
    Holm's correction across the settings of one variant and quantity."""
    out = {}
    for v in variants:
        if v == BASELINE:
            continue
        for where, metric in PAIRED:
            per = {}
            for s in settings:
                runs = lambda name: [r for st, n, r in entries if st == s and n == name]  # noqa: E731
                t = paired_test(per_example_values(runs(BASELINE), where, metric),
                                per_example_values(runs(v), where, metric), n_boot)
                if t is not None:
                    per[s] = t
            if per:
                rejected, adjusted = bootstrap.holm([t["p_value"] for t in per.values()])
                for t, rej, adj in zip(per.values(), rejected, adjusted):
                    t.update(p_holm=adj, significant_holm=rej)
            out[(v, where, metric)] = per
    return out


def _mean_std(values: Sequence[float | None]) -> str:
    vals = [x for x in values if x is not None]
    if not vals:
        return "missing"
    if len(vals) == 1:
        return f"{vals[0]:.4f} ± n/a (1 run)"
    return f"{np.mean(vals):.4f} ± {np.std(vals):.4f}"


def run_table(entries, names) -> list[str]:
    lines = ["| variant | runs | " + " | ".join(c[2] for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for name in names:
        runs = [r for _, n, r in entries if n == name]
        if not runs:
            lines.append(f"| {name} | 0 | " + " | ".join("missing" for _ in COLUMNS) + " |")
            continue
        cols = [_mean_std([run_value(r, w, m) for r in runs]) for w, m, _ in COLUMNS]
        label = f"{name} (untuned)" if name == BASE else name
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cols) + " |")
    return lines


def diff_table(diffs: dict, settings, variants) -> list[str]:
    others = [v for v in variants if v != BASELINE]
    head = [f"Δ {'middle' if w == 'middle' else 'output'} {m}" for w, m in PAIRED]
    lines = ["| setting | variant | " + " | ".join(head) + " |",
             "|---" * (len(PAIRED) + 2) + "|"]
    for s in settings:
        for v in others:
            cells_ = []
            for w, m in PAIRED:
                t = diffs.get((v, w, m), {}).get(s)
                cells_.append("n/a (no paired per-example values)" if t is None else
                              f"{t['diff']:+.4f} [{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] "
                              f"p={t['p_value']:.3f}{'*' if t['significant_holm'] else ''}")
            lines.append(f"| {s[0]} / {s[1]} | {v} − {BASELINE} | " + " | ".join(cells_)
                         + " |")
    return lines


def curves_of(entries, names, metric):
    """{name: (mean, std, runs)} over the runs of each name (variant or base)."""
    out = {}
    for name in names:
        arrs = [np.array(r["summary"][metric]["mean"], np.float64) for _, n, r in entries
                if n == name and metric in r["summary"]]
        if not arrs or len({a.size for a in arrs}) != 1:
            continue
        arr = np.stack(arrs)
        with warnings.catch_warnings():   # layers where a metric is undefined (NaN)
            warnings.simplefilter("ignore", RuntimeWarning)
            out[name] = (np.nanmean(arr, 0), np.nanstd(arr, 0), len(arr))
    return out


def summarize(sweep_dir: str, out_dir: str, sources: Sequence[str], axes: Sequence[str],
              variants: Sequence[str], seeds: Sequence[int]) -> str:
    settings = [(s, a) for s in sources for a in axes]
    entries = load_runs(sweep_dir, cells(sources, axes, variants, seeds), settings)
    if not [e for e in entries if e[1] != BASE]:
        return "## Probe\n\nNo probe.json found in any cell."
    names = list(variants) + ([BASE] if any(e[1] == BASE for e in entries) else [])
    depth = len(entries[0][2]["summary"]["act_entropy"]["mean"]) - 1   # decoder layers
    mid = middle_layers(depth + 1)
    base_note = ("the untuned base model is the grey dashed reference" if BASE in names
                 else "no base-model reference was probed "
                      f"({base_probe_dir(sweep_dir, '<source>', '<axis>')} is missing)")
    lines = ["## Probe", "",
             f"Per-layer quantities of the residual stream, the logit lens (final norm + LM "
             f"head read at every layer) and attention, at the decision position (the token "
             f"the rating is read at) on each run's test examples; {base_note}. Layer 0 is "
             f"the embedding output, layer {depth} the model's output. Middle layers: "
             f"{mid.start}–{mid.stop - 1} of {depth} (the middle third). Outlier "
             f"dimensions: each vector's {OUTLIER_K} largest-energy units, chosen per "
             f"vector (no variant or label involved).", "",
             "### Output sharpness, format and middle-layer activation entropy", "",
             "Mean ± std over probed runs (seeds × settings) of each run's mean over "
             "examples. Sharpness is the 5-label distribution (the five label tokens' "
             "probabilities renormalised; entropy at most log 5 = 1.609 nats, max prob at "
             "least 0.2); the format column is the full-vocabulary mass on those tokens, "
             "which any fine-tuned model drives to ~1.", ""]
    lines += run_table(entries, names)
    diffs = paired_differences(entries, settings, variants)
    lines += ["", f"### Paired differences to {BASELINE}", "",
              f"Per setting: variant − {BASELINE} of per-example values (the mean over the "
              f"middle layers, or the output layer's value), 95% paired hierarchical "
              f"bootstrap interval ({N_BOOT} replicates: seeds, then examples within them, "
              f"paired across the two variants) and two-sided p; * significant after "
              f"Holm's correction across settings (family-wise {bootstrap.ALPHA:g}).", ""]
    lines += diff_table(diffs, settings, variants)
    lines += ["", "### Curves", "",
              "Mean over runs; band ±1 std over runs (seeds × settings) where there are "
              "several.", ""]
    for k in CURVES:
        curves = curves_of(entries, names, k)
        if not curves:
            continue
        outputs.curve_figure(k, curves, os.path.join(out_dir, f"probe_{k}.png"), band="runs",
                             note="mean over runs; band ±1 std over runs")
        lines += [f"![{k}](probe_{k}.png)", "", f"*{k}*: {outputs.CAPTIONS[k]}", ""]
    return "\n".join(lines).rstrip()
