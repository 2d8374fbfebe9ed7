"""Label-position scoring: five head columns only, exact batching over the mesh."""

import jax.numpy as jnp
import numpy as np
import pytest

from xft_jax import sharding
from xft_jax.eval import batching, metrics, scoring
from xft_jax.models import TokenInputs, forward, load_pretrained

LABEL_IDS = [5, 17, 33, 64, 100]


def _batch(cfg, seed=0, b=3, t=12):
    rng = np.random.default_rng(seed)
    lens = np.array([t, t - 3, 4])[:b]
    seg = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    return {"input_ids": rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32),
            "segment_ids": seg, "positions": np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32),
            "label_pos": (lens - 2).astype(np.int32), "label": np.array([0, 3, 4][:b], np.int32)}


@pytest.mark.parametrize("family,quant", [("llama", None), ("qwen2", None),  # qwen2: tied
                                          ("llama", "nf4")])    # NF4 LM head: take_columns
def test_five_columns_equal_renormalised_full_softmax(hf_checkpoint, family, quant):
    kw = {}
    if quant:
        from xft_jax.quantization import QuantConfig, layer_transform

        kw["transform"] = layer_transform(QuantConfig(kind=quant, quantize_lm_head=True))
    model = load_pretrained(hf_checkpoint(family), **kw)
    if quant:
        assert hasattr(model.params()["lm_head"], "take_columns")
    params, cfg, opts = model.params(), model.config, model.forward_options()
    batch = _batch(cfg)
    logp = scoring.make_score_fn(cfg, opts, LABEL_IDS)(params, None, batch)
    inputs = TokenInputs(jnp.asarray(batch["input_ids"]), positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    full = forward(params, cfg, inputs, opts=opts)["logits"]                 # [B,T,V]
    at = np.asarray(full)[np.arange(3), batch["label_pos"]]                  # [B,V]
    p = np.exp(at - at.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    five = p[:, LABEL_IDS] / p[:, LABEL_IDS].sum(1, keepdims=True)
    np.testing.assert_allclose(np.exp(np.asarray(logp)), five, rtol=2e-5, atol=1e-6)
    # the positions matter: reading one token earlier gives a different answer
    moved = dict(batch, label_pos=batch["label_pos"] - 1)
    other = scoring.make_score_fn(cfg, opts, LABEL_IDS)(params, None, moved)
    assert np.abs(np.asarray(other) - np.asarray(logp)).max() > 1e-3


def test_label_ids_checked():
    with pytest.raises(ValueError, match="distinct"):
        scoring.check_label_ids([1, 1, 2, 3, 4], 128)
    with pytest.raises(ValueError, match="vocabulary"):
        scoring.check_label_ids([1, 2, 3, 4, 500], 128)


@pytest.fixture(scope="module")
def real_eval(hf_checkpoint, mistral_tokenizer):
    """A tiny Mistral with the real 32k vocabulary and real eval batches (11 examples)."""
    from xft_jax.data import synthetic
    from xft_jax.data.pipeline import label_token_ids, make_batches

    path = hf_checkpoint("mistral", vocab_size=32000)
    model = load_pretrained(path)
    mesh = sharding.create_mesh(data=2, fsdp=-1)                # 8 fake devices
    sharded = load_pretrained(path, mesh=mesh)                  # fsdp-sharded weights
    examples = synthetic.generate(11, seed=3)

    def batches(bs, train=False, **kw):
        return make_batches(examples, mistral_tokenizer, axis="naturalness", max_len=288,
                            batch_size=bs, train=train, **kw)

    return model, sharded, mesh, label_token_ids(mistral_tokenizer), batches


def _evaluate(model, label_ids, batches, batch_size, mesh):
    fn = scoring.make_score_fn(model.config, model.forward_options(), label_ids, mesh)
    params = model.params()
    res = scoring.collect(scoring.score_batches(fn, params, None, batches, batch_size, mesh,
                                                names=batches.example_ids))
    return res, fn


def test_batch_sizes_that_do_not_divide_give_the_same_metrics(real_eval):
    model, sharded, mesh, label_ids, make = real_eval
    assert label_ids == [28740, 28750, 28770, 28781, 28782]
    ref, _ = _evaluate(model, label_ids, make(1), 1, None)
    assert len(ref["id"]) == 11 and len(set(ref["id"])) == 11
    bs = batching.batch_size_for(mesh, 3)
    assert bs == 8
    got, fn = _evaluate(sharded, label_ids, make(bs), bs, mesh)   # 8 + 3 real rows
    order = np.argsort(got["id"])
    np.testing.assert_array_equal(np.array(got["id"])[order], np.sort(ref["id"]))
    ref_order = np.argsort(ref["id"])
    np.testing.assert_allclose(got["log_probs"][order], ref["log_probs"][ref_order], atol=2e-5)
    m_ref = metrics.rating_metrics(ref["label"], np.exp(ref["log_probs"]))
    m_got = metrics.rating_metrics(got["label"], np.exp(got["log_probs"]))
    for k in ("n", "accuracy", "confusion_matrix", "gold_distribution"):
        assert m_got[k] == m_ref[k], k
    assert m_got["nll"] == pytest.approx(m_ref["nll"], abs=1e-5)
    # a short host batch (3 rows, compiled for 4) is padded and the padding dropped
    short = [dict(b) for b in make(3)]
    assert short[-1]["valid"].tolist() == [1, 1, 0]
    res, _ = _evaluate(model, label_ids, _Named(short, make(3).example_ids), 4, None)
    assert sorted(res["id"]) == sorted(ref["id"])
    # never a [B,T,V] tensor: compiled temporaries are far below one [B,T,V] float32
    batch = sharding.global_batch_from_host(mesh, next(iter(make(bs))), batching.DEVICE_KEYS)
    params = sharded.params()
    mem = fn.lower(params, None, batch).compile().memory_analysis()
    btv = bs * 288 * 32000 * 4
    assert mem is not None
    assert mem.temp_size_in_bytes + mem.output_size_in_bytes < btv / 20


class _Named(list):
    def __init__(self, rows, names):
        super().__init__(rows)
        self.example_ids = names


def test_length_sorted_bucketed_batches_score_the_same(real_eval):
    """evaluation's layout: examples batched by length, each batch padded to a power-of-two
    width; collect(order=...) gives the dataset's order back with the same scores."""
    from xft_jax.data.pipeline import length_buckets

    model, _, _, label_ids, make = real_eval
    assert length_buckets(288) == (64, 128, 256, 288)
    assert length_buckets(64) == (64,) and length_buckets(100, 32) == (32, 64, 100)
    ref, _ = _evaluate(model, label_ids, make(4), 4, None)
    sorted_batches = make(4, sort_by_length=True, buckets=length_buckets(288))
    batches = [dict(b) for b in sorted_batches]
    widths = [b["input_ids"].shape[1] for b in batches]
    lengths = np.concatenate([b["segment_ids"].sum(1)[b["valid"] > 0] for b in batches])
    assert (np.diff(lengths) >= 0).all()                       # batched by length
    assert all(w in (64, 128, 256, 288) for w in widths) and min(widths) < 288
    fn = scoring.make_score_fn(model.config, model.forward_options(), label_ids)
    got = scoring.collect(scoring.score_batches(fn, model.params(), None, batches, 4,
                                                names=sorted_batches.example_ids),
                          order=sorted_batches.example_ids)
    assert got["id"] == ref["id"] == list(sorted_batches.example_ids)
    np.testing.assert_array_equal(got["label"], ref["label"])
    np.testing.assert_allclose(got["log_probs"], ref["log_probs"], atol=2e-5)
    with pytest.raises(ValueError, match="sort_by_length is for eval"):
        make(4, sort_by_length=True, train=True)
