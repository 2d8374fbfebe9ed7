"""The decoder's shortcuts must not change what it computes, for padded and packed rows, a
sliding window, remat and a one-layer model:

* at ``output_positions`` the last layer runs its queries, o_proj and MLP there only;
* causal self-attention in query blocks skips the key blocks the mask hides;
* scoring folds the adapters into the weights (``lora_merged``).
Outputs and LoRA gradients are compared with the plain full forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xft_jax import lora as lora_lib
from xft_jax.models.config import ModelConfig
from xft_jax.models.decoder import (Decoder, ForwardOptions, OutputRequest, TokenInputs,
                                    forward)

B, T, K = 3, 12, 4
# Row 0 full, row 1 right-padded, row 2 packed (two segments, then padding).
SEG = np.array([[1] * 12, [1] * 9 + [0] * 3, [1] * 5 + [2] * 5 + [0] * 2], np.int32)
POS = np.array([[0, 3, 7, 11], [2, 8, 0, 0], [4, 5, 9, 0]], np.int32)


def _model(num_layers):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=8,
                      sliding_window=5, qkv_bias=True)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    lora_lib.attach(model, lora_lib.LoRAConfig(rank=4, alpha=8.0), jax.random.key(1))
    tree = model.lora_params()
    key = jax.random.key(2)
    lora_lib.set_lora_tree(model, {"layers": {
        t: {"a": ab["a"], "b": 0.1 * jax.random.normal(jax.random.fold_in(key, i),
                                                         ab["b"].shape)}
        for i, (t, ab) in enumerate(sorted(tree["layers"].items()))}})
    return model


def _inputs():
    rng = np.random.default_rng(0)
    ids = np.where(SEG > 0, rng.integers(1, 64, (B, T)), 0).astype(np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for s in np.unique(SEG[b][SEG[b] > 0]):
            where = np.flatnonzero(SEG[b] == s)
            pos[b, where] = np.arange(where.size)
    return jnp.asarray(ids), jnp.asarray(SEG), jnp.asarray(pos)


@pytest.mark.parametrize("num_layers,remat", [(3, "none"), (3, "full"), (1, "none")])
def test_outputs_at_positions_equal_full_forward(num_layers, remat):
    model = _model(num_layers)
    cfg, params, lora = model.config, model.params(), model.lora_params()
    opts = ForwardOptions(remat=remat, lora_scale=model.forward_options().lora_scale)
    ids, seg, pos = _inputs()
    out_pos = jnp.asarray(POS)
    inputs = TokenInputs(ids, positions=pos, segment_ids=seg)
    w = jax.random.normal(jax.random.key(3), (B, K, cfg.hidden_size))

    def at_positions(lo):
        return forward(params, cfg, inputs, OutputRequest("hidden", out_pos), opts=opts,
                       lora=lo)["hidden"]

    def full_then_gather(lo):
        h = forward(params, cfg, inputs, OutputRequest("hidden"), opts=opts, lora=lo)["hidden"]
        return jnp.take_along_axis(h, out_pos[..., None], axis=1)

    fast, ref = jax.jit(at_positions)(lora), jax.jit(full_then_gather)(lora)
    assert fast.shape == (B, K, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-5, rtol=1e-5)
    # Logits at the positions too (the LM-head path used by generation and the trainer).
    logits = forward(params, cfg, inputs, OutputRequest(positions=out_pos), opts=opts,
                     lora=lora)["logits"]
    full = forward(params, cfg, inputs, opts=opts, lora=lora)["logits"]
    np.testing.assert_allclose(np.asarray(logits),
                               np.take_along_axis(np.asarray(full), POS[..., None], axis=1),
                               atol=1e-5, rtol=1e-5)

    grad = lambda f: jax.jit(jax.grad(lambda lo: jnp.sum(f(lo) * w)))(lora)  # noqa: E731
    g_fast, g_ref = grad(at_positions), grad(full_then_gather)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fast),
                            jax.tree.leaves(g_ref)):
        assert float(jnp.max(jnp.abs(b))) > 0, path
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4,
                                   err_msg=str(path))


def test_last_layer_at_positions_does_less_work():
    """The compiled forward at K of T positions skips at least the last layer's MLP on
    the other T-K positions (XLA's own FLOP count)."""
    model = _model(3)
    cfg, params, lora, opts = (model.config, model.params(), model.lora_params(),
                               model.forward_options())
    ids, seg, pos = _inputs()

    def flops(output_positions):
        inputs = TokenInputs(ids, positions=pos, segment_ids=seg)
        want = OutputRequest("hidden", output_positions)
        fn = lambda p, lo: forward(p, cfg, inputs, want, opts=opts,  # noqa: E731
                                   lora=lo)["hidden"]
        cost = jax.jit(fn).lower(params, lora).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost["flops"]

    at_k = flops(jnp.asarray(POS))
    all_t = flops(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    mlp_flops = 2 * 3 * cfg.hidden_size * cfg.intermediate_size      # per token
    assert all_t - at_k >= B * (T - K) * mlp_flops, (all_t, at_k)


@pytest.mark.parametrize("block", [4, 5])
def test_blocked_causal_attention_equals_one_block(block):
    """T=12 in blocks of 4 (even) and 5 (ragged last block), with a window of 5."""
    model = _model(2)
    cfg, params, lora = model.config, model.params(), model.lora_params()
    base = dataclasses.replace(model.forward_options(), attention_block=0)
    ids, seg, pos = _inputs()
    w = jax.random.normal(jax.random.key(4), (B, T, cfg.hidden_size))

    def run(opts):
        def f(lo):
            return forward(params, cfg, TokenInputs(ids, positions=pos, segment_ids=seg),
                           OutputRequest("hidden"), opts=opts, lora=lo)["hidden"]
        out = jax.jit(f)(lora)
        grads = jax.jit(jax.grad(lambda lo: jnp.sum(f(lo) * w)))(lora)
        return out, grads

    ref, g_ref = run(base)
    out, g = run(dataclasses.replace(base, attention_block=block))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_key_range_of_a_block():
    from xft_jax.models.attention import key_range

    assert key_range(8, 12, None) == (0, 12)
    assert key_range(8, 12, 5) == (4, 12)      # query 8 sees keys 4..8
    assert key_range(0, 4, 5) == (0, 4)


def test_merged_adapters_equal_unmerged():
    model = _model(3)
    cfg, params, lora = model.config, model.params(), model.lora_params()
    opts = model.forward_options()
    ids, seg, pos = _inputs()
    inputs = TokenInputs(ids, positions=pos, segment_ids=seg)

    def logits(o):
        return np.asarray(forward(params, cfg, inputs, opts=o, lora=lora)["logits"])

    plain, merged = logits(opts), logits(dataclasses.replace(opts, lora_merged=True))
    without = np.asarray(forward(params, cfg, inputs, opts=opts)["logits"])
    assert np.abs(plain - without).max() > 1e-2      # the adapters matter here
    np.testing.assert_allclose(merged, plain, atol=1e-5, rtol=1e-5)


def test_mask_free_form_equals_masked_form(monkeypatch):
    """attention_impl='cudnn' runs the mask-free form (is_causal + window, no mask).
    cuDNN itself needs a GPU, so here the same call runs on XLA: the form must give what
    the explicit mask gives, for right-padded rows, with a sliding window, and gradients."""
    calls = []
    original = jax.nn.dot_product_attention

    def on_xla(q, k, v, *args, implementation=None, **kw):
        if implementation == "cudnn":
            assert kw.get("mask") is None and kw["is_causal"], kw
            calls.append(kw)
            implementation = "xla"
        return original(q, k, v, *args, implementation=implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_xla)
    model = _model(2)
    cfg, params, lora = model.config, model.params(), model.lora_params()
    masked = model.forward_options()
    ids, _, _ = _inputs()
    seg = jnp.asarray([[1] * 12, [1] * 9 + [0] * 3, [1] * 5 + [0] * 7], jnp.int32)
    w = jax.random.normal(jax.random.key(5), (B, T, cfg.hidden_size))
    real = np.asarray(seg)[..., None] > 0

    def run(opts):
        def f(lo):
            return forward(params, cfg, TokenInputs(ids, segment_ids=seg),
                           OutputRequest("hidden"), opts=opts, lora=lo)["hidden"]
        grads = jax.grad(lambda lo: jnp.sum(jnp.where(real, f(lo) * w, 0.0)))(lora)
        return np.asarray(f(lora)), grads

    ref, g_ref = run(masked)
    out, g = run(dataclasses.replace(masked, attention_impl="cudnn"))
    assert calls and calls[0]["local_window_size"] == (cfg.sliding_window - 1, 0)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=1e-5,
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_right_padding_check_and_config_check():
    from xft_jax.models.attention import check_right_padded

    check_right_padded(np.array([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="row 1 holds packed segments"):
        check_right_padded(np.array([[1, 1, 0], [1, 2, 0]]), "batch")
    with pytest.raises(ValueError, match="row 0 is not right-padded"):
        check_right_padded(np.array([[0, 1, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_impl='bogus'"):
        Decoder(_model(1).config, rngs=nnx.Rngs(0), attention_impl="bogus")

    from configs import tiny
    from xft_jax import sharding
    from xft_jax.training import trainer

    c = tiny.get_config("synthetic,naturalness,label_only")
    c.model.attention_impl = "cudnn"
    c.data.pack = True
    mesh = sharding.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="data.pack=True"):
        trainer._check_batch(c, trainer.step_config(c), mesh)
