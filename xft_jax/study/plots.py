"""PNG figures of a study: accuracy per setting and variant, difference CIs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from xft_jax.study.tables import BASELINE  # noqa: E402


def accuracy_bars(data: dict, settings, variants, path: str, metric: str = "accuracy") -> None:
    """Grouped bars (mean +- std over seeds); missing cells are left empty, not zero."""
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(settings) + 2), 4))
    width = 0.8 / max(1, len(variants))
    x = np.arange(len(settings))
    for j, v in enumerate(variants):
        means, stds, xs = [], [], []
        for i, s in enumerate(settings):
            ms = data["tables"][metric][(s, v)]
            if ms is not None:
                xs.append(x[i] + j * width)
                means.append(ms[0])
                stds.append(ms[1])
        ax.bar(xs, means, width, yerr=stds, label=v, capsize=2)
    ax.set_xticks(x + width * (len(variants) - 1) / 2)
    ax.set_xticklabels([f"{s[0]}\n{s[1]}" for s in settings], fontsize=7, rotation=45, ha="right")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def difference_intervals(data: dict, settings, variants, path: str) -> None:
    """Accuracy difference to label_only with its bootstrap 95% interval, per setting."""
    others = [v for v in variants if v != BASELINE]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.35 * len(settings) * max(1, len(others)) + 1)))
    y = 0
    ticks, labels = [], []
    for s in settings:
        for v in others:
            d = data["diffs"][v].get(s)
            if d is not None:
                ax.errorbar(d["diff"], y, xerr=[[d["diff"] - d["ci_low"]], [d["ci_high"] - d["diff"]]],
                            fmt="o", capsize=2, color=f"C{others.index(v)}")
            ticks.append(y)
            labels.append(f"{s[0]}/{s[1]} {v}")
            y += 1
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xlabel(f"accuracy difference to {BASELINE} (95% paired hierarchical bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
