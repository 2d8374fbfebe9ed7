"""Llama-2-7B with the same LoRA set-up as configs/mistral_7b.py."""

from xft_jax import config_defaults


def get_config(arg=None):
    c = config_defaults.base_config()
    c.model.path = "/models/Llama-2-7b-hf"        # HF safetensors directory; override
    c.data.max_len = 1024                          # Llama-2 has a 4096 context
    return config_defaults.apply_arg(c, arg)
