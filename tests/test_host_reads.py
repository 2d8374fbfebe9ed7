"""Read-ahead and reused staging buffers of the checkpoint loader."""

import numpy as np
import pytest

import jax  # noqa: E402

from xft_jax import models, sharding  # noqa: E402
from xft_jax.models import host_reads  # noqa: E402
from xft_jax.models.safetensors_reader import SafetensorsFile  # noqa: E402


class _FakeFile:
    """Records prefetches; every tensor is 100 bytes of whole rows."""

    def __init__(self, log):
        self.log = log

    def prefetch(self, name, rows, cols):
        self.log.append(name)
        return 100


def test_read_ahead_asks_in_order_within_the_window():
    log = []
    f = _FakeFile(log)
    plan = [(f, f"t{k}", [(slice(0, 1), None)]) for k in range(10)]
    reads = host_reads.StreamedReads(plan, window_bytes=250)
    reads.starting("t0")        # itself plus those starting within 250 bytes: t1, t2
    assert log == ["t0", "t1", "t2"]
    reads.starting("t1")        # t3 starts at 300 < 100 + 250
    assert log == ["t0", "t1", "t2", "t3"]
    reads.starting("t7")        # a jump still asks for everything up to it, in order
    assert log == [f"t{k}" for k in range(10)]
    assert reads.asked_bytes() == 1000
    reads.starting("not planned")       # a read outside the plan asks for nothing
    assert len(log) == 10


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
        assert f.prefetch(name, rows, cols) == (4 * full[0].nbytes if wide else 0)
    with pytest.raises(ValueError, match="cannot hold"):
        f.read_block(name, rows, None, out=np.empty((3, ncols), full.dtype))


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
    with pytest.raises(models.SafetensorsError, match=message):    # narrow columns
        f.read_block(last, None, slice(0, shape[1] // 4))
    np.testing.assert_array_equal(f.read_rows(last, slice(0, 1)), whole[:1])   # intact rows


@pytest.mark.parametrize("mesh_shape", [None, (1, 2, 4)])
def test_every_read_was_asked_for_first_and_values_are_exact(hf_checkpoint, monkeypatch,
                                                              mesh_shape):
    """Each block the loader reads was prefetched before, each prefetched block is
    read, and loading through reused (aliased on the CPU) staging buffers gives every
    layer its own values."""
    path = hf_checkpoint("llama")
    asked, read = [], []
    orig_prefetch, orig_read = SafetensorsFile.prefetch, SafetensorsFile.read_block

    def key(name, rows, cols):
        return name, (rows.start, rows.stop) if rows else None, (
            (cols.start, cols.stop) if cols else None)

    def prefetch(self, name, rows=None, cols=None):
        asked.append(key(name, rows, cols))
        return orig_prefetch(self, name, rows, cols)

    def read_block(self, name, rows=None, cols=None, out=None):
        assert key(name, rows, cols) in asked, f"{name} read before it was asked for"
        read.append(key(name, rows, cols))
        return orig_read(self, name, rows, cols, out=out)

    loads = []

    class Recorded(host_reads.StreamedReads):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            loads.append(self)

    monkeypatch.setattr(SafetensorsFile, "prefetch", prefetch)
    monkeypatch.setattr(SafetensorsFile, "read_block", read_block)
    monkeypatch.setattr(models.hf_io, "StreamedReads", Recorded)
    mesh = None if mesh_shape is None else sharding.create_mesh(*mesh_shape)
    model = models.load_pretrained(path, mesh=mesh)
    assert set(read) == set(asked)
    # Read-ahead asked for the tensors in the order the loader read them.
    assert _first_seen(n for n, _, _ in read) == _first_seen(n for n, _, _ in asked)
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
