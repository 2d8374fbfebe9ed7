"""Defaults shared by every training config; each file overrides what differs.

``get_config(arg)`` in the family files accepts ``"source,axis,target"`` (any prefix), e.g.
``--config=configs/mistral_7b.py:coqa,on_topic,explanation``.
"""

from __future__ import annotations

import ml_collections

from xft_jax.data import targets

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.path = ""                 # HF safetensors directory of the frozen base
    c.model.tokenizer = ""            # defaults to model.path
    c.model.dtype = "bfloat16"        # base parameter dtype
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"            # none | full | dots
    # None / "xla": masked attention in query blocks (packing allowed); "cudnn": mask-free
    # fused attention on NVIDIA GPUs, one example per right-padded row (data.pack=False)
    c.model.attention_impl = ml_collections.FieldReference(None, field_type=str)
    c.model.random = ml_collections.FieldReference(None, field_type=ml_collections.ConfigDict)
    # QLoRA: e.g. "nf4" quantises the frozen base while it is read (xft_jax.quantization)
    c.model.quantization = ml_collections.FieldReference(None, field_type=str)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.rslora = False
    c.lora.targets = ALL_LINEAR
    c.lora.param_dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"       # one of the six sources, or synthetic
    c.data.path = ""                  # output of xft_jax.annotate (not needed for synthetic)
    c.data.axis = "naturalness"       # naturalness | comprehensiveness | on_topic
    c.data.target = "explanation"     # label_only | explanation | shuffled | bag_of_words | random_vocab
    c.data.max_len = 1024
    c.data.batch_size = 16            # global batch (all hosts together)
    c.data.seed = 0                   # data generation / split / pseudo-explanation seed
    c.data.num_train = ml_collections.FieldReference(10000, field_type=int)
    c.data.num_test = ml_collections.FieldReference(5000, field_type=int)
    c.data.num_synthetic = ml_collections.FieldReference(None, field_type=int)
    c.data.eval_examples = ml_collections.FieldReference(None, field_type=int)
    c.data.pack = False
    # Target variants every prompt leaves room for: runs of these variants then train and
    # are scored on the same (cut) prompts and keep the same examples, so they differ only
    # in the target. () leaves room for the run's own target only (longer targets then cut
    # more context).
    c.data.prompt_room = tuple(targets.PAPER_VARIANTS)
    # Render the rating prompt with the tokenizer's chat template (instruct models such as
    # the bundled SmolLM2-135M-Instruct); False: the plain prompt.
    c.data.chat_template = False

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.schedule = "cosine"       # cosine | linear | constant (after warm-up)
    c.optim.warmup_steps = 100
    c.optim.end_lr_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 2000
    c.train.seed = 0
    c.train.grad_accum = 1
    c.train.label_loss_weight = 1.0
    c.train.ce_chunk = 256
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    c.train.eval_every = 500
    c.train.eval_batches = ml_collections.FieldReference(None, field_type=int)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1                  # -1: all remaining devices
    c.mesh.tensor = 1
    c.mesh.num_devices = -1           # >0: use only the first N devices (single process)
    return c


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """``"source,axis,target"`` (any prefix of it) from the config-file argument."""
    if arg:
        parts = [p.strip() for p in arg.split(",")]
        for key, value in zip(("source", "axis", "target"), parts):
            if value:
                setattr(c.data, key, value)
    return c
