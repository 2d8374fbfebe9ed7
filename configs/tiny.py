"""The test model on the synthetic source: trains in seconds on a CPU.

The base is a tiny random Mistral-shaped model (Mistral-7B-v0.1's tokenizer, 32000 tokens)
built from ``model.random.seed`` and saved under ``<workdir>/base_model`` on first use.
"""

import ml_collections

from xft_jax import config_defaults


def get_config(arg=None):
    c = config_defaults.base_config()
    c.model.dtype = "float32"
    c.model.compute_dtype = "float32"
    c.model.remat = "none"
    r = ml_collections.ConfigDict()
    r.family = "mistral"
    r.vocab_size = 32000
    r.hidden_size = 64
    r.intermediate_size = 128
    r.num_layers = 2
    r.num_heads = 4
    r.num_kv_heads = 2
    r.sliding_window = 4096
    r.max_position_embeddings = 2048
    r.seed = 0
    c.model.random = r

    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0

    c.data.source = "synthetic"
    c.data.num_synthetic = 240
    c.data.num_train = None
    c.data.num_test = None
    c.data.eval_examples = 16
    c.data.max_len = 224               # the synthetic prompts need ~200 tokens
    c.data.batch_size = 8

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.0

    c.train.steps = 20
    c.train.ce_chunk = 64
    c.train.log_every = 1
    c.train.checkpoint_every = 5
    c.train.eval_every = 0
    c.mesh.fsdp = 1
    return config_defaults.apply_arg(c, arg)
