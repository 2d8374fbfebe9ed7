"""An exclusive lock on a run's workdir, so two runs never write into one directory.

A second ``xft_jax.train`` on the same workdir (a job submitted twice, say) would
otherwise interleave its checkpoints, config.json and metrics with the first's. The
lock is ``fcntl.flock`` on ``<workdir>/LOCK_FILE``: the kernel drops it when the holding
process exits, however it exits, so a killed run never leaves a stale lock. The holder
writes its host, pid and start time into the file so a refusal can name it. On several
hosts, process 0 holds the lock for the run (the others share its workdir).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from xft_jax.errors import UserError

LOCK_FILE = ".xft_jax.lock"


class WorkdirBusyError(UserError, RuntimeError):
    """Another live process holds the workdir."""


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the lock for the block (creates workdir)."""

    def __init__(self, workdir: str, *, hold: bool = True):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self.hold = hold
        self._fd: int | None = None

    def acquire(self) -> None:
        if not self.hold:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"{os.path.dirname(self.path)} is in use by another run ({holder}): wait "
                f"for it to finish, stop it, or choose another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                        time.gmtime())}).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"
