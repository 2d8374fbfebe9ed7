"""The paper's set-up as far as it is known: Mistral-7B-v0.1, LoRA on all linear layers.

The base is bf16 by default; the paper's 4-bit base is ``--config.model.quantization=nf4``
(QLoRA: NF4 blocks of 64, see xft_jax.quantization).
``--config=configs/mistral_7b.py:source,axis,target``.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # config_flags loads this file by path, from any directory
    sys.path.insert(0, _ROOT)

from configs import common  # noqa: E402


def get_config(arg=None):
    c = common.base_config()
    c.model.path = "/models/Mistral-7B-v0.1"     # HF safetensors directory; override
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = common.ALL_LINEAR
    c.data.max_len = 1024
    c.data.batch_size = 16
    c.optim.lr = 2e-4
    return common.apply_arg(c, arg)
