"""Layerwise probe: entropies by hand (numpy on the transformers reference), the last
layer's logit lens against the model's own output, flat memory in sequence length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.hf_fixtures import load_hf_model
from xft_jax.eval import probe as probe_lib, scoring
from xft_jax.models import (Decoder, ModelConfig, OutputRequest, TokenInputs, forward,
                            load_pretrained)

LABEL_IDS = [5, 17, 33, 64, 100]
B, T = 3, 10


def _batch():
    rng = np.random.default_rng(0)
    lens = np.array([10, 7, 4])
    seg = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    return {"input_ids": rng.integers(3, 128, (B, T)).astype(np.int32), "segment_ids": seg,
            "positions": np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32),
            "label_pos": np.array([8, 6, 2], np.int32), "label": np.array([0, 3, 4], np.int32)}


def _entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference(path, batch, eps):
    """Residual streams [L+1] x [B,T,D] and attention probabilities from transformers."""
    hf = load_hf_model(path)
    hf.config._attn_implementation = "eager"
    caps = []
    hooks = [layer.register_forward_hook(
        lambda mod, i, o: caps.append((o[0] if isinstance(o, tuple) else o).numpy()))
        for layer in hf.model.layers]
    with torch.no_grad():
        r = hf(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
               attention_mask=torch.tensor(batch["segment_ids"]), output_hidden_states=True,
               output_attentions=True)
    for h in hooks:
        h.remove()
    head = (hf.get_output_embeddings().weight.detach().numpy()).T   # [D,V]
    return ([r.hidden_states[0].numpy()] + caps, [a.numpy() for a in r.attentions],
            hf.model.norm.weight.detach().numpy(), head)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_entropies_equal_numpy_by_hand(hf_checkpoint, family):
    path = hf_checkpoint(family)
    model = load_pretrained(path)
    cfg, batch = model.config, _batch()
    # vocab_chunk=48 does not divide V=128: the overlapping last chunk must be masked
    out = jax.device_get(probe_lib.make_probe_fn(cfg, model.forward_options(), LABEL_IDS,
                                                 vocab_chunk=48)(model.params(), None, batch))
    hs, attn, norm_w, head = _reference(path, batch, cfg.rms_norm_eps)
    rows, pos, gold = np.arange(B), batch["label_pos"], batch["label"]
    prompt = (np.arange(T)[None] <= pos[:, None]) & (batch["segment_ids"] > 0)
    assert out["act_entropy"].shape == (cfg.num_layers + 1, B)
    for layer, h in enumerate(hs):
        h = h.astype(np.float64)
        hd = h[rows, pos]
        energy = lambda x: x ** 2 / (x ** 2).sum()  # noqa: E731
        act = [_entropy(energy(x)) for x in hd]
        per_tok = np.array([[_entropy(energy(h[b, t])) for t in range(T)] for b in range(B)])
        act_prompt = (per_tok * prompt).sum(1) / prompt.sum(1)
        hn = hd / np.sqrt((hd ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * norm_w
        p = _softmax(hn @ head)
        five = p[:, LABEL_IDS]
        want = {"act_entropy": act, "act_entropy_prompt": act_prompt,
                "lens_entropy": [_entropy(x) for x in p],
                "lens_label_entropy": [_entropy(x / x.sum()) for x in five],
                "lens_label_mass": five.sum(1), "lens_gold_prob": five[rows, gold],
                "lens_gold_prob_labels": five[rows, gold] / five.sum(1)}
        for k, v in want.items():
            np.testing.assert_allclose(out[k][layer], v, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{k} layer {layer}")
        if layer == 0:
            assert np.isnan(out["attn_entropy"][0]).all()
        else:
            a = attn[layer - 1][rows, :, pos]                     # [B,H,T] at the decision
            ent = [np.mean([_entropy(a[b, hh]) for hh in range(a.shape[1])]) for b in range(B)]
            np.testing.assert_allclose(out["attn_entropy"][layer], ent, rtol=1e-4)


def test_last_layer_lens_is_the_models_own_output(hf_checkpoint):
    model = load_pretrained(hf_checkpoint("llama"))
    params, cfg, opts, batch = model.params(), model.config, model.forward_options(), _batch()
    out = jax.device_get(probe_lib.make_probe_fn(cfg, opts, LABEL_IDS)(params, None, batch))
    inputs = TokenInputs(jnp.asarray(batch["input_ids"]), positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    logits = np.asarray(forward(params, cfg, inputs, opts=opts)["logits"], np.float64)
    p = _softmax(logits[np.arange(B), batch["label_pos"]])
    last = cfg.num_layers
    np.testing.assert_allclose(out["lens_entropy"][last], [_entropy(x) for x in p], rtol=1e-5)
    np.testing.assert_allclose(out["lens_label_mass"][last], p[:, LABEL_IDS].sum(1), rtol=1e-5)
    scored = scoring.make_score_fn(cfg, opts, LABEL_IDS)(params, None, batch)
    np.testing.assert_allclose(out["log_probs"], np.asarray(scored), atol=1e-5)
    np.testing.assert_allclose(np.exp(out["log_probs"])[np.arange(B), batch["label"]],
                               out["lens_gold_prob_labels"][last], rtol=1e-5)
    # and an earlier layer is not the output (the lens really reads each layer)
    assert np.abs(out["lens_entropy"][1] - out["lens_entropy"][last]).max() > 1e-4


def test_memory_flat_in_sequence_length():
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=8,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    params, opts, b = model.params(), model.forward_options(), 2
    probe = probe_lib.make_probe_fn(cfg, opts, [1, 2, 3, 4, 5], vocab_chunk=100)

    def spec(t):
        ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
        vec = jax.ShapeDtypeStruct((b,), jnp.int32)
        return {"input_ids": ints, "segment_ids": ints, "positions": ints, "label_pos": vec,
                "label": vec}

    def plain(params, batch):  # the scoring forward alone, as the baseline
        return forward(params, cfg, TokenInputs(batch["input_ids"],
                                                segment_ids=batch["segment_ids"]),
                       OutputRequest("hidden", batch["label_pos"][:, None]), opts=opts)

    def keep_all(params, batch):  # what the probe must not do: every layer's [B,T,D]
        return forward(params, cfg, TokenInputs(batch["input_ids"],
                                                segment_ids=batch["segment_ids"]),
                       OutputRequest("none", layer_reduce=lambda h, i: h), opts=opts)

    mem = {}
    for t in (64, 256):
        mem[t] = {"plain": jax.jit(plain).lower(params, spec(t)).compile().memory_analysis()}
        mem[t]["keep_all"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
            jax.eval_shape(keep_all, params, spec(t))))
        mem[t]["probe"] = probe.lower(params, None, spec(t)).compile().memory_analysis()
    one_layer = lambda t: b * t * cfg.hidden_size * 4  # noqa: E731
    assert mem[64]["probe"].output_size_in_bytes == mem[256]["probe"].output_size_in_bytes
    # what the probe adds over the plain forward does not grow like even one more [B,T,D]
    extra = {t: mem[t]["probe"].temp_size_in_bytes - mem[t]["plain"].temp_size_in_bytes
             for t in (64, 256)}
    assert extra[256] - extra[64] < one_layer(256) - one_layer(64), extra
    # the measure can tell: keeping every layer's residual grows with L x T
    grow = mem[256]["keep_all"] - mem[64]["keep_all"]
    assert grow >= (cfg.num_layers + 1) * (one_layer(256) - one_layer(64))


def test_summarize_is_nan_aware():
    vals = {k: np.arange(6, dtype=float).reshape(3, 2) for k in probe_lib.METRICS}
    vals["attn_entropy"][0] = np.nan
    s = probe_lib.summarize(vals)
    assert s["act_entropy"]["mean"] == [0.5, 2.5, 4.5]
    assert np.isnan(s["attn_entropy"]["mean"][0]) and s["attn_entropy"]["mean"][1] == 2.5
