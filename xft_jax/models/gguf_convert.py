"""GGUF file -> Hugging Face directory (config.json, model.safetensors, tokenizer files
with the chat template) that transformers and ``models.load_pretrained`` both load."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax.numpy as jnp

from xft_jax import atomic
from xft_jax.models import gguf_io
from xft_jax.models.hf_io import save_pretrained


def convert_gguf(gguf_path: str, out_dir: str, dtype="bfloat16") -> str:
    """Writes the HF-format directory ``out_dir`` from ``gguf_path``; returns ``out_dir``.

    The weights are dequantised and stored in ``dtype``. The directory is built beside
    ``out_dir`` and renamed into place when complete, so an interrupted conversion leaves
    nothing that looks like a checkpoint (and an existing ``out_dir`` stays until then).
    """
    jdtype = jnp.dtype(dtype)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}-tmp-")
    try:
        tokenizer = gguf_io.gguf_tokenizer(gguf_path)
        model = gguf_io.load_gguf(gguf_path, dtype=jdtype)
        save_pretrained(model, staging, dtype=jdtype)
        del model
        tokenizer.save_pretrained(staging)
        atomic.replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


__all__ = ["convert_gguf"]
