"""xft_jax: explanation-enhanced LoRA fine-tuning of decoder LLMs in JAX/Flax NNX."""

__version__ = "0.1.0"
