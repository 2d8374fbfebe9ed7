"""Padding widths on a CPU: the demo's training step with powers-of-two widths against
multiples of ``data.bucket_step``.

    python bench/bucket_widths.py --out=/tmp/widths --steps=30

For each target variant and bucket step, trains the demo's cell (``configs/demo.py``, the
real base, validation off) for ``--steps`` steps twice in one process: the first run
compiles every width it meets, the second reuses the compiled steps (the trainer's jit
cache), so its wall time is the steps alone. Reports the second run's seconds per step,
its non-padding and padded tokens per step, and the ratio of the two settings' times.
Training data only; the same batches either way (padding aside).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402
from xft_jax.models.bundled import bundled_model  # noqa: E402
from xft_jax.models.tokenizer import load_tokenizer  # noqa: E402
from xft_jax.study import demo_configs, demo_lib, grid  # noqa: E402
from xft_jax.training import batches as batches_lib, trainer  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Scratch directory (emptied first).", required=True)
_STEPS = flags.DEFINE_integer("steps", 30, "Training steps per timed run.")
_VARIANTS = flags.DEFINE_list("variants", ["label_only", "explanation"], "Target variants.")
_BUCKET_STEPS = flags.DEFINE_list("bucket_steps", ["0", "16"], "data.bucket_step values.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "data.batch_size.")


def tokens_per_step(tc, steps: int) -> tuple[float, float]:
    """(non-padding, padded) tokens per step over the run's first ``steps`` batches."""
    data = batches_lib.build(tc, load_tokenizer(tc.model.tokenizer))
    it = iter(data.train)
    real = padded = 0
    for _ in range(steps):
        b = next(it)
        real += batches_lib.real_tokens(b)
        padded += b["input_ids"].size
    return real / steps, padded / steps


def main(argv):
    del argv
    shutil.rmtree(_OUT.value, ignore_errors=True)
    c = demo_configs.demo_config("")
    base = bundled_model(c.base)
    rows = []
    for variant in _VARIANTS.value:
        for step in (int(s) for s in _BUCKET_STEPS.value):
            tc, _, _ = demo_lib.cell_configs(c, grid.Cell(c.source, "naturalness", variant, 0),
                                             base, _OUT.value)
            with tc.unlocked():
                tc.train.steps, tc.train.eval_every = _STEPS.value, 0
                tc.train.checkpoint_every = _STEPS.value
                tc.data.batch_size, tc.data.bucket_step = _BATCH.value, step
            times = []
            for attempt in ("compile", "timed"):
                workdir = os.path.join(_OUT.value, f"{variant}-{step}-{attempt}")
                t0 = time.perf_counter()
                trainer.train(tc, workdir)
                times.append(time.perf_counter() - t0)
            real, padded = tokens_per_step(tc, _STEPS.value)
            rows.append({"variant": variant, "bucket_step": step,
                         "s_per_step": times[1] / _STEPS.value, "first_run_s": times[0],
                         "real_tokens_per_step": real, "padded_tokens_per_step": padded})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nload average {os.getloadavg()}, commit {common.git_commit()}, "
          f"{_STEPS.value} steps at batch {_BATCH.value}\n")
    print("| variant | bucket_step | s/step (timed run) | tokens/step: real / padded | "
          "first run (compiles), s | time vs powers of two |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ref = next(x for x in rows if x["variant"] == r["variant"])
        print(f"| {r['variant']} | {r['bucket_step']} | {r['s_per_step']:.2f} | "
              f"{r['real_tokens_per_step']:.0f} / {r['padded_tokens_per_step']:.0f} | "
              f"{r['first_run_s']:.0f} | {r['s_per_step'] / ref['s_per_step']:.2f} |")


if __name__ == "__main__":
    app.run(main)
