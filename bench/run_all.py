"""Runs every benchmark at one size and prints the ratio table last.

    python bench/run_all.py --size=cpu [--wait_quiet=900]

Each benchmark runs as its own command (``bench/train_step.py``, ``eval_scoring.py``,
``load.py``), appends its own section to ``bench/RESULTS.md`` and writes its JSON; this
script then appends a summary section with every ratio. ``--wait_quiet`` waits (up to
that many seconds) for the 1-minute load average to drop below ``--quiet_load`` first,
since other processes on the machine distort CPU timings; the load is recorded either way.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402

_SIZE = flags.DEFINE_enum("size", "cpu", common.SIZES, "Benchmark size.")
_OUT = flags.DEFINE_string("out", None, "Directory for the JSON results (default "
                           "bench/results).")
_NO_RECORD = flags.DEFINE_bool("no_record", False, "Do not append to bench/RESULTS.md.")
_ONLY = flags.DEFINE_list("only", ["train_step", "eval_scoring", "load"], "Benchmarks to run.")
_WAIT = flags.DEFINE_integer("wait_quiet", 0, "Seconds to wait for a quiet machine.")
_QUIET = flags.DEFINE_float("quiet_load", 1.5, "1-minute load average that counts as quiet.")
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "Seconds per benchmark.")

BENCHES = ("train_step", "eval_scoring", "load")


def wait_quiet(limit: float, quiet: float) -> float:
    t0 = time.time()
    while os.getloadavg()[0] >= quiet and time.time() - t0 < limit:
        time.sleep(15)
    return os.getloadavg()[0]


def main(argv):
    size = _SIZE.value
    out = os.path.abspath(_OUT.value or common.RESULTS_DIR)
    os.makedirs(out, exist_ok=True)
    bad = [b for b in _ONLY.value if b not in BENCHES]
    if bad:
        raise app.UsageError(f"--only={bad}: expected some of {BENCHES}")
    if _WAIT.value:
        load = wait_quiet(_WAIT.value, _QUIET.value)
        print(f"load average before the run: {load:.2f}", flush=True)
    rows, files = [], {}
    for bench in _ONLY.value:
        before = set(glob.glob(os.path.join(out, f"*_{bench}_{size}.json")))
        cmd = [sys.executable, os.path.join(common.BENCH_DIR, f"{bench}.py"), f"--size={size}",
               f"--out={out}"] + (["--no_record"] if _NO_RECORD.value else [])
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, timeout=_TIMEOUT.value, cwd=common.REPO)
        new = sorted(set(glob.glob(os.path.join(out, f"*_{bench}_{size}.json"))) - before)
        if not new:
            raise RuntimeError(f"{bench}: wrote no result JSON under {out}")
        files[bench] = new[-1]
        with open(new[-1]) as f:
            for r in json.load(f)["rows"]:
                if r.get("ratio") is not None or r.get("met") is not None:
                    rows.append(dict(r, case=f"{bench} {r.get('case', '')}".strip()))
    section = common.record("summary", size, rows, {"files": files}, out,
                            not _NO_RECORD.value, sys.argv)
    print("\n" + section)


if __name__ == "__main__":
    app.run(main)
