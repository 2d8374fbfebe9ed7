"""LoRA fine-tuning main.

    python -m xft_jax.train --config=configs/tiny.py --workdir=/tmp/run \
        [--config.train.steps=50 --config.data.target=label_only ...]

Restarting with the same --workdir resumes from its latest checkpoint. SIGTERM saves a
checkpoint and exits 0. Multi-process: pass --coordinator/--num_processes/--process_id
(or run under SLURM / on a TPU pod, detected automatically); --platform=cpu uses gloo.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")
_PLATFORM = flags.DEFINE_string("platform", None, "'cpu' for gloo CPU collectives.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "CPU devices per process.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:   # orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    from xft_jax import distributed

    spec = distributed.initialize(_COORD.value, _NPROC.value, _PID.value,
                                  platform=_PLATFORM.value, cpu_devices=_CPU_DEVICES.value)
    if spec.mode != "none":
        print(f"start-up: {spec.describe()}", file=sys.stderr)
    from xft_jax.training.trainer import NonFiniteError, train

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
    app.run(main)
