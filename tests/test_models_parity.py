"""Logit parity with transformers (PyTorch, fp32) on the same weights."""

import numpy as np
import pytest
import torch

from tests.hf_fixtures import FAMILIES, load_hf_model

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from xft_jax import models  # noqa: E402

T = 12


def _batch(seed, padding):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 128, size=(3, T))
    mask = np.ones((3, T), np.int64)
    if padding == "left":
        mask[1, :4] = 0
        mask[2, :7] = 0
    else:
        mask[1, -4:] = 0
        mask[2, -7:] = 0
    return ids, mask


def _reference(hf, ids, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos))
    return out.logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(hf_checkpoint, family):
    path = hf_checkpoint(family)
    hf = load_hf_model(path)
    model = models.load_pretrained(path)
    for padding in ("left", "right"):
        ids, mask = _batch(0, padding)
        ref = _reference(hf, ids, mask)
        ours = np.asarray(model(jnp.asarray(ids, jnp.int32),
                                attention_mask=jnp.asarray(mask, jnp.int32)))
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        err = np.abs(ours - ref)[mask.astype(bool)].max()
        assert err <= 1e-4, f"{family} {padding}-padded: max abs logit diff {err}"


def test_sliding_window_matters(hf_checkpoint):
    """The Mistral fixture's window (5) is shorter than T, so dropping it changes logits."""
    import dataclasses

    path = hf_checkpoint("mistral")
    model = models.load_pretrained(path)
    assert model.config.sliding_window == 5 < T
    ids, mask = _batch(1, "right")
    inputs = models.TokenInputs(jnp.asarray(ids), jnp.asarray(mask))
    with_window = model.forward(inputs)["logits"]
    no_window = models.forward(model.params(), dataclasses.replace(model.config,
                               sliding_window=None), inputs)["logits"]
    assert np.abs(np.asarray(with_window) - np.asarray(no_window))[:, 6:].max() > 1e-3


def test_packed_segments_equal_separate_rows(hf_checkpoint):
    """Two examples packed into one row with segment_ids give each example's own logits."""
    model = models.load_pretrained(hf_checkpoint("llama"))
    rng = np.random.default_rng(2)
    a, b = rng.integers(3, 128, 5), rng.integers(3, 128, 6)
    packed = np.concatenate([a, b, [0]])[None]
    seg = np.array([[1] * 5 + [2] * 6 + [0]])
    out = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(seg)))
    alone_a = np.asarray(model(jnp.asarray(a[None])))
    alone_b = np.asarray(model(jnp.asarray(b[None])))
    np.testing.assert_allclose(out[0, :5], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:11], alone_b[0], atol=1e-5)


def test_logits_at_positions_equal_full_logits(hf_checkpoint):
    model = models.load_pretrained(hf_checkpoint("qwen2"))
    ids, mask = _batch(3, "left")
    full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    pos = np.array([[11, 3], [11, 5], [8, 10]])
    some = np.asarray(model.forward(models.TokenInputs(jnp.asarray(ids), jnp.asarray(mask)),
                                    models.OutputRequest(positions=jnp.asarray(pos)))["logits"])
    assert some.shape == (3, 2, 128)
    np.testing.assert_allclose(some, np.take_along_axis(full, pos[..., None], 1), atol=1e-6)


def test_bf16_close_to_fp32(hf_checkpoint):
    path = hf_checkpoint("llama")
    f32 = models.load_pretrained(path)
    bf16 = models.load_pretrained(path, dtype=jnp.bfloat16)
    assert bf16.params()["layers"]["q_proj"].dtype == jnp.bfloat16
    ids, mask = _batch(4, "right")
    a = np.asarray(f32(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    b = np.asarray(bf16(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert b.dtype == np.float32
    valid = mask.astype(bool)
    assert np.abs(a - b)[valid].max() < 0.05 * np.abs(a[valid]).max()
    pa = np.exp(a - a.max(-1, keepdims=True)); pa /= pa.sum(-1, keepdims=True)
    pb = np.exp(b - b.max(-1, keepdims=True)); pb /= pb.sum(-1, keepdims=True)
    assert np.abs(pa - pb)[valid].max() < 0.02


def test_remat_and_scan_give_same_logits(hf_checkpoint):
    path = hf_checkpoint("llama")
    ids, mask = _batch(5, "right")
    ref = np.asarray(models.load_pretrained(path)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    for remat in ("full", "dots"):
        m = models.load_pretrained(path, remat=remat)
        np.testing.assert_allclose(
            np.asarray(m(jnp.asarray(ids), attention_mask=jnp.asarray(mask))), ref, atol=1e-6)
