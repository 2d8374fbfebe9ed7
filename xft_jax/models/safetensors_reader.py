"""Safetensors files: the header checked against the file, slices read by safetensors.

The header is parsed and checked here, before any read, so a truncated or corrupt file
fails naming the file and the tensor (safetensors' own message names neither). Slices
are read with ``safetensors.safe_open(...).get_slice(...)``, one open per read: safe_open
maps the whole file, and every page a read touches counts in the process's resident
memory until the file is closed, so a loader holding its files open would peak near
twice the checkpoint; opened per read, only the slice being read is mapped. Safetensors
is a plain header + raw bytes format, so nothing here can execute code.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import safetensors

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as such."""


class SafetensorsFile:
    """The checked header of one file, and reads of (slices of) its tensors."""

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
        self.size = size
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

    def read_block(self, name: str, rows: slice | None = None,
                   cols: slice | None = None) -> np.ndarray:
        """Rows x columns of a tensor (all when None), as stored. Only the slice's bytes
        are copied out of the file, so a column-sharded device shard does not pull whole
        rows (on several hosts, each reads only its part)."""
        index = tuple(s for s in (rows, cols) if s is not None)
        if cols is not None and rows is None:
            index = (slice(None), cols)
        try:
            with safetensors.safe_open(self.path, framework="numpy") as f:
                return f.get_slice(name)[index] if index else f.get_tensor(name)
        except (safetensors.SafetensorError, OSError) as e:
            size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
            if size < self.size:
                raise SafetensorsError(
                    f"{self.path}: truncated while reading {name!r} (the file has {size} "
                    f"bytes; it had {self.size} when its header was read)") from e
            raise SafetensorsError(f"{self.path}: cannot read {name!r} ({e})") from e
