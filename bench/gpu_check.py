"""The whole GPU check as one command: a random Mistral-7B checkpoint, then every benchmark
in its own process within a time budget, then one JSON and one Markdown table in --out.

    bash bench/gpu_check.sh OUT_DIR --size=gpu      # installs, then runs this
    python bench/gpu_check.py --out=OUT_DIR --size=gpu_smoke

Steps, most wanted first, so that a run cut short by its budget still has the headline:

* ``setup``: versions and devices, then the checkpoint written to local disk and synced
  (``load.py`` evicts it from the page cache for its cold loads; dirty pages cannot be
  evicted);
* ``train_T<seq>`` for the size's first sequence (1024): ``train_step.py --cases=0``,
  ours with each attention implementation, transformers + PEFT (SDPA), our NF4 QLoRA step;
* ``eval``: ``eval_scoring.py``, five label rows against a PEFT forward (full logits and
  ``logits_to_keep``);
* ``load``: ``load.py``, cold and from the page cache, against ``from_pretrained(...,
  device_map="cuda")``;
* ``train_T<seq>`` for the remaining sequences (512).

Every step runs with ``--no_record`` (the device copy's bench/RESULTS.md is never
written; OUT/RESULTS.md is the section to append here) and a timeout of what is left of
``--budget_s``. A step with less than ``--min_step_s`` left is reported as skipped; one
that runs over is killed with its children and reported as timed out. Where JAX has no
GPU, the cuDNN attention variant is not started: its rows say "n/a" (status
``not_applicable``); on a GPU it runs, and a failure is status ``failed``, not met.

Writes OUT/gpu_check.json (environment, and per step: status, seconds, command, rows,
details), OUT/RESULTS.md and OUT/gpu_check.log (every child's output). Exit status 0 when
every step ran, 1 otherwise; the files are written either way.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Directory for gpu_check.json, RESULTS.md and the log.")
_SIZE = flags.DEFINE_enum("size", "gpu", ("gpu", "gpu_smoke"), "Benchmark size.")
_BUDGET = flags.DEFINE_integer("budget_s", 480, "Seconds for all steps together (0: none).")
_MIN_STEP = flags.DEFINE_integer("min_step_s", 20, "A step starts only with this many "
                                 "seconds of the budget left.")
_ONLY = flags.DEFINE_list("only", None, "Steps to run (default all; setup always runs), "
                          "e.g. train_T512,load for a second call.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "train_step.py --max_tokens: cap on "
                                   "tokens per step (0: fill the card).")
_COMMIT = flags.DEFINE_string("commit", None, "The commit measured (a device copy has no "
                              "git history); default: git's HEAD when there is one.")
_SETUP_CHILD = flags.DEFINE_string("setup_child", None, "Internal: run the setup step, "
                                   "writing its JSON here.")



# Seconds each step of the gpu size is expected to take on an H200 (bench/README.md has
# the sum): estimates made before any GPU run, to be replaced by the first run's times.
# A step starts only when this much (at least --min_step_s) of the budget is left, so
# device time is not spent on a step that would be killed half-way.
GPU_STEP_ESTIMATE_S = {"train": 240, "eval": 100, "load": 100}


def steps(size: str) -> list[tuple[str, list[str], int]]:
    """(name, bench command, seconds expected) in the order they run."""
    seqs = [t for _, t in common.spec(size)["train"]["cases"]]
    mt = [] if _MAX_TOKENS.value is None else [f"--max_tokens={_MAX_TOKENS.value}"]
    est = GPU_STEP_ESTIMATE_S if size == "gpu" else {}
    train = [(f"train_T{t}", ["train_step.py", f"--cases={i}", "--nobefore"] + mt,
              est.get("train", 0)) for i, t in enumerate(seqs)]
    return train[:1] + [("eval", ["eval_scoring.py"], est.get("eval", 0)),
                        ("load", ["load.py"], est.get("load", 0))] + train[1:]


# ----------------------------------------------------------------------------- setup child
def setup_child(size: str, path: str) -> None:
    """Versions, devices and the checkpoints, in a process of its own (so no framework
    holds device memory in the parent while the benchmarks run)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import torch

    info = {"python": sys.version.split()[0], "jax_backend": jax.default_backend(),
            "jax_devices": [d.device_kind for d in jax.devices()],
            "torch_cuda": torch.cuda.is_available(), "versions": {},
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    if size == "gpu" and (info["jax_backend"] != "gpu" or not info["torch_cuda"]):
        # A 7B run on the host would spend the whole lease; stop before the checkpoint.
        print(f"gpu_check: --size=gpu needs a GPU in JAX and torch; JAX backend is "
              f"{info['jax_backend']!r}, torch CUDA {info['torch_cuda']}", file=sys.stderr)
        sys.exit(2)
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft",
                 "safetensors", "ml_collections", "numpy"):
        try:
            info["versions"][name] = __import__(name).__version__
        except (ImportError, AttributeError) as e:
            info["versions"][name] = f"missing: {e}"
    sp = common.spec(size)
    t0 = time.perf_counter()
    ckpts = {common.checkpoint(sp["model"], sp["dtype"]),
             common.checkpoint(sp["load"]["model"], sp["load"]["dtype"])}
    info["checkpoint_write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    os.sync()
    info["sync_s"] = time.perf_counter() - t0
    info["checkpoints"] = {p: common.checkpoint_bytes(p) for p in sorted(ckpts)}
    info["cache"] = common.CACHE
    info["cache_fs"] = _fs_type(common.CACHE)
    common.write_child(path, info)


def _fs_type(path: str) -> str:
    """tmpfs means the "cold" loads read memory, not storage."""
    r = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


# ----------------------------------------------------------------------------- steps
def run_step(cmd: list[str], timeout: float, log, env: dict) -> tuple[str, float]:
    """Runs ``cmd`` in its own session; on timeout kills its whole process group (the
    bench's children too). Returns (status, seconds)."""
    t0 = time.perf_counter()
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    status = "ok" if rc == 0 else f"failed (exit {rc})"
    return status, time.perf_counter() - t0


def mark_attention_status(rows: list[dict]) -> list[dict]:
    """Gives each per-attention row a status: "not_applicable" (a GPU-only
    implementation where JAX has no GPU: not started, see common.run_ours_per_attention),
    "failed" (it ran and failed: on a GPU that is a finding, so its row is also not met)
    or "ok"."""
    out = []
    for r in rows:
        if ", attention=" in r.get("metric", ""):
            ours = str(r.get("ours", ""))
            if ours.startswith(common.NOT_APPLICABLE):
                r = dict(r, status="not_applicable")
            elif ours.startswith("failed: "):
                r = dict(r, status="failed", met=False)
            else:
                r = dict(r, status="ok")
        out.append(r)
    return out


def _log_tail(path: str, n: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def main(argv):
    if _SETUP_CHILD.value:
        setup_child(_SIZE.value, _SETUP_CHILD.value)
        return
    if not _OUT.value:
        raise app.UsageError("--out is required")
    size = _SIZE.value
    out = os.path.abspath(_OUT.value)
    os.makedirs(out, exist_ok=True)
    plan = steps(size)
    names = [n for n, _, _ in plan]
    only = names if _ONLY.value is None else _ONLY.value
    bad = [n for n in only if n not in names]
    if bad:
        raise app.UsageError(f"--only={','.join(bad)}: expected some of {','.join(names)}")
    scratch = tempfile.mkdtemp(prefix="xft_gpu_check_")
    log_path = os.path.join(out, "gpu_check.log")
    t_start = time.perf_counter()
    deadline = t_start + _BUDGET.value if _BUDGET.value else None
    report = {"size": size, "command": " ".join(sys.argv), "budget_s": _BUDGET.value,
              "commit": _COMMIT.value or common.git_commit(), "steps": []}
    py = sys.executable
    child_env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        setup_json = os.path.join(scratch, "setup.json")
        status, secs = run_step([py, os.path.join(common.BENCH_DIR, "gpu_check.py"),
                                 f"--size={size}", f"--setup_child={setup_json}"],
                                _BUDGET.value or 3600, log, child_env)
        env = {}
        if status == "ok":
            with open(setup_json) as f:
                env = json.load(f)
        report["environment"] = env
        report["steps"].append({"name": "setup", "status": status, "seconds": secs})
        print(f"[gpu_check] setup: {status} ({secs:.0f} s)", flush=True)
        if env.get("jax_backend"):
            child_env["XFT_BENCH_BACKEND"] = env["jax_backend"]
        for name, bench, expected in plan:
            step = {"name": name, "command": " ".join(bench)}
            report["steps"].append(step)
            left = None if deadline is None else deadline - time.perf_counter()
            if name not in only:
                step["status"] = "not asked (--only)"
                continue
            if report["steps"][0]["status"] != "ok":
                step["status"] = "skipped: setup failed"
                continue
            need = max(_MIN_STEP.value, expected)
            if left is not None and left < need:
                step["status"] = (f"skipped: time budget spent ({left:.0f} s left, "
                                  f"needs ~{need} s)")
                print(f"[gpu_check] {name}: {step['status']}", flush=True)
                continue
            timeout = left if left is not None else 3600
            before = set(os.listdir(scratch))
            cmd = [py, os.path.join(common.BENCH_DIR, bench[0]), f"--size={size}",
                   f"--out={scratch}", "--no_record", f"--timeout={int(timeout) + 1}",
                   *bench[1:]]
            step["status"], step["seconds"] = run_step(cmd, timeout, log, child_env)
            new = sorted(n for n in set(os.listdir(scratch)) - before if n.endswith(".json"))
            if new:
                with open(os.path.join(scratch, new[-1])) as f:
                    payload = json.load(f)
                step["rows"] = mark_attention_status(payload["rows"])
                step["details"] = payload["details"]
            elif step["status"] == "ok":
                step["status"] = "failed (no result JSON)"
            print(f"[gpu_check] {name}: {step['status']} ({step['seconds']:.0f} s)",
                  flush=True)
            if step["status"] != "ok":
                print(_log_tail(log_path), flush=True)
    report["seconds"] = time.perf_counter() - t_start
    report["hardware"] = common.hardware()
    md = render(report)
    _write(os.path.join(out, "gpu_check.json"), json.dumps(report, indent=2, default=str))
    _write(os.path.join(out, "RESULTS.md"), md)
    print("\n" + md)
    ran = [s for s in report["steps"] if s["name"] in only or s["name"] == "setup"]
    sys.exit(0 if all(s["status"] == "ok" for s in ran) else 1)


def render(report: dict) -> str:
    """The section for bench/RESULTS.md: header lines, then one table per step."""
    now = datetime.datetime.now(datetime.timezone.utc)
    hw, env = report["hardware"], report.get("environment", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines = [
        f"## {now:%Y-%m-%d %H:%M} UTC · gpu_check · size={report['size']}", "",
        f"- hardware: {hw['cpu']} ({hw['cores']} cores), GPU: {hw['gpu']}; "
        f"load average {hw['load_avg']}",
        f"- software: python {env.get('python', '?')}, JAX backend "
        f"{env.get('jax_backend', '?')}; {versions}",
        f"- checkpoint: {common.fmt(sum(env.get('checkpoints', {}).values()) or None, 'B')} "
        f"written in {env.get('checkpoint_write_s', 0):.0f} s (+ sync "
        f"{env.get('sync_s', 0):.0f} s) to {env.get('cache', '?')} "
        f"({env.get('cache_fs', '?')})",
        f"- commit: {report['commit']}",
        f"- command: `{report['command']}`",
        f"- time: {report['seconds']:.0f} s"
        + (f" of a {report['budget_s']} s budget" if report["budget_s"] else "")
        + "; steps: "
        + "; ".join(f"{s['name']} {s['status']}"
                    + (f" ({s['seconds']:.0f} s)" if "seconds" in s else "")
                    for s in report["steps"]), ""]
    for s in report["steps"][1:]:
        lines.append(f"### {s['name']}: {s['status']}")
        lines.append("")
        for h in s.get("details", {}).get("batch_sizing", []):
            lines += [f"- batch {h['batch']} x {h['seq']}: {h['rule']} (filling "
                      f"{100 * h.get('fill', 0):.0f}% of the card by the estimate: "
                      f"{h.get('fill_batch') or 'no GPU memory reading'})", ""]
        if s.get("rows"):
            lines += [common.table(s["rows"]), ""]
    return "\n".join(lines)


def _write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


if __name__ == "__main__":
    app.run(main)
