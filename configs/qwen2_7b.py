"""Qwen2-7B with the same LoRA set-up (qkv biases stay frozen; tied embeddings handled)."""

from xft_jax import config_defaults


def get_config(arg=None):
    c = config_defaults.base_config()
    c.model.path = "/models/Qwen2-7B"             # HF safetensors directory; override
    c.data.max_len = 1024
    return config_defaults.apply_arg(c, arg)
