"""Batched KV-cache decoding (greedy, temperature, top-p), jitted end to end.

Prompts are left-padded so every row's next token is written at the same cache index;
positions come from the attention mask (as transformers does), so a padded row decodes
exactly as it would alone. The prefill writes the prompt into the cache in one forward;
each further token is one forward of length 1 inside a ``lax.scan``.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xft_jax import sharding
from xft_jax.models.config import ModelConfig
from xft_jax.models.decoder import (ForwardOptions, OutputRequest, TokenInputs, forward,
                                    init_kv_cache)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B,P], mask int32 [B,P]) with each sequence flush right."""
    longest = max(len(s) for s in seqs)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a prompt of {longest} tokens exceeds the length {length}")
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, length - len(s):] = s
            mask[i, length - len(s):] = 1
    return ids, mask


def sample_next(logits, rng, temperature: float = 0.0, top_p: float = 1.0):
    """Next token [B] from float32 logits [B,V]: argmax when temperature == 0, else a
    draw from softmax(logits / temperature) restricted to the top-p nucleus."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs       # mass strictly above each token
        keep = before < top_p                              # the top token is always kept
        threshold = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def make_generate_fn(cfg: ModelConfig, opts: ForwardOptions, *, max_new_tokens: int,
                     temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None,
                     pad_id: int = 0, cache_dtype=None, mesh=None) -> Callable:
    """Jitted ``fn(params, lora, prompt_ids [B,P], prompt_mask [B,P], rng)`` ->
    {'tokens': int32 [B,N], 'lengths': int32 [B]} (tokens after EOS are ``pad_id``; the
    EOS itself is kept and counted)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    cache_dtype = cache_dtype or opts.dtype

    def fn(params, lora, prompt_ids, prompt_mask, rng):
        b, p = prompt_ids.shape
        prompt_mask = prompt_mask.astype(jnp.int32)
        cache = init_kv_cache(cfg, b, p + max_new_tokens, cache_dtype)
        positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
        keys = jax.random.split(rng, max_new_tokens)
        with sharding.activation_sharding(mesh):
            prompt = TokenInputs(prompt_ids, prompt_mask, positions, cache=cache,
                                 cache_index=jnp.int32(0))
            last = OutputRequest(positions=jnp.full((b, 1), p - 1, jnp.int32))
            out = forward(params, cfg, prompt, last, opts=opts, lora=lora)
        tok = sample_next(out["logits"][:, 0], keys[0], temperature, top_p)
        next_pos = jnp.sum(prompt_mask, axis=1)               # position of the new token
        done = jnp.zeros((b,), bool) if eos_id is None else tok == eos_id

        def step(carry, xs):
            cache, tok, done = carry
            i, key = xs
            with sharding.activation_sharding(mesh):
                one = TokenInputs(tok[:, None], positions=(next_pos + i)[:, None],
                                  cache=cache, cache_index=p + i)
                o = forward(params, cfg, one, opts=opts, lora=lora)
            new = sample_next(o["logits"][:, 0], key, temperature, top_p)
            new = jnp.where(done, pad_id, new)
            if eos_id is not None:
                done = done | (new == eos_id)
            return (o["cache"], new, done), new

        steps = jnp.arange(max_new_tokens - 1, dtype=jnp.int32)
        _, rest = jax.lax.scan(step, (out["cache"], tok, done), (steps, keys[1:]))
        tokens = jnp.concatenate([tok[:, None], rest.T], axis=1)
        if eos_id is None:
            lengths = jnp.full((b,), max_new_tokens, jnp.int32)
        else:
            is_eos = tokens == eos_id
            first = jnp.argmax(is_eos, axis=1)
            lengths = jnp.where(is_eos.any(1), first + 1, max_new_tokens).astype(jnp.int32)
        return {"tokens": tokens, "lengths": lengths}

    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def greedy_uncached(params, cfg: ModelConfig, prompt_ids, prompt_mask, max_new_tokens: int,
                    *, opts: ForwardOptions = ForwardOptions(), lora=None) -> np.ndarray:
    """Reference decoder without a cache: a full forward over the whole sequence for every
    new token (one compile: the buffer has its final length, future slots masked out).
    For tests of the cached path."""
    b, p = np.shape(prompt_ids)
    buf = jnp.zeros((b, p + max_new_tokens), jnp.int32)
    ids = buf.at[:, :p].set(jnp.asarray(prompt_ids, jnp.int32))
    mask = buf.at[:, :p].set(jnp.asarray(prompt_mask, jnp.int32))

    @jax.jit
    def step(ids, mask, i):
        at = jnp.full((b, 1), p - 1, jnp.int32) + i
        logits = forward(params, cfg, TokenInputs(ids, mask), OutputRequest(positions=at),
                         opts=opts, lora=lora)["logits"][:, 0]
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return ids.at[:, p + i].set(tok), mask.at[:, p + i].set(1)

    for i in range(max_new_tokens):
        ids, mask = step(ids, mask, jnp.int32(i))
    return np.asarray(ids[:, p:])


_LABEL_RE = re.compile(r"^\W*(?:rating\s*:?\s*)?([1-5])(?!\d)", re.IGNORECASE)


def parse_label(text: str) -> int | None:
    """The rating 1..5 a generated continuation starts with ("4 ...", "Rating: 4"), or None."""
    m = _LABEL_RE.match(text)
    return int(m.group(1)) if m else None
