"""Orbax checkpoints of a run: LoRA params, optimiser state, step, RNG, data-iterator
state and LoRA metadata, one directory per step under ``<workdir>/checkpoints``.

Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-write leaves the previous checkpoints usable. Saving is synchronous: when
``save`` returns, the step is on disk. Each checkpoint's metadata records a sha256 per
state array; ``save`` reads the new step back and checks it (digests, finite values)
before any older step is deleted (only the last ``max_to_keep`` are kept, plus a step
the run protects: its best-validation checkpoint, ``protect``), and
``restore_verified`` falls back from a damaged or unreadable step to the newest one that
verifies, with a warning naming both.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from xft_jax import distributed, sharding
from xft_jax.errors import MissingPathError, UserError

ITEMS = ("state", "data", "meta")
DIGESTS_KEY = "state_digests"
DAMAGED_DIR = "checkpoints_damaged"     # beside checkpoints/: steps that failed to verify
_DELETING = ".deleting-"


class CheckpointCorruptError(UserError, ValueError):
    """A checkpoint that cannot be read or does not match its recorded digests."""


def state_digests(state) -> dict[str, str]:
    """sha256 of (dtype, shape, bytes) per array of ``state``, keyed by its tree path."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        a = np.ascontiguousarray(sharding.to_host(leaf))
        h = hashlib.sha256(f"{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def non_finite_arrays(state) -> list[str]:
    """Tree paths of the floating-point arrays of ``state`` holding NaN or inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        a = sharding.to_host(leaf)
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            bad.append(jax.tree_util.keystr(path))
    return bad


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        state)


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
    """The run's checkpoint manager (every process calls every method).

    ``create=False`` opens an existing run for reading and never creates a directory."""

    def __init__(self, directory: str, max_to_keep: int = 3, *, create: bool = True):
        self.directory = os.path.abspath(directory)
        if not create and not os.path.isdir(self.directory):
            raise MissingPathError(f"{self.directory}: no checkpoints directory (is the "
                                   f"workdir right? it must be a training run's --workdir)")
        self.max_to_keep = max_to_keep
        self.protected: set[int] = set()
        if create and jax.process_index() == 0 and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):   # deletions a kill interrupted
                if name.startswith(_DELETING):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=create,
                                                 enable_async_checkpointing=False),
            item_names=ITEMS)

    def protect(self, step: int | None) -> None:
        """Keeps ``step`` (and no formerly protected one) beyond the latest ``max_to_keep``."""
        self.protected = set() if step is None else {int(step)}

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: dict, data_state: Any, meta: dict) -> None:
        """Writes ``step``, reads it back and checks it; only then deletes the steps
        beyond ``max_to_keep``. A state with NaN/inf is refused before anything is
        written."""
        bad = non_finite_arrays(state)
        if bad:
            raise FloatingPointError(f"step {step}: not saved, {', '.join(bad[:5])} hold "
                                     f"NaN or inf values")
        meta = dict(meta, **{DIGESTS_KEY: state_digests(state)})
        # 'data' is wrapped so a None or bytes iterator state still forms a JSON object.
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"iterator": _jsonable(data_state)}),
            meta=ocp.args.JsonSave(_jsonable(meta))), force=True)
        self.manager.wait_until_finished()
        self._restore_checked(step, _abstract(state))
        self._prune()

    def _prune(self) -> None:
        steps = self.all_steps()
        if self.max_to_keep is None or len(steps) <= self.max_to_keep:
            return
        doomed = [s for s in steps[:-self.max_to_keep] if s not in self.protected]
        if not doomed:
            return
        if jax.process_index() == 0:
            for step in doomed:
                # Renamed first, so an interrupted deletion never leaves a half-deleted
                # step that looks like a checkpoint.
                trash = os.path.join(self.directory, f"{_DELETING}{step}")
                os.replace(self._step_dir(step), trash)
                shutil.rmtree(trash, ignore_errors=True)
        distributed.sync("xft_jax_checkpoint_prune")
        self.manager.reload()

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, Any, dict]:
        """(state, data-iterator state, meta) of ``step``, placed like ``abstract_state``,
        checked against the digests recorded at save."""
        return self._restore_checked(step, abstract_state)

    def _restore_checked(self, step: int, abstract_state: dict) -> tuple[dict, Any, dict]:
        where = self._step_dir(step)
        meta = self.read_meta(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - TensorStore/orbax read errors of many types
            msg = " ".join(str(e).split())[:300]
            raise CheckpointCorruptError(f"{where}: unreadable ({type(e).__name__}: "
                                         f"{msg})") from e
        state = out["state"]
        recorded = meta.get(DIGESTS_KEY)
        if recorded is not None:
            found = state_digests(state)
            wrong = sorted(k for k in set(recorded) | set(found)
                           if recorded.get(k) != found.get(k))
            if wrong:
                raise CheckpointCorruptError(
                    f"{where}: {len(wrong)} array(s) differ from the digests recorded at "
                    f"save ({', '.join(wrong[:3])})")
        bad = non_finite_arrays(state)
        if bad:
            raise CheckpointCorruptError(f"{where}: {', '.join(bad[:3])} hold NaN or inf")
        return state, _unjsonable(out["data"]["iterator"]), out["meta"]

    def restore_verified(self, target: dict, *, set_aside: bool = False
                         ) -> tuple[int, dict, Any, dict]:
        """(step, state, data state, meta) of the newest step that reads and verifies.

        A newer step that fails is reported with a warning naming it and the step used;
        ``set_aside=True`` (a training run about to write new steps) moves it to
        ``<workdir>/checkpoints_damaged/`` so it is kept for inspection but never
        resumed from or overwritten."""
        failed = []
        for step in reversed(self.all_steps()):
            try:
                state, data, meta = self._restore_checked(step, target)
            except CheckpointCorruptError as e:
                failed.append((step, e))
                continue
            for bad, e in failed:
                logging.warning("%s; using %s, the newest checkpoint that verifies",
                                e, self._step_dir(step))
            if failed and set_aside:
                self._set_aside([s for s, _ in failed])
            return step, state, data, meta
        if failed:
            raise CheckpointCorruptError(f"{self.directory}: no checkpoint verifies; "
                                         f"newest: {failed[0][1]}")
        raise MissingPathError(f"{self.directory}: no checkpoint found")

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            dest = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
            os.makedirs(dest, exist_ok=True)
            for step in steps:
                target = os.path.join(dest, str(step))
                n = 1
                while os.path.exists(target):
                    target = os.path.join(dest, f"{step}.{n}")
                    n += 1
                os.replace(self._step_dir(step), target)
        distributed.sync("xft_jax_checkpoint_set_aside")
        self.manager.reload()

    def read_meta(self, step: int | None = None) -> dict:
        """The metadata item alone (export reads it before building anything)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise MissingPathError(f"{self.directory}: no checkpoint found")
        path = os.path.join(self._step_dir(step), "meta", "metadata")
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    meta = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointCorruptError(f"{path}: damaged checkpoint metadata, not "
                                             f"valid JSON ({e})") from None
        else:
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001 - orbax raises many types here
                raise CheckpointCorruptError(f"{self._step_dir(step)}: unreadable "
                                             f"checkpoint metadata ({e})") from e
        if not isinstance(meta, dict):
            raise CheckpointCorruptError(f"{path}: damaged checkpoint metadata, not an "
                                         f"object")
        return meta

    def newest_readable_meta(self) -> tuple[int | None, dict | None]:
        """(step, meta) of the newest step whose metadata reads; (None, None) when there
        is no step at all."""
        failed = []
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
            except CheckpointCorruptError as e:
                failed.append(e)
                continue
            for e in failed:
                logging.warning("%s; using %s instead", e, self._step_dir(step))
            return step, meta
        if failed:
            raise CheckpointCorruptError(f"{self.directory}: no checkpoint's metadata reads; "
                                         f"newest: {failed[0]}")
        return None, None

    def close(self) -> None:
        self.manager.close()
