"""Read-ahead and reused staging buffers of the checkpoint loader."""

import mmap
import os
import threading

import numpy as np
import pytest

import jax  # noqa: E402

from xft_jax import models, sharding  # noqa: E402
from xft_jax.models import host_reads  # noqa: E402
from xft_jax.models.safetensors_reader import SafetensorsFile  # noqa: E402


class _FakeFile:
    """Records read-ahead; every tensor is 100 bytes of whole rows."""

    def __init__(self, log, fail_on=None):
        self.log, self.fail_on = log, fail_on

    def prefetch_bytes(self, name, rows, cols):
        return 100

    def prefetch(self, name, rows, cols, scratch):
        if name == self.fail_on:
            raise OSError(f"cannot read {name}")
        self.log.append(name)
        return 100


def _plan(f, n=10):
    return [(f, f"t{k}", [(slice(0, 1), None)]) for k in range(n)]


def test_read_ahead_reads_in_order_within_the_window():
    log = []
    with host_reads.StreamedReads(_plan(_FakeFile(log)), window_bytes=250) as reads:
        assert reads.wait_idle() and log == []     # nothing before the first read
        reads.starting("t0")    # later reads starting within 250 bytes of t0: t1, t2
        assert reads.wait_idle()
        assert log == ["t1", "t2"]
        reads.starting("t1")    # t3 starts at 300 < 100 + 250
        assert reads.wait_idle()
        assert log == ["t1", "t2", "t3"]
        reads.starting("t7")    # a jump skips what the loader has passed: t8, t9 only
        assert reads.wait_idle()
        assert log == ["t1", "t2", "t3", "t8", "t9"]
        assert reads.asked_bytes() == 500
        reads.starting("not planned")       # a read outside the plan changes nothing
        assert reads.wait_idle() and len(log) == 5
        thread = reads._thread
    assert not thread.is_alive()


def test_a_failed_read_ahead_stops_quietly_and_close_stops_the_thread():
    """Read-ahead only warms the page cache: its error ends it (the loader's own read
    of that tensor reports the error), and closing mid-plan joins the thread."""
    log = []
    reads = host_reads.StreamedReads(_plan(_FakeFile(log, fail_on="t2")), window_bytes=10**4)
    reads.starting("t0")
    assert reads.wait_idle()
    assert log == ["t1"] and not reads._thread.is_alive()
    assert str(reads.error) == "cannot read t2"
    reads.starting("t3")                # nothing restarts it
    assert reads.wait_idle() and log == ["t1"]
    reads.close()

    log = []
    reads = host_reads.StreamedReads(_plan(_FakeFile(log)), window_bytes=150)
    reads.starting("t0")
    assert reads.wait_idle() and log == ["t1"] and reads._thread.is_alive()
    reads.close()
    assert not reads._thread.is_alive()
    reads.starting("t5")                # after close: nothing more is read
    assert log == ["t1"]


def test_staging_buffers_are_aligned_and_reused_only_after_recycle():
    reads = host_reads.StreamedReads([], window_bytes=0)
    a = reads.buffer((3, 5), np.float32)
    b = reads.buffer((3, 5), np.float32)
    assert a.shape == (3, 5) and a.dtype == np.float32 and a.flags.c_contiguous
    for buf in (a, b, reads.buffer((7,), np.int8)):
        assert buf.ctypes.data % host_reads.ALIGNMENT == 0
    assert not np.shares_memory(a, b)            # both lent at once: distinct
    reads.recycle()
    again = {reads.buffer((3, 5), np.float32).ctypes.data for _ in range(2)}
    assert again == {a.ctypes.data, b.ctypes.data}
    assert not np.shares_memory(reads.buffer((5, 3), np.float32), a)   # other shape: new


def test_read_block_into_a_buffer_and_prefetch(hf_checkpoint):
    path = hf_checkpoint("llama")
    f = SafetensorsFile(f"{path}/model.safetensors")
    name = "model.layers.0.mlp.gate_proj.weight"
    full = f.read_rows(name)
    rows, ncols = slice(2, 6), full.shape[1]
    for cols in (None, slice(0, ncols), slice(1, ncols), slice(3, 3 + ncols // 4)):
        want = full[rows] if cols is None else full[rows, cols]
        out = np.full(want.shape, np.nan, full.dtype)
        assert f.read_block(name, rows, cols, out=out) is out
        np.testing.assert_array_equal(out, want)
        wide = cols is None or 2 * len(range(*cols.indices(ncols))) > ncols
        want_bytes = 4 * full[0].nbytes if wide else 0
        assert f.prefetch_bytes(name, rows, cols) == want_bytes
        assert f.prefetch(name, rows, cols) == want_bytes
    with pytest.raises(ValueError, match="cannot hold"):
        f.read_block(name, rows, None, out=np.empty((3, ncols), full.dtype))


def test_prefetch_brings_the_block_into_the_page_cache(hf_checkpoint, tmp_path):
    """With the page cache emptied (``posix_fadvise`` DONTNEED on a private copy), a
    prefetch through a scratch buffer smaller than the block leaves every page of the
    block cached."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(open(f"{hf_checkpoint('llama')}/model.safetensors", "rb").read())
    f = SafetensorsFile(str(path))
    name = max(f.tensors, key=lambda n: f.tensors[n]["offset"])
    begin = f.data_start + f.tensors[name]["offset"]
    nbytes = f.prefetch_bytes(name)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        before = _cached_pages(fd, os.path.getsize(path))
        assert f.prefetch(name, scratch=memoryview(bytearray(24))) == nbytes
        after = _cached_pages(fd, os.path.getsize(path))
    finally:
        os.close(fd)
    page = mmap.PAGESIZE
    block = set(range(begin // page, (begin + nbytes - 1) // page + 1))
    assert not block & before, "the page cache was not emptied"
    assert block <= after, "a block page is not cached"


def _cached_pages(fd: int, size: int) -> set[int]:
    """Pages of an open file now in the page cache, by ``mincore`` on a mapping (which
    looks without faulting anything in)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    try:
        vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        return {i for i, b in enumerate(vec.raw) if b & 1}
    finally:
        libc.munmap(addr, size)


def test_a_file_that_shrinks_after_its_header_is_read_is_reported(hf_checkpoint, tmp_path):
    """The header check passed, then the file was cut (a copy still being written, a
    full disk): every read path names the file and the tensor instead of returning
    short or stale bytes."""
    src = f"{hf_checkpoint('llama')}/model.safetensors"
    path = tmp_path / "model.safetensors"
    path.write_bytes(open(src, "rb").read())
    f = SafetensorsFile(str(path))
    last = max((n for n in f.tensors if len(f.shape(n)) == 2),
               key=lambda n: f.tensors[n]["offset"])
    shape = f.shape(last)
    whole = f.read_rows(last)
    with open(path, "r+b") as fh:
        fh.truncate(f.data_start + f.tensors[last]["offset"] + whole.nbytes // 2)
    message = rf"{path.name}: truncated while reading '{last}'"
    with pytest.raises(models.SafetensorsError, match=message):
        f.read_rows(last)
    with pytest.raises(models.SafetensorsError, match=message):
        f.prefetch(last)
    with pytest.raises(models.SafetensorsError, match=message):    # narrow columns
        f.read_block(last, None, slice(0, shape[1] // 4))
    np.testing.assert_array_equal(f.read_rows(last, slice(0, 1)), whole[:1])   # intact rows


@pytest.mark.parametrize("mesh_shape", [None, (1, 2, 4)])
def test_read_ahead_follows_the_loader_and_staging_is_not_kept(hf_checkpoint, monkeypatch,
                                                               mesh_shape):
    """The thread reads ahead the blocks the loader reads, each once, in the loader's
    order, and stops with the load; loading through reused (aliased on the CPU) staging
    buffers gives every layer its own values."""
    path = hf_checkpoint("llama")
    ahead, read = [], []
    orig_prefetch, orig_read = SafetensorsFile.prefetch, SafetensorsFile.read_block

    def key(name, rows, cols):
        return name, (rows.start, rows.stop) if rows else None, (
            (cols.start, cols.stop) if cols else None)

    def prefetch(self, name, rows=None, cols=None, scratch=None):
        ahead.append(key(name, rows, cols))
        return orig_prefetch(self, name, rows, cols, scratch)

    def read_block(self, name, rows=None, cols=None, out=None):
        read.append(key(name, rows, cols))
        return orig_read(self, name, rows, cols, out=out)

    loads = []

    class Recorded(host_reads.StreamedReads):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            loads.append(self)

        def starting(self, name):
            # The loader waits for the thread here, so what it reads ahead does not
            # depend on how the two threads are scheduled.
            super().starting(name)
            assert self.wait_idle()

    monkeypatch.setattr(SafetensorsFile, "prefetch", prefetch)
    monkeypatch.setattr(SafetensorsFile, "read_block", read_block)
    monkeypatch.setattr(models.hf_io, "StreamedReads", Recorded)
    mesh = None if mesh_shape is None else sharding.create_mesh(*mesh_shape)
    model = models.load_pretrained(path, mesh=mesh)
    assert loads[0].error is None
    assert len(set(ahead)) == len(ahead), "a block was read ahead twice"
    # Everything but the first tensor (the window covers the whole tiny checkpoint), in
    # the order the loader reads it.
    names = _first_seen(n for n, _, _ in read)
    assert _first_seen(n for n, _, _ in ahead) == names[1:]
    assert set(ahead) == {k for k in read if k[0] != names[0]}
    assert not loads[0]._thread.is_alive()
    monkeypatch.undo()
    # No parameter lives in a staging buffer the loader would hand out again.
    (reads,) = loads
    staging = [(b.ctypes.data, b.ctypes.data + b.nbytes)
               for bufs in reads._free.values() for b in bufs]
    assert staging and not reads._lent
    for leaf in jax.tree.leaves(model.params()):
        for shard in leaf.addressable_shards:
            p = shard.data.unsafe_buffer_pointer()
            assert not any(lo <= p < hi for lo, hi in staging), leaf.shape
    src = SafetensorsFile(f"{path}/model.safetensors")
    got = dict(models.hf_io.hf_state_items(model))
    assert got and set(got) <= set(src.tensors)
    for name, value in got.items():
        np.testing.assert_array_equal(value, src.read_rows(name), err_msg=name)


def _first_seen(names) -> list:
    return list(dict.fromkeys(names))


def test_a_load_that_fails_midway_leaves_no_read_ahead_running(hf_checkpoint, monkeypatch):
    path = hf_checkpoint("llama")
    orig_read, calls = SafetensorsFile.read_block, []

    def read_block(self, name, rows=None, cols=None, out=None):
        calls.append(name)
        if len(calls) == 4:
            raise models.SafetensorsError(f"{self.path}: cannot read {name!r}")
        return orig_read(self, name, rows, cols, out=out)

    monkeypatch.setattr(SafetensorsFile, "read_block", read_block)
    with pytest.raises(models.SafetensorsError, match="cannot read"):
        models.load_pretrained(path)
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-read-ahead"]
