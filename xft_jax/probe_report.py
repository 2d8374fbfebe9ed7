"""Probe several runs (variants x seeds) and write probe.json, probe.csv and one PNG per
metric (metric vs layer, one curve per variant, mean over seeds with a +-1 std band).

Each run is probed on the same kind of data as its evaluation (``eval_lib``); per run a
metric is first averaged over examples, then runs of one variant are averaged over seeds.
"""

from __future__ import annotations

import copy
import csv
import io
import os
from typing import Sequence

import jax
import numpy as np

from xft_jax.errors import ConfigValueError
from xft_jax import console, eval_lib, probe_lib, scoring

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


def probe_run(config, mesh) -> dict:
    """Loads the model named by ``config.model``, probes its eval data; returns the run's
    per-layer summary and identity."""
    loaded = eval_lib.load_model(config.model, mesh)
    d = eval_lib.resolve_data(config.data, loaded.run_config)
    bs = scoring.batch_size_for(mesh, int(config.eval.batch_size))
    batches, data_info = eval_lib.eval_batches(d, loaded.tokenizer, bs)
    m = loaded.model
    fn = probe_lib.make_probe_fn(m.config, m.forward_options(), batches.label_token_ids,
                                 vocab_chunk=int(config.eval.vocab_chunk), mesh=mesh)
    bars = console.progress(batches, total=batches.num_batches, desc="probe")
    values = probe_lib.run_probe(fn, m.params(), m.lora_params(), bars, bs, mesh)
    run = loaded.run_config
    acc = float(np.mean(values["log_probs"].argmax(1) == values["label"]))
    return {"model": loaded.info, "data": data_info, "n": int(values["label"].size),
            "num_layers": int(m.config.num_layers), "accuracy": acc,
            "variant": str(run.data.target) if run is not None else "base",
            "seed": int(run.train.seed) if run is not None else 0,
            "devices": jax.device_count(), "mesh": dict(mesh.shape),
            "summary": probe_lib.summarize(values)}


def aggregate(runs: Sequence[dict]) -> dict:
    """{variant: {metric: {'mean','std' over seeds, 'seeds'}}} from per-run means."""
    out: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        group = [r for r in runs if r["variant"] == variant]
        depth = {r["num_layers"] for r in group}
        if len(depth) != 1:
            raise ValueError(f"variant {variant!r}: runs have different depths {sorted(depth)}")
        out[variant] = {"seeds": [r["seed"] for r in group],
                        "accuracy": float(np.mean([r["accuracy"] for r in group]))}
        for k in probe_lib.METRICS:
            per_seed = np.array([r["summary"][k]["mean"] for r in group], np.float64)
            out[variant][k] = {"mean": per_seed.mean(0).tolist(),
                               "std": per_seed.std(0).tolist()}
    return out


def to_csv(runs: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "seed", "run", "layer", "metric", "mean", "std", "n"])
    for r in runs:
        name = r["model"].get("workdir") or r["model"].get("path")
        for k in probe_lib.METRICS:
            s = r["summary"][k]
            for layer, (mu, sd) in enumerate(zip(s["mean"], s["std"])):
                w.writerow([r["variant"], r["seed"], name, layer, k,
                            "" if np.isnan(mu) else f"{mu:.8g}",
                            "" if np.isnan(sd) else f"{sd:.8g}", r["n"]])
    return buf.getvalue()


def plot(variants: dict, out_dir: str) -> list[str]:
    """One PNG per metric; returns the paths (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    for k in probe_lib.METRICS:
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


def run_probes(config, out_dir: str, workdirs: Sequence[str] = (),
               variants: Sequence[str] = ()) -> dict:
    """Probes each workdir (or ``config.model.path`` when none) and writes the outputs."""
    if variants and len(variants) != len(workdirs):
        raise ConfigValueError(f"--variants has {len(variants)} names for {len(workdirs)} workdirs")
    mesh = eval_lib.make_mesh(config)
    runs = []
    for i, wd in enumerate(workdirs or [None]):
        c = copy.deepcopy(config)
        if wd is not None:
            with c.unlocked():
                c.model.workdir, c.model.path = wd, ""
        r = probe_run(c, mesh)
        if variants:
            r["variant"] = variants[i]
        runs.append(r)
    doc = {"runs": runs, "variants": aggregate(runs), "titles": TITLES}
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        eval_lib.write_json(os.path.join(out_dir, "probe.json"), doc)
        eval_lib.atomic_write(os.path.join(out_dir, "probe.csv"), to_csv(runs))
        doc["plots"] = plot(doc["variants"], out_dir)
    return doc
