"""Quantised base models on the tiny Mistral checkpoint, sharded over fsdp=4 x tensor=2:
layer-by-layer loading, output distributions against the fp32 / bf16 model, parameter
memory against theory, and evaluation scoring and the probe on a quantised base."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xft_jax import sharding
from xft_jax.eval import probe as probe_lib, scoring
from xft_jax import quantization as Q
from xft_jax.eval.batching import DEVICE_KEYS
from xft_jax.models import OutputRequest, TokenInputs, forward, hf_io, partitioning
from xft_jax.models.decoder import LINEAR_NAMES, linear_shape

LABEL_IDS = [5, 17, 33, 64, 100]
B, T = 4, 12


def _quantized(kind):
    return Q.layer_transform(Q.QuantConfig(kind))


def _batch():
    rng = np.random.default_rng(0)
    lens = np.array([12, 9, 6, 12])
    seg = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    return {"input_ids": rng.integers(3, 128, (B, T)).astype(np.int32), "segment_ids": seg,
            "positions": np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32),
            "label_pos": (lens - 1).astype(np.int32), "label": np.array([0, 3, 4, 1], np.int32)}


@pytest.fixture(scope="module")
def setup(hf_checkpoint):
    path = hf_checkpoint("mistral")
    mesh = sharding.create_mesh(1, 4, 2)
    seen = []
    real = Q.quantize_array

    def spy(x, qcfg, axes=None, mesh=None):
        seen.append(tuple(x.shape))
        return real(x, qcfg, axes, mesh)

    Q.quantize_array = spy
    try:
        models = {
            "fp32": hf_io.load_pretrained(path, mesh=mesh),
            "bf16": hf_io.load_pretrained(path, dtype=jnp.bfloat16, mesh=mesh),
            "nf4": hf_io.load_pretrained(path, mesh=mesh, transform=_quantized("nf4")),
            "int8": hf_io.load_pretrained(path, mesh=mesh, transform=_quantized("int8")),
            "nf4_bf16": hf_io.load_pretrained(path, dtype=jnp.bfloat16, mesh=mesh,
                                              transform=_quantized("nf4")),
            "nf4_dq_head": hf_io.load_pretrained(path, mesh=mesh, transform=Q.layer_transform(
                Q.QuantConfig("nf4", double_quant=True, quantize_lm_head=True))),
        }
    finally:
        Q.quantize_array = real
    return path, mesh, models, seen


@functools.partial(jax.jit, static_argnames=("cfg", "opts"))
def _logits(params, ids, seg, cfg, opts):
    return forward(params, cfg, TokenInputs(ids, segment_ids=seg), opts=opts)["logits"]


def _log_probs(model, batch):
    logits = _logits(model.params(), batch["input_ids"], batch["segment_ids"],
                     cfg=model.config, opts=model.forward_options())
    return np.asarray(jax.nn.log_softmax(logits, -1))


def _mean_kl(lp_ref, lp, mask):
    kl = np.sum(np.exp(lp_ref) * (lp_ref - lp), -1)
    return float((kl * mask).sum() / mask.sum())


def test_loaded_layer_by_layer_and_sharded_like_the_weights(setup):
    _, mesh, models, seen = setup
    cfg = models["fp32"].config
    # Every quantised array handed over was ONE layer (or the LM head): the dense stacked
    # leaf was never built.
    per_layer = {linear_shape(cfg, t) for t in LINEAR_NAMES}
    assert set(seen) == per_layer | {(cfg.hidden_size, cfg.vocab_size)}
    for name in ("nf4", "int8"):
        params = models[name].params()
        q = Q.quantized_leaves(params)
        assert sorted(q) == sorted(f"layers.{t}" for t in LINEAR_NAMES)
        assert not isinstance(params["embed"], Q.QuantizedWeight)
        assert not isinstance(params["lm_head"], Q.QuantizedWeight)
        want = partitioning.param_shardings(mesh, params)
        for t in LINEAR_NAMES:
            qw = params["layers"][t]
            assert qw.shape == (cfg.num_layers, *linear_shape(cfg, t))
            for child, sh in zip(jax.tree.leaves(qw), jax.tree.leaves(want["layers"][t])):
                assert child.sharding.spec == sh.spec
    spec = models["nf4"].params()["layers"]["down_proj"].codes.sharding.spec
    assert spec == jax.sharding.PartitionSpec(None, "tensor", None, "fsdp")   # mlp, embed
    assert Q.quantized_leaves(models["nf4_dq_head"].params())["lm_head"].dq_block > 0


def test_quantised_forward_is_the_dense_forward_of_the_dequantised_weights(setup):
    _, _, models, _ = setup
    model, batch = models["nf4_dq_head"], _batch()
    deq = jax.tree.map(lambda x: x.dequantize(jnp.float32) if isinstance(
        x, Q.QuantizedWeight) else x, model.params(),
        is_leaf=lambda x: isinstance(x, Q.QuantizedWeight))
    want = _logits(deq, batch["input_ids"], batch["segment_ids"], cfg=model.config,
                   opts=model.forward_options())
    np.testing.assert_allclose(_log_probs(model, batch),
                               np.asarray(jax.nn.log_softmax(want, -1)), atol=2e-5, rtol=0)


def test_output_distributions_close_to_the_dense_model(setup):
    """Mean KL(dense || quantised) per valid token. int8 error is ~1/16 of NF4's per
    weight, so its KL (quadratic in the error) must be far below NF4's; both stay small
    next to the entropy of the output distribution."""
    _, _, models, _ = setup
    batch = _batch()
    mask = batch["segment_ids"].astype(np.float64)
    ref = _log_probs(models["fp32"], batch)
    lp = {k: _log_probs(m, batch) for k, m in models.items() if k != "fp32"}
    kl = {k: _mean_kl(ref, v, mask) for k, v in lp.items()}
    kl_vs_bf16 = {k: _mean_kl(lp["bf16"], lp[k], mask) for k in ("nf4", "int8", "nf4_bf16")}
    entropy = float((-(np.exp(ref) * ref).sum(-1) * mask).sum() / mask.sum())
    print(f"\nmean KL vs fp32: {kl}\nmean KL vs bf16: {kl_vs_bf16}\nentropy {entropy:.3f}")
    assert 0 < kl["nf4"] < 1e-3 * entropy
    assert 0 < kl["int8"] < kl["nf4"] / 20
    assert kl_vs_bf16["nf4"] < 1e-3 * entropy and kl_vs_bf16["int8"] < kl["nf4"] / 20
    assert kl["nf4_dq_head"] < 2 * kl["nf4"] + 1e-6
    # the paper's set-up: NF4 base, bf16 compute, against the bf16 model
    assert kl_vs_bf16["nf4_bf16"] < 2 * kl["nf4"] + 1e-6


def test_parameter_memory_within_10_percent_of_theory(setup):
    """Bytes of the arrays actually held vs 0.5 (nf4) / 1 (int8) byte per linear weight plus
    a float32 scale per 64 weights, the rest dense float32 (no padding in the theory)."""
    _, _, models, _ = setup
    cfg = models["fp32"].config
    n_lin = cfg.num_layers * sum(np.prod(linear_shape(cfg, t)) for t in LINEAR_NAMES)
    dense = Q.param_bytes(models["fp32"].params())
    other = dense - n_lin * 4
    for name, per_w in (("nf4", 0.5), ("int8", 1.0)):
        params = models[name].params()
        measured = sum(x.nbytes for x in jax.tree.leaves(params))
        lin_measured = sum(q.nbytes for q in Q.quantized_leaves(params).values())
        lin_theory = n_lin * (per_w + 4 / 64)
        print(f"\n{name}: linear {lin_measured} B (theory {lin_theory:.0f}); "
              f"model {measured} B vs dense {dense} B")
        assert abs(lin_measured - lin_theory) / lin_theory < 0.10
        assert abs(measured - (lin_theory + other)) / (lin_theory + other) < 0.10
        assert measured == Q.theoretical_bytes(cfg, Q.QuantConfig(name), jnp.float32)


def test_scoring_and_probe_run_on_a_quantised_base(setup):
    """The eval scorer (five label columns read from a quantised LM head) and the probe on
    the NF4 base agree with each other, with the dense forward of the dequantised weights,
    and stay close to the fp32 model's scores."""
    _, mesh, models, _ = setup
    batch = _batch()
    dev = sharding.global_batch_from_host(mesh, batch, DEVICE_KEYS)
    scores = {}
    for name in ("fp32", "nf4_dq_head"):
        m = models[name]
        fn = scoring.make_score_fn(m.config, m.forward_options(), LABEL_IDS, mesh)
        scores[name] = np.asarray(fn(m.params(), None, dev))
    q = models["nf4_dq_head"]
    dense_head = q.params()["lm_head"].dequantize(jnp.float32)
    hidden = jax.jit(lambda p, b: forward(
        p, q.config, TokenInputs(b["input_ids"], positions=b["positions"],
                                 segment_ids=b["segment_ids"]),
        OutputRequest("hidden", b["label_pos"][:, None]))["hidden"])(q.params(), dev)
    want = jax.nn.log_softmax(hidden[:, 0] @ dense_head[:, jnp.array(LABEL_IDS)], -1)
    np.testing.assert_allclose(scores["nf4_dq_head"], np.asarray(want), atol=1e-5)
    assert np.abs(scores["nf4_dq_head"] - scores["fp32"]).max() < 0.05
    assert np.abs(scores["nf4_dq_head"] - scores["fp32"]).max() > 0     # really quantised

    probe = probe_lib.make_probe_fn(q.config, q.forward_options(), LABEL_IDS,
                                    vocab_chunk=48, mesh=mesh)
    vals = probe_lib.run_probe(probe, q.params(), None, [batch], B, mesh)
    np.testing.assert_allclose(vals["log_probs"], scores["nf4_dq_head"], atol=1e-5)
    L = q.config.num_layers
    for k in ("act_entropy", "lens_entropy", "lens_label_mass", "lens_gold_prob"):
        assert vals[k].shape == (L + 1, B) and np.all(np.isfinite(vals[k])), k
    assert np.all(np.isfinite(vals["attn_entropy"][1:]))
