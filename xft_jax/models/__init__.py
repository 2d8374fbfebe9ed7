"""Models: config, the NNX decoder, and Hugging Face safetensors I/O.

Public API::

    from xft_jax import models
    model = models.load_pretrained(path, dtype=jnp.bfloat16, mesh=mesh)
    logits = model(input_ids, attention_mask=mask)      # float32 [B, T, V]
    models.save_pretrained(model, out_dir)
    tok = models.load_tokenizer(path)
"""

from xft_jax.models.config import ConfigError, ModelConfig
from xft_jax.models.decoder import Decoder, ForwardOptions, forward, init_kv_cache
from xft_jax.models.hf_io import CheckpointError, load_pretrained, save_pretrained
from xft_jax.models.safetensors_reader import SafetensorsError
from xft_jax.models.tokenizer import load_tokenizer, mistral_v1_tokenizer_dir

__all__ = ["ModelConfig", "ConfigError", "Decoder", "ForwardOptions", "forward",
           "init_kv_cache", "load_pretrained", "save_pretrained", "load_tokenizer",
           "mistral_v1_tokenizer_dir", "CheckpointError", "SafetensorsError"]
