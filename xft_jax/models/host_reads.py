"""The host side of streaming a checkpoint: read-ahead and reused staging buffers.

Why read-ahead: on a first load, reading a tensor from storage and the work done with it
(staging, the transfer, the on-device transpose and stacking) would otherwise take turns.
Asking the kernel to read the next tensors (``posix_fadvise`` WILLNEED, which returns at
once) keeps the storage busy while the host works; a bounded window keeps the page cache
from filling with more than is read back soon.

Why reused staging buffers: every page of a new host buffer faults in on first touch, which
on a VM (worse with transparent huge pages compacting memory) costs more than the copy
itself. Layers have the same shapes, so each layer's tensors are staged in the buffers the
previous layer used.
"""

from __future__ import annotations

import collections

import numpy as np

from xft_jax.models.safetensors_reader import SafetensorsFile

# XLA:CPU adopts a host buffer as a device array without copying only when it is this
# aligned; numpy aligns to 16 bytes.
ALIGNMENT = 64

# (rows, cols) of one tensor that this process reads; cols None for whole rows.
Block = tuple[slice, "slice | None"]


class StreamedReads:
    """The tensors one load reads, in order, with read-ahead and staging buffers.

    plan: (file, tensor name, the blocks this process reads) in the order they are read.
    window_bytes: how far ahead of the tensor being read the kernel is asked to read.
    """

    def __init__(self, plan: list[tuple[SafetensorsFile, str, list[Block]]],
                 window_bytes: int):
        self._plan = plan
        self._order = {name: k for k, (_, name, _) in enumerate(plan)}
        self._window = window_bytes
        self._next = 0           # first planned read not yet asked for
        self._asked = 0          # bytes asked for so far
        self._start: dict[int, int] = {}   # read -> bytes asked for before it
        self._free: dict[tuple, list[np.ndarray]] = collections.defaultdict(list)
        self._lent: list[tuple[tuple, np.ndarray]] = []

    def starting(self, name: str) -> None:
        """Called as tensor ``name`` is about to be read: asks for every planned read that
        starts within ``window_bytes`` of it (itself included)."""
        k = self._order.get(name)
        if k is None:
            return
        while self._next <= k or (self._next < len(self._plan)
                                  and self._asked < self._start[k] + self._window):
            f, tensor, blocks = self._plan[self._next]
            self._start[self._next] = self._asked
            self._asked += sum(f.prefetch(tensor, rows, cols) for rows, cols in blocks)
            self._next += 1

    def asked_bytes(self) -> int:
        return self._asked

    def buffer(self, shape, dtype) -> np.ndarray:
        """A host buffer of ``shape`` x ``dtype`` (contents undefined), lent until
        ``recycle``."""
        key = (tuple(shape), np.dtype(dtype))
        free = self._free[key]
        buf = free.pop() if free else _aligned_empty(*key)
        self._lent.append((key, buf))
        return buf

    def recycle(self) -> None:
        """Takes back every lent buffer. Call only once nothing made from them is in use:
        on a CPU, a device array built from a host buffer may alias it, and a transfer
        to an accelerator may still be reading it until its result is ready."""
        for key, buf in self._lent:
            self._free[key].append(buf)
        self._lent.clear()


def _aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``ALIGNMENT`` boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)
