"""Models: config, the NNX decoder, Hugging Face safetensors and GGUF I/O, and the bundled
real checkpoint.

Public API::

    from xft_jax import models
    model = models.load_pretrained(path, dtype=jnp.bfloat16, mesh=mesh)
    logits = model(input_ids, attention_mask=mask)      # float32 [B, T, V]
    models.save_pretrained(model, out_dir)
    tok = models.load_tokenizer(path)
    path = models.bundled_model("smollm2-135m-instruct")   # a real model, offline
    models.convert_gguf("model.gguf", out_dir)          # path may also be a .gguf file
"""

from xft_jax.models.bundled import BundledModelError, bundled_gguf, bundled_model
from xft_jax.models.config import ConfigError, ModelConfig
from xft_jax.models.decoder import (Decoder, ForwardOptions, OutputRequest, TokenInputs, forward,
                                    init_kv_cache)
from xft_jax.models.gguf_convert import convert_gguf
from xft_jax.models.gguf_io import GGUFError
from xft_jax.models.hf_io import CheckpointError, load_pretrained, save_pretrained
from xft_jax.models.safetensors_reader import SafetensorsError
from xft_jax.models.tokenizer import load_tokenizer, mistral_v1_tokenizer_dir

__all__ = ["ModelConfig", "ConfigError", "Decoder", "ForwardOptions", "TokenInputs",
           "OutputRequest", "forward",
           "init_kv_cache", "load_pretrained", "save_pretrained", "load_tokenizer",
           "mistral_v1_tokenizer_dir", "CheckpointError", "SafetensorsError", "GGUFError",
           "convert_gguf", "bundled_model", "bundled_gguf", "BundledModelError"]
