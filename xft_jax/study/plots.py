"""PNG figures of a study: accuracy per setting and variant with its interval and the
majority-class rate, the differences to label_only with theirs, and the predicted-rating
distribution per variant. Every variant has its colour from ``xft_jax.figures``."""

from __future__ import annotations

import math
import textwrap

import numpy as np

from matplotlib.patches import Patch

from xft_jax.figures import plt, variant_color
from xft_jax.study.tables import BASELINE, RATINGS

MAJORITY_STYLE = {"color": "k", "ls": "--", "lw": 1.2}


def _label(s) -> str:
    return f"{s[0]}\n{s[1]}"


def _seeds_note(data: dict) -> str:
    n = len(data.get("seeds", []))
    return "1 seed: intervals cover test examples only" if n == 1 else f"{n} seeds"


def _title(text: str, width: int = 70) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _save(fig, path: str) -> None:
    """Saved with every label and the outside legend inside the image."""
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def accuracy_bars(data: dict, settings, variants, path: str) -> float:
    """Grouped bars of mean test accuracy with 95% hierarchical bootstrap intervals, the
    majority-class rate of each setting as a dashed line, and a y-range cut to the data
    so that differences of a few points show; missing cells are left empty, not zero.
    Returns where the y-axis starts (0.0 when it is not cut), for the text beside it."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(settings) * len(variants) + 1.5), 4.5))
    width = 0.8 / max(1, len(variants))
    x = np.arange(len(settings))
    lows, highs = [], []
    annotate = len(settings) * len(variants) <= 30
    for j, v in enumerate(variants):
        for i, s in enumerate(settings):
            ms = data["tables"]["accuracy"][(s, v)]
            if ms is None:
                continue
            xi = x[i] + (j - (len(variants) - 1) / 2) * width
            ci = data["acc_ci"].get((s, v))
            err = None if ci is None else [[max(0.0, ms[0] - ci[0])], [max(0.0, ci[1] - ms[0])]]
            ax.bar(xi, ms[0], width * 0.92, color=variant_color(v), yerr=err, capsize=3,
                   ecolor="0.2", label=v if i == 0 else None)
            lows.append(ms[0] if ci is None else ci[0])
            highs.append(ms[0] if ci is None else ci[1])
            if annotate:
                ax.annotate(f"{ms[0]:.3f}", (xi, ms[0] if ci is None else ci[1]),
                            xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7)
    for i, s in enumerate(settings):
        if (m := data["majority"].get(s)) is not None:
            ax.hlines(m, x[i] - 0.45, x[i] + 0.45, label="majority class" if i == 0 else None,
                      **MAJORITY_STYLE)
            lows.append(m)
            highs.append(m)
    bottom = 0.0
    if lows:
        lo, hi = min(lows), max(highs)
        pad = max(0.02, 0.15 * (hi - lo))
        bottom = max(0.0, lo - pad)
        ax.set_ylim(bottom, min(1.0, hi + 1.6 * pad))
    ax.set_xticks(x)
    ax.set_xticklabels([_label(s) for s in settings], fontsize=8)
    ax.set_ylabel("test accuracy (fraction of examples correct)")
    ax.set_title(_title(f"Test accuracy by target variant: mean, with 95% bootstrap CI over "
                        f"seeds and examples ({_seeds_note(data)})"
                        + (f"; y-axis starts at {bottom:.2f}" if bottom > 0 else "")),
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return bottom


def difference_intervals(data: dict, settings, variants, path: str) -> None:
    """Accuracy difference to label_only with its 95% interval, per setting and variant;
    filled markers stay significant after Holm's correction, open ones do not."""
    others = [v for v in variants if v != BASELINE]
    rows = [(s, v) for s in settings for v in others]
    fig, ax = plt.subplots(figsize=(7.5, max(2.8, 0.32 * len(rows) + 1.6)))
    span = [0.0]
    for y, (s, v) in enumerate(rows):
        d = data["diffs"][v].get(s)
        if d is None:
            ax.annotate("missing", (0, y), ha="center", va="center", fontsize=7, color="0.4")
            continue
        c = variant_color(v)
        ax.errorbar(d["diff"], y, xerr=[[d["diff"] - d["ci_low"]], [d["ci_high"] - d["diff"]]],
                    fmt="o", capsize=3, color=c, markersize=6,
                    markerfacecolor=c if d.get("significant_holm") else "white")
        span += [d["ci_low"], d["ci_high"]]
    ax.axvline(0.0, color="k", lw=0.8)
    lim = max(0.02, 1.15 * max(abs(x) for x in span))
    ax.set_xlim(-lim, lim)
    ax.set_ylim(max(len(rows), 1) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{s[0]}/{s[1]}: {v}" for s, v in rows], fontsize=7)
    for y, (_, v) in enumerate(rows):
        ax.get_yticklabels()[y].set_color(variant_color(v))
    ax.set_xlabel(f"accuracy difference to {BASELINE} (fraction of test examples;\n"
                  f"> 0: the variant is more accurate)")
    ax.set_title(_title(f"Accuracy difference to {BASELINE}: point estimate and 95% paired "
                        f"bootstrap CI (filled: significant after Holm's correction; open: "
                        f"not; {_seeds_note(data)})", 80), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def predicted_labels(data: dict, settings, variants, path: str) -> None:
    """Per setting, the share of predictions on each rating per variant (seeds pooled),
    with the test labels' shares as a black outline: a collapsed run shows as bars
    crowded onto one or two ratings."""
    shown = [s for s in settings if any(data["labels"].get((s, v)) is not None
                                        for v in variants)]
    if not shown:
        shown = list(settings[:1])
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 0.5, 3.2 * rows + 0.8),
                             squeeze=False, sharey=True)
    width = 0.8 / max(1, len(variants))
    x = np.arange(len(RATINGS))
    for ax, s in zip(axes.flat, shown):
        gold, flagged = None, []
        for j, v in enumerate(variants):
            cm = data["labels"].get((s, v))
            if cm is None:
                continue
            gold = cm.sum(1) / cm.sum()
            bad = any((s, v, k) in data["collapsed"] for k in data.get("seeds", []))
            flagged += [v] if bad else []
            ax.bar(x + (j - (len(variants) - 1) / 2) * width, cm.sum(0) / cm.sum(), width,
                   color=variant_color(v), hatch="///" if bad else None,
                   edgecolor="white" if bad else None)
        if gold is not None:
            ax.bar(x, gold, 0.86, fill=False, edgecolor="k", lw=1.2)
        ax.set_xticks(x)
        ax.set_xticklabels([str(r) for r in RATINGS])
        ax.set_xlabel("rating")
        ax.set_title(f"{s[0]} / {s[1]}" + (f"\ncollapsed (hatched): {', '.join(flagged)}"
                                           if flagged else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    top = max([b.get_height() for ax in axes.flat for b in ax.patches] or [1.0])
    axes.flat[0].set_ylim(0, min(1.02, 1.08 * top))       # shared by every panel
    proxies = [Patch(color=variant_color(v), label=v) for v in variants]
    proxies.append(Patch(fill=False, edgecolor="k", label="test labels"))
    if data["collapsed"]:
        proxies.append(Patch(facecolor="white", edgecolor="0.3", hatch="///",
                             label="collapsed run"))
    fig.legend(handles=proxies, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.9))
    for ax in axes[:, 0]:
        ax.set_ylabel("share of predictions")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(_title("Predicted rating distribution per variant (share of test "
                        "predictions, all seeds pooled; black outline: the test labels)",
                        60 * cols), fontsize=10)
    fig.tight_layout()
    _save(fig, path)
