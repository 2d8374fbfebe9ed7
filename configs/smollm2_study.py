"""The real-model mini-study: the whole protocol on SmolLM2-135M-Instruct and real chats.

    python -m xft_jax.demo --config=configs/smollm2_study.py --config.out=results/smollm2_study

One axis (naturalness) x the five variants x three seeds, on rated examples built from real
chitchat conversations (``xft_jax/data/chitchat_degraded.py``), under the study protocol of
``xft_jax/config_defaults.py``, every setting the demo's; the probe runs with the untuned
base as reference. Sized for about two hours on two CPU cores (15 runs at the demo's per-run
cost); interrupted, the same command resumes at the first unfinished run. The same config
on a GPU is the first study to run there; any change of a setting is a new study, to be
run into a new ``--config.out``.
"""

from xft_jax.study.demo_configs import demo_config


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/smollm2_study.py: takes no arg (got {arg!r})")
    c = demo_config("")
    c.out = "xft_smollm2_study"
    c.seeds = (0, 1, 2)
    return c
