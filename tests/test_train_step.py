"""The train step in isolation (tiny fixture model, hand-made batches of the contract):
chunked CE equals the plain full-logits CE, gradient accumulation equals one big batch,
only LoRA params get optimiser state, the frozen base stays bit-identical, and a
non-finite step changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xft_jax import lora as lora_lib
from xft_jax import config_defaults, sharding
from xft_jax.models import OutputRequest, TokenInputs, hf_io, partitioning
from xft_jax.training import optim
from xft_jax.training.loss import chunked_token_ce, finalize, masked_sums
from xft_jax.training.step import (StepConfig, jit_step, make_step_fn,
                                   opt_state_shardings)

B, T, V = 8, 12, 128


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[1, 9:] = 0                                   # a padded row
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, 6:] = 1.0
    loss_mask *= seg > 0
    label_mask = np.zeros((B, T), np.float32)
    label_mask[:, 6] = 1.0
    return {"input_ids": ids[:, :T], "targets": ids[:, 1:], "loss_mask": loss_mask,
            "label_mask": label_mask, "segment_ids": seg,
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def optim_cfg(lr=1e-2):
    c = config_defaults.base_config().optim
    c.update(dict(lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.01,
                  clip_norm=1.0))
    return c


class Setup:
    def __init__(self, path, devices, mesh_shape=(1, 1, 1), lr=1e-2, grad_accum=1,
                 label_loss_weight=1.0, dropout=0.0):
        self.mesh = sharding.create_mesh(*mesh_shape, devices=devices)
        model = hf_io.load_pretrained(path, mesh=self.mesh)
        self.lcfg = lora_lib.LoRAConfig(rank=4, alpha=8, dropout=dropout)
        lora_lib.attach(model, self.lcfg, jax.random.key(0), self.mesh)
        self.cfg = model.config
        self.opts = model.forward_options()
        self.base = model.params()
        self.lora = model.lora_params()
        self.lora_sh = lora_lib.lora_shardings(self.cfg, self.lcfg, self.mesh)
        self.base_sh = partitioning.param_shardings(self.mesh, self.base)
        self.tx, _ = optim.make_optimizer(optim_cfg(lr), 10)
        self.opt_sh = opt_state_shardings(self.tx, self.lora, self.lora_sh, self.mesh)
        self.opt = jax.jit(self.tx.init, out_shardings=self.opt_sh)(self.lora)
        scfg = StepConfig(grad_accum=grad_accum, label_loss_weight=label_loss_weight,
                          ce_chunk=5)
        self.step = jit_step(make_step_fn(self.cfg, self.opts, self.tx, scfg, self.mesh),
                             self.mesh, self.lora_sh, self.opt_sh, self.base_sh)
        self.rng = jax.random.key_data(jax.random.key(1))

    def run(self, batches):
        out = []
        for i, b in enumerate(batches):
            g = sharding.make_global_batch(self.mesh, b)
            self.lora, self.opt, m = self.step(self.lora, self.opt, self.base, g, self.rng,
                                               jnp.int32(i))
            out.append(jax.device_get(m))
        return out


@pytest.fixture(scope="module")
def path(hf_checkpoint):
    return hf_checkpoint("mistral")


def test_chunked_ce_matches_full_logits(path):
    model = hf_io.load_pretrained(path)
    b = make_batch()
    out = model.forward(TokenInputs(jnp.asarray(b["input_ids"]),
                                    positions=jnp.asarray(b["positions"]),
                                    segment_ids=jnp.asarray(b["segment_ids"])),
                        OutputRequest("hidden"))
    from xft_jax.models.decoder import lm_head
    ce, correct = chunked_token_ce(out["hidden"], lm_head(model.params(), model.config,
                                                          jnp.float32),
                                   jnp.asarray(b["targets"]), chunk=5)   # 12 = 5+5+2
    logits = np.asarray(model(jnp.asarray(b["input_ids"]),
                              segment_ids=jnp.asarray(b["segment_ids"])), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref = lse - np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(ce), ref, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(correct), logits.argmax(-1) == b["targets"])
    m = {k: float(v) for k, v in finalize(masked_sums(ce, correct, b["loss_mask"],
                                                       b["label_mask"], 3.0)).items()}
    lm, lab = b["loss_mask"], b["label_mask"]
    assert m["loss"] == pytest.approx((ref * lm).sum() / lm.sum(), abs=2e-5)
    assert m["label_loss"] == pytest.approx((ref * lab).sum() / lab.sum(), abs=2e-5)
    expl = lm * (1 - lab)
    assert m["explanation_loss"] == pytest.approx((ref * expl).sum() / expl.sum(), abs=2e-5)
    assert m["objective"] == pytest.approx(((ref * lm).sum() + 2 * (ref * lab).sum())
                                           / lm.sum(), abs=2e-5)


@pytest.fixture(scope="module")
def trained(path):
    """One setup trained 3 steps (shared: compiles are the slow part on CPU)."""
    a = Setup(path, jax.devices()[:1])
    a.base_before = jax.tree.map(np.array, a.base)
    a.lora_before = jax.tree.map(np.array, a.lora)
    a.batches = [make_batch(s) for s in range(3)]
    a.metrics = a.run(a.batches)
    return a


def test_only_lora_trains_and_accumulation_is_exact(path, trained):
    a = trained
    base_before, lora_before = a.base_before, a.lora_before
    # optimiser state exists for the LoRA params only: its arrays mirror LoRA leaves
    n_lora = sum(x.size for x in jax.tree.leaves(a.lora))
    n_opt = sum(x.size for x in jax.tree.leaves(a.opt) if x.ndim > 0)
    assert n_opt == 2 * n_lora                                  # Adam mu + nu
    batches, m1 = a.batches, a.metrics
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)),
                 base_before, a.base)                           # base bit-identical
    changed = jax.tree.map(lambda x, y: not np.array_equal(x, np.asarray(y)),
                           lora_before, a.lora)
    assert all(jax.tree.leaves(changed))
    assert m1[2]["loss"] < m1[0]["loss"]
    # two micro-batches of 4 rows == one batch of 8 rows
    b = Setup(path, jax.devices()[:1], grad_accum=2)
    m2 = b.run(batches)
    for x, y in zip(m1, m2):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         atol=1e-5), a.lora, b.lora)


def test_non_finite_step_changes_nothing(trained):
    s = trained
    lora = jax.tree.map(np.array, s.lora)
    opt = jax.tree.map(np.array, s.opt)
    bad = make_batch(1)
    good_base = s.base
    s.base = dict(s.base, final_norm=s.base["final_norm"].at[0].set(jnp.nan))
    m = s.run([bad])[0]
    s.base = good_base
    assert m["finite"] == 0.0 and not np.isfinite(m["loss"])
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)), lora, s.lora)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)), opt, s.opt)


def test_head_at_target_positions_equals_every_position(path):
    """target_pos (LM head only where loss_mask is 1) gives the same sums and gradients
    as applying the head at every position."""
    from xft_jax.training.batches import target_positions
    from xft_jax.training.step import loss_and_sums

    s = Setup(path, jax.devices()[:1])
    b = make_batch(3)
    b["loss_mask"][2, :] = 0.0                 # a row without targets
    b["label_mask"][2, :] = 0.0
    tp = target_positions(b["loss_mask"])
    assert tp.shape == (B, min(T, 16)) and (tp[2] == -1).all() and (tp[1, 3:] == -1).all()
    assert list(tp[0, :6]) == [6, 7, 8, 9, 10, 11]
    scfg = StepConfig(ce_chunk=5)
    n = jnp.float32(b["loss_mask"].sum())
    grad = jax.jit(jax.value_and_grad(
        lambda lora, batch: loss_and_sums(lora, s.base, batch, s.cfg, s.opts, scfg, None, n),
        has_aux=True))
    full_batch = {k: jnp.asarray(v) for k, v in b.items()}
    (obj_a, sums_a), g_a = grad(s.lora, full_batch)
    (obj_b, sums_b), g_b = grad(s.lora, dict(full_batch, target_pos=jnp.asarray(tp)))
    for k in sums_a:
        np.testing.assert_allclose(sums_b[k], sums_a[k], rtol=1e-6, atol=1e-6)
    for x, y in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7)
    assert float(obj_a) == pytest.approx(float(obj_b), rel=1e-6)


def test_padding_width_does_not_change_the_step(path):
    """Training rows pad to a bucket width, not max_len: padding the same batch wider
    gives the same loss sums and gradients (padding is masked out of everything)."""
    from xft_jax.training.batches import target_positions
    from xft_jax.training.step import loss_and_sums

    s = Setup(path, jax.devices()[:1])
    b = make_batch(4)
    wide = {}
    for k, v in b.items():                       # T=12 -> 20 columns of padding
        fill = np.zeros((B, 8), v.dtype)
        wide[k] = np.concatenate([v, fill], axis=1)
    scfg = StepConfig(ce_chunk=5)
    n = jnp.float32(b["loss_mask"].sum())
    grad = jax.jit(jax.value_and_grad(
        lambda lora, batch: loss_and_sums(lora, s.base, batch, s.cfg, s.opts, scfg, None, n),
        has_aux=True))
    results = []
    for batch in (b, wide):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        batch["target_pos"] = jnp.asarray(target_positions(np.asarray(batch["loss_mask"])))
        results.append(grad(s.lora, batch))
    (obj_a, sums_a), g_a = results[0]
    (obj_b, sums_b), g_b = results[1]
    for k in sums_a:
        np.testing.assert_allclose(sums_b[k], sums_a[k], rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_validation_pass_equals_loss_sums_and_the_final_scoring(trained):
    """One forward pass per validation batch gives the teacher-forced sums of
    ``loss_and_sums`` and the five-label log-probs of the final evaluation's scorer (merged
    adapters there, so equal up to float rounding); a padding row gets no label."""
    from xft_jax.eval import scoring
    from xft_jax.training.batches import target_positions
    from xft_jax.training.step import loss_and_sums
    from xft_jax.training.trainer import _make_eval

    s = trained
    b = make_batch(5)
    b["loss_mask"][7], b["label_mask"][7], b["segment_ids"][7] = 0.0, 0.0, 0   # padding row
    label_pos = np.full((B, 1), 6, np.int32)
    label_ids = [10, 11, 12, 13, 14]
    scfg = StepConfig(ce_chunk=5)
    tp = target_positions(b["loss_mask"])
    g = sharding.make_global_batch(s.mesh, dict(b, target_pos=tp))
    fn = _make_eval(s.cfg, s.opts, scfg, s.mesh, s.lora_sh, s.base_sh)
    sums, logp = jax.device_get(fn(s.lora, s.base, g, sharding.make_global_batch(
        s.mesh, {"p": label_pos})["p"], jnp.asarray(label_ids, jnp.int32)))
    _, want = jax.jit(lambda lora, batch: loss_and_sums(
        lora, s.base, batch, s.cfg, s.opts, scfg, None, jnp.float32(1)))(s.lora, g)
    for k in want:
        np.testing.assert_allclose(sums[k], np.asarray(want[k]), rtol=1e-6, atol=1e-6)
    score = scoring.make_score_fn(s.cfg, s.opts, label_ids)
    ref = np.asarray(score(s.base, s.lora, {k: jnp.asarray(v) for k, v in dict(
        b, label_pos=label_pos[:, 0]).items()}))
    np.testing.assert_allclose(logp[:7], ref[:7], atol=1e-5)
    assert not np.allclose(logp[0], logp[0].mean())          # a real, non-uniform rating
    np.testing.assert_allclose(logp[7], np.log(np.full(5, 0.2)), atol=1e-6)


def test_lora_plus_scales_only_the_b_updates():
    """optim.lora_plus_ratio gives the B matrices that many times A's step (weight decay
    included); at 1 the optimiser's state keeps the plain chain's structure, so runs saved
    before the key existed resume."""
    from xft_jax.errors import ConfigValueError

    rng = np.random.default_rng(0)
    params = {"layers": {t: {"a": jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32),
                             "b": jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)}
                         for t in ("q_proj", "down_proj")}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                         params)

    def first_update(ratio):
        c = optim_cfg(1e-3)
        c.lora_plus_ratio = ratio
        tx, _ = optim.make_optimizer(c, 10)
        state = tx.init(params)
        return tx.update(grads, state, params)[0], state

    plain, plain_state = first_update(1.0)
    plus, plus_state = first_update(16.0)
    for t in ("q_proj", "down_proj"):
        np.testing.assert_array_equal(plus["layers"][t]["a"], plain["layers"][t]["a"])
        np.testing.assert_allclose(plus["layers"][t]["b"], 16.0 * plain["layers"][t]["b"],
                                   rtol=1e-6)
    assert (jax.tree.structure(plain_state) ==
            jax.tree.structure(optim.make_optimizer(optim_cfg(1e-3), 10)[0].init(params)))
    assert jax.tree.structure(plus_state) != jax.tree.structure(plain_state)
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        c = optim_cfg()
        c.lora_plus_ratio = bad
        with pytest.raises(ConfigValueError, match="config.optim.lora_plus_ratio"):
            optim.make_optimizer(c, 10)
