"""LoRA fine-tuning main.

    python -m xft_jax.train --config=configs/tiny.py --workdir=/tmp/run \
        [--config.train.steps=50 --config.data.target=label_only ...]

Restarting with the same --workdir resumes from its latest checkpoint. SIGTERM or Ctrl-C
saves a checkpoint and exits 0 (a second Ctrl-C stops at once). Multi-process: pass --coordinator/--num_processes/--process_id
(or run under SLURM / on a TPU pod, detected automatically); --platform=cpu uses gloo.
"""

from __future__ import annotations

import json
import os
import sys

from absl import logging

from xft_jax import config_main, errors
from xft_jax.training.trainer import NonFiniteError, train

_MAIN = config_main.ConfigMain("Training config file.", "workdir",
                               "Run directory (checkpoints, logs).")


def main(argv):
    del argv
    config = _MAIN.start()
    try:
        result = train(config, _MAIN.directory.value)
    except NonFiniteError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 3
    if result.status == "preempted":
        print(f"preempted: saved step {result.step}; rerun with the same --workdir to "
              f"resume", file=sys.stderr)
    else:
        print(finished_line(result), file=sys.stderr)
    return 0


def finished_line(result) -> str:
    """Where a finished run's results are, and its best validation accuracy."""
    wd = result.workdir
    state = "finished" if result.last_metrics else "already finished, nothing to do"
    line = f"{state}: step {result.step} in {wd} (metrics.jsonl, checkpoints/"
    try:
        with open(os.path.join(wd, "validation.json"), encoding="utf-8") as f:
            v = json.load(f)
        return (line + f", validation.json); best validation accuracy {v['best_accuracy']:.3f} "
                f"at step {v['best_step']}")
    except (OSError, ValueError, KeyError, TypeError):
        return line + ")"


if __name__ == "__main__":
    errors.run_main(main)
