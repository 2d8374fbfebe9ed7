"""Tiny random Hugging Face checkpoints, built locally with transformers + torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

FAMILIES = ("llama", "llama31", "mistral", "qwen2", "llama_head_dim")


def hf_config(family: str, **overrides):
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        kw = dict(common, tie_word_embeddings=False)
        cls = transformers.LlamaConfig
    elif family == "llama31":
        kw = dict(common, tie_word_embeddings=False, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 16})
        cls = transformers.LlamaConfig
    elif family == "mistral":
        kw = dict(common, tie_word_embeddings=False, sliding_window=5)
        cls = transformers.MistralConfig
    elif family == "qwen2":
        kw = dict(common, tie_word_embeddings=True, use_sliding_window=False)
        cls = transformers.Qwen2Config
    elif family == "llama_head_dim":
        kw = dict(common, tie_word_embeddings=False, head_dim=24)
        cls = transformers.LlamaConfig
    else:
        raise ValueError(family)
    kw.update(overrides)
    return cls(**kw)


def make_hf_checkpoint(path: str, family: str = "llama", seed: int = 0, dtype=None,
                       **overrides) -> str:
    """Writes a random checkpoint of ``family`` to ``path`` (once) and returns ``path``."""
    import torch
    import transformers

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-trivial norms and biases so a mix-up shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_hf_model(path: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, torch_dtype="float32", trust_remote_code=False).eval()


# A fresh interpreter loads a checkpoint and reports its resident-memory peak above the
# baseline taken after JAX's first computation, and the loaded parameters' size.
_MEASURE_LOAD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from xft_jax import models
    jax.numpy.ones(4).block_until_ready()
    # Reset the high-water mark so import-time spikes do not hide the load's own peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/status") as f:
        base = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:")][0]
    model = models.load_pretrained(sys.argv[1], dtype=jnp.dtype(sys.argv[2]))
    jax.block_until_ready(model.params())
    size = sum(x.nbytes for x in jax.tree.leaves(model.params()))
    # VmHWM, not ru_maxrss: the latter keeps the pre-reset peak of threads that exited.
    with open("/proc/self/status") as f:
        peak = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")][0]
    print(json.dumps({"base": base, "peak": peak, "size": size}))
""")


def load_peak_rss(path: str, dtype: str = "float32") -> dict:
    """{'base', 'peak', 'size'} in bytes for ``models.load_pretrained(path, dtype)``."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _MEASURE_LOAD, str(path), dtype],
                         capture_output=True, text=True, timeout=300, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
