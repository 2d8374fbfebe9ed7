"""bench/gpu_check.sh, the one-command GPU check, run dry at gpu_smoke size on the CPU so
it cannot rot before a GPU is lent; and its batch sizing, budget and install guards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from bench import common, sizing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["setup", "train_T64", "eval", "load", "train_T32"]


def _gpu_check(out, tmp_path, *args, timeout=900):
    env = dict(os.environ, PYTHON=sys.executable, XFT_BENCH_CACHE=str(tmp_path / "cache"))
    return subprocess.run(["bash", "bench/gpu_check.sh", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _rows(step, metric):
    found = [r for r in step.get("rows", []) if r["metric"].startswith(metric)]
    assert found, (step["name"], metric, [r["metric"] for r in step.get("rows", [])])
    return found


def jax_has_gpu() -> bool:
    import jax
    return any(d.platform == "gpu" for d in jax.devices())


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The whole script at gpu_smoke size: every benchmark present in the JSON and the
    table, both sides computing the same thing, cuDNN reported as not applicable. The
    second sequence length is left to --only, as a second device call would (its train
    cases run in tests/test_bench.py), which keeps this test near a minute."""
    out = tmp_path / "out"
    proc = _gpu_check(out, tmp_path, "--size=gpu_smoke", "--skip_install", "--budget_s=0",
                      "--commit=test", "--only=train_T64,eval,load")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # What comes back from a device call: at most 8 plain files, no folders.
    assert sorted(os.listdir(out)) == ["RESULTS.md", "gpu_check.json", "gpu_check.log"]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in report["steps"][:-1]), report["steps"]
    assert steps["train_T32"]["status"] == "not asked (--only)"
    env = report["environment"]
    assert env["checkpoints"] and all(b > 0 for b in env["checkpoints"].values())
    assert env["versions"]["ml_collections"] and env["versions"]["peft"]
    gpu = jax_has_gpu()
    assert env["jax_backend"] == ("gpu" if gpu else "cpu")

    for name, (b, t) in (("train_T64", (1, 64)),):
        s = steps[name]
        case = f"B={b} T={t}"
        assert {r["case"] for r in s["rows"]} == {case}
        assert s["details"]["batch_sizing"][0]["rule"] == "cap 64 tokens/step"
        assert all(r["met"] for r in _rows(s, "loss at step 1")), s["rows"]
        assert float(_rows(s, "tokens/s")[0]["peer"]) > 0
        _rows(s, "MFU (dense bf16 peak 989 TFLOP/s)")
        _rows(s, "peak memory")
        (xla,) = _rows(s, "tokens/s, attention=xla")
        assert xla["status"] == "ok" and float(xla["ours"]) > 0
        (cudnn,) = _rows(s, "tokens/s, attention=cudnn")
        if not gpu:
            assert cudnn["status"] == "not_applicable", cudnn
            assert cudnn["ours"].startswith("n/a (JAX backend cpu"), cudnn
        assert _rows(s, "NF4 QLoRA tokens/s vs ours bf16")[0]["ratio"] > 0
        assert all(r["met"] for r in _rows(s, "NF4 loss at step 1")), s["rows"]
        assert set(s["details"]["cases"][0]["raw"]) >= {"ours@xla", "torch", "ours_nf4"}

    ev = steps["eval"]
    assert all(r["met"] for r in _rows(ev, "max abs log-prob diff")), ev["rows"]
    assert _rows(ev, "examples/s vs logits_to_keep forward")[0]["ratio"] > 0
    (cudnn,) = _rows(ev, "examples/s vs full-logits forward, attention=cudnn")
    assert cudnn["status"] == ("ok" if gpu else "not_applicable"), cudnn

    ld = steps["load"]
    _rows(ld, "cold: load time vs transformers")
    _rows(ld, "warm: load time vs transformers")
    assert ld["details"]["bytes"] > 0

    md = (out / "RESULTS.md").read_text()
    assert md.startswith("## ") and "gpu_check · size=gpu_smoke" in md
    assert "- commit: test" in md
    for name in STEPS[1:-1]:
        assert f"### {name}: ok" in md
    assert "### train_T32: not asked (--only)" in md
    assert "- batch 1 x 64: cap 64 tokens/step" in md
    assert md.count("| case | metric | ours | peer | ratio | target | met |") == 3
    if not gpu:
        assert md.count("n/a (JAX backend cpu") == 2      # train, eval
    assert "train_step.py" in (out / "gpu_check.log").read_text()


def test_gpu_check_reports_steps_its_budget_cannot_hold(tmp_path):
    """A step with too little budget left is reported as skipped, not dropped; the
    files are still written and the exit status says not everything ran."""
    out = tmp_path / "out"
    proc = _gpu_check(out, tmp_path, "--size=gpu_smoke", "--skip_install",
                      "--budget_s=3600", "--min_step_s=100000")
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["name"] for s in report["steps"]] == STEPS
    assert report["steps"][0]["status"] == "ok"
    assert all(s["status"].startswith("skipped: time budget spent")
               for s in report["steps"][1:]), report["steps"]
    md = (out / "RESULTS.md").read_text()
    assert "### load: skipped: time budget spent" in md


def test_gpu_check_gpu_size_stops_without_a_gpu(tmp_path):
    """--size=gpu on a machine without a GPU stops in setup, before writing 14.5 GB."""
    if jax_has_gpu():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    proc = _gpu_check(out, tmp_path, "--skip_install")
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["steps"][0]["status"] == "failed (exit 2)"
    assert all(s["status"] == "skipped: setup failed" for s in report["steps"][1:])
    assert "needs a GPU in JAX and torch; JAX backend is 'cpu'" in (
        out / "gpu_check.log").read_text()
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


def test_gpu_check_refuses_bad_arguments_and_missing_wheels(tmp_path):
    proc = _gpu_check("--size=gpu", tmp_path)
    assert proc.returncode == 2 and "usage: bash bench/gpu_check.sh OUT_DIR" in proc.stderr
    empty = tmp_path / "wheels"
    empty.mkdir()
    proc = _gpu_check(tmp_path / "out", tmp_path, f"--wheels={empty}")
    assert proc.returncode == 2
    assert f"no wheel for ml-collections==1.1.0 in {empty}" in proc.stderr
    proc = _gpu_check(tmp_path / "out", tmp_path, "--skip_install", "--only=train_T99")
    assert proc.returncode != 0 and "--only=train_T99: expected some of" in proc.stderr


H200_BYTES = 143771 * 2**20          # nvidia-smi's memory.total on an H200


def test_train_cases_fill_the_card_within_the_estimate():
    sp = common.spec("gpu")
    m = sp["model"]
    assert sizing.param_count(m) == 7_241_732_096          # Mistral-7B
    # Capped (the default) and uncapped (fill the card).
    cases, how = sizing.train_cases(sp, H200_BYTES)
    assert cases == [(32, 1024), (64, 512)]
    assert [h["rule"] for h in how] == ["cap 32768 tokens/step"] * 2
    full, how = sizing.train_cases(sp, H200_BYTES, max_tokens=0)
    assert [h["rule"] for h in how] == ["fill", "fill"]
    for (b, t), h in zip(full, how):
        assert b % 8 == 0 and b > 32 * 1024 // t
        tok = sizing.train_token_bytes(m, t)
        weights = 2 * sizing.param_count(m)
        peer = lambda n: weights + n * t * tok["peer"]       # noqa: E731
        ours = lambda n: weights + sizing.OURS_FIXED_BYTES + n * t * tok["ours"]  # noqa: E731
        assert peer(b) <= 0.85 * H200_BYTES and ours(b) <= 0.75 * H200_BYTES
        assert (peer(b + 8) > 0.85 * H200_BYTES) or (ours(b + 8) > 0.75 * H200_BYTES)
    # A smaller card: the fill is below the cap, and the fill decides.
    small, how = sizing.train_cases(sp, 24 * 2**30)
    assert [h["rule"] for h in how] == ["fill", "fill"] and small[0][0] < 8
    with pytest.raises(ValueError, match="not one row fits"):
        sizing.train_cases(sp, 16 * 2**30)
    with pytest.raises(ValueError, match="pass --max_tokens"):
        sizing.train_cases(sp, None, max_tokens=0)
    # Fixed batches (CPU sizes) are left alone.
    assert sizing.train_cases(common.spec("cpu"), H200_BYTES)[0] == [(2, 512)]
