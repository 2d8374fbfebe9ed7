"""Atomic file writes: write beside the destination, rename into place only on success,
so a crash or a full disk never leaves a half-written file where a good one was.

``tempfile`` makes its files 0600 and its directories 0700; what is renamed into place
gets the mode a plain ``open`` / ``os.makedirs`` would have given it (0666 / 0777 less
the umask), so reports, results and exports are as readable as any other output."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np


def umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask``
    sets it, briefly leaving other threads' files unmasked)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``os.makedirs`` gives a new directory."""
    return 0o777 & ~umask()


@contextlib.contextmanager
def atomic_path(dest: str) -> Iterator[str]:
    """Yields a temporary path next to ``dest``; renamed onto ``dest`` if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(dest))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dest)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        # after the block: a writer given the path may have replaced the file (safetensors)
        os.chmod(tmp, file_mode())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(dest: str, mode: str = "w", encoding: str | None = "utf-8",
                newline: str | None = None):
    """``open`` for writing, atomically (flushed and fsynced before the rename)."""
    with atomic_path(dest) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding,
                  newline=None if "b" in mode else newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_text(dest: str, text: str) -> None:
    with atomic_open(dest, newline="") as f:
        f.write(text)


def json_safe(x: Any) -> Any:
    """Plain JSON values: numpy -> python, tuples -> lists, NaN / inf -> None (JSON has
    no such numbers; a reader sees them as missing rather than as a string)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(dest: str, obj: Any, sort_keys: bool = False) -> None:
    """``obj`` (made ``json_safe``) as indented UTF-8 JSON, atomically."""
    write_text(dest, json.dumps(json_safe(obj), indent=2, ensure_ascii=False,
                                sort_keys=sort_keys) + "\n")


def replace_dir(staging: str, final: str) -> None:
    """Puts a finished directory at ``final``. An existing one is first moved aside and
    removed only once the new one is in place, so ``final`` is never left half-written.
    ``staging`` (often a 0700 ``tempfile.mkdtemp``) gets the usual directory mode."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    os.chmod(staging, dir_mode())
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}-old-")
        os.replace(final, os.path.join(old, "d"))
    os.replace(staging, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
