"""Export a trained run: its adapters as a PEFT directory, or merged into the base.

Library side of ``python -m xft_jax.export``.
"""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp

from xft_jax import lora as lora_lib
from xft_jax.training.restore import load_trained

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt")
FORMATS = ("peft", "merged")


def export_run(workdir: str, fmt: str, out: str, step: int | None = None,
               dtype: str | None = None) -> str:
    """Writes the run's checkpoint ``step`` (default latest) to ``out``.

    peft: adapter_config.json + adapter_model.safetensors (+ our metadata), for
      ``peft.PeftModel.from_pretrained(base, out)``.
    merged: an HF checkpoint with the adapters folded into the base (merge in float32,
      saved in ``dtype`` or the run's model.dtype), tokenizer files of the base copied.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; expected one of {FORMATS}")
    model, meta, step = load_trained(workdir, step, dtype=dtype, dense=True)
    base_path = meta["lora"]["base_model_path"]
    if fmt == "peft":
        lora_lib.save_peft_adapter(model, out, base_model_path=base_path)
    else:
        lora_lib.save_merged(model, out, dtype=jnp.dtype(dtype) if dtype else None)
        for name in TOKENIZER_FILES:
            src = os.path.join(base_path, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(out, name))
    return f"exported step {step} of {workdir} as {fmt} to {out}"
