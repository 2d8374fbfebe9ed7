"""Orbax checkpoints of a run: LoRA params, optimiser state, step, RNG, data-iterator
state and LoRA metadata, one directory per step under ``<workdir>/checkpoints``.

Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-write leaves the previous checkpoints usable; only the last ``max_to_keep``
are kept. Saving is synchronous: when ``save`` returns, the step is on disk.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

ITEMS = ("state", "data", "meta")


def _jsonable(x: Any) -> Any:
    """Data-iterator states may hold bytes or numpy scalars; JSON needs neither."""
    if isinstance(x, bytes):
        return {"__bytes_b64__": base64.b64encode(x).decode("ascii")}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _unjsonable(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__bytes_b64__"}:
            return base64.b64decode(x["__bytes_b64__"])
        return {k: _unjsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unjsonable(v) for v in x]
    return x


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings (orbax restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def abstract_state(lora: Any, lora_sh: Any, tx: optax.GradientTransformation, opt_sh: Any,
                   mesh) -> dict:
    """The restore target of a checkpoint's state (what ``save`` is given): LoRA params
    and optimiser state placed like ``lora_sh`` / ``opt_sh``, the run's dropout key data
    and the step replicated. ``lora`` may be arrays or ShapeDtypeStructs."""
    rep = NamedSharding(mesh, P())
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return {"lora": abstract_like(lora, lora_sh),
            "opt_state": abstract_like(jax.eval_shape(tx.init, lora), opt_sh),
            "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}


class Checkpoints:
    """The run's checkpoint manager (every process calls every method)."""

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: Any, meta: dict) -> None:
        # 'data' is wrapped so a None or bytes iterator state still forms a JSON object.
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"iterator": _jsonable(data_state)}),
            meta=ocp.args.JsonSave(_jsonable(meta))), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, Any, dict]:
        """(state, data-iterator state, meta) of ``step``, placed like ``abstract_state``."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return out["state"], _unjsonable(out["data"]["iterator"]), out["meta"]

    def read_meta(self, step: int | None = None) -> dict:
        """The metadata item alone (export reads it before building anything)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint found")
        path = os.path.join(self.directory, str(step), "meta", "metadata")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def close(self) -> None:
        self.manager.close()
