"""One Flax NNX decoder for Llama, Mistral and Qwen2.

The NNX module only holds parameters; the computation is the pure function ``forward``
over a params pytree, so LoRA, quantised weights, sharding and the probe all plug into one
place. Layers are stacked on a leading axis and run under ``jax.lax.scan``: compile time
does not grow with depth.

Weight layout is [in, out] (HF stores [out, in]); stacked layer weights carry a leading
layer axis; ``models.partitioning`` gives the logical axes of every leaf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from xft_jax import sharding
from xft_jax.models.attention import (MASK_FREE_IMPLS, causal_self_attention,
                                      mask_free_self_attention)
from xft_jax.models.config import ModelConfig
from xft_jax.models.partitioning import params_tree

ATTENTION_IMPLS = (None, "xla", "cudnn")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def linear_shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """[in, out] of one linear layer."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}[name]


# ------------------------------------------------------------------------ options
@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Static choices of a forward pass (hashable, so they can be jit-static)."""
    dtype: Any = jnp.float32            # compute dtype of activations and matmuls
    remat: str = "none"                 # none | full | dots
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    # None | 'xla': masked, query-blocked; 'cudnn': mask-free, one example per
    # right-padded row (see models/attention.py)
    attention_impl: str | None = None
    # Inference only: fold each adapter into its layer's weight as the layer runs
    # (W + s*A@B, one small matmul per weight instead of two thin ones per token).
    lora_merged: bool = False
    attention_block: int = 128          # query block of causal self-attention (0: one)


# ------------------------------------------------------------------------ building blocks
def rms_norm(x, weight, eps, dtype):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x32.astype(dtype)


def as_dense(w, dtype):
    """A weight as a dense array in the compute dtype (quantised weights dequantise here)."""
    if hasattr(w, "dequantize"):
        return w.dequantize(dtype)
    return w.astype(dtype)


def rope_inv_freq(cfg: ModelConfig, max_pos=None):
    """Inverse frequencies, with linear / llama3 / dynamic-NTK scaling as in transformers."""
    hd = cfg.head_dim
    base = jnp.float32(cfg.rope_theta)
    rs = cfg.rope_scaling_dict
    kind = cfg.rope_type
    exps = jnp.arange(0, hd, 2, dtype=jnp.float32) / hd
    if kind == "dynamic" and max_pos is not None:
        orig = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
        seq_len = jnp.maximum(max_pos.astype(jnp.float32) + 1, orig)
        factor = rs["factor"]
        base = base * ((factor * seq_len / orig) - (factor - 1)) ** (hd / (hd - 2))
    inv = 1.0 / (base ** exps)
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x, positions, inv_freq):
    """x [B,T,N,hd]; rotate-half convention (HF Llama)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq      # [B,T,hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rot * sin).astype(x.dtype)


def default_positions(attention_mask, segment_ids, shape):
    """Positions that match transformers: cumsum of the mask for padded rows, restarting
    at 0 for each packed segment."""
    b, t = shape
    if segment_ids is not None:
        idx = jnp.broadcast_to(jnp.arange(t), (b, t))
        starts = jnp.concatenate(
            [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
        return (idx - first).astype(jnp.int32)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def attention_mask_matrix(q_seg, k_seg, q_idx, k_idx, window):
    """Boolean [B,1,Tq,Tk]: same segment, key not padding, causal by index, in window."""
    allowed = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    causal = k_idx[:, None, :] <= q_idx[:, :, None]
    allowed &= causal
    if window is not None:
        allowed &= (q_idx[:, :, None] - k_idx[:, None, :]) < window
    # A padding query attends to itself only, so its (unused) output stays finite.
    allowed |= (q_seg[:, :, None] == 0) & (k_idx[:, None, :] == q_idx[:, :, None])
    return allowed[:, None]


def _lora_delta(x, lora, name, opts, rng):
    """(dropout(x) @ A) @ B * scale in float32. The activations are flattened to
    [B*T, in] first: XLA:CPU runs the rank-r matmuls on 3-D operands as slower batched
    kernels (measured in bench/README.md)."""
    if lora is None or name not in lora:
        return 0.0
    a, b = lora[name]["a"], lora[name]["b"]
    lead = x.shape[:-1]
    x32 = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    if opts.lora_dropout > 0.0 and rng is not None:
        keep = jax.random.bernoulli(jax.random.fold_in(rng, LINEAR_NAMES.index(name)),
                                    1.0 - opts.lora_dropout, x.shape).reshape(x32.shape)
        x32 = jnp.where(keep, x32 / (1.0 - opts.lora_dropout), 0.0)
    out = (x32 @ a.astype(jnp.float32)) @ b.astype(jnp.float32)
    return (out * opts.lora_scale).reshape(*lead, b.shape[-1])


def _merged_weight(w, ab, opts):
    """W + scale * A @ B in float32, cast to the compute dtype (PEFT's merge, per layer)."""
    delta = (ab["a"].astype(jnp.float32) @ ab["b"].astype(jnp.float32)) * opts.lora_scale
    return (as_dense(w, jnp.float32) + delta).astype(opts.dtype)


def dense(x, p, name, lora, opts, rng, bias=None):
    adapted = lora is not None and name in lora
    if adapted and opts.lora_merged:
        y = x @ _merged_weight(p[name], lora[name], opts)
    else:
        y = x @ as_dense(p[name], opts.dtype)
    if bias is not None:
        y = y + bias.astype(opts.dtype)
    if not adapted or opts.lora_merged:
        return y
    return y + _lora_delta(x, lora, name, opts, rng).astype(opts.dtype)


# ------------------------------------------------------------------------ one layer
def decoder_layer(cfg: ModelConfig, opts: ForwardOptions, x, p, lora, ctx, cache, rng,
                  out_pos=None):
    """One pre-norm block. ``ctx`` holds positions, masks and the attention hook.

    out_pos [B,K]: the block's output is wanted at these positions only (the last layer
    under ``OutputRequest.positions``). Keys and values still cover every position; queries,
    the attention output, o_proj and the MLP run at the K positions: [B,K,D] out."""
    b, t, _ = x.shape
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = opts.dtype
    y = rms_norm(x, p["input_norm"], cfg.rms_norm_eps, dt)
    k = dense(y, p, "k_proj", lora, opts, rng, p.get("k_bias")).reshape(b, t, kvh, hd)
    v = dense(y, p, "v_proj", lora, opts, rng, p.get("v_bias")).reshape(b, t, kvh, hd)
    k = apply_rope(k, ctx["positions"], ctx["inv_freq"])
    q_positions, mask = ctx["positions"], ctx["mask"]
    if out_pos is not None:
        x, y, q_positions = (_rows_at(a, out_pos) for a in (x, y, q_positions))
        mask = jnp.take_along_axis(mask, out_pos[:, None, :, None], axis=2)  # [B,1,K,S]
    tq = x.shape[1]
    q = dense(y, p, "q_proj", lora, opts, rng, p.get("q_bias")).reshape(b, tq, h, hd)
    q = sharding.constrain(apply_rope(q, q_positions, ctx["inv_freq"]),
                           ("batch", "length", "heads", "head_dim"))
    new_cache = None
    if cache is not None:
        start = ctx["cache_index"]
        k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0))
        v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0))
        new_cache = {"k": k, "v": v}
        k, v = k.astype(dt), v.astype(dt)
    mask_free = opts.attention_impl in MASK_FREE_IMPLS
    if cache is None and out_pos is None and mask_free:
        attn = mask_free_self_attention(q, k, v, window=cfg.sliding_window,
                                        implementation=opts.attention_impl)
    elif cache is None and out_pos is None:
        attn = causal_self_attention(q, k, v, mask, window=cfg.sliding_window,
                                     block=opts.attention_block,
                                     implementation=opts.attention_impl)
    else:   # a KV cache or the K output positions: not the aligned causal square
        attn = jax.nn.dot_product_attention(
            q, k, v, mask=mask, implementation=None if mask_free else opts.attention_impl)
    out = {}
    if ctx.get("attention_reduce") is not None:
        out["attention"] = ctx["attention_reduce"](q, k, mask)
    attn = attn.reshape(b, tq, h * hd)
    x = x + dense(attn, p, "o_proj", lora, opts, rng, p.get("o_bias"))
    x = sharding.constrain(x, ("batch", "length", "embed"))
    y = rms_norm(x, p["post_attn_norm"], cfg.rms_norm_eps, dt)
    gate = dense(y, p, "gate_proj", lora, opts, rng)
    up = dense(y, p, "up_proj", lora, opts, rng)
    act = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    x = x + dense(act, p, "down_proj", lora, opts, rng)
    x = sharding.constrain(x, ("batch", "length", "embed"))
    return x, new_cache, out


def _rows_at(a, pos):
    """a[b, pos[b, k]] for [B,T] or [B,T,...] arrays."""
    idx = pos.astype(jnp.int32).reshape(pos.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, idx, axis=1)


# ------------------------------------------------------------------------ full forward
@dataclasses.dataclass(frozen=True)
class TokenInputs:
    """What goes into a forward pass: token ids [B,T] and how they are laid out.

    positions default to the cumulative mask (or restart per packed segment).
    cache {'k','v': [L,B,S,KVH,hd], 'mask': [B,S] int}: KV-cache decoding; the tokens are
      written at ``cache_index`` (a scalar) and attend to all valid cached slots.
    """
    ids: Any
    attention_mask: Any = None
    positions: Any = None
    segment_ids: Any = None
    cache: dict | None = None
    cache_index: Any = None


@dataclasses.dataclass(frozen=True)
class OutputRequest:
    """What a forward pass returns.

    kind: 'logits' (float32 [B,T,V] or [B,K,V] at ``positions`` [B,K]),
      'hidden' (final-normed hidden states, same positions), or 'none'.
    layer_reduce(h, layer_index) -> pytree of small arrays, applied to the embedding
      output (index 0) and each layer's output; results stacked on a leading [L+1] axis.
    attention_reduce(q [B,Tq,H,hd], k [B,S,KVH,hd], mask [B,1,Tq,S]) -> pytree of small
      arrays, applied inside every layer; results stacked on a leading [L] axis under
      'attention' (the probe's attention entropy, without a [B,H,T,T] tensor).
    """
    kind: str = "logits"
    positions: Any = None
    layer_reduce: Callable | None = None
    attention_reduce: Callable | None = None


def forward(params: dict, cfg: ModelConfig, inputs: TokenInputs,
            want: OutputRequest = OutputRequest(), *, opts: ForwardOptions = ForwardOptions(),
            lora: dict | None = None, rng=None) -> dict:
    """Runs the decoder: ``inputs`` in, what ``want`` asks for out (a dict with 'logits'
    or 'hidden', and 'layers', 'attention', 'cache' when requested)."""
    input_ids, attention_mask, positions = inputs.ids, inputs.attention_mask, inputs.positions
    segment_ids, cache, cache_index = inputs.segment_ids, inputs.cache, inputs.cache_index
    output, output_positions = want.kind, want.positions
    layer_reduce, attention_reduce = want.layer_reduce, want.attention_reduce
    b, t = input_ids.shape
    dt = opts.dtype
    if positions is None:
        positions = default_positions(attention_mask, segment_ids, (b, t))
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is not None:
        s = cache["k"].shape[2]
        k_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        q_idx = idx + cache_index
        valid_new = (jnp.ones((b, t), jnp.int32) if attention_mask is None
                     else attention_mask.astype(jnp.int32))
        cache_mask = jax.lax.dynamic_update_slice(cache["mask"], valid_new, (0, cache_index))
        k_seg = cache_mask * (k_idx < cache_index + t)
        q_seg = valid_new
    else:
        if segment_ids is None:
            segment_ids = (jnp.ones((b, t), jnp.int32) if attention_mask is None
                           else attention_mask.astype(jnp.int32))
        q_idx = k_idx = idx
        q_seg = k_seg = segment_ids
    mask = attention_mask_matrix(q_seg, k_seg, q_idx, k_idx, cfg.sliding_window)
    max_pos = jnp.max(positions) if cfg.rope_type == "dynamic" else None
    ctx = {"positions": positions, "inv_freq": rope_inv_freq(cfg, max_pos), "mask": mask,
           "attention_reduce": attention_reduce, "cache_index": cache_index}

    x = jnp.take(params["embed"], input_ids, axis=0).astype(dt)
    x = sharding.constrain(x, ("batch", "length", "embed"))
    lora_layers = (lora or {}).get("layers")
    reduce0 = layer_reduce(x, 0) if layer_reduce else None
    # With output_positions and nothing that needs every layer's full output, the last
    # layer runs its queries, o_proj and MLP at those positions only (see decoder_layer).
    last_at_outputs = (output_positions is not None and output != "none" and cache is None
                       and layer_reduce is None and attention_reduce is None)
    n_scan = cfg.num_layers - 1 if last_at_outputs else cfg.num_layers
    policy = REMAT_POLICIES[opts.remat]
    remat = (lambda f: jax.checkpoint(f, policy=policy, prevent_cse=False)  # noqa: E731
             if opts.remat != "none" else f)

    def run_layer(h, i, lp, c, out_pos=None):
        # The frozen weights are indexed inside the loop (which is what scan does with
        # xs), so the scan can stop one layer short without copying a slice of them.
        p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                         params["layers"])
        layer_rng = None if rng is None else jax.random.fold_in(rng, i)
        return decoder_layer(cfg, opts, h, p, lp, ctx, c, layer_rng, out_pos)

    @remat
    def body(carry, xs):
        h, i = carry
        h, new_c, out = run_layer(h, i, *xs)
        if layer_reduce is not None:
            out["reduce"] = layer_reduce(h, i + 1)
        return (h, i + 1), (new_c, out)

    layer_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    lora_scan = lora_layers if not last_at_outputs else jax.tree.map(
        lambda a: a[:n_scan], lora_layers)
    (x, _), (new_cache, outs) = jax.lax.scan(body, (x, jnp.int32(0)),
                                             (lora_scan, layer_cache), length=n_scan)
    if last_at_outputs:
        last = jax.tree.map(lambda a: a[n_scan], lora_layers)
        x, _, _ = remat(run_layer)(x, jnp.int32(n_scan), last, None,
                                   output_positions.astype(jnp.int32))
        output_positions = None

    result: dict[str, Any] = {}
    if layer_reduce is not None:
        result["layers"] = jax.tree.map(lambda a, r: jnp.concatenate([a[None], r], 0),
                                        reduce0, outs["reduce"])
    if attention_reduce is not None:
        result["attention"] = outs["attention"]
    if cache is not None:
        result["cache"] = {"k": new_cache["k"], "v": new_cache["v"], "mask": cache_mask}
    if output == "none":
        return result
    if output_positions is not None:
        x = _rows_at(x, output_positions)
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps, dt)
    if output == "hidden":
        result["hidden"] = x
        return result
    result["logits"] = jnp.einsum("btd,dv->btv", x, lm_head(params, cfg, dt),
                                  preferred_element_type=jnp.float32).astype(jnp.float32)
    return result


def lm_head(params, cfg: ModelConfig, dtype):
    """[D,V] output projection (the transposed embedding when tied)."""
    if cfg.tie_word_embeddings:
        return params["embed"].astype(dtype).T
    return as_dense(params["lm_head"], dtype)


def init_kv_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "mask": jnp.zeros((batch, max_len), jnp.int32)}


# ------------------------------------------------------------------------ NNX module
class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading layer axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype):
        n, d = cfg.num_layers, cfg.hidden_size
        init = nnx.initializers.normal(0.02)
        self.input_norm = nnx.Param(jnp.ones((n, d), param_dtype))
        self.post_attn_norm = nnx.Param(jnp.ones((n, d), param_dtype))
        for name in LINEAR_NAMES:
            shape = (n, *linear_shape(cfg, name))
            setattr(self, name, nnx.Param(init(rngs.params(), shape, param_dtype)))
        if cfg.qkv_bias:
            for name in ("q", "k", "v"):
                width = linear_shape(cfg, f"{name}_proj")[1]
                setattr(self, f"{name}_bias", nnx.Param(jnp.zeros((n, width), param_dtype)))
        if cfg.o_bias:
            self.o_bias = nnx.Param(jnp.zeros((n, d), param_dtype))


class Decoder(nnx.Module):
    """Llama / Mistral / Qwen2 decoder. ``model(input_ids, attention_mask=m)`` -> logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32, remat: str = "none", attention_impl: str | None = None):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r}; expected one of "
                             f"{list(ATTENTION_IMPLS)}")
        self.config = cfg
        self.options = ForwardOptions(dtype=dtype, remat=remat, attention_impl=attention_impl)
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
        self.layers = DecoderLayers(cfg, rngs, param_dtype)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), param_dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(
                init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), param_dtype))
        self.lora = None  # a xft_jax.lora.LoRA module once adapters are attached

    def params(self) -> dict:
        """The frozen weights as a plain pytree for ``forward``."""
        return params_tree(nnx.state(self, nnx.Param))

    def lora_params(self) -> dict | None:
        if self.lora is None:
            return None
        return params_tree(nnx.state(self.lora, nnx.LoRAParam))

    def forward_options(self) -> ForwardOptions:
        scale = 1.0 if self.lora is None else self.lora.scale
        dropout = 0.0 if self.lora is None else self.lora.dropout
        return dataclasses.replace(self.options, lora_scale=scale, lora_dropout=dropout)

    def forward(self, inputs: TokenInputs, want: OutputRequest = OutputRequest(),
                rng=None) -> dict:
        return forward(self.params(), self.config, inputs, want, opts=self.forward_options(),
                       lora=self.lora_params(), rng=rng)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        return self.forward(TokenInputs(input_ids, attention_mask, positions,
                                        segment_ids))["logits"]

