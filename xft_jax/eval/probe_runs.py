"""Probe several runs (variants x seeds) and write probe.json, probe.csv and one PNG per
metric (metric vs layer, one curve per variant, mean over seeds with a +-1 std band).

Each run is probed on the same kind of data as its evaluation (``evaluation``); per run a
metric is first averaged over examples, then runs of one variant are averaged over seeds.
Each run also keeps its per-example middle-layer and last-layer values
(``probe.per_example``) for the paired test between variants. ``run_base_probe`` probes
the untuned base model, the reference curve of the study's probe figures.
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

BASE = "base"   # the variant name of the untuned base model


def probe_run(config, mesh) -> dict:
    """Loads the model named by ``config.model``, probes its eval data; returns the run's
    per-layer summary and identity."""
    loaded = evaluation.load_model(config.model, mesh)
    d = evaluation.resolve_data(config.data, loaded.run_config)
    # Powers-of-two widths for every probe, whatever the run padded to: the runs' probes
    # and the base's (their reference, which has no run config) pad alike, and a probe
    # is a batch or two, where finer widths would mostly add compiles.
    d.bucket_step = 0
    bs = batching.batch_size_for(mesh, int(config.eval.batch_size))
    batches, data_info = evaluation.eval_batches(d, loaded.tokenizer, bs)
    m = loaded.model
    fn = probe.make_probe_fn(m.config, m.forward_options(), batches.label_token_ids,
                                 vocab_chunk=int(config.eval.vocab_chunk), mesh=mesh)
    bars = console.progress(batches, total=batches.num_batches, desc="probe")
    values = probe.run_probe(fn, m.params(), m.lora_params(), bars, bs, mesh,
                             names=batches.example_ids)
    run = loaded.run_config
    acc = float(np.mean(values["log_probs"].argmax(1) == values["label"]))
    return {"model": loaded.info, "data": data_info, "n": int(values["label"].size),
            "num_layers": int(m.config.num_layers), "accuracy": acc,
            "variant": str(run.data.target) if run is not None else BASE,
            "seed": int(run.train.seed) if run is not None else 0,
            "devices": jax.device_count(), "mesh": dict(mesh.shape),
            "outlier_k": probe.OUTLIER_K, "summary": probe.summarize(values),
            "per_example": probe.per_example(values)}


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
            if not all(k in r["summary"] for r in group):   # a run probed before k existed
                continue
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
    return _write(runs, out_dir)


def run_base_probe(config, out_dir: str) -> dict:
    """Probes the untuned base named by ``config.model.path`` (no adapter, no workdir) on
    the eval data of ``config.data`` (an eval config, data.source / axis set as for the
    runs it is the reference of); writes ``out_dir/probe.json`` etc. with variant "base"."""
    mc = config.model
    if not mc.path or mc.workdir or mc.adapter:
        raise ConfigValueError(
            "the base probe needs config.model.path (the untuned base) and neither "
            f"config.model.workdir nor config.model.adapter (got path={mc.path!r}, "
            f"workdir={mc.workdir!r}, adapter={mc.adapter!r})")
    mesh = sharding.mesh_from_config(config.mesh)
    r = probe_run(config, mesh)
    r["variant"] = BASE
    return _write([r], out_dir)


def _write(runs: list[dict], out_dir: str) -> dict:
    doc = {"runs": runs, "variants": aggregate(runs), "titles": outputs.TITLES,
           "captions": outputs.CAPTIONS, "outlier_k": probe.OUTLIER_K}
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        atomic.write_json(os.path.join(out_dir, "probe.json"), doc, sort_keys=True)
        atomic.write_text(os.path.join(out_dir, "probe.csv"), outputs.probe_csv(runs))
        doc["plots"] = outputs.probe_plots(doc["variants"], out_dir)
    return doc
