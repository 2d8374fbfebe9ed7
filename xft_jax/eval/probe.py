"""Layerwise probe: entropies and logit lens per layer, reduced inside the jitted step.

For the residual stream after each layer (index 0 = embedding output, l = after layer l)
we keep only a handful of numbers per example, so the device never holds [L,B,T,D]:

* ``act_entropy``: entropy (nats) of the energy distribution p_i = h_i^2 / sum_j h_j^2
  over hidden units at the decision position (``label_pos``); ``act_entropy_prompt`` is
  the same averaged over the prompt positions (valid tokens up to ``label_pos``);
* logit lens (final norm + LM head on that layer's residual at ``label_pos``):
  ``lens_entropy`` over the full vocabulary (streamed in vocab chunks with an online
  log-sum-exp, so not even one [B,V] block per layer is needed), ``lens_label_entropy``
  over the five label tokens, ``lens_label_mass`` (probability mass on the five),
  ``lens_gold_prob`` (full-vocab probability of the gold label token) and
  ``lens_gold_prob_labels`` (its probability renormalised over the five);
* ``attn_entropy``: attention entropy at ``label_pos``, mean over heads (computed inside
  each layer through the decoder's ``attention_reduce`` hook; layer 0 has no attention
  and is NaN).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xft_jax import sharding
from xft_jax.models.config import ModelConfig
from xft_jax.models.decoder import (ForwardOptions, OutputRequest, TokenInputs, as_dense,
                                    forward, rms_norm)
from xft_jax.eval.batching import map_batches, replicated_jit
from xft_jax.eval.scoring import check_label_ids, head_columns

METRICS = ("act_entropy", "act_entropy_prompt", "lens_entropy", "lens_label_entropy",
           "lens_label_mass", "lens_gold_prob", "lens_gold_prob_labels", "attn_entropy")


def energy_entropy(h) -> jax.Array:
    """Entropy of p_i = h_i^2 / sum(h^2) over the last axis (0 log 0 = 0)."""
    h = h.astype(jnp.float32)
    e = h * h
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def attention_entropy(q, k, mask, *, probe_pos):
    """Entropy (nats) of the attention distribution of the query at ``probe_pos`` [B],
    mean over heads: one query row per example, never a [B,H,T,T] tensor. q [B,T,H,hd],
    k [B,S,KVH,hd], mask [B,1,T,S] as the decoder's ``attention_reduce`` hook gets them."""
    b, _, heads, head_dim = q.shape
    rows = jnp.arange(b)
    qp = q[rows, probe_pos].astype(jnp.float32)                      # [B,H,hd]
    kk = jnp.repeat(k.astype(jnp.float32), heads // k.shape[2], axis=2)   # [B,S,H,hd]
    logits = jnp.einsum("bhd,bshd->bhs", qp, kk) / math.sqrt(head_dim)
    m = mask[rows, 0, probe_pos]                                      # [B,S]
    logits = jnp.where(m[:, None, :], logits, -jnp.inf)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ent = -jnp.sum(jnp.where(m[:, None, :], jnp.exp(logp) * logp, 0.0), axis=-1)
    return ent.mean(axis=-1)


def _head_slice(params, cfg: ModelConfig, start, size: int, dtype):
    """[D, size] slice of the LM head starting at vocab index ``start`` (traced)."""
    if cfg.tie_word_embeddings:
        return jax.lax.dynamic_slice_in_dim(params["embed"], start, size, 0).astype(dtype).T
    return jax.lax.dynamic_slice_in_dim(as_dense(params["lm_head"], dtype), start, size, 1)


def vocab_log_partition_and_entropy(hn, params, cfg: ModelConfig, dtype, chunk: int):
    """(log Z [B], entropy [B]) of softmax(hn @ head) over the full vocabulary, streamed
    over vocab chunks. Chunks that would run past V are shifted back and their overlap
    masked, so any chunk size works."""
    v = cfg.vocab_size
    chunk = max(1, min(int(chunk), v))
    n_chunks = -(-v // chunk)
    b = hn.shape[0]

    def body(carry, c):
        m, s, t = carry
        start = jnp.minimum(c * chunk, v - chunk)
        logits = jnp.einsum("bd,dk->bk", hn, _head_slice(params, cfg, start, chunk, dtype),
                            preferred_element_type=jnp.float32)
        fresh = (start + jnp.arange(chunk)) >= c * chunk          # not counted before
        logits = jnp.where(fresh[None], logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(logits - m_new[:, None])
        s = s * scale + jnp.sum(e, axis=-1)
        t = t * scale + jnp.sum(jnp.where(fresh[None], e * logits, 0.0), axis=-1)
        return (m_new, s, t), None

    init = (jnp.full((b,), -jnp.inf, jnp.float32), jnp.zeros((b,), jnp.float32),
            jnp.zeros((b,), jnp.float32))
    (m, s, t), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    log_z = m + jnp.log(s)
    return log_z, log_z - t / s


def layer_stats(h, layer, *, params, cfg: ModelConfig, dtype, label_ids, label_pos, gold,
                prompt_mask, vocab_chunk: int) -> dict:
    """All per-layer numbers for one residual stream h [B,T,D] -> dict of [B] arrays."""
    del layer
    rows = jnp.arange(h.shape[0])
    hd = h[rows, label_pos]                                            # [B,D]
    w = prompt_mask.astype(jnp.float32)
    per_token = energy_entropy(h)                                      # [B,T]
    out = {"act_entropy": energy_entropy(hd),
           "act_entropy_prompt": jnp.sum(per_token * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)}
    hn = rms_norm(hd, params["final_norm"], cfg.rms_norm_eps, dtype)
    log_z, ent = vocab_log_partition_and_entropy(hn, params, cfg, dtype, vocab_chunk)
    ll = jnp.einsum("bd,dk->bk", hn, head_columns(params, cfg, label_ids, dtype),
                    preferred_element_type=jnp.float32)                 # [B,5]
    label_logp = jax.nn.log_softmax(ll, axis=-1)
    out["lens_entropy"] = ent
    out["lens_label_entropy"] = -jnp.sum(jnp.exp(label_logp) * label_logp, axis=-1)
    out["lens_label_mass"] = jnp.sum(jnp.exp(ll - log_z[:, None]), axis=-1)
    out["lens_gold_prob"] = jnp.exp(ll[rows, gold] - log_z)
    out["lens_gold_prob_labels"] = jnp.exp(label_logp[rows, gold])
    return out


def prompt_positions(segment_ids, label_pos) -> jax.Array:
    """[B,T] bool: valid tokens at or before the decision position."""
    idx = jnp.arange(segment_ids.shape[1])[None]
    return (segment_ids > 0) & (idx <= label_pos[:, None])


def probe_forward(params, cfg: ModelConfig, batch: dict, label_ids: Sequence[int], *,
                  opts: ForwardOptions = ForwardOptions(), lora=None,
                  vocab_chunk: int = 8192) -> dict:
    """{metric: float32 [L+1, B]} plus 'log_probs' [B,5] (the model's own scores)."""
    label_pos = jnp.asarray(batch["label_pos"], jnp.int32)
    seg = batch["segment_ids"]
    if hasattr(params.get("lm_head"), "dequantize"):  # once, not per layer and chunk
        params = dict(params, lm_head=as_dense(params["lm_head"], opts.dtype))
    reduce = functools.partial(
        layer_stats, params=params, cfg=cfg, dtype=opts.dtype, label_ids=label_ids,
        label_pos=label_pos, gold=jnp.asarray(batch["label"], jnp.int32),
        prompt_mask=prompt_positions(seg, label_pos), vocab_chunk=vocab_chunk)
    inputs = TokenInputs(batch["input_ids"], positions=batch.get("positions"), segment_ids=seg)
    want = OutputRequest("hidden", label_pos[:, None], layer_reduce=reduce,
                         attention_reduce=functools.partial(attention_entropy,
                                                            probe_pos=label_pos))
    out = forward(params, cfg, inputs, want, opts=opts, lora=lora)
    stats = dict(out["layers"])
    b = label_pos.shape[0]
    stats["attn_entropy"] = jnp.concatenate(
        [jnp.full((1, b), jnp.nan, jnp.float32), out["attention"].astype(jnp.float32)], 0)
    logits = jnp.einsum("bd,dk->bk", out["hidden"][:, 0],
                        head_columns(params, cfg, label_ids, opts.dtype),
                        preferred_element_type=jnp.float32)
    stats["log_probs"] = jax.nn.log_softmax(logits, axis=-1)
    return stats


def make_probe_fn(cfg: ModelConfig, opts: ForwardOptions, label_ids: Sequence[int], *,
                  vocab_chunk: int = 8192, mesh=None) -> Callable:
    """Jitted ``fn(params, lora, batch) -> probe_forward(...)`` (memoised like
    ``scoring.make_score_fn``)."""
    return _probe_fn(cfg, opts, check_label_ids(label_ids, cfg.vocab_size), int(vocab_chunk),
                     mesh)


@functools.lru_cache(maxsize=16)
def _probe_fn(cfg, opts, label_ids, vocab_chunk, mesh):

    def fn(params, lora, batch):
        with sharding.activation_sharding(mesh):
            return probe_forward(params, cfg, batch, label_ids, opts=opts, lora=lora,
                                 vocab_chunk=vocab_chunk)

    return replicated_jit(fn, mesh)


def run_probe(probe_fn: Callable, params, lora, batches, batch_size: int, mesh=None) -> dict:
    """Per-example probe values over a dataset: {metric: [L+1, N]}, 'label' [N],
    'log_probs' [N,5]; padding of the last batch removed."""
    parts: dict[str, list] = {}
    for _, rows, batch, out in map_batches(lambda dev, _: probe_fn(params, lora, dev),
                                           batches, batch_size, mesh):
        for k, v in out.items():
            v = np.asarray(v)
            parts.setdefault(k, []).append(v[rows] if k == "log_probs" else v[:, rows])
        parts.setdefault("label", []).append(np.asarray(batch["label"])[rows])
    if not parts:
        raise ValueError("no examples were probed (empty dataset?)")
    return {k: np.concatenate(v, axis=0 if k in ("log_probs", "label") else 1)
            for k, v in parts.items()}


def summarize(values: dict) -> dict:
    """{metric: {'mean': [L+1], 'std': [L+1]}} over examples (NaN rows stay NaN)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN layer 0 of attn_entropy
        for k in METRICS:
            v = np.asarray(values[k], np.float64)
            out[k] = {"mean": np.nanmean(v, axis=1).tolist(), "std": np.nanstd(v, axis=1).tolist()}
    return out
