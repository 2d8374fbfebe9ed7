"""Layerwise probe main: activation / logit-lens / attention entropies per layer.

    python -m xft_jax.probe --config=configs/eval.py --out=/tmp/probe \
        --workdirs=/runs/label_only_s0,/runs/label_only_s1,/runs/explanation_s0
    python -m xft_jax.probe --config=configs/eval.py:coqa,on_topic --out=/tmp/probe \
        --config.model.path=/models/mistral-7b                # the untouched base

Runs are grouped by variant (the run's ``data.target`` unless ``--variants`` names them)
and averaged over seeds. Writes ``probe.json``, ``probe.csv`` and ``probe_<metric>.png``.
"""

from __future__ import annotations

from absl import flags, logging

from xft_jax import config_main, errors
from xft_jax.eval import probe_runs

_MAIN = config_main.ConfigMain("Eval config (configs/eval.py).", "out", "Output directory.")
_WORKDIRS = flags.DEFINE_list("workdirs", [], "Training runs to probe (default: "
                              "config.model.path / config.model.workdir alone).")
_VARIANTS = flags.DEFINE_list("variants", [], "Variant name per workdir (default: each "
                              "run's data.target).")


def main(argv):
    del argv
    config = _MAIN.start()
    out = _MAIN.directory.value
    doc = probe_runs.run_probes(config, out, _WORKDIRS.value, _VARIANTS.value)
    for r in doc["runs"]:
        logging.info("%s seed %d: n=%d accuracy=%.3f", r["variant"], r["seed"], r["n"],
                     r["accuracy"])
    print(f"wrote {out}/probe.json, probe.csv and {len(doc.get('plots', []))} plots")
    return 0


if __name__ == "__main__":
    errors.run_main(main)
