"""The paper's set-up as far as it is known: Mistral-7B-v0.1, LoRA on all linear layers.

The base is bf16 by default; the paper's 4-bit base is ``--config.model.quantization=nf4``
(QLoRA: NF4 blocks of 64, see xft_jax.quantization).
``--config=configs/mistral_7b.py:source,axis,target``.
"""

from xft_jax import config_defaults


def get_config(arg=None):
    c = config_defaults.base_config()
    c.model.path = "/models/Mistral-7B-v0.1"     # HF safetensors directory; override
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = config_defaults.ALL_LINEAR
    c.data.max_len = 1024
    c.data.batch_size = 16
    c.optim.lr = 2e-4
    return config_defaults.apply_arg(c, arg)
