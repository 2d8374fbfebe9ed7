"""GGUF checkpoints (llama.cpp's single-file format) in: config, weights and tokenizer.

The header is read by ``gguf_file`` (a memory map, no pickle), the tensors dequantised by
the ``gguf`` package's numpy kernels (llama.cpp's own: F32/F16/BF16, Q4_0 ... Q8_0,
K-quants, IQ types). Like the safetensors path, the abstract model is built first and each parameter's
sharding derived; then one tensor at a time is dequantised, un-permuted (llama.cpp
stores Llama's Q and K rows interleaved for its rotary kernel), transposed to our
[in, out] layout, cast to the load dtype and placed into its device shards. The host
holds at most one dequantised tensor; its pages of the file are dropped once it is read.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from xft_jax import sharding
from xft_jax.models.config import ModelConfig
from xft_jax.models.decoder import LINEAR_NAMES, Decoder
from xft_jax.models.layer_stacking import layer_sharding, put_layer, set_state_leaf
from xft_jax.models.partitioning import leaf_axes
from xft_jax.models.gguf_file import GGUFFile, GGUFFormatError, TensorInfo
from xft_jax.errors import UserError

# our stacked leaf name -> GGUF name inside block N (weights stored [out, in], like HF)
GGUF_LAYER_NAMES = {
    "input_norm": "attn_norm.weight", "post_attn_norm": "ffn_norm.weight",
    "q_proj": "attn_q.weight", "k_proj": "attn_k.weight",
    "v_proj": "attn_v.weight", "o_proj": "attn_output.weight",
    "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
    "o_bias": "attn_output.bias",
    "gate_proj": "ffn_gate.weight", "up_proj": "ffn_up.weight", "down_proj": "ffn_down.weight",
}
GGUF_TOP_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
                  "lm_head": "output.weight"}
LAYER_PREFIX = "blk.{i}."
TRANSPOSED = set(LINEAR_NAMES) | {"lm_head"}
# GGUF architectures we load -> our model_type. llama.cpp writes Mistral as 'llama'.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# Architectures whose Q/K rows llama.cpp's converter permuted (its LlamaModel.permute).
PERMUTED_QK = {"llama", "mistral"}
MISSING = object()


class GGUFError(UserError, ValueError):
    """A GGUF file this project cannot load faithfully (names the file and the problem)."""


def is_gguf(path: str) -> bool:
    """A regular file that is (or claims, by name, to be) a GGUF checkpoint."""
    if not os.path.isfile(path):
        return False
    if path.endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# ------------------------------------------------------------------------ reading
def open_gguf(path: str) -> GGUFFile:
    """The metadata and tensor index of ``path``; a damaged or truncated file is one
    GGUFError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        raise GGUFError(f"{path}: not a complete GGUF file: {e}") from None


def field(reader: GGUFFile, key: str, default: Any = MISSING):
    """A metadata value (str, number, bool or list), or ``default`` when absent."""
    if key not in reader.metadata:
        if default is MISSING:
            raise GGUFError(f"{reader.path}: missing metadata key {key!r}")
        return default
    return reader.metadata[key]


def config_from_gguf(reader, path: str) -> ModelConfig:
    """ModelConfig from GGUF metadata (llama.cpp's key names, ``{arch}.*``)."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: unsupported architecture {arch!r} (supported: "
                        f"{', '.join(sorted(ARCHITECTURES))})")
    names = set(reader.tensors)

    def need(key):
        value = field(reader, f"{arch}.{key}", None)
        if value is None:
            raise GGUFError(f"{path}: missing metadata key {arch}.{key!s}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(field(reader, f"{arch}.attention.key_length", hidden // heads))
    rot = int(field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise GGUFError(f"{path}: partial rotary embedding ({arch}.rope.dimension_count={rot}"
                        f", head_dim={head_dim}) is not supported")
    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    rope_scaling = {}
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear",
                        "factor": float(need("rope.scaling.factor"))}
    elif scaling != "none":
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in names:
        raise GGUFError(f"{path}: per-frequency rope factors (tensor 'rope_freqs.weight', "
                        f"Llama-3.1 style) are not supported")
    tokens = field(reader, "tokenizer.ggml.tokens", None)
    vocab = field(reader, f"{arch}.vocab_size", None)
    if vocab is None:
        vocab = len(tokens) if tokens is not None else _embed_rows(reader, path)
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=tuple(sorted(rope_scaling.items())),
        max_position_embeddings=int(field(reader, f"{arch}.context_length", 4096)),
        qkv_bias=ARCHITECTURES[arch] == "qwen2",
        tie_word_embeddings="output.weight" not in names,
        model_type=ARCHITECTURES[arch],
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id", None),
    )


def _embed_rows(reader, path: str) -> int:
    if GGUF_TOP_NAMES["embed"] in reader.tensors:
        return int(reader.tensors[GGUF_TOP_NAMES["embed"]].shape[0])
    raise GGUFError(f"{path}: no vocab size in the metadata and no tensor 'token_embd.weight'")


def qk_row_order(n_heads: int, head_dim: int) -> np.ndarray:
    """Row ``r`` of the HF weight is row ``order[r]`` of llama.cpp's permuted one
    (llama.cpp interleaves each head's two rotary halves: HF (h, k, j) -> GGUF (h, j, k))."""
    return np.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2).transpose(
        0, 2, 1).reshape(-1)


def dequantized(reader: GGUFFile, t: TensorInfo, out: np.ndarray, *, transpose: bool,
                row_order: np.ndarray | None = None, chunk_bytes: int = 16 * 2**20) -> None:
    """Writes tensor ``t`` (rows reordered by ``row_order``, then transposed if asked)
    into ``out``, dequantising a few MB of rows at a time: the package's kernels make
    several float32 temporaries of what they are given."""
    from gguf import quants

    data = reader.rows(t)
    if data.ndim == 1:
        out[...] = quants.dequantize(data, t.tensor_type)[
            slice(None) if row_order is None else row_order]
        return
    step = max(1, chunk_bytes // (4 * t.shape[-1]))
    for r in range(0, t.shape[0], step):
        rows = slice(r, min(r + step, t.shape[0]))
        block = data[rows] if row_order is None else data[row_order[rows]]
        try:
            w = quants.dequantize(block, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{reader.path}: tensor {t.name!r} has quantisation type "
                            f"{t.tensor_type.name}, which cannot be dequantised") from None
        if transpose:
            out[:, rows] = w.T
        else:
            out[rows] = w


# ------------------------------------------------------------------------ checking
def _leaves(cfg: ModelConfig, dtype, compute_dtype, remat, attention_impl):
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype,
                                              dtype=compute_dtype, remat=remat,
                                              attention_impl=attention_impl))
    graphdef, state = nnx.split(abstract)
    leaves = []
    for p, var in nnx.to_flat_state(state):
        keys = tuple(str(getattr(k, "key", k)) for k in p)
        leaves.append((p, keys, tuple(var.get_value().shape)))
    return graphdef, state, leaves


def gguf_name(keys: tuple[str, ...], layer: int | None) -> str:
    if layer is None:
        return GGUF_TOP_NAMES[keys[-1]]
    return LAYER_PREFIX.format(i=layer) + GGUF_LAYER_NAMES[keys[-1]]


def expected_gguf_shapes(cfg: ModelConfig, leaves) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy-order shape ([out, in] for weights) for this config."""
    out = {}
    for _, keys, shape in leaves:
        leaf = keys[-1]
        if keys[0] == "layers":
            per = shape[1:]
            for i in range(shape[0]):
                out[gguf_name(keys, i)] = per[::-1] if leaf in TRANSPOSED else per
        else:
            out[gguf_name(keys, None)] = shape[::-1] if leaf in TRANSPOSED else shape
    return out


def check_tensors(reader, cfg: ModelConfig, leaves, path: str) -> dict:
    """{name: tensor}; every expected tensor present with the metadata's shape and a type
    we can dequantise, and nothing else in the file."""
    from gguf import GGMLQuantizationType as Q, quants

    tensors = reader.tensors
    expected = expected_gguf_shapes(cfg, leaves)
    for name, shape in expected.items():
        if name not in tensors:
            raise GGUFError(f"{path}: missing tensor {name!r} (expected shape {shape})")
        t = tensors[name]
        found = tuple(t.shape)
        if found != tuple(shape):
            raise GGUFError(f"{path}: tensor {name!r} has shape {found}, expected "
                            f"{tuple(shape)} from the metadata")
        if t.tensor_type not in (Q.F32, Q.F16) and t.tensor_type not in quants._type_traits:
            raise GGUFError(f"{path}: tensor {name!r} has quantisation type "
                            f"{t.tensor_type.name}, which the gguf package cannot dequantise")
    for name in tensors:
        if name not in expected:
            raise GGUFError(f"{path}: unexpected tensor {name!r} (not part of a "
                            f"{cfg.architecture} with this metadata)")
    return tensors


# ------------------------------------------------------------------------ loading
def _host_tensor(reader: GGUFFile, t: TensorInfo, leaf: str, cfg: ModelConfig, arch: str,
                 np_dtype) -> np.ndarray:
    """One tensor in our layout and the load dtype, on the host."""
    order = None
    if arch in PERMUTED_QK and leaf in ("q_proj", "k_proj"):
        heads = cfg.num_heads if leaf == "q_proj" else cfg.num_kv_heads
        order = qk_row_order(heads, cfg.head_dim)
    transpose = leaf in TRANSPOSED
    out = np.empty(t.shape[::-1] if transpose else t.shape, np_dtype)
    dequantized(reader, t, out, transpose=transpose, row_order=order)
    reader.release(t)
    return out


def _device_array(host: np.ndarray, shard) -> jax.Array:
    return jax.make_array_from_callback(host.shape, shard, lambda idx: host[idx])


def load_gguf(path: str, dtype=jnp.float32, mesh: Mesh | None = None, *,
              compute_dtype=None, remat: str = "none", attention_impl: str | None = None,
              transform: Callable | None = None) -> Decoder:
    """A Decoder with weights from a GGUF file, placed with their shardings over ``mesh``.

    transform: ``fn(keys, array)`` applied to each layer of every leaf as it is placed
    (quantisation), as in ``hf_io.load_pretrained``.
    """
    reader = open_gguf(path)
    arch = field(reader, "general.architecture")
    cfg = config_from_gguf(reader, path)
    compute_dtype = compute_dtype or dtype
    graphdef, state, leaves = _leaves(cfg, dtype, compute_dtype, remat, attention_impl)
    tensors = check_tensors(reader, cfg, leaves, path)
    np_dtype = np.dtype(jnp.dtype(dtype))
    loaded = {}
    for p, keys, shape in leaves:
        if mesh is not None:
            shard = sharding.named_sharding(mesh, leaf_axes(keys), shape)
        else:
            shard = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        leaf = keys[-1]
        if keys[0] != "layers":
            host = _host_tensor(reader, tensors[gguf_name(keys, None)], leaf, cfg, arch,
                                np_dtype)
            arr = _device_array(host, shard)
            del host
            loaded[keys] = arr if transform is None else transform(keys, arr)
            jax.block_until_ready(loaded[keys])
            continue
        layer_shard = layer_sharding(shard, len(shape))
        for i in range(shape[0]):
            host = _host_tensor(reader, tensors[gguf_name(keys, i)], leaf, cfg, arch,
                                np_dtype)
            arr = _device_array(host, layer_shard)
            del host
            out = arr if transform is None else transform(keys, arr)
            del arr
            loaded[keys] = put_layer(loaded.get(keys), out, i, shape[0])
            del out
            jax.block_until_ready(loaded[keys])   # frees this layer's staging copy
    for p, keys, _ in leaves:
        set_state_leaf(state, p, loaded[keys])
    return nnx.merge(graphdef, state)


def gguf_config(path: str) -> ModelConfig:
    """The ModelConfig a GGUF file describes (metadata only; no tensor is read)."""
    return config_from_gguf(open_gguf(path), path)


# ------------------------------------------------------------------------ tokenizer
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
_TOKENIZER_KEYS = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens",
                   "scores": "scores", "token_type": "token_type", "merges": "merges",
                   "precompiled_charsmap": "precompiled_charsmap",
                   "add_space_prefix": "add_prefix_space"}


def gguf_tokenizer(path: str):
    """A ``PreTrainedTokenizerFast`` built from the GGUF metadata (tokens, merges, special
    ids, add-bos/eos flags, chat template) by transformers' GGUF tokenizer conversion."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    reader = open_gguf(path)
    arch = field(reader, "general.architecture")
    tok = {name: field(reader, f"tokenizer.ggml.{key}")
           for key, name in _TOKENIZER_KEYS.items() if f"tokenizer.ggml.{key}" in reader.metadata}
    if "tokens" not in tok:
        raise GGUFError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.tokens)")
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{key}" in reader.metadata:
            tok[key.replace("unknown_", "unk_").replace("padding_", "pad_")] = field(
                reader, f"tokenizer.ggml.{key}")
    kwargs: dict[str, Any] = {}
    for key in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{key}" in reader.metadata:
            kwargs[key] = bool(field(reader, f"tokenizer.ggml.{key}"))
    if tok.get("tokenizer_type") == "llama":
        kwargs.setdefault("add_bos_token", True)
    template = field(reader, "tokenizer.chat_template", None)
    if template:
        kwargs["chat_template"] = template
    for name, key in _SPECIAL_IDS.items():
        token_id = field(reader, f"tokenizer.ggml.{key}", None)
        if token_id is not None:
            kwargs[name] = tok["tokens"][int(token_id)]
    try:
        backend, extra = convert_gguf_tokenizer(arch, tok)
    except (KeyError, ValueError, NotImplementedError) as e:
        raise GGUFError(f"{path}: cannot build the tokenizer "
                        f"({tok.get('tokenizer_type')!r}): {e}") from None
    kwargs.update(extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


__all__ = ["GGUFError", "is_gguf", "open_gguf", "config_from_gguf", "gguf_config",
           "load_gguf", "gguf_tokenizer", "qk_row_order", "GGUF_LAYER_NAMES",
           "GGUF_TOP_NAMES"]
