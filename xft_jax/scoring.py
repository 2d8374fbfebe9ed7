"""Rating scores read at the label position, from five LM-head columns only.

The label comes first in every training target, so a model's rating is the next-token
distribution at ``label_pos`` restricted to the five label tokens "1".."5". We gather the
final-normed hidden state at that one position and multiply it by the five head columns:
no [B,T,V] (nor even [B,V]) logits are built, which is what makes a 32k-vocab eval cheap
(transformers #12878 is the trap this avoids).

``score_batches`` runs a jitted, mesh-sharded scorer over any iterable of eval batches,
padding the last partial batch to the compiled shape and dropping the padding again, so
each example is counted exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from xft_jax import sharding
from xft_jax.models.config import ModelConfig
from xft_jax.models.decoder import ForwardOptions, as_dense, forward

NUM_LABELS = 5
# Keys of the batch contract that the scorer feeds to the device ([B,T] or [B]).
DEVICE_KEYS = ("input_ids", "segment_ids", "positions", "label_pos", "label")


def head_columns(params: dict, cfg: ModelConfig, token_ids, dtype) -> jax.Array:
    """[D, K] columns of the LM head for ``token_ids`` (rows of the embedding if tied)."""
    token_ids = jnp.asarray(token_ids, jnp.int32)
    if cfg.tie_word_embeddings:
        return jnp.take(params["embed"], token_ids, axis=0).astype(dtype).T
    w = params["lm_head"]
    if hasattr(w, "take_columns"):  # quantised weights may offer a cheap column gather
        return w.take_columns(token_ids, dtype)
    if hasattr(w, "dequantize"):
        return jnp.take(as_dense(w, dtype), token_ids, axis=1)
    return jnp.take(w, token_ids, axis=1).astype(dtype)


def label_logits(params: dict, cfg: ModelConfig, input_ids, label_pos, label_ids, *,
                 opts: ForwardOptions = ForwardOptions(), lora=None, segment_ids=None,
                 positions=None, attention_mask=None) -> jax.Array:
    """float32 [B, 5] logits of the five label tokens at ``label_pos`` [B]."""
    out = forward(params, cfg, input_ids, attention_mask=attention_mask, positions=positions,
                  segment_ids=segment_ids, opts=opts, lora=lora,
                  output_positions=jnp.asarray(label_pos, jnp.int32)[:, None], output="hidden")
    h = out["hidden"][:, 0]                                            # [B, D]
    cols = head_columns(params, cfg, label_ids, opts.dtype)            # [D, 5]
    return jnp.einsum("bd,dk->bk", h, cols, preferred_element_type=jnp.float32)


def label_log_probs(*args, **kwargs) -> jax.Array:
    """float32 [B, 5] log-softmax over the five label tokens."""
    return jax.nn.log_softmax(label_logits(*args, **kwargs), axis=-1)


def check_label_ids(label_ids: Sequence[int], vocab_size: int) -> tuple[int, ...]:
    ids = tuple(int(i) for i in label_ids)
    if len(ids) != NUM_LABELS or len(set(ids)) != NUM_LABELS:
        raise ValueError(f"label_ids {ids}: need {NUM_LABELS} distinct token ids")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"label_ids {bad} outside the model's vocabulary (size {vocab_size})")
    return ids


def make_score_fn(cfg: ModelConfig, opts: ForwardOptions, label_ids: Sequence[int],
                  mesh: Mesh | None = None) -> Callable:
    """Jitted ``fn(params, lora, batch) -> log_probs [B,5]`` (batch: DEVICE_KEYS arrays).
    Adapters are folded into each layer's weights as it runs (``lora_merged``): scoring
    takes no gradient. Memoised on its (hashable) arguments, so evaluating several
    checkpoints of one architecture compiles once."""
    opts = dataclasses.replace(opts, lora_merged=True)
    return _score_fn(cfg, opts, check_label_ids(label_ids, cfg.vocab_size), mesh)


@functools.lru_cache(maxsize=16)
def _score_fn(cfg, opts, label_ids, mesh):

    def fn(params, lora, batch):
        with sharding.activation_sharding(mesh):
            return label_log_probs(params, cfg, batch["input_ids"], batch["label_pos"],
                                   label_ids, opts=opts, lora=lora,
                                   segment_ids=batch["segment_ids"],
                                   positions=batch["positions"])

    return replicated_jit(fn, mesh)


# ------------------------------------------------------------------------ batching
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


def device_put_batch(batch: dict, mesh: Mesh | None, keys=DEVICE_KEYS) -> dict:
    """Device arrays of a host's *global* batch (every process holds the same rows, as the
    eval pipeline with process_count=1 gives them): on a mesh each process feeds its own
    slice and the arrays are sharded over ('data','fsdp') on the batch dim."""
    if mesh is None:
        return {k: jnp.asarray(np.asarray(batch[k])) for k in keys}
    b = int(np.asarray(batch["input_ids"]).shape[0])
    rows = sharding.process_batch_slice(mesh, b)
    local = {k: np.asarray(batch[k])[rows] for k in keys}
    return sharding.make_global_batch(mesh, local, global_batch_size=b)


def replicated_jit(fn: Callable, mesh: Mesh | None) -> Callable:
    """jit whose outputs are replicated, so every process can read all of them."""
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=NamedSharding(mesh, jax.sharding.PartitionSpec()))


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


def score_batches(score_fn: Callable, params, lora, batches: Iterable[dict], batch_size: int,
                  mesh: Mesh | None = None, names: Sequence[str] | None = None
                  ) -> Iterator[dict]:
    """Yields per-batch host results {'id', 'label', 'log_probs'} for real rows only.

    A batch may have at most ``batch_size`` rows; short ones are padded to it so the
    function compiles once, and the pipeline's ``valid = 0`` rows are dropped, so every
    example is counted exactly once.
    """
    seen = 0
    for batch in batches:
        padded, n = pad_batch(batch, batch_size)
        rows = real_rows(batch, n)
        if rows.size == 0:
            continue
        logp = np.asarray(jax.device_get(score_fn(params, lora, device_put_batch(padded, mesh))))
        yield {"id": example_ids(batch, rows, seen, names),
               "label": np.asarray(batch["label"])[rows], "log_probs": logp[rows]}
        seen += rows.size


def collect(results: Iterable[dict], order: Sequence[str] | None = None) -> dict[str, Any]:
    """Concatenates ``score_batches`` output: ids list, labels [N], log_probs [N,5];
    with ``order`` (example ids), sorted into that order (batches may be length-sorted)."""
    ids, labels, logps = [], [], []
    for r in results:
        ids.extend(r["id"])
        labels.append(r["label"])
        logps.append(r["log_probs"])
    if not ids:
        raise ValueError("no examples were scored (empty dataset?)")
    label = np.concatenate(labels).astype(np.int64)
    log_probs = np.concatenate(logps).astype(np.float64)
    if order is not None:
        rank = {name: i for i, name in enumerate(order)}
        perm = np.argsort([rank[name] for name in ids], kind="stable")
        ids, label, log_probs = [ids[i] for i in perm], label[perm], log_probs[perm]
    return {"id": ids, "label": label, "log_probs": log_probs}


__all__ = ["NUM_LABELS", "head_columns", "label_logits", "label_log_probs", "make_score_fn",
           "score_batches", "collect", "pad_batch", "device_put_batch", "batch_size_for",
           "check_label_ids", "real_rows", "example_ids", "replicated_jit"]
