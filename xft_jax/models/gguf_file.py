"""A GGUF file's metadata and tensor index, read straight from a memory map.

``gguf.GGUFReader`` builds a numpy array for every metadata string: 180 MB of host memory
for SmolLM2's 49k-token vocabulary and merges, a third of that model's fp32 weights, which
breaks the loader's host-memory budget. The header is a flat list (key, type, value;
then name, dims, type, offset per tensor), so it is parsed here into plain Python values;
the ``gguf`` package still supplies the value types, block sizes and dequantisation.
Tensor data stay in the file: ``rows`` returns a view of the mapped bytes, and
``release`` drops a tensor's pages from this process once it has been read.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct

import numpy as np
from xft_jax.errors import UserError


class GGUFFormatError(UserError, ValueError):
    """Bytes that are not a complete GGUF file."""


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]          # numpy order (GGUF lists dims innermost first)
    tensor_type: object             # gguf.GGMLQuantizationType
    offset: int                     # absolute byte offset in the file
    n_bytes: int


class GGUFFile:
    """``metadata`` (key -> str / number / bool / list) and ``tensors`` (name -> TensorInfo)."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        self.size = os.path.getsize(path)
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        self._off = 0
        try:
            if self._unpack("<I") != gguf.GGUF_MAGIC:
                raise GGUFFormatError("no GGUF magic at the start")
            self.version = self._unpack("<I")
            if self.version not in (2, 3):
                raise GGUFFormatError(f"GGUF version {self.version} is not supported")
            n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
            self.metadata = {}
            for _ in range(n_kv):
                key = self._string()
                self.metadata[key] = self._value(self._unpack("<I"))
            infos = []
            for _ in range(n_tensors):
                name = self._string()
                dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
                infos.append((name, tuple(reversed(dims)), self._unpack("<I"),
                              self._unpack("<Q")))
        except (struct.error, UnicodeDecodeError, MemoryError, OverflowError) as e:
            raise GGUFFormatError(f"truncated or damaged header: reading stopped at byte "
                                  f"{self._off} of {self.size} ({type(e).__name__}: {e})"
                                  ) from None
        align = int(self.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        start = -(-self._off // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, rel in infos:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise GGUFFormatError(f"tensor {name!r} has an unknown type id {type_id}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
            info = TensorInfo(name, shape, qtype, start + rel, n_bytes)
            if info.offset + n_bytes > self.size:
                raise GGUFFormatError(f"truncated: tensor {name!r} ends at byte "
                                      f"{info.offset + n_bytes}, the file has {self.size} bytes")
            if name in self.tensors:
                raise GGUFFormatError(f"tensor {name!r} appears twice")
            self.tensors[name] = info

    # ------------------------------------------------------------------ header
    def _unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._mm, self._off)
        self._off += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        if self._off + n > self.size:
            raise struct.error(f"a string of {n} bytes runs past the end")
        s = self._mm[self._off:self._off + n].decode("utf-8")
        self._off += n
        return s

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALAR:
            return self._unpack(_SCALAR[vtype])
        if vtype != _ARRAY:
            raise struct.error(f"unknown value type {vtype}")
        etype, n = self._unpack("<I"), self._unpack("<Q")
        if etype in _NUMPY:
            dt = np.dtype(_NUMPY[etype])
            if self._off + n * dt.itemsize > self.size:
                raise struct.error(f"an array of {n} values runs past the end")
            arr = np.frombuffer(self._mm, dt, count=n, offset=self._off)
            self._off += n * dt.itemsize
            return arr.tolist()
        return [self._value(etype) for _ in range(n)]

    # ------------------------------------------------------------------ data
    def rows(self, info: TensorInfo) -> np.ndarray:
        """The tensor's stored bytes as [..., bytes per row] (a view of the file), the
        layout ``gguf.quants.dequantize`` takes for every type."""
        import gguf

        shape = gguf.quant_shape_to_byte_shape(info.shape, info.tensor_type)
        return np.frombuffer(self._mm, np.uint8, count=info.n_bytes,
                             offset=info.offset).reshape(shape)

    def release(self, info: TensorInfo) -> None:
        """Drops the tensor's pages from this process (the kernel's page cache keeps them)."""
        if not hasattr(self._mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        end = min(self.size, info.offset + info.n_bytes)
        if end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)


__all__ = ["GGUFFile", "GGUFFormatError", "TensorInfo"]
