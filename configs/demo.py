"""The offline demo: the whole study in miniature on a CPU.

    python -m xft_jax.demo                                  # defaults below
    python -m xft_jax.demo --config=configs/demo.py:smoke   # seconds-long sizes (CI)
    python -m xft_jax.demo --config.seeds="(0,1,2)" --config.out=/tmp/demo

A synthetic corpus (six domains x three axes) is generated; a tiny Mistral-shaped base
model on the real Mistral-7B-v0.1 tokenizer is pre-trained on its unlabelled dialogues
(cached in ``<out>/base_model``); each target variant is LoRA-fine-tuned under the study
protocol (xft_jax/config_defaults.py: validation carved from the training split, plain causal-LM
loss, a fixed number of epochs, the best-validation checkpoint), evaluated on the held-out
test split and probed; a report is written to ``<out>/report``.
"""

import ml_collections

from xft_jax import config_defaults


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.out = "xft_demo_out"
    c.seeds = (0,)
    c.variants = ("label_only", "explanation", "shuffled", "bag_of_words", "random_vocab")
    c.axes = ("naturalness",)
    c.num_items = 3000                # synthetic items; train/validation/test by hashed id
    c.probe = True

    p = ml_collections.ConfigDict()  # base-model pre-training (xft_jax.study.pretrain)
    p.hidden_size = 128
    p.intermediate_size = 384
    p.num_layers = 4
    p.num_heads = 4
    p.num_kv_heads = 2
    p.seq_len = 128
    p.batch_size = 16
    p.steps = 200
    p.learning_rate = 3e-3
    p.warmup_steps = 20
    p.seed = 0
    p.num_texts = 3000
    c.pretrain = p

    t = config_defaults.base_config()          # the LoRA fine-tuning config of every run
    t.model.dtype = "float32"
    t.model.compute_dtype = "float32"
    t.model.remat = "none"
    t.lora.rank = 8
    t.lora.alpha = 16.0
    t.lora.dropout = 0.0
    t.data.source = "synthetic"
    t.data.max_len = 256
    t.data.batch_size = 8
    t.data.num_train = None
    t.data.num_test = None
    t.optim.lr = 3e-3
    t.optim.warmup_steps = 10
    t.optim.weight_decay = 0.0
    t.train.epochs = 1.0              # ~225 steps at batch 8
    t.train.log_every = 10
    t.train.checkpoint_every = 200
    t.train.eval_every = 25           # validation accuracy; the best checkpoint is scored
    t.mesh.fsdp = 1
    t.mesh.num_devices = 1
    c.train = t

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 32
    c.eval.max_examples = ml_collections.FieldReference(None, field_type=int)  # all held out
    c.eval.probe_examples = 200       # the probe runs on the first N held-out examples

    if arg == "smoke":
        c.num_items = 400
        c.variants = ("label_only", "explanation")
        p.hidden_size, p.intermediate_size, p.num_layers = 64, 128, 2
        p.steps, p.num_texts, p.batch_size, p.seq_len, p.warmup_steps = 8, 200, 8, 64, 2
        t.train.steps = 4
        t.train.eval_every = 2
        t.data.eval_examples = 16
        t.optim.warmup_steps = 1
        t.train.checkpoint_every = 4
        t.train.log_every = 1
        t.data.batch_size = 8
        c.eval.max_examples = 24
        c.eval.probe_examples = 16
    elif arg:
        raise ValueError(f"configs/demo.py: unknown arg {arg!r} (expected '' or 'smoke')")
    return c
