"""Defaults shared by every training config; each file overrides what differs.

``get_config(arg)`` in the family files accepts ``"source,axis,target"`` (any prefix), e.g.
``--config=configs/mistral_7b.py:coqa,on_topic,explanation``.
"""

from __future__ import annotations

import ml_collections

from xft_jax.data import encode, targets

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
    # Fraction of the training split's id groups carved out (by hashed id) as the
    # validation split: checkpoint selection reads it; the test split is read only by the
    # final evaluation.
    c.data.validation_fraction = 0.1
    c.data.num_train = ml_collections.FieldReference(10000, field_type=int)
    c.data.num_test = ml_collections.FieldReference(5000, field_type=int)
    c.data.num_synthetic = ml_collections.FieldReference(None, field_type=int)
    c.data.eval_examples = ml_collections.FieldReference(None, field_type=int)  # validation cap
    c.data.pack = False
    # Every prompt leaves the same room for its target: this percentile of the training
    # split's longest target among the run's own and these variants (a longer target loses
    # its tail, never its label). A cut prompt then carries nothing about its label, and
    # runs of these variants train and are scored on the same prompts and keep the same
    # examples, so they differ only in the target.
    c.data.prompt_room = tuple(targets.PAPER_VARIANTS)
    c.data.prompt_room_percentile = encode.ROOM_PERCENTILE
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
    # Length of a run: passes over the training split (steps follow from its size and
    # data.batch_size); train.steps, when set, replaces them (short test runs).
    c.train.epochs = ml_collections.FieldReference(3.0, field_type=float)
    c.train.steps = ml_collections.FieldReference(None, field_type=int)
    c.train.seed = 0
    c.train.grad_accum = 1
    c.train.label_loss_weight = 1.0   # 1: plain causal-LM loss over the target tokens
    c.train.ce_chunk = 256
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    # Validation accuracy every k steps (and at the last); the best checkpoint is the run's
    # result (kept beyond keep_checkpoints, recorded in <workdir>/validation.json).
    c.train.eval_every = 200
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
