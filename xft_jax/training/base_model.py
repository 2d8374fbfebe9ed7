"""The frozen base model of a run: an HF checkpoint path, or a tiny random one, and the
one way to load it from a run's ``model`` config (``load_base``).

``model.path`` names an HF safetensors directory. When it is empty and ``model.random``
describes a tiny model (configs/tiny.py), a random checkpoint is built from
``model.random.seed`` and saved once (with the Mistral-7B-v0.1 tokenizer beside it) under
``<workdir>/base_model``, so the rest of the run reads it like any other checkpoint.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
from flax import nnx

from xft_jax import distributed, quantization
from xft_jax.errors import ConfigValueError, MissingPathError
from xft_jax.models import hf_io
from xft_jax.models.config import ModelConfig
from xft_jax.models.decoder import Decoder
from xft_jax.models.tokenizer import mistral_v1_tokenizer_dir


def tiny_model_config(r) -> ModelConfig:
    return ModelConfig(
        vocab_size=int(r.vocab_size), hidden_size=int(r.hidden_size),
        intermediate_size=int(r.intermediate_size), num_layers=int(r.num_layers),
        num_heads=int(r.num_heads), num_kv_heads=int(r.num_kv_heads),
        head_dim=int(r.hidden_size) // int(r.num_heads), rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=int(r.max_position_embeddings),
        sliding_window=r.sliding_window, model_type=str(r.family),
        bos_token_id=1, eos_token_id=2)


def build_random_checkpoint(path: str, r) -> str:
    """Writes (once) a random HF checkpoint described by ``r`` plus the Mistral v1
    tokenizer; deterministic in ``r.seed``. Safe to call on every process: process 0
    writes, the others wait at a barrier."""
    done = os.path.join(path, "config.json")
    if jax.process_index() == 0 and not os.path.exists(done):
        cfg = tiny_model_config(r)
        model = Decoder(cfg, rngs=nnx.Rngs(int(r.seed)))
        tmp = path + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        hf_io.save_pretrained(model, tmp)
        tok = mistral_v1_tokenizer_dir(os.path.join(tmp, ".tok"))
        for name in os.listdir(tok):
            shutil.copyfile(os.path.join(tok, name), os.path.join(tmp, name))
        shutil.rmtree(os.path.join(tmp, ".tok"), ignore_errors=True)
        if os.path.exists(done):           # someone else finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
    distributed.sync("xft_jax_base_model")
    return path


def resolve_base_path(config, workdir: str) -> str:
    """The base checkpoint directory this run uses (building the tiny one if asked)."""
    path = str(config.model.path or "")
    if path:
        if not os.path.isdir(path):
            raise MissingPathError(f"config.model.path={path!r}: not a directory")
        return path
    r = config.model.random
    if r is None:
        raise ConfigValueError("config.model.path is empty and config.model.random is not set: "
                               "give the HF checkpoint directory of the base model")
    return build_random_checkpoint(os.path.join(os.path.abspath(workdir), "base_model"), r)


def tokenizer_path(config, base_path: str) -> str:
    return str(config.model.tokenizer or "") or base_path


def load_base(mc, path: str, mesh, *, dtype=None, dense: bool = False,
              inference: bool = False) -> Decoder:
    """The frozen base described by a ``model`` config section, read from ``path`` onto
    ``mesh``. ``model.quantization`` quantises it while it is read (QLoRA) unless
    ``dense``; ``dtype`` overrides the parameter and compute dtypes (e.g. float32 for an
    exact export). ``inference`` skips remat (nothing is differentiated) and uses the
    default attention."""
    param_dtype = jnp.dtype(dtype or mc.dtype or "float32")
    compute_dtype = jnp.dtype(dtype or mc.compute_dtype or param_dtype)
    qcfg = quantization.QuantConfig.from_config(mc)
    transform = quantization.layer_transform(qcfg) if qcfg.enabled and not dense else None
    return hf_io.load_pretrained(
        path, dtype=param_dtype, mesh=mesh, compute_dtype=compute_dtype,
        remat="none" if inference else str(mc.remat),
        attention_impl=None if inference else mc.attention_impl,
        transform=transform)
