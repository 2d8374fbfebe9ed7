"""Rating scores read at the label position, from five LM-head columns only.

The label comes first in every training target, so a model's rating is the next-token
distribution at ``label_pos`` restricted to the five label tokens "1".."5". We gather the
final-normed hidden state at that one position and multiply it by the five head columns:
no [B,T,V] (nor even [B,V]) logits are built, which is what makes a 32k-vocab eval cheap
(transformers #12878 is the trap this avoids).

``score_batches`` runs a jitted, mesh-sharded scorer over any iterable of eval batches
(``batching.map_batches``), so each example is counted exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from xft_jax import sharding
from xft_jax.data.schema import NUM_LABELS
from xft_jax.eval.batching import map_batches, replicated_jit
from xft_jax.models.config import ModelConfig
from xft_jax.models.decoder import (ForwardOptions, OutputRequest, TokenInputs, as_dense,
                                    forward)


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
    inputs = TokenInputs(input_ids, attention_mask, positions, segment_ids)
    at_labels = OutputRequest("hidden", jnp.asarray(label_pos, jnp.int32)[:, None])
    out = forward(params, cfg, inputs, at_labels, opts=opts, lora=lora)
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


def score_batches(score_fn: Callable, params, lora, batches: Iterable[dict], batch_size: int,
                  mesh: Mesh | None = None, names: Sequence[str] | None = None
                  ) -> Iterator[dict]:
    """Yields per-batch host results {'id', 'label', 'log_probs'} for real rows only.

    A batch may have at most ``batch_size`` rows (see ``batching.map_batches``).
    """
    for ids, rows, batch, logp in map_batches(lambda dev, _: score_fn(params, lora, dev),
                                              batches, batch_size, mesh, names=names):
        yield {"id": ids, "label": np.asarray(batch["label"])[rows],
               "log_probs": np.asarray(logp)[rows]}


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


__all__ = ["head_columns", "label_logits", "label_log_probs", "make_score_fn",
           "score_batches", "collect", "check_label_ids"]
