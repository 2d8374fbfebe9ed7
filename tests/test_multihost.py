"""Multi-host start-up: resolution from flags / SLURM / TPU env, and real two-process
runs (2 CPU processes x 2 devices, gloo on 127.0.0.1) that must match one process: the
sharded forward, and the evaluate main."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from xft_jax import distributed
from xft_jax.models import hf_io
from xft_jax.models.decoder import TokenInputs, forward
from xft_jax.models.safetensors_reader import SafetensorsFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost", "worker.py")
# data,fsdp,tensor over 4 devices: fsdp spans the processes / data does / tensor does.
MESHES = ("1,2,2", "2,1,2", "1,1,4")


# --------------------------------------------------------------- resolve (no processes)
@pytest.mark.parametrize("nodelist,host", [
    ("node001", "node001"), ("node001,host2", "node001"), ("gpu[003-005,9],login1", "gpu003"),
    ("a-b[07,09-12]", "a-b07"), ("x[5]", "x5")])
def test_first_slurm_host(nodelist, host):
    assert distributed.first_slurm_host(nodelist) == host


def test_slurm_spec_one_task_per_node_and_per_gpu():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_JOB_NODELIST": "gpu[010-013]",
           "SLURM_JOB_ID": "12345", "SLURM_NTASKS_PER_NODE": "1", "SLURM_LOCALID": "0"}
    spec = distributed.resolve(env=env)
    assert (spec.mode, spec.num_processes, spec.process_id) == ("slurm", 4, 3)
    assert spec.coordinator_address == f"gpu010:{12345 % 4096 + 61440}"
    assert spec.local_device_ids is None          # one task per node: all its GPUs
    per_gpu = dict(env, SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8(x2)", SLURM_LOCALID="5",
                   SLURM_STEP_NODELIST="gpu[011-012]")
    spec = distributed.resolve(env=per_gpu)
    assert spec.local_device_ids == (5,) and spec.coordinator_address.startswith("gpu011:")
    # --gpus-per-task=1: SLURM already narrowed CUDA_VISIBLE_DEVICES to this task's GPU
    assert distributed.resolve(env=dict(per_gpu, CUDA_VISIBLE_DEVICES="5")
                               ).local_device_ids is None
    # a single-task allocation is a single process
    assert distributed.resolve(env=dict(env, SLURM_NTASKS="1")).mode == "none"
    with pytest.raises(distributed.DistributedError, match="srun"):
        distributed.resolve(mode="slurm", env={})


def test_resolve_explicit_tpu_and_defaults():
    assert distributed.resolve(env={}).mode == "none"
    # absl flag defaults (no coordinator, 1 process, id 0) are a single process
    assert distributed.resolve(None, 1, 0, env={}).mode == "none"
    spec = distributed.resolve("10.0.0.1:1234", 2, 1, platform="cpu", env={})
    assert (spec.mode, spec.coordinator_address, spec.num_processes, spec.process_id,
            spec.platform) == ("explicit", "10.0.0.1:1234", 2, 1, "cpu")
    # explicit flags win over SLURM variables
    slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1",
             "SLURM_JOB_ID": "1"}
    assert distributed.resolve("h:1", 2, 0, env=slurm).mode == "explicit"
    with pytest.raises(distributed.DistributedError, match="missing"):
        distributed.resolve(None, 4, 0, env={})
    with pytest.raises(distributed.DistributedError, match="host:port"):
        distributed.resolve("localhost", 2, 0, env={})
    with pytest.raises(distributed.DistributedError, match="outside"):
        distributed.resolve("h:1", 2, 2, env={})
    with pytest.raises(distributed.DistributedError, match="mode"):
        distributed.resolve(mode="mpi", env={})
    assert distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}).mode == "tpu"
    assert distributed.resolve(mode="tpu", env={}).mode == "tpu"


def test_initialize_after_backend_start_fails_clearly():
    jax.devices()  # the backend of this test process is up
    with pytest.raises(distributed.DistributedError, match="before any JAX"):
        distributed.initialize("127.0.0.1:1", 2, 0, env={})
    # single process: nothing to start, and this process is the primary one
    assert distributed.initialize(env={}).mode == "none"
    # in-process reuse (e.g. a main called from a test): matching settings are fine
    n = jax.local_device_count()
    assert distributed.initialize(platform="cpu", cpu_devices=n, env={}).mode == "none"
    with pytest.raises(distributed.DistributedError, match="already started"):
        distributed.initialize(platform="cpu", cpu_devices=n + 1, env={})
    assert distributed.is_primary()
    assert distributed.process_info()["process_count"] == 1


# --------------------------------------------------------------- two real processes
def _free_port(lo=None, hi=None) -> int:
    """A port nobody listens on now (in [lo, hi] when given)."""
    candidates = [0] if lo is None else np.random.default_rng().permutation(
        np.arange(lo, hi + 1))[:200].tolist()
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {lo}..{hi}")


def _batch(b=8, t=12):
    rng = np.random.default_rng(3)
    seg = np.ones((b, t), np.int32)
    seg[1, 8:] = 0                     # padding
    seg[2, 5:] = 2                     # two packed examples
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    pos[2, 5:] -= 5
    return {"input_ids": rng.integers(0, 128, (b, t)).astype(np.int32),
            "segment_ids": seg, "positions": pos}


def _run_workers(args_per_proc, envs, timeout=240, program=(WORKER,)):
    """Starts one worker per entry, waits for all under one deadline, always reaps them."""
    base = {k: v for k, v in os.environ.items()
            if k != "XLA_FLAGS" and not k.startswith("SLURM_")}
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + base.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, *program, *a], env=dict(base, **e), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True, text=True)
             for a, e in zip(args_per_proc, envs)]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        pytest.fail(f"multi-process run did not finish in {timeout}s")
    finally:
        for p in procs:            # reap everything, also on failure
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
    return outputs


@pytest.fixture(scope="module")
def reference(hf_checkpoint, tmp_path_factory):
    """The checkpoint, the batch file, one-process logits and the checkpoint's byte counts."""
    ckpt = hf_checkpoint("llama")
    batch = _batch()
    path = tmp_path_factory.mktemp("mh") / "batch.npz"
    np.savez(path, **batch)
    model = hf_io.load_pretrained(ckpt)               # one process, one device
    ref = np.asarray(jax.jit(lambda p, b: forward(
        p, model.config, TokenInputs(b["input_ids"], positions=b["positions"],
                                     segment_ids=b["segment_ids"]),
        opts=model.forward_options())["logits"])(model.params(), batch))
    f = SafetensorsFile(os.path.join(ckpt, "model.safetensors"))
    total = sum(f.read_block(n).nbytes for n in f.tensors)
    replicated = sum(f.read_block(n).nbytes for n in f.tensors if n.endswith("norm.weight"))
    return ckpt, str(path), ref, total, replicated


def _check(out, meshes, reference, spec_prefix):
    _, _, ref, total, replicated = reference
    half = (total - replicated) // 2 + replicated
    # bytes each process must read: only its own devices' slices (+ replicated norms)
    expect_read = {"1x2x2": half, "2x1x2": total, "1x1x4": half}
    expect_rows = {"1x2x2": [(0, 4), (4, 8)], "2x1x2": [(0, 4), (4, 8)],
                   "1x1x4": [(0, 8), (0, 8)]}
    results = [dict(np.load(out / f"result_{i}.npz")) for i in range(2)]
    assert [bool(r["primary"]) for r in results] == [True, False]
    report = json.loads((out / "report.json").read_text())   # written by process 0 only
    assert report["spec"].startswith(spec_prefix), report["spec"]
    for mesh in meshes:
        tag = mesh.replace(",", "x")
        for i, r in enumerate(results):
            err = np.max(np.abs(r[f"logits_{tag}"] - ref))
            assert err < 1e-5, f"mesh {tag}, process {i}: max |logits - 1 process| = {err}"
            assert r[f"shard_ok_{tag}"].all() and r[f"shard_ok_{tag}"].size > 0, tag
            assert tuple(r[f"rows_{tag}"]) == expect_rows[tag][i], tag
            assert int(r[f"read_bytes_{tag}"]) == expect_read[tag], (
                f"mesh {tag}, process {i} read {int(r[f'read_bytes_{tag}'])} bytes of the "
                f"checkpoint; its devices hold {expect_read[tag]} (total {total})")


def test_two_processes_match_single_process(reference, tmp_path):
    """Explicit --coordinator/--num_processes/--process_id, three mesh layouts."""
    ckpt, batch, *_ = reference
    common = ["--ckpt", ckpt, "--batch", batch, "--out", str(tmp_path),
              "--coordinator", f"127.0.0.1:{_free_port()}", "--num_processes", "2",
              "--cpu_devices", "2", "--meshes", ";".join(MESHES)]
    _run_workers([common + ["--process_id", str(i)] for i in range(2)], [{}, {}])
    _check(tmp_path, MESHES, reference, "explicit: process 0 of 2, coordinator 127.0.0.1:")


def test_two_processes_started_from_slurm_variables(reference, tmp_path):
    """No flags: each process reads SLURM_* as under srun (port = 61440 + job id % 4096)."""
    ckpt, batch, *_ = reference
    job = _free_port(61440, 65535) - 61440
    args = ["--ckpt", ckpt, "--batch", batch, "--out", str(tmp_path), "--cpu_devices", "2",
            "--meshes", "1,2,2"]
    envs = [{"SLURM_JOB_ID": str(job), "SLURM_NTASKS": "2", "SLURM_PROCID": str(i),
             "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_JOB_NODELIST": "127.0.0.1"} for i in range(2)]
    _run_workers([args, args], envs)
    _check(tmp_path, ["1,2,2"], reference,
           f"slurm: process 0 of 2, coordinator 127.0.0.1:{61440 + job}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step training run of the tiny config (one process, one device)."""
    from configs import tiny
    from xft_jax.training.trainer import train

    c = tiny.get_config("synthetic,naturalness,label_only")
    c.train.steps, c.train.checkpoint_every = 2, 2
    c.data.num_synthetic, c.data.max_len = 40, 320
    run = str(tmp_path_factory.mktemp("mh_run"))
    train(c, run, devices=jax.devices()[:1])
    return run


def _main_on_two_processes(module: str, flags: list[str]) -> None:
    port = _free_port()
    args = ["-m", module, "--config=configs/eval.py", *flags,
            f"--coordinator=127.0.0.1:{port}", "--num_processes=2", "--platform=cpu",
            "--cpu_devices=2"]
    _run_workers([[f"--process_id={i}"] for i in range(2)], [{}, {}], timeout=300,
                 program=tuple(args))


def test_two_process_evaluate_equals_one_process(tiny_run, tmp_path):
    """``python -m xft_jax.evaluate`` on 2 processes x 2 devices scores every example once
    and writes (process 0 only) what one process writes."""
    import csv

    from configs import eval as eval_config
    from xft_jax.eval import evaluation as eval_lib

    run = tiny_run
    e = eval_config.get_config()
    e.model.workdir = run
    e.eval.batch_size, e.data.max_examples = 4, 10            # 2 full batches + 1 partial
    one = eval_lib.run_evaluation(e, str(tmp_path / "one"))

    _main_on_two_processes("xft_jax.evaluate", [
        f"--out={tmp_path / 'two'}", f"--config.model.workdir={run}",
        "--config.eval.batch_size=4", "--config.data.max_examples=10"])
    with open(tmp_path / "two" / "metrics.json") as f:
        two = json.load(f)
    assert two["devices"] == 4 and two["mesh"]["fsdp"] == 4
    assert two["metrics"]["n"] == one["metrics"]["n"] == 10
    assert two["metrics"]["accuracy"] == pytest.approx(one["metrics"]["accuracy"])

    def probs(d):
        with open(d / "predictions.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [r["id"] for r in rows], np.array(
            [[float(r[f"p{k}"]) for k in range(1, 6)] for r in rows])

    ids1, p1 = probs(tmp_path / "one")
    ids2, p2 = probs(tmp_path / "two")
    assert ids1 == ids2 and len(set(ids2)) == 10
    np.testing.assert_allclose(p2, p1, atol=2e-5)


def test_two_process_probe_equals_one_process(tiny_run, tmp_path):
    """``python -m xft_jax.probe`` on 2 processes x 2 devices: the same per-layer means as
    one process, written once."""
    from configs import eval as eval_config
    from xft_jax.eval import probe as probe_lib, probe_runs as probe_report

    e = eval_config.get_config()
    e.model.workdir = tiny_run
    e.eval.batch_size, e.data.max_examples = 4, 6
    one = probe_report.run_probes(e, str(tmp_path / "one"), [], [])
    _main_on_two_processes("xft_jax.probe", [
        f"--out={tmp_path / 'two'}", f"--config.model.workdir={tiny_run}",
        "--config.eval.batch_size=4", "--config.data.max_examples=6"])
    with open(tmp_path / "two" / "probe.json") as f:
        two = json.load(f)
    assert two["runs"][0]["n"] == one["runs"][0]["n"] == 6
    assert two["runs"][0]["devices"] == 4 and two["runs"][0]["mesh"]["fsdp"] == 4
    (variant,) = one["variants"]
    for metric in probe_lib.METRICS:
        got = np.array(two["variants"][variant][metric]["mean"], dtype=float)
        want = np.array(one["variants"][variant][metric]["mean"], dtype=float)
        assert np.isfinite(want[1:]).all(), metric
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=metric)
