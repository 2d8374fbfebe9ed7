"""Blockwise weight quantisation of the frozen base (QLoRA's NF4, or int8) under LoRA.

A linear weight [..., in, out] is cut into blocks of ``block`` consecutive input rows per
output column; each block keeps its absmax as a float32 scale and each weight becomes a
code: NF4 (the 16 NormalFloat levels of QLoRA / bitsandbytes, two codes per uint8) or
int8 (round(127 w / absmax)). With double quantisation the scales themselves are stored
as int8 around their mean, one float32 scale per ``dq_block`` of them, as in QLoRA.

Layout (``codes`` keeps the weight's logical axes, plus 'quant_block' for the rows inside
a block, so it shards like the weight it encodes):

    codes      uint8 [..., nb, block // 2, out] (nf4: row r and r + block/2 share a byte)
               int8  [..., nb, block, out]      (int8)
    scales     float32 [..., nb, out]           (int8 [..., nb, out] when double-quantised)
    dq_scales  float32 [..., nb, out // dq_block]   (double quantisation only)
    dq_offset  float32 [..., 1, 1]                   (double quantisation only)

``QuantizedWeight`` is a pytree (arrays as children, the rest static), so it passes
through jit, scan (which slices the leading layer axis of every child) and sharding;
``decoder.as_dense`` calls ``dequantize`` right before each matmul inside the jitted
step, one layer at a time under the scan, so only one layer is ever dense.

Quantisation happens while loading (``hf_io.load_pretrained(..., transform=
layer_transform(qcfg))``): each
layer of each linear weight is read, quantised on its devices and written into the stacked
quantised buffers, so the unquantised model is never held whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from xft_jax import sharding
from xft_jax.errors import UserError
from xft_jax.models.config import ModelConfig
from xft_jax.models.decoder import LINEAR_NAMES, Decoder, linear_shape
from xft_jax.models.partitioning import leaf_axes, path_keys

KINDS = ("none", "nf4", "int8")

# The NF4 code book exactly as bitsandbytes ships it (QLoRA, Dettmers et al. 2023, App. E).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
# Worst-case |w - dequant(quant(w))| / absmax of a block: half the largest level gap (NF4),
# half a step of 1/127 (int8).
NF4_MAX_REL_ERROR = float(np.max(np.diff(NF4_LEVELS)) / 2)
INT8_MAX_REL_ERROR = 1.0 / 127 / 2


class QuantizationError(UserError, ValueError):
    """A quantisation setting or weight that cannot be quantised as asked."""


# ------------------------------------------------------------------------ config
# ``model`` config key -> QuantConfig field
_CONFIG_KEYS = {"quantization": "kind", "quant_block": "block", "quant_double": "double_quant",
                "quant_dq_block": "dq_block", "quant_lm_head": "quantize_lm_head"}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantise and how (``model.quantization`` and friends in a run config)."""
    kind: str = "none"                    # none | nf4 | int8
    block: int = 64                       # input rows per absmax block
    double_quant: bool = False            # int8 scales + one float32 per dq_block scales
    dq_block: int = 256
    quantize_lm_head: bool = False        # embedding and LM head stay dense by default
    targets: tuple[str, ...] = LINEAR_NAMES

    def __post_init__(self):
        if self.kind not in KINDS:
            raise QuantizationError(f"model.quantization={self.kind!r}; expected one of {KINDS}")
        if self.block < 2 or self.block % 2:
            raise QuantizationError(f"model.quant_block={self.block}: must be an even "
                                    f"number >= 2 (NF4 packs two codes per byte)")
        if self.dq_block < 1:
            raise QuantizationError(f"model.quant_dq_block={self.dq_block}: must be >= 1")
        bad = [t for t in self.targets if t not in LINEAR_NAMES]
        if bad:
            raise QuantizationError(f"quantisation targets {bad}: not linear layers "
                                    f"(known: {LINEAR_NAMES})")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @classmethod
    def from_config(cls, model_config) -> "QuantConfig":
        """From the ``model`` section of a config (``config_defaults`` declares its keys);
        a plain mapping may leave keys out, which then take the fields' defaults."""
        kw = {field: model_config[key] for key, field in _CONFIG_KEYS.items()
              if key in model_config}
        kw["kind"] = str(kw.pop("kind", None) or "none")
        return cls(**kw)

    def applies(self, keys: Sequence[str]) -> bool:
        """Whether the parameter at ``keys`` (e.g. ('layers', 'q_proj')) is quantised."""
        if not self.enabled:
            return False
        if keys[0] == "layers":
            return keys[-1] in self.targets
        return keys[-1] == "lm_head" and self.quantize_lm_head


# ------------------------------------------------------------------------ the weight
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A blockwise-quantised [..., in, out] weight; ``dequantize(dtype)`` gives it back."""
    codes: Any
    scales: Any
    dq_scales: Any = None
    dq_offset: Any = None
    kind: str = dataclasses.field(default="nf4", metadata=dict(static=True))
    block: int = dataclasses.field(default=64, metadata=dict(static=True))
    n_in: int = dataclasses.field(default=0, metadata=dict(static=True))
    dq_block: int = dataclasses.field(default=0, metadata=dict(static=True))
    orig_dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

    # --- array-like metadata (derived from the children, so valid after scan slicing)
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-3]) + (self.n_in, self.codes.shape[-1])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return jnp.dtype(self.orig_dtype)

    @property
    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in jax.tree.leaves(self)))

    def block_scales(self) -> jax.Array:
        """float32 [..., nb, out] absmax of every block (double quantisation undone)."""
        if self.dq_block == 0:
            return self.scales.astype(jnp.float32)
        q = self.scales.astype(jnp.float32)
        s2 = jnp.repeat(self.dq_scales.astype(jnp.float32), self.dq_block, axis=-1)
        return q / 127.0 * s2 + self.dq_offset

    def code_values(self) -> jax.Array:
        """float32 [..., nb, block, out]: the NF4 level in [-1, 1] of every code (unpacked
        and looked up), or the int8 integer itself."""
        if self.kind == "nf4":
            idx = jnp.concatenate([self.codes & 0x0F, self.codes >> 4], axis=-2)
            return jnp.take(jnp.asarray(NF4_LEVELS), idx.astype(jnp.int32), mode="clip")
        return self.codes.astype(jnp.float32)

    def steps(self) -> jax.Array:
        """float32 [..., nb, out]: the value of one code unit, absmax (nf4) or absmax/127
        (so that integer multiples of a power-of-two step come back exactly)."""
        s = self.block_scales()
        return s if self.kind == "nf4" else s / 127.0

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The dense [..., in, out] weight in ``dtype`` (float32 math, then cast)."""
        w = self.code_values() * self.steps()[..., None, :]
        *lead, nb, blk, out = w.shape
        w = w.reshape(*lead, nb * blk, out)
        if nb * blk != self.n_in:
            w = w[..., :self.n_in, :]
        return w.astype(dtype)

    astype = dequantize

    def take_columns(self, ids, dtype=jnp.float32) -> jax.Array:
        """[..., in, K] dense columns ``ids`` of the weight, without dequantising the rest
        (the scorer reads five label columns of a quantised LM head this way)."""
        ids = jnp.asarray(ids, jnp.int32)
        scales = jnp.take(self.block_scales(), ids, axis=-1)
        sub = dataclasses.replace(self, codes=jnp.take(self.codes, ids, axis=-1),
                                  scales=scales, dq_scales=None, dq_offset=None, dq_block=0)
        return sub.dequantize(dtype)

    def child_axes(self, axes: Sequence[str | None]) -> "QuantizedWeight":
        """Logical axes of every child from the weight's axes (..., in_axis, out_axis)."""
        *lead, ax_in, ax_out = axes
        lead = tuple(lead)
        return dataclasses.replace(
            self, codes=lead + (ax_in, "quant_block", ax_out), scales=lead + (ax_in, ax_out),
            dq_scales=None if self.dq_scales is None else lead + (ax_in, ax_out),
            dq_offset=None if self.dq_offset is None else lead + (None, None))

    def shardings_for(self, mesh, axes: Sequence[str | None], rules=None) -> "QuantizedWeight":
        """The same structure with a NamedSharding per child (jit in/out_shardings)."""
        ax = self.child_axes(axes)
        return jax.tree.map(
            lambda a, x: sharding.named_sharding(mesh, a, x.shape, rules),
            ax, self, is_leaf=lambda x: isinstance(x, tuple))


# ------------------------------------------------------------------------ (de)quantise
def _nf4_encode(y):
    """Nearest NF4 level index (uint8 0..15) of values in [-1, 1]: 15 fused compares."""
    code = jnp.zeros(y.shape, jnp.uint8)
    for m in NF4_MIDPOINTS:
        code = code + (y > m).astype(jnp.uint8)
    return code


def _dq_block_for(out: int, dq_block: int) -> int:
    """The second-level block: ``dq_block`` when it divides the output width, else the
    largest common divisor (e.g. 64 for a 64-wide test model)."""
    return dq_block if out % dq_block == 0 else math.gcd(out, dq_block)


def quantize(w, kind: str = "nf4", block: int = 64, double_quant: bool = False,
             dq_block: int = 256) -> QuantizedWeight:
    """Blockwise quantisation of a [..., in, out] weight (jittable; ``in`` is zero-padded
    up to a multiple of ``block``)."""
    if kind not in ("nf4", "int8"):
        raise QuantizationError(f"quantize: kind={kind!r}; expected 'nf4' or 'int8'")
    if w.ndim < 2:
        raise QuantizationError(f"quantize: weight of shape {w.shape} is not a matrix")
    *lead, n_in, out = w.shape
    nb = -(-n_in // block)
    x = w.astype(jnp.float32)
    if nb * block != n_in:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, nb * block - n_in), (0, 0)])
    x = x.reshape(*lead, nb, block, out)
    absmax = jnp.max(jnp.abs(x), axis=-2)                              # [..., nb, out]
    y = x / jnp.where(absmax > 0, absmax, 1.0)[..., None, :]
    if kind == "nf4":
        c = _nf4_encode(y)
        half = block // 2
        codes = c[..., :half, :] | (c[..., half:, :] << 4)
    else:
        codes = jnp.clip(jnp.round(y * 127.0), -127, 127).astype(jnp.int8)
    scales, dq_scales, dq_offset, dqb = absmax, None, None, 0
    if double_quant:
        dqb = _dq_block_for(out, dq_block)
        dq_offset = jnp.mean(absmax, axis=(-2, -1), keepdims=True)
        c = (absmax - dq_offset).reshape(*lead, nb, out // dqb, dqb)
        dq_scales = jnp.max(jnp.abs(c), axis=-1)
        q = c / jnp.where(dq_scales > 0, dq_scales, 1.0)[..., None]
        scales = jnp.clip(jnp.round(q * 127.0), -127, 127).astype(jnp.int8).reshape(
            *lead, nb, out)
    return QuantizedWeight(codes=codes, scales=scales, dq_scales=dq_scales,
                           dq_offset=dq_offset, kind=kind, block=block, n_in=n_in,
                           dq_block=dqb, orig_dtype=jnp.dtype(w.dtype).name)


def max_abs_error_bound(w, kind: str, block: int, double_quant: bool = False,
                        dq_block: int = 256) -> np.ndarray:
    """Per-element worst-case reconstruction error [..., in, out] (numpy, for tests and
    reports): rel * absmax of the element's block, plus the scale's own error (at most
    half a step of its int8 code, times |level| <= 1) when the scales are quantised."""
    w = np.asarray(w, np.float32)
    *lead, n_in, out = w.shape
    nb = -(-n_in // block)
    x = np.zeros((*lead, nb * block, out), np.float32)
    x[..., :n_in, :] = w
    absmax = np.abs(x.reshape(*lead, nb, block, out)).max(axis=-2)
    rel = NF4_MAX_REL_ERROR if kind == "nf4" else INT8_MAX_REL_ERROR
    bound = absmax * rel
    if double_quant:
        dqb = _dq_block_for(out, dq_block)
        c = absmax - absmax.mean(axis=(-2, -1), keepdims=True)
        s2 = np.abs(c.reshape(*lead, nb, out // dqb, dqb)).max(axis=-1)
        ds = np.repeat(s2 / 127.0 / 2, dqb, axis=-1)
        bound = (absmax + ds) * rel + ds
    full = np.repeat(bound, block, axis=-2)
    return full[..., :n_in, :]


@functools.lru_cache(maxsize=None)
def _jitted_quantize(kind, block, double_quant, dq_block, out_shardings):
    return jax.jit(functools.partial(quantize, kind=kind, block=block,
                                     double_quant=double_quant, dq_block=dq_block),
                   out_shardings=out_shardings)


def quantize_array(x: jax.Array, qcfg: QuantConfig, axes: Sequence[str | None] | None = None,
                   mesh=None) -> QuantizedWeight:
    """Quantises a device array where it lies: with a mesh (taken from ``x`` when it has a
    NamedSharding) and the weight's logical ``axes``, every child is placed with the
    sharding of the axes it inherits. One compiled function per shape and sharding."""
    if mesh is None and isinstance(getattr(x, "sharding", None), NamedSharding):
        mesh = x.sharding.mesh
    out_sh = None
    if mesh is not None and axes is not None:
        abstract = jax.eval_shape(functools.partial(
            quantize, kind=qcfg.kind, block=qcfg.block, double_quant=qcfg.double_quant,
            dq_block=qcfg.dq_block), jax.ShapeDtypeStruct(x.shape, x.dtype))
        out_sh = abstract.shardings_for(mesh, axes)
    elif getattr(x, "sharding", None) is not None:
        out_sh = x.sharding          # one device: keep it there
    fn = _jitted_quantize(qcfg.kind, qcfg.block, qcfg.double_quant, qcfg.dq_block, out_sh)
    return fn(x)


# ------------------------------------------------------------------------ loading
def layer_transform(qcfg: QuantConfig) -> Callable:
    """``fn(keys, array)`` for ``hf_io`` to apply to every layer of every stacked leaf as it
    is read (and to top-level leaves): quantises the targets, passes the rest through."""
    def fn(keys, arr):
        keys = tuple(keys)
        if not qcfg.applies(keys):
            return arr
        axes = leaf_axes(keys)
        if keys[0] == "layers" and arr.ndim == len(axes) - 1:
            axes = axes[1:]                                 # one layer of a stacked leaf
        return quantize_array(arr, qcfg, axes)
    return fn


# ------------------------------------------------------------------------ memory
def param_bytes(params) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in a pytree, quantised children too."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(params)))


def theoretical_bytes(cfg: ModelConfig, qcfg: QuantConfig, dtype=jnp.bfloat16) -> int:
    """Size by formula: 0.5 byte (nf4) or 1 byte (int8) per quantised weight plus 4 bytes
    per block scale (1 byte plus 4 per dq_block when double-quantised); every other
    parameter dense in ``dtype``."""
    item = jnp.dtype(dtype).itemsize
    per_w = {"none": item, "nf4": 0.5, "int8": 1.0}[qcfg.kind]

    def linear(d_in, d_out):
        if not qcfg.enabled:
            return d_in * d_out * item
        nb = -(-d_in // qcfg.block)
        scales = nb * d_out * 4
        if qcfg.double_quant:
            dqb = _dq_block_for(d_out, qcfg.dq_block)
            scales = nb * d_out + nb * (d_out // dqb) * 4 + 4
        return nb * qcfg.block * d_out * per_w + scales

    n, d, v = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    total = sum(n * linear(*linear_shape(cfg, t)) if t in qcfg.targets
                else n * math.prod(linear_shape(cfg, t)) * item for t in LINEAR_NAMES)
    total += (v * d + d + 2 * n * d) * item                 # embed, final norm, layer norms
    if cfg.qkv_bias:
        total += n * sum(linear_shape(cfg, t)[1] for t in ("q_proj", "k_proj", "v_proj")) * item
    if cfg.o_bias:
        total += n * d * item
    if not cfg.tie_word_embeddings:
        total += linear(d, v) if qcfg.quantize_lm_head else d * v * item
    return int(total)


def abstract_params(cfg: ModelConfig, qcfg: QuantConfig, dtype=jnp.bfloat16) -> dict:
    """The params pytree of a (quantised) model as ShapeDtypeStructs, nothing allocated:
    the abstract model from ``nnx.eval_shape`` with each target replaced by the
    ``jax.eval_shape`` of its quantisation."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype))
    params = abstract.params()
    q = functools.partial(quantize, kind=qcfg.kind, block=qcfg.block,
                          double_quant=qcfg.double_quant, dq_block=qcfg.dq_block)

    def one(path, x):
        return jax.eval_shape(q, x) if qcfg.applies(path_keys(path)) else x
    return jax.tree_util.tree_map_with_path(one, params)


def quantized_leaves(params) -> dict[str, QuantizedWeight]:
    """'layers.q_proj' -> QuantizedWeight for every quantised leaf of a params dict."""
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]
    for path, x in flat:
        if isinstance(x, QuantizedWeight):
            out[".".join(path_keys(path))] = x
    return out


__all__ = ["QuantConfig", "QuantizedWeight", "QuantizationError", "NF4_LEVELS", "KINDS",
           "quantize", "quantize_array", "layer_transform", "param_bytes", "theoretical_bytes", "abstract_params",
           "max_abs_error_bound", "quantized_leaves", "NF4_MAX_REL_ERROR",
           "INT8_MAX_REL_ERROR"]
