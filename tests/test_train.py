"""The training loop with configs/tiny.py (tiny random Mistral-shaped base, synthetic
data, the real Mistral tokenizer): logs and checkpoints, reproducibility, exact resume
after SIGKILL / SIGTERM, sharding invariance (8 fake devices and two gloo processes vs
one device), and the non-finite stop.

The runs share one configuration (constant learning rate, so runs of different lengths
agree on their common prefix); the jitted step is compiled once per mesh per process.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from xft_jax.training import metrics_log
from xft_jax.training.checkpoint import Checkpoints
from xft_jax.data import readers, splits as data_splits
from xft_jax.eval.evaluation import checkpoint_step
from xft_jax.training.export_run import export_run
from xft_jax.training.restore import UnfinishedRunError, load_trained
from xft_jax.training.run_identity import RunMismatchError
from xft_jax.training.trainer import NonFiniteError, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
OVERRIDES = {"train.steps": STEPS, "train.checkpoint_every": 2, "train.keep_checkpoints": 2,
             "data.num_synthetic": 64, "data.batch_size": 4, "lora.dropout": 0.1,
             "optim.lr": 1e-2, "optim.warmup_steps": 0, "optim.schedule": "constant",
             "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}


def tiny_config(**kw):
    c = tiny.get_config()
    for key, value in {**OVERRIDES, **kw}.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return c


def losses(workdir):
    return [r["loss"] for r in metrics_log.read_metrics(workdir)]


def lora_of(workdir):
    model, _, step = load_trained(workdir)
    return jax.tree.map(np.asarray, model.lora_params()), step


def latest_step(workdir):
    ck = Checkpoints(os.path.join(workdir, "checkpoints"))
    try:
        return ck.latest_step()
    finally:
        ck.close()


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("one"))
    result = train(tiny_config(), wd, devices=jax.devices()[:1])
    return wd, result


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache shared by this module's subprocesses."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def _main(workdir, cache, *extra, devices=8, overrides=None):
    """The train main in a subprocess. By default it sees 8 CPU devices like this process
    and uses the first (mesh.num_devices=1): XLA:CPU's numerics depend on the device
    count a process was started with, and bit-exact comparisons need the same."""
    overrides = overrides or dict(OVERRIDES, **{"mesh.num_devices": 1})
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    return subprocess.Popen(
        [sys.executable, "-m", "xft_jax.train", f"--config={REPO}/configs/tiny.py",
         f"--workdir={workdir}", *args, *extra], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _reap(procs, timeout=300):
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=timeout)[1].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return errs


# ------------------------------------------------------------------------ one run
def test_run_writes_logs_checkpoints_and_config(one_device):
    wd, result = one_device
    assert result.status == "done" and result.step == STEPS
    rows = metrics_log.read_metrics(wd)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "label_loss", "label_accuracy", "explanation_loss", "lr",
                "grad_norm", "tokens_per_sec"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert all(r["tokens_per_sec"] > 0 for r in rows)
    assert rows[0]["loss"] > 9.0                       # ~ln(32000) for a random base
    assert rows[-1]["loss"] < rows[0]["loss"]
    saved = json.load(open(os.path.join(wd, "config.json")))
    assert saved["train"]["steps"] == STEPS and saved["data"]["source"] == "synthetic"
    assert any(f.startswith("events.out.tfevents")
               for f in os.listdir(os.path.join(wd, "tensorboard")))
    ck = Checkpoints(os.path.join(wd, "checkpoints"))
    assert ck.all_steps() == [4, 6]                    # keep the last 2
    meta = ck.read_meta()
    ck.close()
    assert meta["lora"]["rank"] == 8 and meta["lora"]["alpha"] == 16.0
    assert meta["lora"]["targets"] == list(tiny.get_config().lora.targets)
    assert meta["lora"]["base_model_path"] == os.path.join(wd, "base_model")
    assert len(meta["lora"]["base_config_hash"]) == 16 and meta["step"] == STEPS


def test_same_seed_same_losses_other_seed_differs(one_device, tmp_path):
    wd, _ = one_device
    train(tiny_config(), str(tmp_path / "again"), devices=jax.devices()[:1])
    assert losses(str(tmp_path / "again")) == losses(wd)          # bit-identical
    a, _ = lora_of(wd)
    b, _ = lora_of(str(tmp_path / "again"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    train(tiny_config(**{"train.seed": 1}), str(tmp_path / "seed1"),
          devices=jax.devices()[:1])
    other = losses(str(tmp_path / "seed1"))
    assert len(other) == STEPS and other != losses(wd)


# ------------------------------------------------------------------------ resume
def _run_until(workdir, cache, sig, at_step):
    """Starts the main, sends ``sig`` once ``at_step`` steps are logged; returns rc."""
    p = _main(workdir, cache)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if len(metrics_log.read_metrics(workdir)) >= at_step:
            p.send_signal(sig)
            break
        time.sleep(0.005)
    err = _reap([p])[0]
    return p.returncode, err


def _assert_same_as(workdir, reference):
    a, step_a = lora_of(reference)
    b, step_b = lora_of(workdir)
    assert step_a == step_b == STEPS
    jax.tree.map(np.testing.assert_array_equal, a, b)            # bit-identical
    assert losses(workdir) == losses(reference)


def test_resume_after_sigkill_is_exact(one_device, compile_cache, tmp_path):
    ref, _ = one_device
    wd = str(tmp_path / "killed")
    at = random.Random().randint(2, STEPS - 1)
    print(f"SIGKILL once step {at} is logged")      # shown if the test fails
    rc, err = _run_until(wd, compile_cache, signal.SIGKILL, at)
    assert rc == -signal.SIGKILL, f"not killed (rc={rc}): {err[-2000:]}"
    done = latest_step(wd)
    assert done is None or done < STEPS
    result = train(tiny_config(), wd, devices=jax.devices()[:1])
    assert result.status == "done"
    _assert_same_as(wd, ref)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_saves_exits_zero_and_resumes_exactly(one_device, compile_cache, tmp_path,
                                                      sig):
    """SIGTERM (preemption) and a Ctrl-C (SIGINT) both save, exit 0 and resume exactly."""
    ref, _ = one_device
    wd = str(tmp_path / "preempted")
    at = random.Random().randint(1, STEPS - 2)
    print(f"{sig.name} once step {at} is logged")
    rc, err = _run_until(wd, compile_cache, sig, at)
    assert rc == 0, err[-2000:]
    assert "preempted: saved step" in err
    assert ("Ctrl-C: saving at the next step" in err) == (sig == signal.SIGINT)
    saved = latest_step(wd)
    assert saved is not None and at <= saved < STEPS
    assert len(metrics_log.read_metrics(wd)) == saved
    # Unfinished: choosing its step by validation (or its latest) is refused by name.
    with pytest.raises(UnfinishedRunError, match=rf"stopped at step {saved} of {STEPS} "):
        checkpoint_step(wd, None)
    with pytest.raises(UnfinishedRunError, match=r"pass --step=N"):
        export_run(wd, "peft", str(tmp_path / "adapter"))
    assert not os.path.exists(tmp_path / "adapter")
    assert checkpoint_step(wd, saved) == (saved, "config.model.step")  # asked for: allowed
    train(tiny_config(), wd, devices=jax.devices()[:1])
    _assert_same_as(wd, ref)
    assert checkpoint_step(wd, None)[1] != "config.model.step"      # finished: chosen


def test_only_a_second_ctrl_c_aborts_without_saving():
    """A sweep forwards SIGTERM when Ctrl-C reaches it and the run alike: SIGTERM and
    the first Ctrl-C, in either order, ask for a save; a second Ctrl-C aborts."""
    from xft_jax.training.preemption import Preemption

    for first, second in ((signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)):
        p = Preemption("saving")
        p._handle(first, None)
        p._handle(second, None)
        assert p.flag and p.name == first.name
        with pytest.raises(KeyboardInterrupt):
            p._handle(signal.SIGINT, None)


# ------------------------------------------------------------------------ resume guard
def test_resume_refuses_a_changed_config_and_keeps_the_runs_record(one_device, tmp_path):
    ref, _ = one_device
    wd = str(tmp_path / "copy")
    shutil.copytree(ref, wd)
    config_json = os.path.join(wd, "config.json")
    before = open(config_json).read()
    with pytest.raises(RunMismatchError) as e:
        train(tiny_config(**{"optim.lr": 2e-2, "data.target": "label_only"}), wd,
              devices=jax.devices()[:1])
    msg = str(e.value)
    assert "optim.lr: 0.01 -> 0.02" in msg and "data.target: 'explanation' -> 'label_only'" in msg
    assert os.path.join(wd, "checkpoints", str(STEPS)) in msg
    assert open(config_json).read() == before          # the run's record is not overwritten
    # Operational keys may change: the finished run is recognised and nothing retrains.
    result = train(tiny_config(**{"train.log_every": 3, "mesh.num_devices": 1}), wd,
                   devices=jax.devices()[:1])
    assert result.status == "done" and result.step == STEPS
    assert losses(wd) == losses(ref) and latest_step(wd) == STEPS


def test_resume_checks_the_training_data_by_content_not_path(one_device, tmp_path, capsys):
    """Moved data resumes (and says so); changed data at the same path is refused."""
    c = tiny_config()
    d = c.data
    parts = data_splits.build_datasets(d.source, None, num_train=d.num_train,
                                       num_test=d.num_test, seed=d.seed,
                                       num_synthetic=d.num_synthetic)
    first, moved = tmp_path / "data", tmp_path / "moved"
    first.mkdir()
    readers.write_rated_jsonl(str(first / "train.jsonl"), parts.train)
    readers.write_rated_jsonl(str(first / "test.jsonl"), parts.test)
    wd = str(tmp_path / "run")
    devices = jax.devices()[:1]
    train(tiny_config(**{"data.path": str(first)}), wd, devices=devices)
    shutil.copytree(first, moved)
    capsys.readouterr()
    result = train(tiny_config(**{"data.path": str(moved)}), wd, devices=devices)
    assert result.status == "done" and result.step == STEPS
    log = capsys.readouterr().out
    assert f"resumed with a moved input: data.path: {str(first)!r} -> {str(moved)!r}" in log

    rows = [json.loads(line) for line in open(moved / "train.jsonl")]
    rows[0]["ratings"][d.axis]["explanation"] += " Also terse."
    with open(moved / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(RunMismatchError, match="the training data differs"):
        train(tiny_config(**{"data.path": str(moved)}), wd, devices=devices)


# ------------------------------------------------------------------------ sharding
def test_mesh_2x2x2_matches_one_device(one_device, tmp_path):
    wd, _ = one_device
    assert jax.device_count() == 8
    train(tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                         "train.steps": 3}), str(tmp_path / "mesh"), devices=jax.devices())
    np.testing.assert_allclose(losses(str(tmp_path / "mesh")), losses(wd)[:3], atol=1e-5,
                               rtol=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_device(one_device, compile_cache, tmp_path):
    wd, _ = one_device
    port = _free_port()
    out = str(tmp_path / "mp")
    ov = dict(OVERRIDES, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                            "train.steps": 3})
    procs = [_main(out, compile_cache, "--platform=cpu", "--cpu_devices=4",
                   f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={i}", devices=4, overrides=ov) for i in range(2)]
    errs = _reap(procs)
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    np.testing.assert_allclose(losses(out), losses(wd)[:3], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ failures
def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    wd = str(tmp_path / "nan")
    cfg = tiny_config(**{"optim.lr": 1e36, "optim.clip_norm": 0.0,
                         "train.checkpoint_every": 1})
    with pytest.raises(NonFiniteError, match="not finite") as err:
        train(cfg, wd, devices=jax.devices()[:1])
    last = latest_step(wd)
    assert last is not None and f"step {last + 1}:" in str(err.value)
    assert f"(step {last} in" in str(err.value)
    assert len(metrics_log.read_metrics(wd)) == last
