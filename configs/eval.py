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

from xft_jax import config_defaults


def get_config(arg=None):
    return config_defaults.apply_arg(config_defaults.eval_config(), arg)
