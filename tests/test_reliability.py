"""No lost runs (issue cases 1-4): one run per workdir, kills at random points (during
checkpoint writes too) resume to exactly the uninterrupted result, and an export never
overwrites the base, the run or a stale export's files."""

import hashlib
import json
import os
import random
import signal
import time

import jax
import numpy as np
import pytest

from tests.test_train import (OVERRIDES, _main, _reap, latest_step, lora_of, losses,
                              tiny_config)
from xft_jax.models import hf_io
from xft_jax.training import metrics_log
from xft_jax.training.trainer import train


KILL_STEPS = 10
KILL_OVERRIDES = {"train.steps": KILL_STEPS, "train.checkpoint_every": 1}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


# ------------------------------------------------------------------------ the lock (1)
def test_a_second_run_on_a_busy_workdir_refuses_naming_the_holder(tmp_path, compile_cache):
    import socket

    wd = str(tmp_path / "run")
    first = _main(wd, compile_cache, overrides=dict(
        OVERRIDES, **{"mesh.num_devices": 1, "train.steps": 100000,
                      "train.checkpoint_every": 0}))
    try:
        deadline = time.time() + 240
        while not metrics_log.read_metrics(wd) and first.poll() is None:
            assert time.time() < deadline
            time.sleep(0.05)
        assert first.poll() is None
        before = sorted(os.listdir(wd))
        second = _main(wd, compile_cache)
        err = _reap([second])[0]
        assert second.returncode == 2, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
        assert "is in use by another run" in lines[0]
        assert f"host {socket.gethostname()}, pid {first.pid}" in lines[0]
        assert sorted(os.listdir(wd)) == before       # the refused run wrote nothing
        assert json.load(open(os.path.join(wd, "config.json")))["train"]["steps"] == 100000
        from xft_jax.training.workdir_lock import WorkdirBusyError, WorkdirLock

        with pytest.raises(WorkdirBusyError):         # in-process too
            WorkdirLock(wd).acquire()
    finally:
        first.kill()                                  # SIGKILL: the kernel drops the lock
        first.wait()
    with WorkdirLock(wd):                             # free again once the holder is gone
        pass


# ------------------------------------------------------------------------ kills (2)
def _pending_write(wd):
    d = os.path.join(wd, "checkpoints")
    return os.path.isdir(d) and any("tmp" in name for name in os.listdir(d))


def _kill_once(wd, cache, rng, mode):
    """Starts the main and SIGKILLs it at a random point: inside a checkpoint write
    (a temporary step directory exists), or a random delay after a random step."""
    overrides = dict(OVERRIDES, **KILL_OVERRIDES, **{"mesh.num_devices": 1})
    done = len(metrics_log.read_metrics(wd)) if os.path.isdir(wd) else 0
    at = min(KILL_STEPS - 1, done + rng.randint(1, 2))
    delay = rng.uniform(0, 0.2)
    p = _main(wd, cache, overrides=overrides)
    deadline = time.time() + 240
    point = None
    while time.time() < deadline and p.poll() is None:
        logged = len(metrics_log.read_metrics(wd))
        if mode == "in_write" and logged >= at - 1 and _pending_write(wd):
            point = f"during the write of step {logged}"
        elif mode == "after_step" and logged >= at:
            time.sleep(delay)
            point = f"{delay:.3f}s after step {logged} was logged"
        if point:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    err = _reap([p])[0]
    return p.returncode, point, err


def test_sigkill_at_random_points_resumes_to_the_uninterrupted_result(tmp_path,
                                                                      compile_cache):
    ref = str(tmp_path / "ref")
    train(tiny_config(**KILL_OVERRIDES), ref, devices=jax.devices()[:1])
    wd = str(tmp_path / "killed")
    rng = random.Random()
    kills = []
    while len(kills) < 5:
        # every other kill waits for a checkpoint write in progress
        mode = "in_write" if len(kills) % 2 == 0 else rng.choice(["in_write", "after_step"])
        rc, point, err = _kill_once(wd, compile_cache, rng, mode)
        if rc == 0:                                   # finished before the kill point
            break
        assert rc == -signal.SIGKILL, f"rc={rc}: {err[-3000:]}"
        kills.append(point)
        print("killed", point, "latest checkpoint", latest_step(wd))
    assert len(kills) >= 5, kills
    assert any(k.startswith("during") for k in kills), kills
    result = train(tiny_config(**KILL_OVERRIDES), wd, devices=jax.devices()[:1])
    assert result.status == "done" and result.step == KILL_STEPS
    a, step_a = lora_of(ref)
    b, step_b = lora_of(wd)
    assert step_a == step_b == KILL_STEPS
    jax.tree.map(np.testing.assert_array_equal, a, b)            # bit-identical
    assert losses(wd) == losses(ref)


# ------------------------------------------------------------------------ export (3, 4)
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("exp") / "run")
    train(tiny_config(**{"train.steps": 2}), wd, devices=jax.devices()[:1])
    return wd


def _tree_digest(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_export_refuses_the_base_the_workdir_and_non_empty_dirs(trained, tmp_path):
    from xft_jax.training.export_run import ExportPathError, export_run

    base = os.path.join(trained, "base_model")
    before = _tree_digest(trained)
    for out in (base, trained, os.path.dirname(trained)):
        with pytest.raises(ExportPathError, match="would overwrite it"):
            export_run(trained, "merged", out, overwrite=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(ExportPathError, match="is not empty.*--overwrite"):
        export_run(trained, "merged", str(full))
    assert (full / "notes.txt").read_text() == "mine"
    assert _tree_digest(trained) == before             # base and run untouched


def test_export_over_a_stale_sharded_export_replaces_it_whole(trained, tmp_path):
    from xft_jax.training.export_run import export_run
    from xft_jax.training.restore import load_trained

    out = str(tmp_path / "merged")
    model, _, _ = load_trained(trained, dense=True)
    hf_io.save_pretrained(model, out, max_shard_size=20_000)       # an older, sharded one
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    export_run(trained, "merged", out, overwrite=True)
    names = set(os.listdir(out))
    assert "model.safetensors.index.json" not in names and "model.safetensors" in names
    assert not any(n.startswith("model-0") for n in names)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".merged")]  # no staging
    merged = hf_io.load_pretrained(out)
    assert merged.config.vocab_size == model.config.vocab_size
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == model.config.num_layers
