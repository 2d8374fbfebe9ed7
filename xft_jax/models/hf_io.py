"""Hugging Face checkpoint I/O: safetensors in, safetensors out, never pickle.

Loading builds the abstract model first (``nnx.eval_shape``), derives each parameter's
sharding, then reads for every device shard exactly the slice it holds, straight from the
files (``jax.make_array_from_callback``). The whole model is never held twice on the host,
and on several hosts each host reads only what its own devices hold. Tensors are read
layer by layer in the order they sit in the files, so a load from storage reads each
file front to back.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xft_jax import atomic, errors, sharding
from xft_jax.errors import UserError
from xft_jax.models import gguf_io
from xft_jax.models.config import ModelConfig
from xft_jax.models.layer_stacking import layer_sharding, put_layer, set_state_leaf
from xft_jax.models.decoder import Decoder
from xft_jax.models.partitioning import leaf_axes
from xft_jax.models.safetensors_reader import SafetensorsError, SafetensorsFile

LAYER_PREFIX = "model.layers.{i}."
# our stacked leaf name -> HF name inside a layer (weights stored [out, in] there)
HF_LAYER_NAMES = {
    "input_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias", "o_bias": "self_attn.o_proj.bias",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
HF_TOP_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                "lm_head": "lm_head.weight"}
TRANSPOSED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "lm_head"}
# Buffers some checkpoints carry that hold no weights.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that does not match the model it claims to be."""


errors.register(SafetensorsError)   # a malformed file the user pointed us at


# ------------------------------------------------------------------------ index
def _tensor_index(path: str) -> tuple[dict[str, SafetensorsFile], list[str]]:
    """Tensor name -> open file, and the list of files, for single or sharded checkpoints."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = {}
        for name in sorted(set(weight_map.values())):
            fp = os.path.join(path, name)
            if not os.path.exists(fp):
                raise CheckpointError(f"{index}: lists {name}, which does not exist")
            files[name] = SafetensorsFile(fp)
        out = {}
        for tensor, name in weight_map.items():
            if tensor not in files[name].tensors:
                raise CheckpointError(
                    f"{index}: maps tensor {tensor!r} to {name}, which does not contain it")
            out[tensor] = files[name]
        return out, [f.path for f in files.values()]
    if os.path.exists(single):
        f = SafetensorsFile(single)
        return {t: f for t in f.tensors}, [single]
    pickles = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
               if os.path.exists(os.path.join(path, n))]
    if pickles:
        raise CheckpointError(
            f"{path}: only {', '.join(pickles)} found. Pickle checkpoints are refused (loading "
            f"them can execute code). Convert once in a trusted environment, e.g. "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            f"safe_serialization=True), then load the safetensors.")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for this config (the checkpoint must match exactly)."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        keys = [str(getattr(k, "key", k)) for k in path]
        shape = leaf.get_value().shape
        for name, hf_shape in _hf_tensors_of(keys, shape):
            out[name] = hf_shape
    return out


def _hf_tensors_of(keys: list[str], shape: tuple[int, ...]):
    leaf = keys[-1]
    if keys[0] == "layers":
        per = tuple(shape[1:])
        hf = per[::-1] if leaf in TRANSPOSED else per
        for i in range(shape[0]):
            yield LAYER_PREFIX.format(i=i) + HF_LAYER_NAMES[leaf], hf
    else:
        yield HF_TOP_NAMES[leaf], tuple(shape[::-1]) if leaf in TRANSPOSED else tuple(shape)


# ------------------------------------------------------------------------ loading
# Source dtypes staged as stored and cast on device (when no wider than the target).
_DEVICE_CAST = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}


def _stage_dtype(f: SafetensorsFile, name: str, np_dtype: np.dtype) -> np.dtype:
    """The dtype a tensor is staged in on the host: its own when the device can cast it
    and it is no wider than the target (staging stays at most target-sized), else the
    target (cast on the host)."""
    src = np.dtype(f.tensors[name]["dtype"])
    return src if src in _DEVICE_CAST and src.itemsize <= np_dtype.itemsize else np_dtype


def _blocks(index, shape) -> tuple[slice, slice | None]:
    """(rows, columns) of a device shard's ``index`` into a tensor of ``shape``."""
    norm = tuple(slice(*s.indices(n)) for s, n in zip(
        tuple(index) + (slice(None),) * (len(shape) - len(index)), shape))
    return norm[0] if norm else None, norm[1] if len(norm) > 1 else None


def _read_hf(f: SafetensorsFile, name: str, index, shape, stage_dtype):
    """The slice ``index`` of one tensor in HF's own layout (as stored, so no host
    transpose). ``read_block`` reads only this shard's columns: on several hosts each
    host reads only its own part."""
    rows, cols = _blocks(index, shape)
    return np.ascontiguousarray(f.read_block(name, rows, cols), dtype=stage_dtype)


def _hf_sharding(shard, ndim: int):
    """Sharding of a transposed leaf's HF-layout [..., out, in] tensor: our spec with
    the last two dims swapped, so the on-device transpose lands exactly on ``shard``."""
    if not isinstance(shard, NamedSharding):
        return shard
    spec = tuple(shard.spec) + (None,) * (ndim - len(shard.spec))
    return NamedSharding(shard.mesh, P(*spec[:-2], spec[-1], spec[-2]))


def _hf_layout(leaf: str, shape, shard):
    """(shape, sharding) of a leaf's tensor as HF stores it, and whether ours transposes it."""
    if leaf not in TRANSPOSED:
        return tuple(shape), shard, False
    return (tuple(shape[:-2]) + (shape[-1], shape[-2]), _hf_sharding(shard, len(shape)),
            True)


def _tensor_reads(top_leaves, leaves, order: list[int]):
    """Every tensor one load reads, in the order it reads them: the top-level leaves,
    then layer by layer in ``order``. Yields (HF name, keys, shape in our layout (one
    layer's for stacked leaves), sharding, layer index or None)."""
    for _, keys, shape, shard in top_leaves:
        yield HF_TOP_NAMES[keys[-1]], keys, tuple(shape), shard, None
    for i in order:
        for keys, shape, shard in leaves:
            yield _hf_layer_name(i, keys[-1]), keys, tuple(shape[1:]), shard, i


def _read_array(f, name, leaf, shape, shard, np_dtype):
    """(HF-layout device array, whether it still needs a transpose to ``shape``)."""
    hf_shape, hf_shard, transpose = _hf_layout(leaf, shape, shard)
    stage = _stage_dtype(f, name, np_dtype)
    arr = jax.make_array_from_callback(
        hf_shape, hf_shard, lambda idx: _read_hf(f, name, idx, hf_shape, stage))
    return arr, transpose


def _swap_last(x):
    return jnp.swapaxes(x, -1, -2)


def _astype(x, dtype):
    return x.astype(dtype)


@functools.lru_cache(maxsize=64)     # one compiled program per (sharding, dtype)
def _jitted(fn, shard, dtype=None):
    return jax.jit(fn if dtype is None else functools.partial(fn, dtype=dtype),
                   out_shardings=shard)


def _transposed(arr, transpose: bool, shard):
    """HF [out, in] -> our [in, out] on device, as a program of its own rather than fused
    into the stacking update (faster on XLA:CPU; see bench/README.md)."""
    return _jitted(_swap_last, shard)(arr) if transpose else arr


def _convert(arr, transpose: bool, shard, np_dtype):
    """HF layout and staging dtype -> our layout and dtype, on device."""
    arr = _transposed(arr, transpose, shard)
    return arr if arr.dtype == np_dtype else _jitted(_astype, shard, np_dtype)(arr)


@jax.jit
def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


def _hf_layer_name(i: int, leaf: str) -> str:
    return LAYER_PREFIX.format(i=i) + HF_LAYER_NAMES[leaf]


def _layer_order(files, leaves, n: int) -> list[int]:
    """Layer indices in the order their tensors sit in the files, so a load from storage
    reads each file front to back (HF shards order names as text: 0, 1, 10, 11, ...)."""
    def where(i):
        return min((files[t].path, files[t].tensors[t]["offset"])
                   for t in (_hf_layer_name(i, keys[-1]) for keys, _, _ in leaves))
    return sorted(range(n), key=where)


def _load_tensors(files, tensor_reads, n: int, np_dtype, transform=None) -> dict:
    """{keys: device array} of every leaf in ``tensor_reads`` (see ``_tensor_reads``):
    top-level leaves as read, layer leaves stacked [n, ...].

    Each tensor is read as stored (HF [out, in]), transposed and cast on device, and
    mapped by ``transform`` (quantisation) when given. A layer tensor is written into
    its donated stacked buffers (one per pytree child), so the host stages one tensor
    at a time and the dense layer is dropped as soon as it is written."""
    loaded: dict[tuple, Any] = {}
    for name, keys, shape, shard, i in tensor_reads:
        key = tuple(keys)
        arr = _convert(*_read_array(files[name], name, keys[-1], shape, shard, np_dtype),
                       shard, np_dtype)
        if not bool(_all_finite(arr)):
            raise CheckpointError(f"{files[name].path}: tensor {name!r} holds NaN or inf "
                                  f"values; the checkpoint is damaged: use an intact copy")
        out = arr if transform is None else transform(key, arr)
        del arr
        loaded[key] = out if i is None else put_layer(loaded.get(key), out, i, n)
        # Waiting frees the staged host copy before the next tensor is staged; without
        # it, staged tensors pile up on the host.
        del out
        jax.block_until_ready(loaded[key])
    return loaded


def load_pretrained(path: str, dtype=jnp.float32, mesh: Mesh | None = None, *,
                    compute_dtype=None, remat: str = "none",
                    attention_impl: str | None = None, transform=None) -> Decoder:
    """A Decoder with weights streamed from an HF safetensors checkpoint directory.

    dtype: parameter dtype (source tensors in any float dtype are cast on read).
    compute_dtype: activation dtype (defaults to ``dtype``).
    mesh: place every parameter with its logical-axis sharding over this mesh.
    transform: ``fn(keys, array) -> leaf`` applied to every layer of every stacked leaf
      as it is read, and to top-level leaves (``quantization.layer_transform`` quantises
      the base this way, so the dense model is never held whole).
    A ``.gguf`` file is read by ``gguf_io.load_gguf`` (dequantised to ``dtype``).
    """
    if gguf_io.is_gguf(path):
        return gguf_io.load_gguf(path, dtype, mesh, compute_dtype=compute_dtype, remat=remat,
                                 attention_impl=attention_impl,
                                 transform=transform)
    if not os.path.isdir(path):
        raise errors.MissingPathError(f"{path}: checkpoint directory not found")
    cfg = ModelConfig.from_pretrained(path)
    files, _ = _tensor_index(path)
    expected = expected_hf_shapes(cfg)
    for name, shape in expected.items():
        if name not in files:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise CheckpointError(f"{path}: missing tensor {name!r} (expected shape {shape})")
        found = files[name].shape(name)
        if tuple(found) != tuple(shape):
            raise CheckpointError(
                f"{files[name].path}: tensor {name!r} has shape {tuple(found)}, expected "
                f"{tuple(shape)} from config.json")
        stored = np.dtype(files[name].tensors[name]["dtype"])
        if not jnp.issubdtype(stored, jnp.floating):
            raise CheckpointError(
                f"{files[name].path}: tensor {name!r} is stored as {stored.name}, expected a "
                f"floating-point dtype (float32, float16 or bfloat16): the header is damaged "
                f"or the file is not this model's")
    for name in files:
        if name in expected or IGNORED.match(name):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        raise CheckpointError(f"{files[name].path}: unexpected tensor {name!r} (not part of a "
                              f"{cfg.architecture} with this config)")

    compute_dtype = compute_dtype or dtype
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype,
                                              dtype=compute_dtype, remat=remat,
                                              attention_impl=attention_impl))
    graphdef, state = nnx.split(abstract)
    np_dtype = np.dtype(jnp.dtype(dtype))
    top_leaves, layer_leaves = [], []
    for p, var in nnx.to_flat_state(state):
        keys = [str(getattr(k, "key", k)) for k in p]
        shape = var.get_value().shape
        if mesh is not None:
            shard = sharding.named_sharding(mesh, leaf_axes(tuple(keys)), shape)
        else:
            shard = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if keys[0] == "layers":
            layer_leaves.append((p, keys, shape, layer_sharding(shard, len(shape))))
        else:
            top_leaves.append((p, keys, shape, shard))
    leaves = [leaf[1:] for leaf in layer_leaves]
    # Top-level leaves (embed, lm_head) first, while little else is resident: their
    # transient host copy then never adds to a nearly loaded model.
    tensor_reads = list(_tensor_reads(top_leaves, leaves,
                                      _layer_order(files, leaves, cfg.num_layers)))
    loaded = _load_tensors(files, tensor_reads, cfg.num_layers, np_dtype, transform)
    for p, keys, _, _ in top_leaves + layer_leaves:
        set_state_leaf(state, p, loaded[tuple(keys)])
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------ saving
def _saved_leaves(model: Decoder):
    """(keys, value) of every parameter leaf a save writes (LoRA adapters are not)."""
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[0] != "lora":
            yield keys, var.get_value() if isinstance(var, nnx.Variable) else var


def _hf_specs(model: Decoder, dtype=None):
    """(hf_name, shape, numpy dtype) of every tensor ``hf_state_items`` yields, in its
    order, without computing or gathering any."""
    for keys, value in _saved_leaves(model):
        quantised = hasattr(value, "dequantize")
        np_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else
                                      jnp.float32 if quantised else value.dtype))
        leaf = keys[-1]
        if keys[0] == "layers":
            per = tuple(value.shape[1:])
            hf = per[::-1] if leaf in TRANSPOSED else per
            for i in range(value.shape[0]):
                yield LAYER_PREFIX.format(i=i) + HF_LAYER_NAMES[leaf], hf, np_dtype
        else:
            shape = tuple(value.shape)
            yield HF_TOP_NAMES[leaf], shape[::-1] if leaf in TRANSPOSED else shape, np_dtype


def hf_state_items(model: Decoder, dtype=None):
    """Yields (hf_name, numpy array in HF layout), one tensor at a time."""
    for keys, value in _saved_leaves(model):
        if hasattr(value, "dequantize"):
            value = value.dequantize(dtype or jnp.float32)
        leaf = keys[-1]
        if keys[0] == "layers":
            for i in range(value.shape[0]):
                a = sharding.to_host(value[i])
                a = a.T if leaf in TRANSPOSED else a
                yield LAYER_PREFIX.format(i=i) + HF_LAYER_NAMES[leaf], _cast(a, dtype)
        else:
            a = sharding.to_host(value)
            yield HF_TOP_NAMES[leaf], _cast(a.T if leaf in TRANSPOSED else a, dtype)


def _cast(a, dtype):
    a = np.ascontiguousarray(a)
    return a if dtype is None else a.astype(np.dtype(jnp.dtype(dtype)))


def _shard_plan(specs, limit: int) -> list[list[str]]:
    """Tensor names per shard file: consecutive tensors, a new shard whenever the next
    tensor would take a non-empty shard past ``limit`` bytes."""
    shards, size = [[]], 0
    for name, shape, np_dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        if size and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_pretrained(model: Decoder, path: str, max_shard_size: int | str = "5GB",
                    dtype=None) -> None:
    """HF-compatible config.json + safetensors (sharded with an index past max_shard_size).

    The shards are planned from the parameters' shapes first, then written one at a
    time, each before the next one's tensors are gathered, so the host holds about one
    shard, never the whole model. Files are written under temporary names and renamed,
    config.json last, so an interrupted save never leaves a directory that looks
    complete.
    """
    from safetensors.numpy import save_file

    limit = _parse_size(max_shard_size)
    specs = list(_hf_specs(model, dtype))
    plan = _shard_plan(specs, limit)
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    os.makedirs(path, exist_ok=True)
    write = jax.process_index() == 0    # every process gathers (collectives); one writes
    shard: dict[str, np.ndarray] = {}
    k = 0
    for name, arr in hf_state_items(model, dtype):
        if write:
            shard[name] = arr
        del arr
        if name == plan[k][-1]:
            if write:
                with atomic.atomic_path(os.path.join(path, names[k])) as tmp:
                    save_file(shard, tmp, metadata={"format": "pt"})
            shard = {}
            k += 1
    if not write:
        return
    if len(plan) > 1:
        total = sum(int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
                    for _, shape, np_dtype in specs)
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: n for n, ts in zip(names, plan) for t in ts}}
        atomic.write_json(os.path.join(path, "model.safetensors.index.json"), index)
    cfg_dict = model.config.to_hf_dict()
    if dtype is not None:
        cfg_dict["torch_dtype"] = str(np.dtype(jnp.dtype(dtype)))
    atomic.write_json(os.path.join(path, "config.json"), cfg_dict)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or e.g. '5GB', '200MB'")
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)]
    return int(float(m.group(1)) * mult)


__all__ = ["load_pretrained", "save_pretrained", "CheckpointError", "SafetensorsError",
           "expected_hf_shapes", "hf_state_items"]
