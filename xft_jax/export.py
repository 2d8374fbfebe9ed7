"""Export a trained run's adapters.

    python -m xft_jax.export --workdir=/tmp/run --format=peft --out=/tmp/adapter
    python -m xft_jax.export --workdir=/tmp/run --format=merged --out=/tmp/merged [--dtype=bfloat16]

``peft``: adapter_config.json + adapter_model.safetensors for
``peft.PeftModel.from_pretrained(base, out)``. ``merged``: an HF checkpoint with the
adapters folded into the base weights (config.json + safetensors; tokenizer files of the
base copied along).
"""

from __future__ import annotations

from absl import flags

from xft_jax import console, errors
from xft_jax.training.export_run import export_run

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.")
_FORMAT = flags.DEFINE_enum("format", "peft", ["peft", "merged"], "Export format.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the one the run "
                             "selected on validation, else the latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out whole.")
_DTYPE = flags.DEFINE_string("dtype", None, "Base dtype for the merge / saved weights "
                             "(default: the run's model.dtype).")
flags.mark_flags_as_required(["workdir", "out"])

console.define_flags(with_config=False)


def main(argv):
    del argv
    console.start()
    print(export_run(_WORKDIR.value, _FORMAT.value, _OUT.value, _STEP.value, _DTYPE.value,
                     _OVERWRITE.value))


if __name__ == "__main__":
    errors.run_main(main)
