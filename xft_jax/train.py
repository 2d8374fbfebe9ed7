"""LoRA fine-tuning main.

    python -m xft_jax.train --config=configs/tiny.py --workdir=/tmp/run \
        [--config.train.steps=50 --config.data.target=label_only ...]

Restarting with the same --workdir resumes from its latest checkpoint. SIGTERM saves a
checkpoint and exits 0. Multi-process: pass --coordinator/--num_processes/--process_id
(or run under SLURM / on a TPU pod, detected automatically); --platform=cpu uses gloo.
"""

from __future__ import annotations

import sys

from absl import flags, logging
from ml_collections import config_flags

from xft_jax import distributed, errors
from xft_jax.training.trainer import NonFiniteError, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")
_DIST = distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:   # orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    distributed.initialize_from_flags(_DIST)
    try:
        result = train(_CONFIG.value, _WORKDIR.value)
    except NonFiniteError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 3
    if result.status == "preempted":
        print(f"preempted: saved step {result.step}; rerun with the same --workdir to "
              f"resume", file=sys.stderr)
    return 0


if __name__ == "__main__":
    errors.run_main(main)
