"""One loop over eval batches on a mesh: pad to the compiled size, feed the device, keep
the real rows.

Every eval pass (scoring, generation, the probe) runs a jitted function over batches of
at most ``batch_size`` rows. The last, short batch is padded to that size so the function
compiles once, and the pipeline's padding rows (``valid = 0``) and the added rows are
dropped from what comes back, so every example is counted exactly once.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xft_jax import sharding

# Keys of the batch contract that the scorer and the probe feed to the device.
DEVICE_KEYS = ("input_ids", "segment_ids", "positions", "label_pos", "label")


def pad_batch(batch: dict, size: int) -> tuple[dict, int]:
    """Pads every [B,...] array to ``size`` rows by repeating row 0; returns (batch, n)."""
    n = int(np.asarray(batch["input_ids"]).shape[0])
    if n > size:
        raise ValueError(f"batch of {n} rows exceeds the compiled batch size {size}")
    if n == size:
        return batch, n
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim and v.shape[0] == n:
            v = np.concatenate([v, np.repeat(v[:1], size - n, axis=0)], axis=0)
        out[k] = v
    return out, n


def replicated_jit(fn: Callable, mesh: Mesh | None) -> Callable:
    """jit whose outputs are replicated, so every process can read all of them."""
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def batch_size_for(mesh: Mesh | None, requested: int) -> int:
    """``requested`` rounded up to a multiple of the mesh's batch-parallel size."""
    if mesh is None:
        return requested
    par = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-requested // par) * par


def real_rows(batch: dict, n: int) -> np.ndarray:
    """Indices of the real examples among the first ``n`` rows (the pipeline marks its
    padding rows with ``valid = 0``)."""
    if "valid" in batch:
        return np.flatnonzero(np.asarray(batch["valid"])[:n] > 0)
    return np.arange(n)


def example_ids(batch: dict, rows: np.ndarray, start: int,
                names: Sequence[str] | None = None) -> list[str]:
    """Ids of ``rows``: ``names[example_index]`` for pipeline batches, else ``batch['id']``,
    else the running example number."""
    if "example_index" in batch and names is not None:
        return [str(names[int(i)]) for i in np.asarray(batch["example_index"])[rows]]
    if "id" in batch:
        return [str(x) for x in np.asarray(batch["id"])[rows]]
    return [str(start + i) for i in range(len(rows))]


def map_batches(fn: Callable, batches: Iterable[dict], batch_size: int,
                mesh: Mesh | None = None, *, keys: Sequence[str] = DEVICE_KEYS,
                names: Sequence[str] | None = None,
                feed: Callable[[dict], dict] | None = None
                ) -> Iterator[tuple[list[str], np.ndarray, dict, dict]]:
    """Yields (ids, rows, batch, host output) per batch with real rows.

    ``fn(device_batch, batch_index)`` is called on the batch padded to ``batch_size``
    (mapped by ``feed`` first, when given) with ``keys`` placed on ``mesh``; ``rows``
    index the real examples in its output and in ``batch``.
    """
    seen = 0
    for i, batch in enumerate(batches):
        padded, n = pad_batch(batch, batch_size)
        rows = real_rows(batch, n)
        if rows.size == 0:
            continue
        inputs = padded if feed is None else feed(padded)
        out = jax.device_get(fn(sharding.global_batch_from_host(mesh, inputs, keys), i))
        yield example_ids(batch, rows, seen, names), rows, batch, out
        seen += rows.size
