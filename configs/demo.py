"""The offline demo: the whole study in miniature on a CPU.

    python -m xft_jax.demo                                  # defaults below
    python -m xft_jax.demo --config=configs/demo.py:smoke   # seconds-long sizes (CI)
    python -m xft_jax.demo --config=configs/demo.py:toy     # the toy base on synthetic data
    python -m xft_jax.demo --config.seeds="(0,1,2)" --config.out=/tmp/demo

By default the base is a real pretrained model, SmolLM2-135M-Instruct (the bundled GGUF,
converted once into $XFT_JAX_CACHE), and the data are real human chats from the
``chitchat-dataset`` package whose next turns are degraded in controlled ways and rated by
the simulated annotator ensemble (``xft_jax/data/chitchat_degraded.py``). ``toy`` instead
pre-trains a tiny Mistral-shaped base on the Mistral-7B-v0.1 tokenizer and uses the
synthetic corpus (``xft_jax/data/synthetic.py``). Either way each target variant is
LoRA-fine-tuned under the study protocol (xft_jax/config_defaults.py: validation carved
from the training split, plain causal-LM loss, a fixed number of epochs, the
best-validation checkpoint), evaluated on the held-out test split and probed, with the
untuned base as the probe's reference; a report is written to ``<out>/report``.
"""

from xft_jax.study.demo_configs import demo_config


def get_config(arg=None):
    return demo_config(arg)
