"""A validating, slice-reading safetensors reader.

Why not ``safe_open``: it memory-maps the whole file, and every page it touches counts in
the process's resident memory until the file is closed, so loading a model through it
peaks near twice the checkpoint size. This reader ``pread``s exactly the rows a device
shard needs into a buffer the caller owns, and checks the header against the file size
so a truncated or corrupt file fails with its name instead of a bus error. Safetensors is
a plain header + raw bytes format, so nothing here can execute code.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER = 100 * 1024 * 1024
# The size of the buffer a prefetch reads through (and drops).
PREFETCH_CHUNK = 8 * 2**20


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as such."""


class SafetensorsFile:
    """Header of one file plus positioned reads of (slices of) its tensors."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path}: truncated or corrupt safetensors file "
                                       f"({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{path}: truncated or corrupt safetensors file "
                                       f"(header length {n} exceeds file size {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: corrupt safetensors header (not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.tensors: dict[str, dict] = {}
        data_len = size - self.data_start
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise SafetensorsError(f"{path}: tensor {name!r} has a corrupt header entry "
                                       f"({info!r})") from e
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if end - begin != nbytes or begin < 0:
                raise SafetensorsError(f"{path}: tensor {name!r} has inconsistent offsets "
                                       f"{begin}..{end} for shape {shape} {info['dtype']}")
            if end > data_len:
                raise SafetensorsError(
                    f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                    f"{self.data_start + end} but the file has {size} bytes")
            self.tensors[name] = {"dtype": dtype, "shape": shape, "offset": begin}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name]["shape"]

    def _row_bytes(self, name: str, rows: slice | None) -> tuple[int, int, int, int]:
        """(first row, end row, file offset of the first row, byte count) of ``rows``."""
        info = self.tensors[name]
        shape, itemsize = info["shape"], np.dtype(info["dtype"]).itemsize
        if not shape:
            rows = None
        start, stop = (0, shape[0] if shape else 1) if rows is None else (
            rows.start or 0, shape[0] if rows.stop is None else rows.stop)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize if shape else itemsize
        return (start, stop, self.data_start + info["offset"] + start * row_bytes,
                (stop - start) * row_bytes)

    def read_rows(self, name: str, rows: slice | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` of the tensor (all when None), read with one pread, into ``out``
        when given (a contiguous array of the rows' shape and the tensor's dtype)."""
        info = self.tensors[name]
        shape, dtype = info["shape"], np.dtype(info["dtype"])
        start, stop, offset, nbytes = self._row_bytes(name, rows)
        out = self._buffer(name, out, (stop - start, *shape[1:]) if shape else (), dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self._pread_exact(fd, memoryview(out.reshape(-1).view(np.uint8))[:nbytes],
                              offset, name)
        finally:
            os.close(fd)
        return out

    def _pread_exact(self, fd: int, view: memoryview, offset: int, name: str) -> None:
        """Fills ``view`` from ``offset`` (preads may return short); a file that ends
        first is reported as truncated."""
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n <= 0:
                raise SafetensorsError(f"{self.path}: truncated while reading {name!r}")
            got += n

    def _buffer(self, name: str, out: np.ndarray | None, shape, dtype) -> np.ndarray:
        """``out`` checked to hold exactly ``shape`` x ``dtype`` contiguously, or a new one."""
        if out is None:
            return np.empty(shape, dtype)
        if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"{self.path}: a {out.shape} {out.dtype} buffer cannot hold "
                             f"{tuple(shape)} {np.dtype(dtype)} of {name!r}")
        return out

    def _cols_of(self, name: str, cols: slice | None) -> tuple[int, int] | None:
        """The column range ``cols`` selects when only its bytes are worth reading (at most
        half a row of a 2-D tensor); None when whole rows are read."""
        shape = self.tensors[name]["shape"]
        if cols is None:
            return None
        if len(shape) != 2:
            raise SafetensorsError(f"{self.path}: column slice of {name!r} with shape "
                                   f"{shape} (only 2-D tensors have columns)")
        c0, c1, _ = cols.indices(shape[1])
        return (c0, c1) if 2 * (c1 - c0) <= shape[1] else None

    def prefetch_bytes(self, name: str, rows: slice | None = None,
                       cols: slice | None = None) -> int:
        """The bytes ``prefetch`` reads for this block: 0 for a narrow column block."""
        if self._cols_of(name, cols) is not None:
            return 0
        return self._row_bytes(name, rows)[3]

    def prefetch(self, name: str, rows: slice | None = None, cols: slice | None = None,
                 scratch: memoryview | None = None) -> int:
        """Reads the bytes ``read_block(name, rows, cols)`` will read and discards them, so
        that they are in the page cache when it comes. Blocks: it is meant for a
        read-ahead thread (``host_reads``), whose preads overlap the loader's work.
        Narrow column blocks (scattered rows) are left to their own reads. ``scratch`` is
        the buffer read into (reused by the caller; ``PREFETCH_CHUNK`` bytes when None).
        Returns the bytes read; a file that ends early raises like ``read_block``."""
        if self._cols_of(name, cols) is not None:
            return 0
        _, _, offset, nbytes = self._row_bytes(name, rows)
        scratch = memoryview(bytearray(PREFETCH_CHUNK)) if scratch is None else scratch
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for at in range(0, nbytes, len(scratch)):
                self._pread_exact(fd, scratch[:min(len(scratch), nbytes - at)],
                                  offset + at, name)
        finally:
            os.close(fd)
        return nbytes

    def read_block(self, name: str, rows: slice | None = None, cols: slice | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Rows x columns of a tensor (into ``out`` when given). When the columns are at
        most half a row, only their bytes are read (one pread per row), so a
        column-sharded device shard does not pull whole rows from disk (on several
        hosts, each reads only its part); otherwise whole rows are read and sliced."""
        shape = self.tensors[name]["shape"]
        narrow = self._cols_of(name, cols)
        if narrow is None:
            if cols is None or cols.indices(shape[1])[:2] == (0, shape[1]):
                return self.read_rows(name, rows, out=out)
            part = self.read_rows(name, rows)[:, cols]
            out = self._buffer(name, out, part.shape, part.dtype)
            np.copyto(out, part)
            return out
        (c0, c1), (r0, r1, _) = narrow, (rows or slice(None)).indices(shape[0])
        dtype = np.dtype(self.tensors[name]["dtype"])
        out = self._buffer(name, out, (r1 - r0, c1 - c0), dtype)
        row_bytes, width = shape[1] * dtype.itemsize, (c1 - c0) * dtype.itemsize
        base = self.data_start + self.tensors[name]["offset"] + c0 * dtype.itemsize
        view = memoryview(out.view(np.uint8).reshape(-1))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, r in enumerate(range(r0, r1)):
                self._pread_exact(fd, view[i * width:(i + 1) * width],
                                  base + r * row_bytes, name)
        finally:
            os.close(fd)
        return out
