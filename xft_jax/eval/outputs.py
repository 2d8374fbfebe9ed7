"""What an evaluation and a probe write: metrics.json, predictions.csv, probe.json,
probe.csv and one PNG per probe metric. Every file is written atomically (process 0)."""

from __future__ import annotations

import csv
import io
import os
from typing import Sequence

import numpy as np

from xft_jax.eval.probe import METRICS

TITLES = {
    "act_entropy": "activation-energy entropy at the decision position (nats)",
    "act_entropy_prompt": "activation-energy entropy, mean over prompt positions (nats)",
    "lens_entropy": "logit lens: entropy over the full vocabulary (nats)",
    "lens_label_entropy": "logit lens: entropy over the five label tokens (nats)",
    "lens_label_mass": "logit lens: probability mass on the five label tokens",
    "lens_gold_prob": "logit lens: probability of the gold label token",
    "lens_gold_prob_labels": "logit lens: gold label probability among the five",
    "attn_entropy": "attention entropy at the decision position, mean over heads (nats)",
}


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
            s = r["summary"][k]
            for layer, (mu, sd) in enumerate(zip(s["mean"], s["std"])):
                w.writerow([r["variant"], r["seed"], name, layer, k,
                            "" if np.isnan(mu) else f"{mu:.8g}",
                            "" if np.isnan(sd) else f"{sd:.8g}", r["n"]])
    return buf.getvalue()


def probe_plots(variants: dict, out_dir: str) -> list[str]:
    """One PNG per metric; returns the paths (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    for k in METRICS:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, v in variants.items():
            mu, sd = np.array(v[k]["mean"]), np.array(v[k]["std"])
            x = np.arange(mu.size)
            ok = ~np.isnan(mu)
            label = f"{variant} (n_seeds={len(v['seeds'])})"
            ax.plot(x[ok], mu[ok], marker="o", ms=3, label=label)
            if len(v["seeds"]) > 1:
                ax.fill_between(x[ok], (mu - sd)[ok], (mu + sd)[ok], alpha=0.2)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(TITLES[k], fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"probe_{k}.png")
        tmp = os.path.join(out_dir, f".tmp_probe_{k}.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, path)
        paths.append(path)
    return paths
