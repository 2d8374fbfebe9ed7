"""Llama-2-7B with the same LoRA set-up as configs/mistral_7b.py."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # config_flags loads this file by path, from any directory
    sys.path.insert(0, _ROOT)

from configs import common  # noqa: E402


def get_config(arg=None):
    c = common.base_config()
    c.model.path = "/models/Llama-2-7b-hf"        # HF safetensors directory; override
    c.data.max_len = 1024                          # Llama-2 has a 4096 context
    return common.apply_arg(c, arg)
