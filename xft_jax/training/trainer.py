"""The training loop: build everything from a config, resume, step, log, checkpoint.

``train(config, workdir)`` is what ``python -m xft_jax.train`` calls. Order matters for
reproducibility: the run key is made from ``train.seed`` before any parameter exists;
the LoRA init and the dropout stream are both derived from it. A restart with the same
workdir restores LoRA params, optimiser state, step, RNG and the data-iterator position
from the latest checkpoint, and continues exactly where the checkpoint was taken.

The run lasts ``train.epochs`` passes over its training split (or ``train.steps``). Every
``train.eval_every`` steps, and at the last, it scores the validation split (never test)
and saves a checkpoint; the one with the best validation accuracy is kept and recorded in
``<workdir>/validation.json`` with the curve (``training.selection``), for the evaluator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from xft_jax import lora as lora_lib
from xft_jax import atomic, sharding
from xft_jax.errors import ConfigValueError, is_user_error
from xft_jax.models import attention, partitioning
from xft_jax.models.config import ModelConfig
from xft_jax.models.tokenizer import load_tokenizer
from xft_jax.training import base_model, batches as batches_lib, loss as loss_lib, optim, run_identity
from xft_jax.training import selection
from xft_jax.training.checkpoint import Checkpoints, abstract_state
from xft_jax.training.config_checks import check_train_config
from xft_jax.training.workdir_lock import LOCK_FILE, WorkdirLock
from xft_jax.training.metrics_log import RunLogger
from xft_jax.training.preemption import Preemption
from xft_jax.training.step import (StepConfig, batch_shardings, jit_step,
                                   make_step_fn, opt_state_shardings, validation_sums)

CONFIG_FILE = "config.json"


class NonFiniteError(FloatingPointError):
    """Loss or gradients became NaN/inf; the run stopped without saving."""


@dataclasses.dataclass
class TrainResult:
    step: int
    status: str                  # 'done' | 'preempted'
    last_metrics: dict
    workdir: str


def save_config(config, workdir: str) -> None:
    """The resolved config (after overrides), atomically, by process 0."""
    if jax.process_index() != 0:
        return
    atomic.write_text(os.path.join(workdir, CONFIG_FILE),
                      config.to_json_best_effort(indent=2, sort_keys=True))


def step_config(config) -> StepConfig:
    t = config.train
    return StepConfig(grad_accum=int(t.grad_accum), label_loss_weight=float(t.label_loss_weight),
                      ce_chunk=int(t.ce_chunk))


def _check_batch(config, scfg: StepConfig, mesh):
    if config.model.attention_impl in attention.MASK_FREE_IMPLS and bool(config.data.pack):
        raise ConfigValueError(f"model.attention_impl={config.model.attention_impl!r} needs one "
                               f"example per row; data.pack=True packs several: set one of them "
                               f"differently (e.g. model.attention_impl=xla)")
    b = int(config.data.batch_size)
    shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    if b % scfg.grad_accum or (b // scfg.grad_accum) % shards:
        raise ConfigValueError(
            f"data.batch_size={b} must split into train.grad_accum={scfg.grad_accum} "
            f"micro-batches whose size divides the {shards} batch shards (mesh.data x "
            f"mesh.fsdp)")


def train(config, workdir: str, *, devices=None) -> TrainResult:
    """Runs (or resumes) training as ``config`` says, writing everything under workdir.

    SIGTERM or Ctrl-C at any point (loading included) makes the run save after its next
    step and return with status 'preempted'."""
    with Preemption("saving at the next step, then stopping") as preempt:
        return _train(config, workdir, devices, preempt)


def _train(config, workdir: str, devices, preempt: Preemption) -> TrainResult:
    check_train_config(config)
    workdir = os.path.abspath(workdir)
    existed = os.path.isdir(workdir)
    before = set(os.listdir(workdir)) if existed else set()
    with WorkdirLock(workdir, hold=jax.process_index() == 0):
        ckpts = Checkpoints(os.path.join(workdir, "checkpoints"),
                            int(config.train.keep_checkpoints))
        try:
            return _train_in(config, workdir, devices, preempt, ckpts)
        except Exception as e:
            if is_user_error(e) and ckpts.latest_step() is None:
                _remove_created(workdir, existed, before)
            raise
        finally:
            ckpts.close()


def _remove_created(workdir: str, existed: bool, before: set) -> None:
    """After bad input, a run that saved nothing leaves no trace: what it created in
    the workdir is removed (the workdir too, if it made it). Process 0 only."""
    if jax.process_index() != 0:
        return
    for name in sorted(set(os.listdir(workdir)) - before - {LOCK_FILE}):
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
    if not existed:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(workdir, LOCK_FILE))
            os.rmdir(workdir)


def _train_in(config, workdir: str, devices, preempt: Preemption,
              ckpts: Checkpoints) -> TrainResult:
    # A resume must continue the run its checkpoint belongs to: checked before this
    # attempt's config overwrites the run's config.json.
    latest, resumed_meta = ckpts.newest_readable_meta()
    where = f"{ckpts.directory}/{latest}"
    moved = [] if resumed_meta is None else run_identity.check_resume_config(
        resumed_meta.get("config"), json.loads(config.to_json_best_effort()), where)
    t = config.train
    mesh = sharding.mesh_from_config(config.mesh, devices)
    scfg = step_config(config)
    _check_batch(config, scfg, mesh)
    mask_free_attention = config.model.attention_impl in attention.MASK_FREE_IMPLS

    # The run key exists before any parameter; everything random derives from it.
    run_key = jax.random.key(int(t.seed))
    lora_key, dropout_key = jax.random.split(run_key)

    base_path = base_model.resolve_base_path(config, workdir)
    # Data first: a data error (or data that differs from a resumed run's) surfaces
    # before minutes of loading a 7B base.
    base_cfg = ModelConfig.from_pretrained(base_path)
    tokenizer = load_tokenizer(base_model.tokenizer_path(config, base_path))
    if len(tokenizer) > base_cfg.vocab_size:
        raise ConfigValueError(
            f"{base_path}/config.json: vocab_size={base_cfg.vocab_size} is smaller than the "
            f"tokenizer's {len(tokenizer)} tokens ({base_model.tokenizer_path(config, base_path)}"
            f"): the tokenizer does not belong to this model; set config.model.tokenizer")
    run_data = batches_lib.build(config, tokenizer)
    if latest is not None:
        run_identity.check_resume_data(resumed_meta.get("data"), run_data.info, where)
    steps = batches_lib.train_steps(t, run_data.train.stats.kept, int(config.data.batch_size))
    model = base_model.load_base(config.model, base_path, mesh)
    save_config(config, workdir)
    lcfg = lora_lib.LoRAConfig.from_config(config.lora)
    lora_lib.attach(model, lcfg, lora_key, mesh)
    meta = {"lora": lora_lib.metadata(model.config, lcfg, base_path),
            "config": json.loads(config.to_json_best_effort()), "steps": steps}
    opts = model.forward_options()
    base = model.params()
    lora = model.lora_params()
    model.lora = None          # the loop owns the adapters from here on

    rep = NamedSharding(mesh, P())
    base_sh = partitioning.param_shardings(mesh, base)
    lora_sh = lora_lib.lora_shardings(model.config, lcfg, mesh)
    tx, schedule = optim.make_optimizer(config.optim, steps)
    opt_sh = opt_state_shardings(tx, lora, lora_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(lora)
    rng = jax.device_put(jax.random.key_data(dropout_key), rep)

    meta["data"] = run_data.info
    meta["label_token_ids"] = run_data.label_token_ids
    it = iter(run_data.train)

    start = 0
    if latest is not None:
        latest, state, data_state, old_meta = ckpts.restore_verified(
            abstract_state(lora, lora_sh, tx, opt_sh, mesh), set_aside=True)
        lora_lib.check_metadata(old_meta.get("lora", {}), model.config,
                                f"{ckpts.directory}/{latest}")
        lora, opt_state, rng = state["lora"], state["opt_state"], state["rng"]
        start = int(state["step"])
        it.set_state(data_state)
    # The validation curve up to the restored step (a later point was never saved with
    # its state); its best checkpoint stays protected from deletion.
    curve = selection.ValidationCurve.from_dict(
        old_meta.get("validation") if latest is not None else None)
    best = curve.best
    ckpts.protect(None if best is None else best["step"])
    if jax.process_index() == 0 and curve.points:
        selection.write(workdir, curve)

    step_fn, eval_fn = _jitted(model.config, opts, scfg, mesh, lcfg, config.optim.to_json(),
                               steps, tx, lora_sh, opt_sh, base_sh)
    every = {k: int(t[k]) for k in ("log_every", "checkpoint_every", "eval_every")}
    logger = RunLogger(workdir, steps, start)
    if start:
        logger.write(f"resumed from {ckpts.directory}/{start}")
        for note in moved:
            logger.write(f"resumed with a moved input: {note}")
    logger.write(sharding.describe(mesh))
    enc = run_data.train.stats
    logger.write(f"data: {run_data.info['origin']}, {enc.kept} of {enc.total} training "
                 f"examples encoded ({enc.truncated} with their context cut, {enc.dropped} "
                 f"dropped as longer than data.max_len={config.data.max_len}; every prompt "
                 f"leaves {enc.target_room} target tokens, the "
                 f"{config.data.prompt_room_percentile or 'default'} percentile "
                 f"of the training split's longest target of {', '.join(enc.prompt_room)}; "
                 f"{enc.target_cut} training targets lost their tail to it); "
                 f"{run_data.info['num_validation']} validation examples; {steps} steps ("
                 + ("train.steps" if t.steps is not None else
                    f"{t.epochs} epochs at data.batch_size={config.data.batch_size}")
                 + ")")
    if enc.dropped > 0.1 * enc.total:
        logger.write(f"WARNING: {enc.dropped} of {enc.total} training examples do not fit "
                     f"data.max_len={config.data.max_len}; raise it")
    last: dict = {}
    status = "done"

    def save(step):
        ckpts.save(step, {"lora": lora, "opt_state": opt_state, "rng": rng,
                          "step": jax.device_put(np.int32(step), rep)}, it.get_state(),
                   dict(meta, step=step, validation=curve.to_dict()))

    try:
        step = start
        tokens, t0 = 0, time.perf_counter()
        while step < steps:
            batch = next(it)
            if mask_free_attention:
                attention.check_right_padded(batch["segment_ids"], f"training batch {step}")
            gbatch = batches_lib.to_global(mesh, batch)
            new_lora, new_opt, m = step_fn(lora, opt_state, base, gbatch, rng,
                                           jnp.int32(step))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if m["finite"] != 1.0:
                raise NonFiniteError(
                    f"step {step + 1}: loss={m['loss']} grad_norm={m['grad_norm']} is not "
                    f"finite; stopping without saving. The last good checkpoint "
                    f"(step {ckpts.latest_step()} in {ckpts.directory}) is untouched. "
                    f"Lower optim.lr, check the data, or raise optim.clip_norm.")
            lora, opt_state = new_lora, new_opt
            step += 1
            tokens += batches_lib.real_tokens(batch)
            now = time.perf_counter()
            m["lr"] = float(schedule(step - 1))
            m["tokens_per_sec"] = tokens / max(now - t0, 1e-9)
            last = m
            validated = bool(every["eval_every"] and run_data.eval is not None and (
                step % every["eval_every"] == 0 or step == steps))
            if validated:
                point, losses = validate(eval_fn, lora, base, run_data, mesh,
                                         config.train.eval_batches)
                m.update(losses, val_accuracy=point["accuracy"], val_nll=point["nll"])
                if curve.add(step, **point):
                    ckpts.protect(step)
            if every["log_every"] and (step % every["log_every"] == 0 or step == steps):
                logger.log(step, {k: v for k, v in m.items() if k != "finite"})
                tokens, t0 = 0, time.perf_counter()
            logger.progress(step, m)
            stop = preempt.requested()
            if stop or validated or step == steps or (every["checkpoint_every"] and
                                                      step % every["checkpoint_every"] == 0):
                save(step)
            if validated and jax.process_index() == 0:
                selection.write(workdir, curve)
            if stop:
                status = "preempted"
                logger.write(f"{preempt.name or 'SIGTERM'}: saved step {step} to "
                             f"{ckpts.directory}; exiting")
                break
    finally:
        logger.close()
    return TrainResult(step=step, status=status, last_metrics=last, workdir=workdir)


_JIT_CACHE: dict = {}


def _jitted(cfg, opts, scfg, mesh, lcfg, optim_json, steps, tx, lora_sh, opt_sh, base_sh):
    """The jitted step and eval functions, reused by later runs in the same process with
    the same model, mesh and optimiser (sweeps, tests): their compiled code is cached."""
    key = (cfg, opts, scfg, mesh, lcfg, optim_json, steps)
    if key not in _JIT_CACHE:
        if len(_JIT_CACHE) >= 8:
            _JIT_CACHE.pop(next(iter(_JIT_CACHE)))
        _JIT_CACHE[key] = (
            jit_step(make_step_fn(cfg, opts, tx, scfg, mesh), mesh, lora_sh, opt_sh, base_sh),
            _make_eval(cfg, opts, scfg, mesh, lora_sh, base_sh))
    return _JIT_CACHE[key]


def _make_eval(cfg, opts, scfg, mesh, lora_sh, base_sh):
    """Jitted ``fn(lora, base, batch, label_pos, label_ids) -> (sums, log_probs [B,5])``:
    one forward pass per validation batch (step.validation_sums)."""
    rep = NamedSharding(mesh, P())
    rows = batch_shardings(mesh)
    opts = dataclasses.replace(opts, lora_dropout=0.0)

    def fn(lora, base, batch, label_pos, label_ids):
        with sharding.activation_sharding(mesh):
            return validation_sums(lora, base, batch, label_pos, label_ids, cfg, opts, scfg)

    return jax.jit(fn, in_shardings=(lora_sh, base_sh, rows, rows, rep),
                   out_shardings=(rep, rep))


def validate(eval_fn, lora, base, run_data, mesh,
             max_batches=None) -> tuple[dict, dict]:
    """The validation split in one pass, as ``(point, losses)``. ``point`` is the
    selection curve's entry: rating accuracy and NLL read as the final evaluation reads
    test (the argmax over the five label tokens at the label position; adapters applied
    unmerged here, merged there, equal up to float rounding) and the example count.
    ``losses`` are the logged ``eval_*`` metrics: the teacher-forced loss, label loss and
    label accuracy (argmax over the whole vocabulary)."""
    total, labels, log_probs = None, [], []
    label_ids = jnp.asarray(run_data.label_token_ids, jnp.int32)
    for batch in batches_lib.eval_batches(run_data, max_batches):
        label_pos = sharding.global_batch_from_host(  # [B, 1]: sharded like the rows
            mesh, {"p": np.asarray(batch["label_pos"])[:, None]})["p"]
        s, logp = jax.device_get(eval_fn(lora, base, batches_lib.to_global(mesh, batch),
                                         label_pos, label_ids))
        total = s if total is None else {k: total[k] + s[k] for k in s}
        real = np.asarray(batch["valid"]) > 0
        labels.append(np.asarray(batch["label"])[real])
        log_probs.append(np.asarray(logp, np.float64)[real])
    n = int(sum(len(x) for x in labels))
    if n == 0:
        raise ConfigValueError(
            "validation scored no example: the validation split is empty or no example "
            "fits config.data.max_len; raise data.validation_fraction or data.max_len, or "
            "set train.eval_every=0 to train without selection")
    acc, nll = selection.rating_accuracy(np.concatenate(labels).astype(np.int64),
                                         np.concatenate(log_probs))
    f = {k: float(v) for k, v in jax.device_get(loss_lib.finalize(total)).items()}
    return ({"accuracy": acc, "nll": nll, "n": n},
            {"eval_loss": f["loss"], "eval_label_loss": f["label_loss"],
             "eval_label_accuracy": f["label_accuracy"],
             "eval_explanation_loss": f["explanation_loss"]})
