"""Blockwise NF4 / int8 quantisation: code book, error bounds, layout, sharding, memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from xft_jax import quantization as Q
from xft_jax import sharding
from xft_jax.models import partitioning
from xft_jax.models.config import ModelConfig
from xft_jax.models.decoder import LINEAR_NAMES, linear_shape


def _normal(shape, seed=0, std=0.02):
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def test_nf4_code_book_is_the_published_normal_float():
    """Re-derived as bitsandbytes' create_normal_map does: normal quantiles at 8 positive
    and 7 negative equally spaced probabilities from 0.9677083 to 0.5, plus an exact 0,
    scaled to [-1, 1]."""
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    levels /= levels.max()
    np.testing.assert_allclose(Q.NF4_LEVELS, levels, atol=2e-6)
    assert len(np.unique(Q.NF4_LEVELS)) == 16 and Q.NF4_LEVELS[7] == 0.0


@pytest.mark.parametrize("kind,double_quant", [("nf4", False), ("nf4", True),
                                               ("int8", False), ("int8", True)])
def test_reconstruction_error_within_the_derived_bound(kind, double_quant):
    """|w - dq(q(w))| <= rel * block absmax (rel: half the largest NF4 level gap, or half an
    int8 step 1/254), plus the scale's own int8 error when the scales are quantised."""
    w = _normal((3, 200, 256), seed=1)         # 200 rows: the last block is zero-padded
    qw = jax.jit(functools.partial(Q.quantize, kind=kind, block=64,
                                   double_quant=double_quant))(w)
    back = np.asarray(qw.dequantize(jnp.float32))
    assert back.shape == w.shape and qw.shape == w.shape
    err = np.abs(back - w)
    bound = Q.max_abs_error_bound(w, kind, 64, double_quant)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-9), float((err - bound).max())
    # The bound is tight-ish (the error is not trivially zero) and far below the weights.
    assert err.max() > 0.2 * bound.max()
    rel = np.sqrt(np.mean(err ** 2)) / np.std(w)
    assert rel < (0.15 if kind == "nf4" else 0.01), rel


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_exact_on_code_book_points(kind):
    """Weights on the grid come back bit-exact: NF4 levels times a power-of-two block absmax,
    or integers -127..127 times a power-of-two step (each block holding its absmax)."""
    rng = np.random.default_rng(2)
    block, nb, out = 32, 4, 16
    if kind == "nf4":
        units = Q.NF4_LEVELS[rng.integers(0, 16, (nb, block, out))]
        units[:, 0, :] = 1.0                               # the absmax of every block
    else:
        units = rng.integers(-127, 128, (nb, block, out)).astype(np.float32)
        units[:, 0, :] = 127.0
    scale = (2.0 ** rng.integers(-8, 0, (nb, 1, out))).astype(np.float32)
    w = (units * scale).reshape(nb * block, out).astype(np.float32)
    qw = Q.quantize(jnp.asarray(w), kind=kind, block=block)
    np.testing.assert_array_equal(np.asarray(qw.dequantize(jnp.float32)), w)


def test_packing_layout_and_metadata():
    w = _normal((2, 128, 48))
    qw = Q.quantize(jnp.asarray(w), "nf4", block=64)
    assert qw.codes.dtype == jnp.uint8 and qw.codes.shape == (2, 2, 32, 48)
    assert qw.scales.shape == (2, 2, 48) and qw.scales.dtype == jnp.float32
    assert qw.nbytes == 2 * 128 * 48 // 2 + 2 * 2 * 48 * 4
    assert qw.dtype == jnp.float32 and qw.ndim == 3
    # Both nibbles are used: unpacking by hand gives the nearest level of each weight.
    c = np.asarray(qw.codes)
    codes = np.concatenate([c & 15, c >> 4], axis=-2).reshape(2, 128, 48)
    absmax = np.abs(w.reshape(2, 2, 64, 48)).max(-2).repeat(64, axis=-2)
    nearest = np.abs(w[..., None] / absmax[..., None] - Q.NF4_LEVELS).argmin(-1)
    assert (codes == nearest).mean() > 0.999                # ties at midpoints aside
    i8 = Q.quantize(jnp.asarray(w), "int8", block=64)
    assert i8.codes.dtype == jnp.int8 and i8.codes.shape == (2, 2, 64, 48)


def test_pytree_jit_scan_and_columns():
    """Under scan each layer's slice dequantises to that layer; take_columns equals the
    dense columns; bf16 dequantisation is the float32 one rounded."""
    w = _normal((3, 128, 40), seed=3)
    qw = Q.quantize(jnp.asarray(w), "nf4", block=64, double_quant=True)
    leaves, treedef = jax.tree.flatten(qw)
    assert len(leaves) == 4 and all(isinstance(x, jax.Array) for x in leaves)
    dense = qw.dequantize(jnp.float32)

    def body(c, q):
        return c, q.dequantize(jnp.float32)
    _, per_layer = jax.jit(lambda q: jax.lax.scan(body, 0, q))(qw)
    np.testing.assert_allclose(np.asarray(per_layer), np.asarray(dense), rtol=1e-6)
    ids = jnp.array([3, 0, 39])
    np.testing.assert_allclose(np.asarray(qw.take_columns(ids)),
                               np.asarray(dense)[..., [3, 0, 39]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(qw.dequantize(jnp.bfloat16), np.float32),
                               np.asarray(dense), rtol=2 ** -8)


def test_sharded_quantisation_matches_and_follows_the_weight_axes():
    """Quantised on an fsdp=4 x tensor=2 mesh, the children shard along the weight's
    logical axes (in-blocks like 'embed', out like 'mlp') and equal the one-device result."""
    mesh = sharding.create_mesh(1, 4, 2)
    w = _normal((512, 256), seed=4)
    axes = ("embed", "mlp")
    x = jax.device_put(w, sharding.named_sharding(mesh, axes, w.shape))
    qcfg = Q.QuantConfig("nf4", block=64, double_quant=True)
    qs = Q.quantize_array(x, qcfg, axes)
    assert qs.codes.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
    assert qs.scales.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    q1 = Q.quantize(jnp.asarray(w), "nf4", 64, True)
    np.testing.assert_array_equal(np.asarray(qs.codes), np.asarray(q1.codes))
    # (the scales' mean is reduced in another order across shards: rounding only)
    np.testing.assert_allclose(np.asarray(qs.dequantize()), np.asarray(q1.dequantize()),
                               rtol=1e-5, atol=1e-9)
    sh = partitioning.param_shardings(mesh, {"layers": {"up_proj": Q.quantize(
        jnp.asarray(_normal((2, 512, 256))), "nf4", 64)}})
    assert sh["layers"]["up_proj"].codes.spec == jax.sharding.PartitionSpec(
        None, "fsdp", None, "tensor")
    # the trainer's shardings are the same for quantised leaves.
    sh2 = partitioning.param_shardings(mesh, {"layers": {"up_proj": Q.quantize(
        jnp.asarray(_normal((2, 512, 256))), "nf4", 64)}})
    assert sh2["layers"]["up_proj"] == sh["layers"]["up_proj"]


def test_config_validation_names_the_key():
    with pytest.raises(Q.QuantizationError, match="model.quantization"):
        Q.QuantConfig(kind="nf3")
    with pytest.raises(Q.QuantizationError, match="model.quant_block"):
        Q.QuantConfig(kind="nf4", block=63)
    c = Q.QuantConfig.from_config({"quantization": "int8", "quant_block": 32,
                                   "quant_double": True})
    assert (c.kind, c.block, c.double_quant) == ("int8", 32, True)
    assert not Q.QuantConfig.from_config({}).enabled
    assert c.applies(("layers", "q_proj")) and not c.applies(("layers", "input_norm"))
    assert not c.applies(("embed",)) and not c.applies(("lm_head",))


MISTRAL_7B = dict(architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=32000,
                  hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8,
                  max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                  sliding_window=4096, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2)


def test_mistral_7b_memory_by_eval_shape():
    """Nothing allocated: the abstract quantised params of Mistral-7B-v0.1 against 0.5 byte
    per linear weight + scales, embedding and LM head in bf16."""
    cfg = ModelConfig.from_hf_dict(MISTRAL_7B)
    n_lin = cfg.num_layers * sum(np.prod(linear_shape(cfg, t)) for t in LINEAR_NAMES)
    dense_other = (2 * cfg.vocab_size * cfg.hidden_size
                   + (2 * cfg.num_layers + 1) * cfg.hidden_size) * 2
    sizes = {}
    for kind, dq in (("none", False), ("nf4", False), ("nf4", True), ("int8", False)):
        ab = Q.abstract_params(cfg, Q.QuantConfig(kind, double_quant=dq), jnp.bfloat16)
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(ab))
        sizes[(kind, dq)] = Q.param_bytes(ab)
    theory = {("none", False): n_lin * 2, ("nf4", False): n_lin * (0.5 + 4 / 64),
              ("nf4", True): n_lin * (0.5 + 1 / 64 + 4 / (64 * 256)),
              ("int8", False): n_lin * (1 + 4 / 64)}
    for k, t in theory.items():
        assert abs(sizes[k] - (t + dense_other)) / (t + dense_other) < 0.10, (k, sizes[k], t)
    assert sizes[("none", False)] == pytest.approx(14.48e9, rel=0.01)   # 7.24B x 2 bytes
    assert sizes[("nf4", False)] < 0.32 * sizes[("none", False)]
    assert sizes[("nf4", True)] < sizes[("nf4", False)]


def test_forward_dequantises_one_layer_at_a_time():
    """Compiled from abstract NF4 params (nothing allocated): the forward's scratch memory
    holds about one dense layer, not the dense stack, so dequantisation happens per layer
    inside the scan, right before the matmuls."""
    from xft_jax.models.decoder import ForwardOptions, TokenInputs, forward

    cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=1024,
                      num_layers=12, num_heads=4, num_kv_heads=4, head_dim=64,
                      rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64,
                      model_type="mistral", bos_token_id=1, eos_token_id=2)
    one_layer = 4 * sum(np.prod(linear_shape(cfg, t)) for t in LINEAR_NAMES)
    ab = Q.abstract_params(cfg, Q.QuantConfig("nf4"), jnp.float32)
    fn = jax.jit(lambda p, i: forward(p, cfg, TokenInputs(i), opts=ForwardOptions())["logits"])
    mem = fn.lower(ab, jax.ShapeDtypeStruct((1, 8), jnp.int32)).compile().memory_analysis()
    assert mem.argument_size_in_bytes < 0.2 * one_layer * cfg.num_layers
    assert mem.temp_size_in_bytes < 1.5 * one_layer, (mem.temp_size_in_bytes, one_layer)
