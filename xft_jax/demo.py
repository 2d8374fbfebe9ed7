"""The study end to end on a CPU in minutes, offline: ``python -m xft_jax.demo``.

Generates the synthetic corpus, pre-trains a tiny base model on the real Mistral-7B-v0.1
tokenizer (cached), LoRA-fine-tunes each target variant, evaluates on the held-out split,
runs the layerwise probe and prints the report (also written to <out>/report).
"""

from __future__ import annotations

import os

from absl import logging
from ml_collections import config_flags

from xft_jax import console, errors
from xft_jax.study import demo_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "demo.py")

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Demo config.")

console.define_flags()


def main(argv):
    del argv
    console.start(_CONFIG)
    result = demo_lib.run_demo(_CONFIG.value, log=logging.info)
    if result.get("stopped"):
        return 0          # like a training run stopped by SIGTERM or Ctrl-C: saved, resumable
    print(result["report"])
    print(f"report written to {result['report_dir']} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    errors.run_main(main)
