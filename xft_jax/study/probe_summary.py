"""The probe section of a study report: per-layer curves per variant over all settings,
and the paper's two internal quantities side by side — activation entropy in the middle
layers and the output layer's probability mass on the label tokens."""

from __future__ import annotations

import json
import os
import warnings
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from xft_jax.study.grid import cells  # noqa: E402

CURVES = ("act_entropy", "act_entropy_prompt", "lens_entropy", "lens_label_mass",
          "attn_entropy")


def load_curves(sweep_dir: str, cell_list) -> dict[str, dict[str, list[np.ndarray]]]:
    """{variant: {metric: [per-layer curve of each probed cell]}}."""
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    for c in cell_list:
        path = os.path.join(sweep_dir, c.rel, "probe", "probe.json")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        for run in doc["runs"]:
            per = out.setdefault(c.variant, {})
            for k, v in run["summary"].items():
                per.setdefault(k, []).append(np.asarray(v["mean"], np.float64))
    return out


def middle_layers(num_points: int) -> slice:
    """The middle third of the decoder layers (index 0 is the embedding output)."""
    n = num_points - 1
    return slice(1 + n // 3, 1 + max(n // 3 + 1, 2 * n // 3))


def summarize(sweep_dir: str, out_dir: str, sources: Sequence[str], axes: Sequence[str],
              variants: Sequence[str], seeds: Sequence[int]) -> str:
    curves = load_curves(sweep_dir, cells(sources, axes, variants, seeds))
    if not curves:
        return "## Probe\n\nNo probe.json found in any cell."
    lines = ["## Probe (mean ± std over probed runs)", "",
             "| variant | runs | middle-layer activation entropy | output label mass | "
             "output label entropy |", "|---|---|---|---|---|"]
    for v in variants:
        per = curves.get(v)
        if not per:
            lines.append(f"| {v} | 0 | missing | missing | missing |")
            continue
        act = np.stack(per["act_entropy"])
        mid = act[:, middle_layers(act.shape[1])].mean(axis=1)
        mass = np.stack(per["lens_label_mass"])[:, -1]
        lab_ent = np.stack(per["lens_label_entropy"])[:, -1]
        fmt = lambda a: f"{a.mean():.4f} ± {a.std():.4f}"  # noqa: E731
        lines.append(f"| {v} | {len(act)} | {fmt(mid)} | {fmt(mass)} | {fmt(lab_ent)} |")
    for k in CURVES:
        fig, ax = plt.subplots(figsize=(6, 4))
        for v in variants:
            if v not in curves or k not in curves[v]:
                continue
            arr = np.stack(curves[v][k])
            x = np.arange(arr.shape[1])
            with warnings.catch_warnings():  # layers where a metric is undefined (NaN)
                warnings.simplefilter("ignore", RuntimeWarning)
                mu, sd = np.nanmean(arr, 0), np.nanstd(arr, 0)
            ok = ~np.isnan(mu)
            ax.plot(x[ok], mu[ok], marker="o", ms=3, label=f"{v} (n={len(arr)})")
            ax.fill_between(x[ok], (mu - sd)[ok], (mu + sd)[ok], alpha=0.2)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_title(k)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"probe_{k}.png"), dpi=120)
        plt.close(fig)
        lines.append("")
        lines.append(f"![{k}](probe_{k}.png)")
    return "\n".join(lines)
