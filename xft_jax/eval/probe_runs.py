"""Probe several runs (variants x seeds) and write probe.json, probe.csv and one PNG per
metric (metric vs layer, one curve per variant, mean over seeds with a +-1 std band).

Each run is probed on the same kind of data as its evaluation (``evaluation``); per run a
metric is first averaged over examples, then runs of one variant are averaged over seeds.
"""

from __future__ import annotations

import copy
import os
from typing import Sequence

import jax
import numpy as np

from xft_jax import atomic, console, sharding
from xft_jax.errors import ConfigValueError
from xft_jax.eval import batching, evaluation, outputs, probe



def probe_run(config, mesh) -> dict:
    """Loads the model named by ``config.model``, probes its eval data; returns the run's
    per-layer summary and identity."""
    loaded = evaluation.load_model(config.model, mesh)
    d = evaluation.resolve_data(config.data, loaded.run_config)
    bs = batching.batch_size_for(mesh, int(config.eval.batch_size))
    batches, data_info = evaluation.eval_batches(d, loaded.tokenizer, bs)
    m = loaded.model
    fn = probe.make_probe_fn(m.config, m.forward_options(), batches.label_token_ids,
                                 vocab_chunk=int(config.eval.vocab_chunk), mesh=mesh)
    bars = console.progress(batches, total=batches.num_batches, desc="probe")
    values = probe.run_probe(fn, m.params(), m.lora_params(), bars, bs, mesh)
    run = loaded.run_config
    acc = float(np.mean(values["log_probs"].argmax(1) == values["label"]))
    return {"model": loaded.info, "data": data_info, "n": int(values["label"].size),
            "num_layers": int(m.config.num_layers), "accuracy": acc,
            "variant": str(run.data.target) if run is not None else "base",
            "seed": int(run.train.seed) if run is not None else 0,
            "devices": jax.device_count(), "mesh": dict(mesh.shape),
            "summary": probe.summarize(values)}


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
        for k in probe.METRICS:
            per_seed = np.array([r["summary"][k]["mean"] for r in group], np.float64)
            out[variant][k] = {"mean": per_seed.mean(0).tolist(),
                               "std": per_seed.std(0).tolist()}
    return out


def run_probes(config, out_dir: str, workdirs: Sequence[str] = (),
               variants: Sequence[str] = ()) -> dict:
    """Probes each workdir (or ``config.model.path`` when none) and writes the outputs."""
    if variants and len(variants) != len(workdirs):
        raise ConfigValueError(f"--variants has {len(variants)} names for {len(workdirs)} "
                               f"workdirs")
    mesh = sharding.mesh_from_config(config.mesh)
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
    doc = {"runs": runs, "variants": aggregate(runs), "titles": outputs.TITLES}
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        atomic.write_json(os.path.join(out_dir, "probe.json"), doc, sort_keys=True)
        atomic.write_text(os.path.join(out_dir, "probe.csv"), outputs.probe_csv(runs))
        doc["plots"] = outputs.probe_plots(doc["variants"], out_dir)
    return doc
