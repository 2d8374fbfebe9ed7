"""What every absl main shows a person: our own lines, help that exits 0, --print_config.

Third-party libraries log a great deal at INFO (orbax names every file it writes, jax
reports each backend it could not start, transformers advises installing PyTorch); by
default only records logged from inside ``xft_jax`` pass below WARNING. ``--verbosity``
given on the command line shows everything at that level.

    console.define_flags()          # module level, next to the main's own flags
    ...
    def main(argv):
        console.start(_CONFIG)      # first line of main
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging

from xft_jax.errors import ConfigValueError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Read when transformers is imported (its "PyTorch was not found" advice) and by
# TensorFlow's C++ logging: set before any main imports either.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_CONFIG_HINT = ("Every config key can be overridden with --config.KEY=value; "
                "--print_config prints the resolved config (all keys) and exits.")


class OwnLinesOnly(std_logging.Filter):
    """Passes WARNING and above, and lower records only when logged from xft_jax."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        return os.path.abspath(record.pathname or "").startswith(_PACKAGE_DIR)


class _Help(app.HelpFlag):
    """--help / -? : the main's flags on stdout, exit 0 (a request, not an error)."""

    def parse(self, arg):
        if self._parse(arg):
            app.usage(shorthelp=True, writeto_stdout=True)
            print()
            if "print_config" in flags.FLAGS:
                print(_CONFIG_HINT)
            print("Try --helpfull to get a list of all flags.")
            sys.exit(0)


class _HelpShort(_Help):
    NAME = "helpshort"
    SHORT_NAME = None


class _HelpFull(app.HelpfullFlag):
    def parse(self, arg):
        if self._parse(arg):
            app.usage(writeto_stdout=True)
            sys.exit(0)


def define_flags(with_config: bool = True) -> None:
    """Help flags that exit 0, and ``--print_config`` for mains that take a --config."""
    app.define_help_flags()            # absl's, so app.run does not define them again
    if not isinstance(flags.FLAGS["help"], _Help):
        for name in ("help", "?", "helpshort", "helpfull"):
            if name in flags.FLAGS:
                delattr(flags.FLAGS, name)
        for flag in (_Help(), _HelpShort(), _HelpFull()):
            flags.DEFINE_flag(flag)
    if with_config and "print_config" not in flags.FLAGS:
        flags.DEFINE_bool("print_config", False, "Print the resolved config (every key "
                          "--config.KEY=value can set) and exit.")


def quiet_third_party() -> None:
    """Hides third-party records below WARNING unless --verbosity was given."""
    if flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.INFO)
    handler = logging.get_absl_handler()
    if not any(isinstance(f, OwnLinesOnly) for f in handler.filters):
        handler.addFilter(OwnLinesOnly())
    for name in ("transformers", "datasets", "tensorflow_datasets"):
        std_logging.getLogger(name).setLevel(std_logging.WARNING)


def start(config_flag=None) -> None:
    """First call of a main: a quiet console; with --print_config, print and exit 0."""
    quiet_third_party()
    if config_flag is not None:
        try:       # a config file that failed to load raises on first attribute access
            config_flag.value.keys  # noqa: B018
        except OSError as e:     # how ml_collections reports a config file it could not load
            cause = e.__cause__ or e
            raise ConfigValueError("--config: " + " ".join(str(cause).split())) from e
    if config_flag is not None and flags.FLAGS["print_config"].value:
        print(config_flag.value.to_json_best_effort(indent=2, sort_keys=True))
        sys.exit(0)


def progress(iterable, *, total=None, desc: str, unit: str = "batch"):
    """A tqdm bar on stderr over ``iterable``, shown by process 0 only and cleared when
    done (the caller prints one line with the result)."""
    from tqdm import tqdm

    import jax

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False,
                disable=jax.process_index() != 0, dynamic_ncols=True)
