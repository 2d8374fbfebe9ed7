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

from absl import logging

from xft_jax import config_main, errors
from xft_jax.eval import evaluation

_MAIN = config_main.ConfigMain("Eval config (configs/eval.py).", "out", "Output directory.")


def main(argv):
    del argv
    config = _MAIN.start()
    doc = evaluation.run_evaluation(config, _MAIN.directory.value)
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
