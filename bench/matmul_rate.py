"""The machine's float32 matmul rate under jit: the ceiling a training step can approach.

    python bench/matmul_rate.py

Prints GFLOP/s for square matmuls and one of a SmolLM2-135M MLP's shape (640 tokens x 576
-> 1536), each the mean of repeated calls after a warm-up. Compare with a trainer's
tokens/s times its FLOPs per token (bench/README.md, "How far a training step is from this
CPU's limit").
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (640, 576, 1536))


def rate(m: int, k: int, n: int, seconds: float = 2.0) -> float:
    """GFLOP/s of an [m, k] @ [k, n] float32 matmul."""
    x, w = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    f = jax.jit(lambda x, w: x @ w)
    f(x, w).block_until_ready()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f(x, w).block_until_ready()
        calls += 1
    return 2 * m * k * n * calls / (time.perf_counter() - t0) / 1e9


if __name__ == "__main__":
    print(f"devices: {jax.devices()}")
    for m, k, n in SHAPES:
        print(f"{m} x {k} x {n}: {rate(m, k, n):.1f} GFLOP/s")
