"""The defaults every config file starts from: ``base_config()`` for training runs and
``eval_config()`` for evaluation and the probe. Every key the library reads is declared
here, so library code reads ``config.x.y`` and never a default of its own.

The files in ``configs/`` import this module (it is part of the installed package, so no
``sys.path`` edit is needed) and override what differs. Their ``get_config(arg)`` accepts
``"source,axis,target"`` (any prefix), e.g.
``--config=configs/mistral_7b.py:coqa,on_topic,explanation`` (``apply_arg``).
"""

from __future__ import annotations

import ml_collections

from xft_jax.data import encode, targets
from xft_jax.models.decoder import LINEAR_NAMES

ALL_LINEAR = LINEAR_NAMES


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
    _quantization(c.model, None)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.rslora = False
    c.lora.targets = ALL_LINEAR
    c.lora.param_dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"       # one of the six sources, chitchat, or a generated one
    c.data.path = ""                  # output of xft_jax.annotate (not for generated sources:
                                      # synthetic, chitchat_degraded)
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
    # Unpacked rows pad to a few widths (data.pipeline.length_buckets): 0, powers of two
    # (few compiles, for accelerators); N > 0, every multiple of N (little padding, for
    # a CPU that pays per token). Same results either way, up to float rounding.
    c.data.bucket_step = 0
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
    # State the axis' rubric in the rating prompt; False: only the question (a short
    # prompt, for a CPU demo that pays per token).
    c.data.rubric = True

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
    c.optim.lora_plus_ratio = 1.0     # LoRA+: the B matrices' lr over the A matrices' (1: off)

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

    c.mesh = _mesh()
    return c


def _quantization(m: ml_collections.ConfigDict, kind: str | None) -> None:
    """QLoRA: e.g. "nf4" quantises the frozen base while it is read (xft_jax.quantization)."""
    m.quantization = ml_collections.FieldReference(kind, field_type=str)
    m.quant_block = 64                # input rows per absmax block
    m.quant_double = False            # double quantisation of the block scales
    m.quant_dq_block = 256            # scales per second-level block
    m.quant_lm_head = False           # embedding and LM head stay dense by default


def _mesh() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.data = 1
    m.fsdp = -1                       # -1: all remaining devices
    m.tensor = 1
    m.num_devices = -1                # >0: use only the first N devices (single process)
    return m


def eval_config() -> ml_collections.ConfigDict:
    """What ``xft_jax.evaluate`` and ``xft_jax.probe`` load, on which data, how batched.
    Data fields left empty ("" / None) are taken from the training run's own config when
    ``model.workdir`` is set, else from ``eval.evaluation.DATA_DEFAULTS``."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.workdir = ""             # training run directory (orbax checkpoints)
    # None: the step the run selected on validation (<workdir>/validation.json), else latest
    c.model.step = ml_collections.FieldReference(None, field_type=int)
    c.model.path = ""                # HF safetensors dir: base model or merged checkpoint
    c.model.adapter = ""             # optional PEFT LoRA adapter dir on top of model.path
    c.model.tokenizer = ""           # default: the run's tokenizer, else model.path
    c.model.dtype = ""               # default: the run's dtype, else float32
    c.model.compute_dtype = ""
    _quantization(c.model, "none")   # model.path only: none | nf4 | int8 (QLoRA-style base)

    c.data = ml_collections.ConfigDict()
    c.data.source = ""
    c.data.path = ""
    c.data.axis = ""
    c.data.target = ""               # recorded only: every row is scored as prompt + label
    # variants each prompt leaves room for (as in training); None: the run's, else the
    # paper's variants
    c.data.prompt_room = ml_collections.FieldReference(None, field_type=tuple)
    c.data.prompt_room_percentile = ml_collections.FieldReference(None, field_type=float)
    # the rating prompt in the tokenizer's chat template; None: the run's, else False
    c.data.chat_template = ml_collections.FieldReference(None, field_type=bool)
    c.data.rubric = ml_collections.FieldReference(None, field_type=bool)  # None: the run's
    c.data.validation_fraction = ml_collections.FieldReference(None, field_type=float)
    c.data.split = "test"            # test | validation | train
    c.data.max_len = ml_collections.FieldReference(None, field_type=int)
    c.data.seed = ml_collections.FieldReference(None, field_type=int)
    c.data.num_train = ml_collections.FieldReference(None, field_type=int)
    c.data.num_test = ml_collections.FieldReference(None, field_type=int)
    c.data.num_synthetic = ml_collections.FieldReference(None, field_type=int)
    c.data.max_examples = ml_collections.FieldReference(None, field_type=int)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16           # global; rounded up to a multiple of data x fsdp
    c.eval.generate = False          # also decode label + explanation text
    c.eval.max_new_tokens = 64
    c.eval.temperature = 0.0         # 0: greedy
    c.eval.top_p = 1.0
    c.eval.seed = 0
    c.eval.vocab_chunk = 8192        # probe: logit-lens vocabulary chunk

    c.mesh = _mesh()
    return c


def with_defaults(stored: dict) -> ml_collections.ConfigDict:
    """A run config as stored (config.json, a checkpoint's metadata) with every key of
    ``base_config()`` it lacks filled in, so a run recorded before a key existed still
    reads as a complete config."""
    out = ml_collections.ConfigDict(stored)
    _fill(out, base_config())
    return out


def _fill(dst: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
    for key, value in defaults.items():
        if key not in dst:
            dst[key] = value
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(
                dst[key], ml_collections.ConfigDict):
            _fill(dst[key], value)


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """``"source,axis,target"`` (any prefix of it) from the config-file argument."""
    if arg:
        parts = [p.strip() for p in arg.split(",")]
        for key, value in zip(("source", "axis", "target"), parts):
            if value:
                setattr(c.data, key, value)
    return c
