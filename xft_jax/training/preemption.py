"""Stopping on request without losing work: SIGTERM (a preempted job) or Ctrl-C.

Inside ``with Preemption(...) as stop``, SIGTERM or a first Ctrl-C only sets
``stop.flag``; the code polls it where stopping loses nothing (the trainer after a step,
which it then saves; the demo between runs). Only a second Ctrl-C stops at once
(KeyboardInterrupt). A SIGTERM arriving with the first Ctrl-C, in either order (a sweep
forwards one when Ctrl-C reaches it and its command alike), is the same request. The
previous handlers come back on exit, so an inner ``Preemption`` (the trainer's, inside
the demo's) takes over while it is active.
"""

from __future__ import annotations

import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class HandlesStopSignals:
    """Base of a context manager that handles SIGTERM and Ctrl-C itself while active, in
    its ``_handle(signum, frame)``, and restores the previous handlers on exit. Python
    lets only the main thread install handlers; elsewhere (a test runner's worker thread)
    none are installed."""

    _previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        raise NotImplementedError


class Preemption(HandlesStopSignals):
    def __init__(self, ctrl_c_message: str):
        self.ctrl_c_message = ctrl_c_message   # printed on the first Ctrl-C
        self.flag = False
        self.name = None              # the first signal's name, for the log line
        self.interrupts = 0           # Ctrl-Cs: only a second one aborts

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            print(f"Ctrl-C: {self.ctrl_c_message} (Ctrl-C again stops at once)",
                  file=sys.stderr, flush=True)
        self.name = self.name or signal.Signals(signum).name
        self.flag = True

    def requested(self) -> bool:
        """The flag; with several processes, set on all when any one has it (so all
        stop at the same step)."""
        import jax   # here, so that the jax-free sweep can import this module cheaply
        import numpy as np
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.flag))
        return bool(np.any(flags))
