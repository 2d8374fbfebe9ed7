"""Layerwise probe: entropies and logit lens per layer, reduced inside the jitted step.

For the residual stream after each layer (index 0 = embedding output, l = after layer l)
we keep only a handful of numbers per example, so the device never holds [L,B,T,D]:

* ``act_entropy``: entropy (nats) of the energy distribution p_i = h_i^2 / sum_j h_j^2
  over hidden units at the decision position (``label_pos``); ``act_entropy_prompt`` is
  the same averaged over the prompt positions (valid tokens up to ``label_pos``);
* ``act_entropy_norm`` / ``act_entropy_prompt_norm``: the same on the final RMS norm's
  output (g * h / rms(h), g its learned gain: the vector the LM head reads). The energy
  distribution does not change when a vector is rescaled, so the RMS division alone
  changes nothing; the per-unit gain does, and in real LLMs it damps the outlier units;
* ``act_entropy_trim`` / ``act_entropy_prompt_trim``: the energy entropy with the
  ``OUTLIER_K`` largest-energy units of each vector left out, renormalised over the
  other D - k. "Outlier dimensions" are chosen per vector (each example, position and
  layer) by magnitude, so they are found without the variant, the label or a reference
  model; a real LLM's massive activations sit in a few fixed units that top every
  token, so this removes them, and where there are none it removes k ordinary units,
  alike for every variant and the base. ``act_outlier_share``: the share of the energy
  at ``label_pos`` in those k units;
* logit lens (final norm + LM head on that layer's residual at ``label_pos``):
  ``lens_entropy`` over the full vocabulary (streamed in vocab chunks with an online
  log-sum-exp, so not even one [B,V] block per layer is needed); the five-label
  distribution q (the label tokens' probabilities renormalised over the five) with
  ``lens_label_entropy`` (its entropy, at most log 5) and ``lens_label_maxprob`` (max_k
  q_k): how sharp the rating is; ``lens_label_mass`` (full-vocab mass on the five: format
  compliance, not sharpness); ``lens_gold_prob`` (full-vocab probability of the gold
  label token) and ``lens_gold_prob_labels`` (q at the gold label). At the last layer the
  lens is the model's own output;
* ``attn_entropy``: attention entropy at ``label_pos``, mean over heads (computed inside
  each layer through the decoder's ``attention_reduce`` hook; layer 0 has no attention
  and is NaN).

``per_example`` keeps, per example, the mean over the middle layers (``middle_layers``)
and the last layer's value of each metric: what the paired test between variants needs.
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

METRICS = ("act_entropy", "act_entropy_norm", "act_entropy_trim", "act_outlier_share",
           "act_entropy_prompt", "act_entropy_prompt_norm", "act_entropy_prompt_trim",
           "lens_entropy", "lens_label_entropy", "lens_label_maxprob", "lens_label_mass",
           "lens_gold_prob", "lens_gold_prob_labels", "attn_entropy")
# Units left out by the ``_trim`` entropies: fixed before any result was seen. Massive
# activations in 7B-scale models occupy a handful of the 4096 units (2-8 in published
# counts); 8 covers them and is < 1.5% of SmolLM2-135M's 576.
OUTLIER_K = 8


def energy_entropy(h) -> jax.Array:
    """Entropy of p_i = h_i^2 / sum(h^2) over the last axis (0 log 0 = 0)."""
    h = h.astype(jnp.float32)
    e = h * h
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def kth_largest(e, k: int) -> jax.Array:
    """[..., 1] the k-th largest value of ``e`` over its last axis (ties counted), found by
    k passes of "largest value below the last one". Each pass is one fused reduction, so
    no sorted or [..., D]-sized copy is made, unlike ``lax.top_k`` on a [B,T,D] input."""
    thr = jnp.full(e.shape[:-1] + (1,), jnp.inf, e.dtype)
    got = jnp.zeros(e.shape[:-1] + (1,), jnp.float32)
    for _ in range(k):
        v = jnp.max(jnp.where(e < thr, e, -1.0), axis=-1, keepdims=True)
        more = got < k
        got = jnp.where(more, got + jnp.sum(e == v, axis=-1, keepdims=True), got)
        thr = jnp.where(more, v, thr)
    return thr


def trimmed_energy_entropy(h, k: int) -> tuple[jax.Array, jax.Array]:
    """(entropy of the energy distribution without the k largest-energy units, share of
    the energy in those k) over the last axis. Computed from masks (not as total minus
    top-k), so an outlier holding nearly all the energy costs no precision; ties at the
    k-th value are left out fractionally, so exactly k units' worth goes."""
    h = h.astype(jnp.float32)
    e = h * h
    k = max(0, min(int(k), e.shape[-1] - 1))
    if k == 0:
        return energy_entropy(h), jnp.zeros(e.shape[:-1], jnp.float32)
    thr = kth_largest(e, k)
    above = jnp.sum(e > thr, axis=-1, keepdims=True).astype(jnp.float32)
    tied = jnp.sum(e == thr, axis=-1, keepdims=True).astype(jnp.float32)
    keep_tied = (tied - (k - above)) / jnp.maximum(tied, 1.0)         # in [0, 1)
    w = jnp.where(e < thr, 1.0, jnp.where(e == thr, keep_tied, 0.0))
    tiny = jnp.finfo(jnp.float32).tiny
    rest = jnp.sum(w * e, axis=-1, keepdims=True)
    p = e / jnp.maximum(rest, tiny)
    ent = -jnp.sum(jnp.where(w * p > 0, w * p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0),
                   axis=-1)
    share = jnp.sum((1.0 - w) * e, axis=-1) / jnp.maximum(jnp.sum(e, axis=-1), tiny)
    return ent, share


def prompt_mean_trimmed(h, weights, k: int, chunk: int = 128) -> jax.Array:
    """[B] weighted mean over positions of ``trimmed_energy_entropy`` of h [B,T,D], in
    position chunks: the k-pass threshold reads each vector k times, and on a whole
    [B,T,D] block XLA keeps the energies as one more [B,T,D] buffer; a chunk's is small.
    The last chunk is shifted back and its overlap masked, so any T works."""
    t = h.shape[1]
    c = max(1, min(int(chunk), t))

    def body(acc, i):
        start = jnp.minimum(i * c, t - c)
        hc = jax.lax.dynamic_slice_in_dim(h, start, c, 1)
        wc = jax.lax.dynamic_slice_in_dim(weights, start, c, 1)
        fresh = (start + jnp.arange(c)) >= i * c
        ent, _ = trimmed_energy_entropy(hc, k)
        return acc + jnp.sum(jnp.where(fresh[None], ent * wc, 0.0), axis=1), None

    total, _ = jax.lax.scan(body, jnp.zeros(h.shape[:1], jnp.float32), jnp.arange(-(-t // c)))
    return total / jnp.maximum(jnp.sum(weights, 1), 1.0)


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
                prompt_mask, vocab_chunk: int, outlier_k: int = OUTLIER_K) -> dict:
    """All per-layer numbers for one residual stream h [B,T,D] -> dict of [B] arrays.
    Each [B,T,D] intermediate lives within this one layer's reduction only."""
    del layer
    rows = jnp.arange(h.shape[0])
    hd = h[rows, label_pos]                                            # [B,D]
    w = prompt_mask.astype(jnp.float32)
    prompt_mean = lambda x: jnp.sum(x * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)  # noqa: E731
    gain = params["final_norm"].astype(jnp.float32)   # rms scale drops out of the energy
    trim_d, share_d = trimmed_energy_entropy(hd, outlier_k)
    out = {"act_entropy": energy_entropy(hd),
           "act_entropy_norm": energy_entropy(hd.astype(jnp.float32) * gain),
           "act_entropy_trim": trim_d, "act_outlier_share": share_d,
           "act_entropy_prompt": prompt_mean(energy_entropy(h)),
           "act_entropy_prompt_norm": prompt_mean(energy_entropy(h.astype(jnp.float32) * gain)),
           "act_entropy_prompt_trim": prompt_mean_trimmed(h, w, outlier_k)}
    hn = rms_norm(hd, params["final_norm"], cfg.rms_norm_eps, dtype)
    log_z, ent = vocab_log_partition_and_entropy(hn, params, cfg, dtype, vocab_chunk)
    ll = jnp.einsum("bd,dk->bk", hn, head_columns(params, cfg, label_ids, dtype),
                    preferred_element_type=jnp.float32)                 # [B,5]
    label_logp = jax.nn.log_softmax(ll, axis=-1)
    out["lens_entropy"] = ent
    out["lens_label_entropy"] = -jnp.sum(jnp.exp(label_logp) * label_logp, axis=-1)
    out["lens_label_maxprob"] = jnp.exp(jnp.max(label_logp, axis=-1))
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
                  vocab_chunk: int = 8192, outlier_k: int = OUTLIER_K) -> dict:
    """{metric: float32 [L+1, B]} plus 'log_probs' [B,5] (the model's own scores)."""
    label_pos = jnp.asarray(batch["label_pos"], jnp.int32)
    seg = batch["segment_ids"]
    if hasattr(params.get("lm_head"), "dequantize"):  # once, not per layer and chunk
        params = dict(params, lm_head=as_dense(params["lm_head"], opts.dtype))
    reduce = functools.partial(
        layer_stats, params=params, cfg=cfg, dtype=opts.dtype, label_ids=label_ids,
        label_pos=label_pos, gold=jnp.asarray(batch["label"], jnp.int32),
        prompt_mask=prompt_positions(seg, label_pos), vocab_chunk=vocab_chunk,
        outlier_k=outlier_k)
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
                  vocab_chunk: int = 8192, mesh=None, outlier_k: int = OUTLIER_K) -> Callable:
    """Jitted ``fn(params, lora, batch) -> probe_forward(...)`` (memoised like
    ``scoring.make_score_fn``)."""
    return _probe_fn(cfg, opts, check_label_ids(label_ids, cfg.vocab_size), int(vocab_chunk),
                     mesh, int(outlier_k))


@functools.lru_cache(maxsize=16)
def _probe_fn(cfg, opts, label_ids, vocab_chunk, mesh, outlier_k):

    def fn(params, lora, batch):
        with sharding.activation_sharding(mesh):
            return probe_forward(params, cfg, batch, label_ids, opts=opts, lora=lora,
                                 vocab_chunk=vocab_chunk, outlier_k=outlier_k)

    return replicated_jit(fn, mesh)


def run_probe(probe_fn: Callable, params, lora, batches, batch_size: int, mesh=None,
              names: Sequence[str] | None = None) -> dict:
    """Per-example probe values over a dataset: {metric: [L+1, N]}, 'label' [N],
    'log_probs' [N,5], 'id' (N example ids, ``names`` as in ``map_batches``); padding of
    the last batch removed."""
    parts: dict[str, list] = {}
    ids: list[str] = []
    for got, rows, batch, out in map_batches(lambda dev, _: probe_fn(params, lora, dev),
                                             batches, batch_size, mesh, names=names):
        for k, v in out.items():
            v = np.asarray(v)
            parts.setdefault(k, []).append(v[rows] if k == "log_probs" else v[:, rows])
        parts.setdefault("label", []).append(np.asarray(batch["label"])[rows])
        ids += got
    if not parts:
        raise ValueError("no examples were probed (empty dataset?)")
    out = {k: np.concatenate(v, axis=0 if k in ("log_probs", "label") else 1)
           for k, v in parts.items()}
    out["id"] = ids
    return out


def middle_layers(num_points: int) -> slice:
    """The middle third of the decoder layers (index 0 is the embedding output), at least
    one layer."""
    n = num_points - 1
    return slice(1 + n // 3, 1 + max(n // 3 + 1, 2 * n // 3))


def per_example(values: dict) -> dict:
    """What the paired test between variants reads, small enough for probe.json: per
    example, the mean over ``middle_layers`` and the last layer's value of each metric
    (6 significant digits), with the example ids."""
    mid = middle_layers(np.asarray(values[METRICS[0]]).shape[0])
    rnd = lambda a: [float(f"{x:.6g}") for x in np.asarray(a, np.float64)]  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        middle = {k: rnd(np.nanmean(np.asarray(values[k], np.float64)[mid], axis=0))
                  for k in METRICS}
    return {"ids": [str(i) for i in values["id"]], "middle_layers": [mid.start, mid.stop],
            "middle": middle, "last": {k: rnd(np.asarray(values[k])[-1]) for k in METRICS}}


def summarize(values: dict) -> dict:
    """{metric: {'mean': [L+1], 'std': [L+1]}} over examples (NaN rows stay NaN)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN layer 0 of attn_entropy
        for k in METRICS:
            v = np.asarray(values[k], np.float64)
            out[k] = {"mean": np.nanmean(v, axis=1).tolist(), "std": np.nanstd(v, axis=1).tolist()}
    return out
