"""Does label_only learn the demo's rating? A check of the demo's settings on validation.

    python bench/demo_label_check.py --out=/tmp/check                     # the demo's own
    python bench/demo_label_check.py --out=/tmp/check --lr=3e-3 --schedule=constant
    python bench/demo_label_check.py --out=/tmp/check --num_train=8 --epochs=40 \
        --eval_every=0                                     # can the label be fitted at all?

Trains one ``label_only`` run of the demo (``configs/demo.py``, or ``--arg``) with the
given overrides and prints its validation curve and its training label loss. It reads the
training and validation splits only, never the test split, so a setting chosen with it
stays a choice made on validation data (the study protocol). The same setting must then
hold for every variant.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import demo_flags  # noqa: E402
from xft_jax.models.bundled import bundled_model  # noqa: E402
from xft_jax.study import demo_configs, demo_lib, grid  # noqa: E402
from xft_jax.training import metrics_log, selection, trainer  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Directory of the run.", required=True)
_ARG = flags.DEFINE_string("arg", "", "configs/demo.py arg ('' or 'smoke').")
_AXIS = flags.DEFINE_string("axis", "naturalness", "Rating axis.")
_SEED = flags.DEFINE_integer("seed", 0, "Training seed.")
_LR = flags.DEFINE_float("lr", None, "optim.lr (default: the demo's).")
_SCHEDULE = flags.DEFINE_string("schedule", None, "optim.schedule.")
_WARMUP = flags.DEFINE_integer("warmup_steps", None, "optim.warmup_steps.")
_BATCH = flags.DEFINE_integer("batch_size", None, "data.batch_size.")
_EPOCHS = flags.DEFINE_float("epochs", None, "train.epochs.")
_STEPS = flags.DEFINE_integer("steps", None, "train.steps (replaces train.epochs).")
_BUCKET_STEP = flags.DEFINE_integer("bucket_step", None, "data.bucket_step (padding widths).")
_NUM_TRAIN = flags.DEFINE_integer("num_train", None, "data.num_train (a subset).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", None, "train.eval_every (0: none).")
_B2 = flags.DEFINE_float("b2", None, "optim.b2 (Adam's second-moment decay).")
_LORA_PLUS = flags.DEFINE_float("lora_plus_ratio", None, "optim.lora_plus_ratio (LoRA+).")

OVERRIDES = {"optim.lr": _LR, "optim.schedule": _SCHEDULE, "optim.warmup_steps": _WARMUP,
             "data.batch_size": _BATCH, "train.epochs": _EPOCHS, "train.steps": _STEPS,
             "data.bucket_step": _BUCKET_STEP, "data.num_train": _NUM_TRAIN,
             "train.eval_every": _EVAL_EVERY, "optim.b2": _B2,
             "optim.lora_plus_ratio": _LORA_PLUS, **demo_flags.DATA_OVERRIDES}


def main(argv):
    del argv
    c = demo_configs.demo_config(_ARG.value)
    items = demo_flags.apply_items(c)
    base = bundled_model(c.base) if c.base != "toy" else None
    if base is None:
        raise app.UsageError("the toy base is pre-trained by the demo itself; use the real one")
    cell = grid.Cell(c.source, _AXIS.value, "label_only", _SEED.value)
    tc, _, _ = demo_lib.cell_configs(c, cell, base, _OUT.value)
    given = demo_flags.apply(tc, OVERRIDES)
    workdir = os.path.join(_OUT.value, cell.rel, "train")
    t0 = time.time()
    result = trainer.train(tc, workdir)
    print(f"{result.status} at step {result.step} in {time.time() - t0:.0f} s; "
          f"overrides: " + json.dumps(given | items))
    for m in metrics_log.read_metrics(workdir):
        extra = (f"  validation accuracy {m['val_accuracy']:.3f} nll {m['val_nll']:.3f}"
                 if "val_accuracy" in m else "")
        print(f"step {m['step']:4d}  train label loss {m['label_loss']:.3f} "
              f"accuracy {m['label_accuracy']:.3f}{extra}")
    doc = selection.read(workdir)
    if doc:
        print(f"best validation step {doc['best_step']} "
              f"(accuracy {doc['best_accuracy']:.3f} on {doc['curve'][-1]['n']} examples)")


if __name__ == "__main__":
    app.run(main)
