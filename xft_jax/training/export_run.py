"""Export a trained run: its adapters as a PEFT directory, or merged into the base.

Library side of ``python -m xft_jax.export``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import jax.numpy as jnp

from xft_jax import atomic
from xft_jax import lora as lora_lib
from xft_jax.errors import ConfigValueError, MissingPathError, UserError
from xft_jax.training import selection
from xft_jax.training.checkpoint import Checkpoints
from xft_jax.training.restore import check_finished, load_trained

# The training run an export came from (its config, workdir and step), so evaluating the
# export reads the run's own data settings, as evaluating the workdir does.
RUN_FILE = "xft_jax_run.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt")
FORMATS = ("peft", "merged")


class ExportPathError(UserError, ValueError):
    """An export destination that would overwrite something it must not."""


def _inside(path: str, parent: str) -> bool:
    return os.path.commonpath([path, parent]) == parent


def check_out_dir(out: str, workdir: str, base_path: str, overwrite: bool) -> None:
    """Refuses an ``out`` that is (or contains) the run's base model or workdir, and an
    existing non-empty directory unless ``overwrite``."""
    real = os.path.realpath(out)
    for what, path in (("the run's base model", base_path), ("the run's workdir", workdir)):
        p = os.path.realpath(path)
        if real == p or _inside(p, real):
            raise ExportPathError(f"--out={out} is {what} ({path}) or holds it: exporting "
                                  f"there would overwrite it; choose another --out")
    if os.path.exists(real) and not os.path.isdir(real):
        raise ExportPathError(f"--out={out} is a file, not a directory")
    if os.path.isdir(real) and os.listdir(real) and not overwrite:
        raise ExportPathError(f"--out={out} is not empty: choose an empty or new directory, "
                              f"or pass --overwrite to replace it whole")


def export_run(workdir: str, fmt: str, out: str, step: int | None = None,
               dtype: str | None = None, overwrite: bool = False) -> str:
    """Writes the run's checkpoint ``step`` to ``out``; by default the step the run
    selected on validation (``training.selection``), else its latest.

    peft: adapter_config.json + adapter_model.safetensors (+ our metadata), for
      ``peft.PeftModel.from_pretrained(base, out)``.
    merged: an HF checkpoint with the adapters folded into the base (merge in float32,
      saved in ``dtype`` or the run's model.dtype), tokenizer files of the base copied.
    Both carry ``RUN_FILE`` (the run's config), which the evaluator reads for its data.

    Everything is written to a directory beside ``out`` and swapped in whole when
    complete, so ``out`` never mixes files of two exports (a stale shard index, say).
    """
    if fmt not in FORMATS:
        raise ConfigValueError(f"format={fmt!r}; expected one of {FORMATS}")
    if step is None:
        check_finished(workdir, "pass --step=N")
        step = selection.selected_step(workdir)
    check_out_dir(out, workdir, _base_path_of(workdir, step), overwrite)
    model, meta, step = load_trained(workdir, step, dtype=dtype, dense=True)
    base_path = meta["lora"]["base_model_path"]
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.export-")
    try:
        if fmt == "peft":
            lora_lib.save_peft_adapter(model, staging, base_model_path=base_path)
        else:
            lora_lib.save_merged(model, staging, dtype=jnp.dtype(dtype) if dtype else None)
            for name in TOKENIZER_FILES:
                src = os.path.join(base_path, name)
                if os.path.exists(src):
                    shutil.copyfile(src, os.path.join(staging, name))
        atomic.write_json(os.path.join(staging, RUN_FILE),
                          {"workdir": os.path.abspath(workdir), "step": int(step),
                           "config": meta["config"]}, sort_keys=True)
        atomic.replace_dir(staging, out)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
    return f"exported step {step} of {workdir} as {fmt} to {out}"


def _base_path_of(workdir: str, step: int | None) -> str:
    """The run's base model path from its checkpoint metadata (read before any load)."""
    if not os.path.isdir(workdir):
        raise MissingPathError(f"{workdir}: no such training run directory")
    ckpts = Checkpoints(os.path.join(os.path.abspath(workdir), "checkpoints"), create=False)
    try:
        meta = ckpts.newest_readable_meta()[1] if step is None else ckpts.read_meta(step)
        if meta is None:
            raise MissingPathError(f"{ckpts.directory}: no checkpoint to export")
        return meta["lora"]["base_model_path"]
    finally:
        ckpts.close()
