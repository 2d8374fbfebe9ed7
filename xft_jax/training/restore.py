"""A trained run as a model: the base from the checkpoint's metadata plus its adapters.

Used by ``xft_jax.export`` (and any evaluator): reads ``<workdir>/checkpoints/<step>``,
rebuilds the run's optimiser only to describe the checkpoint's tree, and attaches the
restored LoRA arrays to a freshly loaded base.
"""

from __future__ import annotations

import os

import jax

from xft_jax import lora as lora_lib
from xft_jax import config_defaults, sharding
from xft_jax.errors import MissingPathError, UserError
from xft_jax.training import optim
from xft_jax.training.base_model import load_base
from xft_jax.training.checkpoint import Checkpoints, abstract_state
from xft_jax.training.step import opt_state_shardings


class UnfinishedRunError(UserError, RuntimeError):
    """A run stopped short of its planned steps, asked for without an explicit step."""


def check_finished(workdir: str, how_to_pick: str) -> None:
    """Raises ``UnfinishedRunError`` when the run's newest checkpoint is short of the steps
    it planned (stopped by a signal or a crash): its best-validation step would be chosen
    from part of the curve, and its latest step is not the run the config describes.
    ``how_to_pick`` says how to ask for a step of it anyway. Checkpoints that do not
    record their planned steps, and a missing workdir, are left to the loader."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        return
    ckpts = Checkpoints(directory, create=False)
    try:
        step, meta = ckpts.newest_readable_meta()
    finally:
        ckpts.close()
    planned = (meta or {}).get("steps")
    if step is not None and planned and step < int(planned):
        raise UnfinishedRunError(
            f"{workdir}: training stopped at step {step} of {int(planned)} and has not "
            f"finished; run its train command again to finish it (it resumes exactly), "
            f"or {how_to_pick} to use a step of the unfinished run")


def load_trained(workdir: str, step: int | None = None, *, dtype=None, mesh=None,
                 dense: bool = False):
    """(model with adapters attached, checkpoint meta, step). ``dtype`` overrides the
    base parameter dtype of the run (e.g. float32 for an exact export). A QLoRA run's base
    is quantised again exactly as in training, so its adapters are evaluated on the
    weights they were trained against; ``dense=True`` loads the unquantised base instead
    (needed to merge)."""
    if not os.path.isdir(workdir):
        raise MissingPathError(f"{workdir}: no such training run directory")
    ckpts = Checkpoints(os.path.join(os.path.abspath(workdir), "checkpoints"), create=False)
    try:
        requested = step
        if step is None:
            step, _ = ckpts.newest_readable_meta()
        if step is None:
            raise MissingPathError(f"{ckpts.directory}: no checkpoint to load")
        if step not in ckpts.all_steps():
            raise MissingPathError(f"{ckpts.directory}: no checkpoint of step {step} "
                                   f"(steps: {ckpts.all_steps()})")
        meta = ckpts.read_meta(step)
        config = config_defaults.with_defaults(meta["config"])
        lmeta = meta["lora"]
        base_path = lmeta["base_model_path"]
        mesh = mesh or sharding.create_mesh(1, 1, 1, devices=jax.devices()[:1])
        model = load_base(config.model, base_path, mesh, dtype=dtype, dense=dense,
                          inference=True)
        lora_lib.check_metadata(lmeta, model.config, f"{ckpts.directory}/{step}")
        lcfg = lora_lib.LoRAConfig(rank=lmeta["rank"], alpha=lmeta["alpha"],
                                   dropout=lmeta["dropout"], targets=tuple(lmeta["targets"]),
                                   rslora=lmeta["rslora"],
                                   param_dtype=lmeta.get("param_dtype", "float32"))
        lora = lora_lib.abstract_lora(model.config, lcfg)
        lora_sh = lora_lib.lora_shardings(model.config, lcfg, mesh)
        tx, _ = optim.make_optimizer(config.optim, int(meta.get("steps")
                                                        or config.train.steps))
        opt_sh = opt_state_shardings(tx, lora, lora_sh, mesh)
        target = abstract_state(lora, lora_sh, tx, opt_sh, mesh)
        if requested is None:      # the newest that verifies, with a warning if not latest
            step, state, _, meta = ckpts.restore_verified(target)
        else:
            state, _, meta = ckpts.restore(step, target)
        lora_lib.attach_arrays(model, lcfg, state["lora"]["layers"])
        return model, meta, step
    finally:
        ckpts.close()
