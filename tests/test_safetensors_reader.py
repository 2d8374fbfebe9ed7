"""The checkpoint reader: slices as stored, errors that name the file and the tensor,
and no file left mapped after a load."""

import os

import numpy as np
import pytest
import torch

from tests.hf_fixtures import make_hf_checkpoint

from xft_jax import models  # noqa: E402
from xft_jax.models import hf_io  # noqa: E402
from xft_jax.models.safetensors_reader import SafetensorsFile  # noqa: E402


def _reference(path, name):
    from safetensors.numpy import load_file

    return load_file(path)[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_block_returns_the_slice_as_stored(tmp_path, dtype):
    path = make_hf_checkpoint(str(tmp_path / "ckpt"), "llama", dtype=dtype)
    f = SafetensorsFile(f"{path}/model.safetensors")
    name = "model.layers.0.mlp.gate_proj.weight"
    full = _reference(f.path, name)
    assert f.read_block(name).dtype == full.dtype == np.dtype(f.tensors[name]["dtype"])
    np.testing.assert_array_equal(f.read_block(name), full)
    rows, ncols = slice(2, 6), full.shape[1]
    for cols in (None, slice(0, ncols), slice(1, ncols), slice(3, 3 + ncols // 4)):
        want = full[rows] if cols is None else full[rows, cols]
        got = f.read_block(name, rows, cols)
        assert got.shape == want.shape and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)
    norm = "model.layers.0.input_layernorm.weight"
    np.testing.assert_array_equal(f.read_block(norm, slice(1, 3)),
                                  _reference(f.path, norm)[1:3])


def _cut(path, f, name):
    """Truncates ``path`` halfway through tensor ``name``."""
    nbytes = int(np.prod(f.shape(name))) * np.dtype(f.tensors[name]["dtype"]).itemsize
    with open(path, "r+b") as fh:
        fh.truncate(f.data_start + f.tensors[name]["offset"] + nbytes // 2)


def test_a_file_that_shrinks_after_its_header_is_read_is_reported(hf_checkpoint, tmp_path):
    """The header check passed, then the file was cut (a copy still being written, a
    full disk): reads name the file and the tensor instead of returning short or stale
    bytes."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(open(f"{hf_checkpoint('llama')}/model.safetensors", "rb").read())
    f = SafetensorsFile(str(path))
    last = max((n for n in f.tensors if len(f.shape(n)) == 2),
               key=lambda n: f.tensors[n]["offset"])
    _cut(path, f, last)
    message = rf"{path.name}: truncated while reading '{last}'"
    with pytest.raises(models.SafetensorsError, match=message):
        f.read_block(last)
    with pytest.raises(models.SafetensorsError, match=message):    # narrow columns
        f.read_block(last, None, slice(0, f.shape(last)[1] // 4))


def test_a_load_whose_file_shrinks_midway_names_file_and_tensor(hf_checkpoint, tmp_path,
                                                                 monkeypatch):
    """The index is built (headers checked), then a file is cut before its tensors are
    read: the load fails with the file and the first tensor it cannot read."""
    src = hf_checkpoint("llama")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for n in os.listdir(src):
        (ckpt / n).write_bytes((open(os.path.join(src, n), "rb")).read())
    orig = hf_io._tensor_index

    def index_then_cut(path):
        files, paths = orig(path)
        f = files["model.norm.weight"]
        _cut(f.path, f, "model.norm.weight")
        return files, paths

    monkeypatch.setattr(hf_io, "_tensor_index", index_then_cut)
    with pytest.raises(models.SafetensorsError,
                       match=r"model\.safetensors: truncated while reading '.+'"):
        models.load_pretrained(str(ckpt))


def test_no_checkpoint_file_stays_mapped_after_a_load(hf_checkpoint):
    """Each read maps its file only while it reads, so file pages never pile up in the
    loader's resident memory."""
    path = hf_checkpoint("llama")
    model = models.load_pretrained(path)
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if os.path.realpath(path) in line
                  or path in line]
    assert not mapped, mapped
    got = dict(hf_io.hf_state_items(model))
    src = SafetensorsFile(f"{path}/model.safetensors")
    for name, value in got.items():
        np.testing.assert_array_equal(value, src.read_block(name), err_msg=name)
