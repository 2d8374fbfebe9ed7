"""User errors and how the absl mains report them.

A ``UserError`` is bad input from the person running a main (a config key, a data file,
a checkpoint, a path) that they can fix: a main prints it as one line on stderr and exits
2. Anything else is a bug and keeps its traceback. ``--verbosity=1`` (or higher) shows the
traceback of a user error too. Lower layers (models, data) define their own error classes
as subclasses of ``UserError``, so this module imports nothing of the project.
"""

from __future__ import annotations

import functools
import sys
import traceback

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input the user can fix; the message names the file, key or value."""


class ConfigValueError(UserError, ValueError):
    """A config value that cannot work (the message names the key)."""


class MissingPathError(UserError, FileNotFoundError):
    """A path given by the user that does not exist or holds the wrong thing."""


# Error classes of modules this project may not subclass (third-party or files owned
# elsewhere) that still mean bad input: registered by the module that raises them.
_REGISTERED: list[type] = []


def register(*types: type) -> None:
    """Treats ``types`` as user errors in ``run_main``."""
    for t in types:
        if t not in _REGISTERED:
            _REGISTERED.append(t)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, (UserError, *_REGISTERED))


def one_line(e: BaseException) -> str:
    """The error's message on one line (a multi-line message keeps its lines, joined)."""
    text = " ".join(str(e).split("\n")).strip() or type(e).__name__
    return f"error: {text}"


def _verbose() -> bool:
    try:
        from absl import flags

        return flags.FLAGS.is_parsed() and int(flags.FLAGS.verbosity) >= 1
    except Exception:  # noqa: BLE001 - no flags parsed: not verbose
        return False


def report_user_errors(main):
    """Wraps an absl ``main(argv)``: a user error becomes one line on stderr and exit
    code 2 (with its traceback only under ``--verbosity=1``); bugs propagate."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a user error
            if not is_user_error(e):
                raise
            if _verbose():
                traceback.print_exc()
            sys.stderr.flush()
            print(one_line(e), file=sys.stderr, flush=True)
            return USER_ERROR_EXIT

    return wrapped


def run_main(main) -> None:
    """``absl.app.run(main)`` with user errors reported by ``report_user_errors``."""
    from absl import app

    app.run(report_user_errors(main))
