"""Probe additions against answers worked out by hand: the 5-label sharpness beside the
label-token mass, activation entropy after the final RMS norm and without the outlier
units, on a hand-built model whose layers add nothing to the residual stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xft_jax.eval import probe as probe_lib
from xft_jax.models import Decoder, ModelConfig

D, V = 16, 32
LABEL_IDS = [3, 4, 5, 6, 7]
SPIKY, FLAT = 10, 11                       # token ids with hand-set embeddings
H_SPIKY = np.array([12.0, -6.0] + [1.0] * 14)   # two outlier units, 14 ordinary ones
GAIN = np.array([0.1, 0.2] + [1.0] * 14)         # the final norm damps the outliers
Q = np.array([0.5, 0.2, 0.1, 0.1, 0.1])          # the 5-label distribution we build in
LABEL_SUM = 3.0                                  # sum of exp(label logits); others: 0


def _ent(p):
    p = np.asarray(p, np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def _hand_model(num_layers=3):
    """Every layer's weights zero, so each layer's residual is the embedding; the LM head
    reads only unit 0 and gives the label tokens logits log(3 Q), every other token 0."""
    cfg = ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=24,
                      num_layers=num_layers, num_heads=2, num_kv_heads=1, head_dim=8)
    p = Decoder(cfg, rngs=nnx.Rngs(0)).params()
    p = dict(p, layers={k: (v if k.endswith("norm") else jnp.zeros_like(v))
                        for k, v in p["layers"].items()})
    embed = np.zeros((V, D), np.float32)
    embed[SPIKY], embed[FLAT] = H_SPIKY, 1.0
    hn0 = GAIN[0] * H_SPIKY[0] / np.sqrt((H_SPIKY ** 2).mean() + cfg.rms_norm_eps)
    head = np.zeros((D, V), np.float32)
    head[0, LABEL_IDS] = np.log(LABEL_SUM * Q) / hn0
    p.update(embed=jnp.asarray(embed), final_norm=jnp.asarray(GAIN, jnp.float32),
             lm_head=jnp.asarray(head))
    return cfg, p


def _batch():
    # row 0: FLAT FLAT SPIKY (decision at 2); row 1: FLAT SPIKY FLAT (decision at 1)
    return {"input_ids": np.array([[FLAT, FLAT, SPIKY, 0, 0], [FLAT, SPIKY, FLAT, FLAT, 0]],
                                  np.int32),
            "segment_ids": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.int32),
            "positions": np.array([[0, 1, 2, 0, 0], [0, 1, 2, 3, 0]], np.int32),
            "label_pos": np.array([2, 1], np.int32), "label": np.array([0, 1], np.int32)}


@pytest.mark.parametrize("k", [2, probe_lib.OUTLIER_K])
def test_every_probe_quantity_on_a_hand_built_model(k):
    cfg, params = _hand_model()
    opts = Decoder(cfg, rngs=nnx.Rngs(0)).forward_options()
    out = jax.device_get(probe_lib.make_probe_fn(cfg, opts, LABEL_IDS, vocab_chunk=7,
                                                 outlier_k=k)(params, None, _batch()))
    spiky = _ent(H_SPIKY ** 2)
    flat = np.log(16)
    spiky_norm = _ent((GAIN * H_SPIKY) ** 2)     # energies 1.44, 1.44 and fourteen 1s
    flat_norm = _ent(GAIN ** 2)
    # without the k largest: k=2 drops both outliers (14 ones left); k=8 also 6 of the
    # ones (8 left); a flat vector keeps 16 - k equal units either way
    spiky_trim = flat_trim = np.log(16 - k)
    share = (144 + 36 + (k - 2)) / (144 + 36 + 14)
    full = np.concatenate([LABEL_SUM * Q, np.ones(V - 5)]) / (LABEL_SUM + V - 5)
    want = {
        "act_entropy": [spiky, spiky], "act_entropy_norm": [spiky_norm, spiky_norm],
        "act_entropy_trim": [spiky_trim, spiky_trim], "act_outlier_share": [share, share],
        "act_entropy_prompt": [(2 * flat + spiky) / 3, (flat + spiky) / 2],
        "act_entropy_prompt_norm": [(2 * flat_norm + spiky_norm) / 3,
                                    (flat_norm + spiky_norm) / 2],
        "act_entropy_prompt_trim": [(2 * flat_trim + spiky_trim) / 3,
                                    (flat_trim + spiky_trim) / 2],
        "lens_entropy": [_ent(full)] * 2,
        "lens_label_entropy": [_ent(Q)] * 2,            # 1.359 nats, not the 0.1 mass
        "lens_label_maxprob": [0.5, 0.5],
        "lens_label_mass": [LABEL_SUM / (LABEL_SUM + V - 5)] * 2,
        "lens_gold_prob": [Q[0] * 0.1, Q[1] * 0.1],
        "lens_gold_prob_labels": [Q[0], Q[1]],
        "attn_entropy": [np.log(3), np.log(2)],         # q = k = 0: uniform over seen
    }
    assert set(want) == set(probe_lib.METRICS)
    for name, v in want.items():
        got = out[name]
        assert got.shape == (cfg.num_layers + 1, 2), name
        rows = got[1:] if name == "attn_entropy" else got
        for layer_row in rows:
            np.testing.assert_allclose(layer_row, v, rtol=2e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.exp(out["log_probs"]), [Q, Q], rtol=1e-5)
    assert spiky_norm > spiky + 0.5 and spiky_trim > spiky + 0.5   # what the fixes change


def test_trimmed_entropy_by_hand_ties_and_a_massive_outlier():
    h = jnp.array([[10.0, 1, 1, 1, 1], [1e4, 1, 1, 1, 0]])
    ent, share = probe_lib.trimmed_energy_entropy(h, 1)
    np.testing.assert_allclose(ent, [np.log(4), np.log(3)], rtol=1e-6)
    np.testing.assert_allclose(share, [100 / 104, 1e8 / (1e8 + 3)], rtol=1e-6)
    # k=2 on [10,1,1,1,1]: the 10 and one unit's worth of the tied 1s go -> three 1s left
    ent2, share2 = probe_lib.trimmed_energy_entropy(h[:1], 2)
    np.testing.assert_allclose(ent2, [np.log(3)], rtol=1e-6)
    np.testing.assert_allclose(share2, [101 / 104], rtol=1e-6)
    # k = 0 is the plain energy entropy; the prompt mean in chunks equals the direct one
    np.testing.assert_allclose(probe_lib.trimmed_energy_entropy(h, 0)[0],
                               probe_lib.energy_entropy(h), rtol=1e-6)
    x = jax.random.normal(jax.random.key(0), (3, 10, 16)) ** 3
    w = (jnp.arange(10)[None] < jnp.array([10, 6, 3])[:, None]).astype(jnp.float32)
    direct = (probe_lib.trimmed_energy_entropy(x, 3)[0] * w).sum(1) / w.sum(1)
    for chunk in (4, 10, 128):                      # 4 does not divide 10: overlap masked
        np.testing.assert_allclose(probe_lib.prompt_mean_trimmed(x, w, 3, chunk), direct,
                                   rtol=1e-5)


def test_per_example_middle_and_last_layer_values():
    vals = {k: np.arange(7 * 3, dtype=float).reshape(7, 3) for k in probe_lib.METRICS}
    vals["attn_entropy"][0] = np.nan
    vals["id"] = ["x", "y", "z"]
    pe = probe_lib.per_example(vals)
    mid = probe_lib.middle_layers(7)
    assert (mid.start, mid.stop) == (3, 5) and pe["middle_layers"] == [3, 5]
    assert pe["ids"] == ["x", "y", "z"]
    assert pe["middle"]["act_entropy"] == [10.5, 11.5, 12.5]      # rows 3, 4 averaged
    assert pe["last"]["lens_label_mass"] == [18.0, 19.0, 20.0]
    assert probe_lib.middle_layers(3) == slice(1, 2)              # at least one layer
