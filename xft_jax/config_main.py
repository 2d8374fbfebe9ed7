"""The flags and first lines every config-driven absl main shares (train, evaluate, probe).

One place, so that --config, the output-directory flag, --print_config, the help flags
and multi-process start-up behave the same in each main:

    _MAIN = config_main.ConfigMain("Eval config (configs/eval.py).", "out", "Output directory.")

    def main(argv):
        del argv
        config = _MAIN.start()          # first line of main
        ... _MAIN.directory.value ...
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from xft_jax import console, distributed

# The flags defined below belong to the main that asks for them, so its --help lists them.
flags.disclaim_key_flags()


class ConfigMain:
    """Defines (at module level of a main) --config, one required directory flag, the
    multi-process flags and the console flags; ``start`` is the main's first call."""

    def __init__(self, config_help: str, directory_flag: str, directory_help: str):
        self.config = config_flags.DEFINE_config_file("config", None, config_help,
                                                      lock_config=True)
        self.directory = flags.DEFINE_string(directory_flag, None, directory_help)
        self._distributed = distributed.define_flags()
        flags.mark_flags_as_required(["config", directory_flag])
        console.define_flags()

    def start(self):
        """A quiet console (with --print_config: print and exit 0), then multi-process
        start-up; returns the resolved config."""
        console.start(self.config)
        distributed.initialize_from_flags(self._distributed)
        return self.config.value
