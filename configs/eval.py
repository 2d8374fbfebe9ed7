"""Evaluation / probe config: what to load, which data, how to batch.

    python -m xft_jax.evaluate --config=configs/eval.py --out=/tmp/eval \
        --config.model.workdir=/tmp/run                       # a training run (latest step)
    python -m xft_jax.evaluate --config=configs/eval.py:coqa,on_topic --out=/tmp/eval \
        --config.model.path=/models/mistral-7b --config.model.adapter=/adapters/x \
        --config.data.path=/data/rated

``arg`` is "source,axis,target" (any prefix), as for training. Data fields left empty
("" / None) are taken from the training run's own config when ``model.workdir`` is set,
else from defaults (synthetic, naturalness, label_only, max_len 1024), so evaluating a
run reproduces its own test split by default.
"""

import ml_collections


def get_config(arg=None):
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
    c.model.quantization = "none"    # model.path only: none | nf4 | int8 (QLoRA-style base)
    c.model.quant_block = 64
    c.model.quant_lm_head = False

    c.data = ml_collections.ConfigDict()
    c.data.source = ""
    c.data.path = ""
    c.data.axis = ""
    c.data.target = ""               # recorded only: every row is scored as prompt + label
    # variants each prompt leaves room for (as in training); None: the run's, else the
    # paper's variants
    c.data.prompt_room = ml_collections.FieldReference(None, field_type=tuple)
    c.data.prompt_room_percentile = ml_collections.FieldReference(None, field_type=float)
    c.data.validation_fraction = ml_collections.FieldReference(None, field_type=float)
    # the rating prompt in the tokenizer's chat template; None: the run's, else False
    c.data.chat_template = ml_collections.FieldReference(None, field_type=bool)
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

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    if arg:
        for key, value in zip(("source", "axis", "target"), [p.strip() for p in arg.split(",")]):
            if value:
                setattr(c.data, key, value)
    return c

