"""KV-cache decoding equals uncached full-forward decoding, token for token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xft_jax.models import generation
from xft_jax.models import load_pretrained

NEW = 8


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: sliding_window=5
def test_cached_greedy_equals_uncached_left_padded(hf_checkpoint, family):
    model = load_pretrained(hf_checkpoint(family))
    params, cfg, opts = model.params(), model.config, model.forward_options()
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(3, cfg.vocab_size, n)) for n in (3, 9, 6)]
    ids, mask = generation.left_pad(seqs, pad_id=0)
    fn = generation.make_generate_fn(cfg, opts, max_new_tokens=NEW)
    cached = np.asarray(fn(params, None, ids, mask, jax.random.key(0))["tokens"])
    uncached = generation.greedy_uncached(params, cfg, ids, mask, NEW, opts=opts)
    np.testing.assert_array_equal(cached, uncached)
    # Left padding changes nothing: each row decodes as it would alone.
    alone = generation.greedy_uncached(params, cfg, np.array([seqs[0]]),
                                       np.ones((1, len(seqs[0]))), NEW, opts=opts)
    np.testing.assert_array_equal(cached[0], alone[0])
    # The prompt plus the new tokens exceeds the window, so it was exercised.
    assert max(map(len, seqs)) + NEW > (cfg.sliding_window or 0)


def test_eos_stops_and_pads(hf_checkpoint):
    model = load_pretrained(hf_checkpoint("llama"))
    params, cfg, opts = model.params(), model.config, model.forward_options()
    ids, mask = generation.left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    free = np.asarray(generation.make_generate_fn(cfg, opts, max_new_tokens=NEW)(
        params, None, ids, mask, jax.random.key(0))["tokens"])
    eos = int(free[0, 2])  # pretend the third token of row 0 is EOS
    out = generation.make_generate_fn(cfg, opts, max_new_tokens=NEW, eos_id=eos, pad_id=-1)(
        params, None, ids, mask, jax.random.key(0))
    toks, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
    first = int(np.argmax(free[0] == eos))
    np.testing.assert_array_equal(toks[0, :first + 1], free[0, :first + 1])
    assert (toks[0, first + 1:] == -1).all() and lengths[0] == first + 1


def test_top_p_restricts_to_nucleus_and_temperature_zero_is_greedy():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None].repeat(4000, 0), jnp.float32)
    draws = np.asarray(generation.sample_next(logits, jax.random.key(1), 1.0, 0.7))
    assert set(np.unique(draws)) == {0, 1}                  # 0.5 < 0.7 <= 0.5 + 0.3
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03
    full = np.asarray(generation.sample_next(logits, jax.random.key(1), 1.0, 1.0))
    assert set(np.unique(full)) == {0, 1, 2, 3}
    assert (np.asarray(generation.sample_next(logits[:3], jax.random.key(0), 0.0)) == 0).all()
    tiny = np.asarray(generation.sample_next(logits[:50], jax.random.key(2), 1.0, 1e-6))
    assert (tiny == 0).all()


@pytest.mark.parametrize("text,label", [("4 The reply is fine.", 4), (" 2", 2),
                                         ("Rating: 5\nGood", 5), ("rating:3", 3),
                                         ("45 words", None), ("Seven", None), ("", None)])
def test_parse_label(text, label):
    assert generation.parse_label(text) == label


def test_sampling_path_with_a_tiny_nucleus_is_greedy(hf_checkpoint):
    model = load_pretrained(hf_checkpoint("llama"))
    params, cfg, opts = model.params(), model.config, model.forward_options()
    ids, mask = generation.left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    greedy = generation.greedy_uncached(params, cfg, ids, mask, 4, opts=opts)
    fn = generation.make_generate_fn(cfg, opts, max_new_tokens=4, temperature=1.0, top_p=1e-6)
    out = np.asarray(fn(params, None, ids, mask, jax.random.key(3))["tokens"])
    np.testing.assert_array_equal(out, greedy)
