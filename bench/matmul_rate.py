"""The machine's float32 matmul rate under jit: the ceiling a training step can approach.

    python bench/matmul_rate.py

Prints GFLOP/s for square matmuls and one of a SmolLM2-135M MLP's shape (640 tokens x 576
-> 1536), each the median of 20 calls after a warm-up (``common.jax_matmul_rate``, the
peak the train-step benchmark measures too). Compare with a trainer's tokens/s times its
FLOPs per token (bench/README.md, "How far a training step is from this CPU's limit").
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench import common  # noqa: E402

SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (640, 576, 1536))

if __name__ == "__main__":
    print(f"devices: {jax.devices()}")
    for m, k, n in SHAPES:
        print(f"{m} x {k} x {n}: {common.jax_matmul_rate(m, k, n, 'float32', reps=20) / 1e9:.1f} "
              f"GFLOP/s")
