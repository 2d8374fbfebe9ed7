"""What an evaluation and a probe write: metrics.json, predictions.csv, probe.json,
probe.csv and one PNG per probe metric. Every file is written atomically (process 0)."""

from __future__ import annotations

import csv
import io
import os
from typing import Sequence

import numpy as np

from xft_jax.eval.probe import METRICS, OUTLIER_K

TITLES = {
    "act_entropy": "Activation-energy entropy at the decision position",
    "act_entropy_norm": "Activation-energy entropy after the final RMS norm (decision position)",
    "act_entropy_trim": f"Activation-energy entropy without the top-{OUTLIER_K} units "
                        f"(decision position)",
    "act_outlier_share": f"Share of activation energy in the top-{OUTLIER_K} units "
                         f"(decision position)",
    "act_entropy_prompt": "Activation-energy entropy, mean over prompt positions",
    "act_entropy_prompt_norm": "Activation-energy entropy after the final RMS norm, "
                               "mean over prompt positions",
    "act_entropy_prompt_trim": f"Activation-energy entropy without the top-{OUTLIER_K} "
                               f"units, mean over prompt positions",
    "lens_entropy": "Logit lens: entropy over the full vocabulary",
    "lens_label_entropy": "Logit lens: entropy of the 5-label distribution",
    "lens_label_maxprob": "Logit lens: largest probability of the 5-label distribution",
    "lens_label_mass": "Logit lens: probability mass on the five label tokens (format)",
    "lens_gold_prob": "Logit lens: probability of the gold label token (full vocabulary)",
    "lens_gold_prob_labels": "Logit lens: gold label's probability among the five",
    "attn_entropy": "Attention entropy at the decision position, mean over heads",
}
_ENERGY = "p_i = h_i^2 / sum_j h_j^2 over the hidden units of the residual stream h"
CAPTIONS = {
    "act_entropy": f"Entropy of {_ENERGY}, at the decision position (the token the rating "
                   f"is read at); high = energy spread over many units.",
    "act_entropy_norm": "As act_entropy, on the final RMS norm's output g*h/rms(h) (what "
                        "the LM head reads); only the per-unit gain g can change it.",
    "act_entropy_trim": f"As act_entropy, with each vector's {OUTLIER_K} largest-energy "
                        f"units (outlier dimensions, chosen per vector) left out.",
    "act_outlier_share": f"Fraction of the decision position's energy in its "
                         f"{OUTLIER_K} largest units: how much outliers dominate "
                         f"act_entropy.",
    "act_entropy_prompt": "As act_entropy, averaged over every prompt token up to the "
                          "decision position instead of that one token.",
    "act_entropy_prompt_norm": "As act_entropy_norm, averaged over the prompt tokens.",
    "act_entropy_prompt_trim": "As act_entropy_trim, averaged over the prompt tokens.",
    "lens_entropy": "Entropy of the next-token distribution over the whole vocabulary when "
                    "the final norm and LM head read this layer (logit lens).",
    "lens_label_entropy": "Entropy of the five label tokens' lens probabilities "
                          "renormalised over the five (at most log 5 = 1.61 nats); the "
                          "last layer is the sharpness of the model's rating.",
    "lens_label_maxprob": "Largest of those five renormalised probabilities (0.2 = "
                          "uniform, 1 = certain).",
    "lens_label_mass": "Format: the lens's total probability on the five label tokens "
                       "(does the layer predict a rating token at all, whichever).",
    "lens_gold_prob": "Lens probability of the gold label token, over the full vocabulary.",
    "lens_gold_prob_labels": "Lens probability of the gold label among the five.",
    "attn_entropy": "Entropy of the decision position's attention over the tokens it "
                    "sees, mean over heads; layer l is the attention inside layer l.",
}
UNITS = {k: "entropy (nats)" for k in METRICS if "entropy" in k}
UNITS.update(act_outlier_share="fraction of energy (unitless)",
             **{k: "probability (unitless)" for k in METRICS if k.startswith("lens_")
                and "entropy" not in k})
X_LABEL = "layer (0 = embedding output, l = residual after layer l)"
X_LABEL_ATTN = "layer (attention inside layer l; starts at 1)"


def generation_summary(res: dict, gen: dict[str, dict]) -> dict:
    pred = res["log_probs"].argmax(1) + 1
    gold = res["label"] + 1
    parsed = [gen[i]["label"] for i in res["id"]]
    ok = np.array([p is not None for p in parsed])
    p = np.array([x if x is not None else -1 for x in parsed])
    n = len(parsed)
    return {"n": n, "parse_rate": float(ok.mean()),
            "agreement_with_scored": float(np.mean(p == pred)),
            "agreement_with_scored_when_parsed": float(np.mean(p[ok] == pred[ok])) if ok.any()
            else None,
            "accuracy": float(np.mean(p == gold))}


def predictions_csv(res: dict, gen: dict | None = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    head = ["id", "gold", "predicted"] + [f"p{k}" for k in range(1, 6)]
    if gen is not None:
        head += ["generated_label", "generated_text"]
    w.writerow(head)
    probs = np.exp(res["log_probs"])
    for i, name in enumerate(res["id"]):
        row = [name, int(res["label"][i]) + 1, int(probs[i].argmax()) + 1]
        row += [f"{p:.6g}" for p in probs[i]]
        if gen is not None:
            g = gen[name]
            row += ["" if g["label"] is None else g["label"], g["text"]]
        w.writerow(row)
    return buf.getvalue()


def probe_csv(runs: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "seed", "run", "layer", "metric", "mean", "std", "n"])
    for r in runs:
        name = r["model"].get("workdir") or r["model"].get("path")
        for k in METRICS:
            if k not in r["summary"]:
                continue
            s = r["summary"][k]
            for layer, (mu, sd) in enumerate(zip(s["mean"], s["std"])):
                w.writerow([r["variant"], r["seed"], name, layer, k,
                            "" if _nan(mu) else f"{mu:.8g}",
                            "" if _nan(sd) else f"{sd:.8g}", r["n"]])
    return buf.getvalue()


def _nan(x) -> bool:
    return x is None or np.isnan(x)


def curve_figure(metric: str, curves: dict, path: str, *, band: str = "seeds",
                 note: str = "") -> str:
    """One probe figure: ``curves`` {name: (mean [L+1], std [L+1], runs)} drawn in the
    variant's colour (the base grey and dashed), a +-1 std band where runs > 1, integer
    layer ticks; NaN layers (attention at 0) left out. Written atomically."""
    from matplotlib.ticker import MaxNLocator

    from xft_jax.figures import plt, variant_color

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (mu, sd, runs) in curves.items():
        mu = np.array(mu, np.float64)      # None (NaN in JSON) -> nan
        sd = np.array(sd, np.float64)
        x = np.arange(mu.size)
        ok = ~np.isnan(mu)
        base = name == "base"
        color = variant_color(name)
        label = (f"base (untuned, {runs} run{'s' if runs != 1 else ''})" if base else
                 f"{name} ({runs} {band if runs != 1 else band.rstrip('s')})")
        ax.plot(x[ok], mu[ok], color=color, ls="--" if base else "-",
                marker=None if base else "o", ms=3, lw=1.6 if base else 1.4, label=label,
                zorder=3 if base else 2)
        if runs > 1:
            ax.fill_between(x[ok], (mu - sd)[ok], (mu + sd)[ok], color=color, alpha=0.15,
                            lw=0)
    ax.set_xlabel(X_LABEL_ATTN if metric == "attn_entropy" else X_LABEL)
    ax.set_ylabel(UNITS[metric])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(TITLES[metric] + (f"\n{note}" if note else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".tmp_{name}")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def probe_plots(variants: dict, out_dir: str) -> list[str]:
    """One PNG per metric (mean over seeds, +-1 std band over seeds); returns the paths."""
    paths = []
    for k in METRICS:
        curves = {v: (d[k]["mean"], d[k]["std"], len(d["seeds"]))
                  for v, d in variants.items() if k in d}
        if curves:
            paths.append(curve_figure(k, curves, os.path.join(out_dir, f"probe_{k}.png"),
                                      note="mean over seeds of each run's mean over examples"))
    return paths
