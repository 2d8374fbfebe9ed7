"""Sharding on 8 fake CPU devices: the same logits on every mesh, each weight shard holds
exactly its part, logical rules that survive sizes that do not divide, global batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from xft_jax import lora as lora_lib
from xft_jax import sharding
from xft_jax.models import hf_io, partitioning
from xft_jax.models.config import ModelConfig
from xft_jax.models.decoder import Decoder, TokenInputs, forward
from xft_jax.models.partitioning import leaf_axes

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]
TOL = 1e-5


def _batch(b=8, t=12, vocab=128):
    rng = np.random.default_rng(0)
    seg = np.ones((b, t), np.int32)
    seg[1, 7:] = 0                     # right padding
    seg[3, 4:] = 2                     # two packed examples in one row
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    pos[3, 4:] -= 4
    return {"input_ids": rng.integers(0, vocab, (b, t)).astype(np.int32),
            "segment_ids": seg, "positions": pos,
            "loss_mask": (seg > 0).astype(np.float32)}


def _logits(model, batch, mesh=None):
    cfg, opts = model.config, model.forward_options()

    def fwd(p, b):
        with sharding.activation_sharding(mesh):
            inputs = TokenInputs(b["input_ids"], positions=b["positions"],
                                 segment_ids=b["segment_ids"])
            return forward(p, cfg, inputs, opts=opts)["logits"]

    return np.asarray(jax.jit(fwd)(model.params(), batch))


def _flat_params(model):
    return {tuple(str(getattr(k, "key", k)) for k in p): v.get_value()
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _parts(spec, mesh, ndim):
    """Number of pieces each dim is cut into under ``spec``."""
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    out = []
    for e in entries:
        axes = () if e is None else ((e,) if isinstance(e, str) else tuple(e))
        out.append(int(np.prod([mesh.shape[a] for a in axes])) if axes else 1)
    return out


def _check_shards(model, ref_flat, mesh):
    """Every addressable shard holds exactly its 1/N part, with the reference values.
    Returns {leaf keys: pieces per dim} for the leaves that are split."""
    split = {}
    for keys, arr in _flat_params(model).items():
        ref = np.asarray(ref_flat[keys])
        want = sharding.logical_to_spec(leaf_axes(keys), shape=arr.shape, mesh=mesh)
        parts = _parts(arr.sharding.spec, mesh, arr.ndim)
        assert parts == _parts(want, mesh, arr.ndim), (keys, arr.sharding.spec, want)
        n = int(np.prod(parts))
        piece = tuple(d // k for d, k in zip(arr.shape, parts))
        assert all(d % k == 0 for d, k in zip(arr.shape, parts)), (keys, arr.shape, parts)
        shards = arr.addressable_shards
        assert len(shards) == mesh.devices.size
        for s in shards:
            assert s.data.shape == piece, (keys, s.data.shape, piece)
            assert s.data.size * n == arr.size
            np.testing.assert_array_equal(np.asarray(s.data), ref[s.index], err_msg=str(keys))
        distinct = {tuple((sl.start, sl.stop) for sl in s.index) for s in shards}
        assert len(distinct) == n, (keys, len(distinct), n)   # every part is somewhere
        if n > 1:
            split[keys] = parts
    return split


@pytest.fixture(scope="module")
def llama(hf_checkpoint):
    path = hf_checkpoint("llama")
    model = hf_io.load_pretrained(path)
    batch = _batch()
    return path, _flat_params(model), batch, _logits(model, batch)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_logits_equal_single_device(llama, shape):
    path, ref_flat, batch, ref = llama
    mesh = sharding.create_mesh(*shape)
    assert tuple(mesh.shape.values()) == shape
    model = hf_io.load_pretrained(path, mesh=mesh)
    split = _check_shards(model, ref_flat, mesh)
    data, fsdp, tensor = shape
    if fsdp == 1 and tensor == 1:
        assert not split                      # pure data parallel: weights replicated
    else:
        assert split
    if tensor == 8:   # 4 heads / 2 kv heads: their flattened dims 64 / 32 still split 8 ways
        for leaf, dim in (("lm_head",), 1), (("embed",), 0), (("layers", "q_proj"), 2), \
                         (("layers", "k_proj"), 2), (("layers", "gate_proj"), 2), \
                         (("layers", "down_proj"), 1):
            assert split[leaf][dim] == 8, (leaf, split.get(leaf))
    if fsdp == 8:
        assert split[("layers", "q_proj")][1] == 8 and split[("embed",)][1] == 8
    gbatch = sharding.make_global_batch(mesh, batch)
    assert gbatch["input_ids"].sharding.spec == sharding.logical_to_spec(
        ("batch", "length"), mesh=mesh)
    err = np.max(np.abs(_logits(model, gbatch, mesh) - ref))
    assert err < TOL, f"mesh {shape}: max |logits - single device| = {err}"


def test_heads_divisible_by_tensor_and_tied_qkv_bias(hf_checkpoint):
    """8 heads on tensor=8 (head-aligned activation sharding) and Qwen2 (tied embedding,
    q/k/v biases) on (2,2,2)."""
    for family, overrides, shape in (("llama", {"num_attention_heads": 8,
                                                "num_key_value_heads": 8}, (1, 1, 8)),
                                     ("qwen2", {}, (2, 2, 2))):
        path = hf_checkpoint(family, **overrides)
        base = hf_io.load_pretrained(path)
        batch = _batch()
        ref = _logits(base, batch)
        mesh = sharding.create_mesh(*shape)
        model = hf_io.load_pretrained(path, mesh=mesh)
        split = _check_shards(model, _flat_params(base), mesh)
        if family == "qwen2":
            assert split[("layers", "q_bias")] == [1, 2]
            assert ("lm_head",) not in _flat_params(model)
        err = np.max(np.abs(_logits(model, sharding.make_global_batch(mesh, batch), mesh)
                            - ref))
        assert err < TOL, f"{family} on {shape}: {err}"


# --------------------------------------------------------------- rules and mesh
def test_logical_to_spec_divisibility_rules():
    mesh = sharding.create_mesh(2, 4, 1)
    spec = sharding.logical_to_spec
    assert spec(("batch", "length"), mesh=mesh) == P(("data", "fsdp"), None)
    # batch 4 on data=2 x fsdp=4: the longest prefix that divides ('data')
    assert spec(("batch", "length"), shape=(4, 3), mesh=mesh) == P("data", None)
    assert spec(("batch", "length"), shape=(3, 3), mesh=mesh) == P(None, None)
    # tensor=1 is dropped; fsdp takes embed
    assert spec(("embed", "heads"), shape=(64, 64), mesh=mesh) == P("fsdp", None)
    mesh8 = sharding.create_mesh(1, 1, 8)
    # 12 does not divide over tensor=8: replicated, not an error
    assert spec(("layers", "embed", "heads"), shape=(2, 64, 12), mesh=mesh8) == P(None, None,
                                                                                  None)
    assert spec(("layers", "embed", "mlp"), shape=(2, 64, 96), mesh=mesh8) == P(None, None,
                                                                                "tensor")
    # LoRA rank and layers never shard
    assert spec(("layers", "lora_rank", "heads"), shape=(2, 8, 64), mesh=mesh8) == \
        P(None, None, "tensor")
    with pytest.raises(KeyError, match="no sharding rule"):
        spec(("embed", "nonsense"))
    with pytest.raises(ValueError, match="rank"):
        spec(("embed",), shape=(2, 3), mesh=mesh)
    with pytest.raises(KeyError, match="does not have"):
        spec(("embed",), rules={"embed": "model"}, mesh=mesh)


def test_create_mesh_sizes():
    assert dict(sharding.create_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(sharding.create_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.create_mesh(-1, 1, 4).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    for args, msg in (((3, -1, 1), "does not divide"), ((2, 2, 4), "16 devices"),
                      ((-1, -1, 1), "at most one"), ((0, 8, 1), "positive")):
        with pytest.raises(ValueError, match=msg):
            sharding.create_mesh(*args)


# --------------------------------------------------------------- model state and LoRA
def test_model_shardings_and_shard_model_with_lora(hf_checkpoint):
    mesh = sharding.create_mesh(1, 2, 4)
    cfg = ModelConfig.from_pretrained(hf_checkpoint("llama"))
    model = Decoder(cfg, rngs=nnx.Rngs(0))                 # built on the host
    lora_lib.attach(model, lora_lib.LoRAConfig(rank=4, targets=("q_proj", "down_proj")),
                    jax.random.key(1))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    want = partitioning.model_shardings(mesh, model)
    assert want["lora"]["layers"]["q_proj"]["a"].spec == P(None, "fsdp", None)   # A: in
    assert want["lora"]["layers"]["q_proj"]["b"].spec == P(None, None, "tensor")  # B: out
    assert want["lora"]["layers"]["down_proj"]["a"].spec == P(None, "tensor", None)
    assert want["lora"]["layers"]["down_proj"]["b"].spec == P(None, None, "fsdp")
    assert want["layers"]["gate_proj"].spec == P(None, "fsdp", "tensor")
    partitioning.shard_model(model, mesh)
    after = nnx.to_pure_dict(nnx.state(model))
    jax.tree.map(lambda a, s: _same_sharding(a, s), after, want)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), before)
    # the pure-dict helpers the trainer uses for jit in/out shardings agree
    got = partitioning.param_shardings(mesh, model.lora_params(), prefix=("lora",))
    assert got["layers"]["q_proj"]["a"].spec == want["lora"]["layers"]["q_proj"]["a"].spec
    assert got == lora_lib.lora_shardings(cfg, model.lora.config, mesh)
    assert partitioning.param_shardings(mesh, model.params())["embed"].spec == P("tensor", "fsdp")
    with pytest.raises(KeyError, match="PARAM_AXES"):
        partitioning.param_shardings(mesh, {"mystery": jnp.zeros((4,))})


def _same_sharding(arr, want):
    assert arr.sharding.is_equivalent_to(want, arr.ndim), (arr.sharding, want)


# --------------------------------------------------------------- global batches
def test_make_global_batch_single_process():
    mesh = sharding.create_mesh(2, 2, 2)
    batch = _batch()
    batch["label"] = np.arange(8, dtype=np.int32) % 5
    batch["extra"] = np.ones((8, 3, 2), np.float32)
    assert sharding.process_batch_slice(mesh, 8) == slice(0, 8)
    with pytest.raises(ValueError, match="does not divide over the 4 batch shards"):
        sharding.process_batch_slice(mesh, 6)
    g = sharding.make_global_batch(mesh, batch)
    for key, value in batch.items():
        assert g[key].shape == value.shape and g[key].dtype == value.dtype
        assert g[key].sharding.spec[0] == ("data", "fsdp"), key
        assert {s.data.shape[0] for s in g[key].addressable_shards} == {2}, key
        np.testing.assert_array_equal(np.asarray(g[key]), value)
    g = sharding.make_global_batch(mesh, {"w": np.ones((8, 4))}, axes={"w": (None, "batch")})
    assert g["w"].sharding.spec == P(None, ("data", "fsdp"))
    with pytest.raises(ValueError, match="input_ids"):
        sharding.make_global_batch(mesh, {"input_ids": np.zeros((6, 4), np.int32)})
    with pytest.raises(ValueError, match="rank"):
        sharding.make_global_batch(mesh, {"input_ids": np.zeros((8,), np.int32)})


def test_to_host_and_describe():
    mesh = sharding.create_mesh(1, 2, 4)
    x = jax.device_put(np.arange(32.0).reshape(4, 8),
                       sharding.named_sharding(mesh, ("embed", "mlp")))
    np.testing.assert_array_equal(sharding.to_host(x), np.arange(32.0).reshape(4, 8))
    line = sharding.describe(mesh)
    assert "data=1 x fsdp=2 x tensor=4" in line and "1 process" in line
