"""Evaluation main: rating metrics of a run, a base model + PEFT adapter, or a merged model.

    python -m xft_jax.evaluate --config=configs/eval.py --out=/tmp/eval \
        --config.model.workdir=/tmp/run [--config.eval.generate=True]
    python -m xft_jax.evaluate --config=configs/eval.py:coqa,on_topic --out=/tmp/eval \
        --config.model.path=/models/mistral-7b [--config.model.adapter=/adapters/x]

Multi-process (a TPU pod, SLURM, or --coordinator/--num_processes/--process_id): every
process runs the same command; process 0 writes. Writes ``<out>/metrics.json``
(metrics, examples/s, what was loaded, the data) and
``<out>/predictions.csv`` (id, gold, predicted, p1..p5 [, generated label and text]).
"""

from __future__ import annotations

import json

from absl import flags, logging
from ml_collections import config_flags

from xft_jax import console, distributed, errors
from xft_jax.eval import evaluation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Eval config (configs/eval.py).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_DIST = distributed.define_flags()
flags.mark_flags_as_required(["config", "out"])

console.define_flags()


def main(argv):
    del argv
    console.start(_CONFIG)
    distributed.initialize_from_flags(_DIST)
    doc = evaluation.run_evaluation(_CONFIG.value, _OUT.value)
    m = doc["metrics"]
    logging.info("n=%d accuracy=%.4f qwk=%s macro_f1=%.4f ece=%.4f %.1f examples/s",
                 m["n"], m["accuracy"], m["qwk"], m["macro_f1"], m["ece"],
                 doc["timing"]["examples_per_s"])
    print(json.dumps({k: m[k] for k in ("n", "accuracy", "within1_accuracy", "macro_f1", "qwk",
                                        "mae", "spearman", "ece", "nll", "brier")}))
    if "generation" in doc:
        print(json.dumps({"generation": doc["generation"]}))
    return 0


if __name__ == "__main__":
    errors.run_main(main)
