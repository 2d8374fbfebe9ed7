"""The jitted, sharded train step: gradients for the LoRA params only.

The frozen base is an input the step does not differentiate (``value_and_grad`` with
respect to the LoRA pytree, argument 0), so no weight gradient of the base is ever
computed and the optimiser holds state for the adapters only. Micro-batches for gradient
accumulation are scanned inside the step; every micro-batch's loss is divided by the
target-token count of the whole batch, so k micro-batches give the gradient of one big
batch. A non-finite loss or gradient leaves the params and optimiser state unchanged and
is reported in the metrics (``finite`` = 0), so the loop can stop before saving anything.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xft_jax import sharding
from xft_jax.eval import scoring
from xft_jax.models.config import ModelConfig
from xft_jax.models.decoder import (ForwardOptions, OutputRequest, TokenInputs, forward,
                                    lm_head)
from xft_jax.training import loss as loss_lib

TRAIN_KEYS = ("input_ids", "targets", "loss_mask", "label_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    grad_accum: int = 1
    label_loss_weight: float = 1.0
    ce_chunk: int = 256


def batch_shardings(mesh: Mesh) -> NamedSharding:
    """One sharding for every [B, ...] field of a train batch (rows over data x fsdp),
    used as a pytree prefix so batches with or without ``target_pos`` both fit."""
    specs = {sharding.batch_sharding(mesh, k, 2) for k in TRAIN_KEYS + ("target_pos",)}
    assert len(specs) == 1, specs
    return specs.pop()


def opt_state_shardings(tx: optax.GradientTransformation, lora_abstract, lora_sh, mesh):
    """Optimiser-state leaves that mirror a LoRA param take its sharding; the rest
    (counts) are replicated."""
    abstract = jax.eval_shape(tx.init, lora_abstract)
    rep = NamedSharding(mesh, P())
    return optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract, lora_sh, transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding))


def _target_hidden(lora, base, batch, cfg: ModelConfig, opts: ForwardOptions, rng):
    """(hidden [B,K,D], targets, loss_mask, label_mask, positions) at the K target
    positions of ``target_pos`` [B,K] (see training.batches.target_positions), or at
    every position (K = T, positions None) without it."""
    targets, loss_mask, label_mask = batch["targets"], batch["loss_mask"], batch["label_mask"]
    positions = None
    if "target_pos" in batch:
        tp = batch["target_pos"]
        valid = (tp >= 0).astype(jnp.float32)
        positions = jnp.maximum(tp, 0)
        take = lambda x: jnp.take_along_axis(x, positions, axis=1)  # noqa: E731
        targets = take(targets)
        loss_mask = take(loss_mask) * valid
        label_mask = take(label_mask) * valid
    inputs = TokenInputs(batch["input_ids"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    out = forward(base, cfg, inputs, OutputRequest("hidden", positions), opts=opts, lora=lora,
                  rng=rng if opts.lora_dropout > 0 else None)
    return out["hidden"], targets, loss_mask, label_mask, positions


def _token_sums(hidden, targets, loss_mask, label_mask, base, cfg: ModelConfig,
                opts: ForwardOptions, scfg: StepConfig) -> dict:
    """The loss sums (training.loss.SUM_KEYS) of the LM head over ``hidden``."""
    ce, correct = loss_lib.chunked_token_ce(hidden, lm_head(base, cfg, opts.dtype), targets,
                                            scfg.ce_chunk)
    return loss_lib.masked_sums(ce, correct, loss_mask, label_mask, scfg.label_loss_weight)


def loss_and_sums(lora, base, batch, cfg: ModelConfig, opts: ForwardOptions,
                  scfg: StepConfig, rng, n_tok_total):
    """(objective / n_tok_total, sums) for one micro-batch.

    With ``target_pos`` [B,K] (see training.batches.target_positions) the final norm and LM
    head run at the K target positions only; without it, at every position (chunked)."""
    hidden, targets, loss_mask, label_mask, _ = _target_hidden(lora, base, batch, cfg, opts,
                                                               rng)
    sums = _token_sums(hidden, targets, loss_mask, label_mask, base, cfg, opts, scfg)
    return sums["objective_sum"] / jnp.maximum(n_tok_total, 1.0), sums


def validation_sums(lora, base, batch, label_pos, label_ids, cfg: ModelConfig,
                    opts: ForwardOptions, scfg: StepConfig):
    """(sums, label log-probs [B,5]) of an eval batch from one forward pass: the
    teacher-forced loss sums of ``loss_and_sums`` and the log-softmax over the five label
    tokens' head columns at ``label_pos`` [B, 1], the rating as the final evaluation reads it
    (eval.scoring). Rows whose ``label_pos`` is not a target position (padding rows) get
    the uniform distribution. Needs ``target_pos`` in ``batch``."""
    hidden, targets, loss_mask, label_mask, positions = _target_hidden(
        lora, base, batch, cfg, opts, None)
    sums = _token_sums(hidden, targets, loss_mask, label_mask, base, cfg, opts, scfg)
    at_label = (positions == label_pos) & (batch["target_pos"] >= 0)
    h = jnp.einsum("bk,bkd->bd", at_label.astype(hidden.dtype), hidden)
    cols = scoring.head_columns(base, cfg, label_ids, opts.dtype)
    logits = jnp.einsum("bd,dk->bk", h, cols, preferred_element_type=jnp.float32)
    return sums, jax.nn.log_softmax(logits, axis=-1)


def make_step_fn(cfg: ModelConfig, opts: ForwardOptions, tx: optax.GradientTransformation,
                 scfg: StepConfig, mesh: Mesh | None) -> Callable:
    """step(lora, opt_state, base, batch, rng_data, step) -> (lora, opt_state, metrics)."""
    grad_fn = jax.value_and_grad(loss_and_sums, has_aux=True)

    def step(lora, opt_state, base, batch, rng_data, step_i):
        with sharding.activation_sharding(mesh):
            rng = jax.random.fold_in(jax.random.wrap_key_data(rng_data), step_i)
            n_tok = jnp.sum(batch["loss_mask"].astype(jnp.float32))
            k = scfg.grad_accum
            if k == 1:
                (_, sums), grads = grad_fn(lora, base, batch, cfg, opts, scfg, rng, n_tok)
            else:
                b = batch["input_ids"].shape[0]
                # Interleaved split (row j goes to micro-batch j % k): each device keeps
                # its own rows, no resharding between micro-batches.
                micro = jax.tree.map(
                    lambda x: x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

                def body(carry, xs):
                    g_acc, s_acc = carry
                    mb, i = xs
                    mb = {key: sharding.constrain(v, ("batch", "length"))
                          for key, v in mb.items()}
                    (_, s), g = grad_fn(lora, base, mb, cfg, opts, scfg,
                                        jax.random.fold_in(rng, i), n_tok)
                    return (jax.tree.map(jnp.add, g_acc, g),
                            jax.tree.map(jnp.add, s_acc, s)), None

                zeros_g = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), lora)
                zeros_s = {key: jnp.float32(0) for key in loss_lib.SUM_KEYS}
                (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s),
                                                (micro, jnp.arange(k)))
            metrics = loss_lib.finalize(sums)
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(metrics["objective"]) & jnp.isfinite(grad_norm)
            updates, new_opt = tx.update(grads, opt_state, lora)
            new_lora = optax.apply_updates(lora, updates)
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            new_lora = jax.tree.map(keep, new_lora, lora)
            new_opt = jax.tree.map(keep, new_opt, opt_state)
            metrics.update(grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                           param_norm=optax.tree.norm(new_lora))
            return new_lora, new_opt, metrics

    return step


def jit_step(step: Callable, mesh: Mesh, lora_sh, opt_sh, base_sh) -> Callable:
    """jit with explicit in/out shardings; LoRA params and optimiser state are donated."""
    rep = NamedSharding(mesh, P())
    return jax.jit(step,
                   in_shardings=(lora_sh, opt_sh, base_sh, batch_shardings(mesh), rep, rep),
                   out_shardings=(lora_sh, opt_sh, rep),
                   donate_argnums=(0, 1))
