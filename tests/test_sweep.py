"""The sweep: the dry run lists the full grid; re-runs skip finished cells."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from xft_jax.study import grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(tmp_path, sources=grid.SOURCES):
    """Sweep flags pointing the model and data paths at existing directories."""
    for s in sources:
        os.makedirs(tmp_path / "inputs" / "data" / s, exist_ok=True)
    os.makedirs(tmp_path / "inputs" / "model", exist_ok=True)
    return [f"--config.data_path={tmp_path}/inputs/data/{{source}}",
            f"--config.overrides=('--config.model.path={tmp_path}/inputs/model',)"]


def test_dry_run_lists_every_cell(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "xft_jax.sweep", "--config=configs/paper.py",
         f"--sweep_dir={tmp_path}", "--dry_run", *_inputs(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    cells = [l for l in out.splitlines() if l.startswith("# ")]
    assert len(cells) == 6 * 3 * 5 * 3
    assert len(set(cells)) == len(cells)
    assert sum("-m xft_jax.train " in l for l in out.splitlines()) == 270
    assert "270 cells = 6 sources x 3 axes x 5 variants x 3 seeds" in out
    assert sum("/random_vocab/" in l for l in cells) == 6 * 3 * 3
    out2 = subprocess.run(
        [sys.executable, "-m", "xft_jax.sweep", "--config=configs/paper.py",
         f"--sweep_dir={tmp_path}", "--dry_run", "--config.seeds=(0,1)", *_inputs(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "180 cells = 6 sources x 3 axes x 5 variants x 2 seeds" in out2
    # one probe of the untuned base per setting: the reference of the probe section
    base = [l for l in out.splitlines() if l.startswith("base probe ")]
    assert len(base) == 6 * 3 and "base probe coqa/on_topic/base [pending]" in out
    lines = out.splitlines()
    cmd = lines[lines.index(next(l for l in base if "coqa/on_topic/" in l)) + 1]
    assert "-m xft_jax.probe " in cmd and f"--out={tmp_path}/coqa/on_topic/base/probe" in cmd
    assert f"--config.model.path={tmp_path}/inputs/model" in cmd
    assert "--config.data.axis=on_topic" in cmd and "--config.data.source=coqa" in cmd


def test_dry_run_shows_the_inputs_and_fails_early_on_a_missing_one(tmp_path):
    """The model path every run will load is shown, and a missing data path stops the
    dry run and the real run (exit 2) before anything is written."""
    args = [sys.executable, "-m", "xft_jax.sweep", "--config=configs/paper.py",
            "--config.sources=('coqa','amazon_qa')", "--config.axes=('naturalness',)",
            "--config.seeds=(0,)", *_inputs(tmp_path, ["coqa"])]
    sweep = str(tmp_path / "sweep")
    dry = subprocess.run(args + [f"--sweep_dir={sweep}", "--dry_run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 2, dry.stderr[-2000:]
    assert f"input model.path: {tmp_path}/inputs/model [found]" in dry.stdout
    assert f"input data.path (coqa): {tmp_path}/inputs/data/coqa [found]" in dry.stdout
    assert f"input data.path (amazon_qa): {tmp_path}/inputs/data/amazon_qa [MISSING]" in dry.stdout
    assert dry.stderr.count("\n") == 1 and "1 input path(s) missing" in dry.stderr
    assert "Traceback" not in dry.stderr
    real = subprocess.run(args + [f"--sweep_dir={sweep}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert real.returncode == 2 and "data.path (amazon_qa)" in real.stderr
    assert not os.path.exists(sweep)                     # failed before writing anything


FAKE_RUN = """
import json, os, sys
root = sys.argv[1]
os.makedirs(os.path.join(root, "eval"), exist_ok=True)
os.makedirs(os.path.join(root, "probe"), exist_ok=True)
with open(os.path.join(root, "calls"), "a") as f:
    f.write("x\\n")
if os.path.exists(os.path.join(root, "FAIL")):
    sys.exit(3)
json.dump({"metrics": {"accuracy": 0.5, "macro_f1": 0.25, "n": 2}},
          open(os.path.join(root, "eval", "metrics.json"), "w"))
open(os.path.join(root, "eval", "predictions.csv"), "w").write("id,gold,predicted\\na,1,1\\n")
json.dump({}, open(os.path.join(root, "probe", "probe.json"), "w"))
"""


def test_rerun_skips_finished_and_retries_failed(tmp_path):
    sweep = str(tmp_path)
    cells = grid.cells(["coqa"], ["naturalness", "on_topic"], ["label_only", "explanation"], [0])

    def commands_of(cell):
        return [[sys.executable, "-c", FAKE_RUN, os.path.join(sweep, cell.rel)]]

    bad = cells[1]
    os.makedirs(os.path.join(sweep, bad.rel))
    open(os.path.join(sweep, bad.rel, "FAIL"), "w").close()
    def definition_of(cell):
        return {"train": {"data": {"target": cell.variant}}}

    r1 = grid.run_local(cells, sweep, commands_of, probe=True, max_attempts=2,
                        log=lambda *_: None, definition_of=definition_of)
    assert len(r1["done"]) == 3 and r1["failed"] == [bad]
    for cell in cells:                        # every cell run records what it ran under
        assert json.load(open(os.path.join(sweep, cell.rel, grid.DEFINITION_FILE))) == \
            definition_of(cell)
    assert json.load(open(os.path.join(sweep, bad.rel, "status.json")))["state"] == "failed"
    lines = []
    r2 = grid.run_local(cells, sweep, commands_of, probe=True, max_attempts=2, log=lines.append)
    assert len(r2["skipped"]) == 3 and r2["failed"] == [bad]
    done = cells[0]
    assert (f"[sweep] finished earlier, skipped: {done.rel}: accuracy 0.500, macro-F1 0.250 "
            f"on 2 test examples; results in {os.path.join(sweep, done.rel, 'eval')}") in lines
    os.remove(os.path.join(sweep, bad.rel, "FAIL"))
    r3 = grid.run_local(cells, sweep, commands_of, probe=True, max_attempts=2, log=lambda *_: None)
    assert r3["failed"] == [bad]  # two attempts used up: listed, not retried
    calls = {c.rel: len(open(os.path.join(sweep, c.rel, "calls")).read().split()) for c in cells}
    assert calls[bad.rel] == 2 and all(n == 1 for rel, n in calls.items() if rel != bad.rel)
    r4 = grid.run_local(cells, sweep, commands_of, probe=True, max_attempts=3, log=lambda *_: None)
    assert r4["done"] == [bad] and len(r4["skipped"]) == 3


# A training run as the sweep sees one: it waits for work, and on SIGTERM "saves" and
# exits 0 (xft_jax.train's contract).
PREEMPTIBLE_RUN = """
import os, signal, sys, time
root = sys.argv[1]
def save(signum, frame):
    open(os.path.join(root, "saved"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
os.makedirs(root, exist_ok=True)
open(os.path.join(root, "started"), "w").close()
time.sleep(60)
sys.exit(5)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_stops_the_sweep_after_the_running_command_without_costing_an_attempt(
        tmp_path, sig):
    """SIGTERM (preemption) or Ctrl-C: the running command gets SIGTERM and saves."""
    import signal
    import threading
    import time

    sweep = str(tmp_path)
    cells = grid.cells(["coqa"], ["naturalness"], ["label_only", "explanation"], [0])
    first = os.path.join(sweep, cells[0].rel)

    def preempted(cell):
        root = os.path.join(sweep, cell.rel)
        return [[sys.executable, "-c", PREEMPTIBLE_RUN, root],
                [sys.executable, "-c", FAKE_RUN, root]]

    def preempt_when_started():
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(first, "started")) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), getattr(signal, sig))

    handlers = [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)]
    threading.Thread(target=preempt_when_started, daemon=True).start()
    lines = []
    r = grid.run_local(cells, sweep, preempted, probe=True, max_attempts=1,
                       log=lines.append)
    assert [signal.getsignal(signal.SIGTERM),
            signal.getsignal(signal.SIGINT)] == handlers          # restored
    assert r["interrupted"] == [cells[0]] and not r["done"] and not r["failed"]
    assert os.path.exists(os.path.join(first, "saved"))          # SIGTERM reached the run
    assert not os.path.exists(os.path.join(first, "calls"))      # nothing ran after it
    assert not os.path.exists(os.path.join(sweep, cells[1].rel))  # nor the next cell
    assert json.load(open(os.path.join(first, "status.json"))) == {"state": "interrupted",
                                                                   "attempts": 0}
    assert lines[-1].startswith(f"[sweep] {cells[0].rel}: stopped by SIGTERM")

    def finishing(cell):
        return [[sys.executable, "-c", FAKE_RUN, os.path.join(sweep, cell.rel)]]

    r = grid.run_local(cells, sweep, finishing, probe=True, max_attempts=1,
                       log=lambda *_: None)                       # the re-run resumes
    assert r["done"] == cells and not r["failed"]
    assert json.load(open(os.path.join(first, "status.json")))["attempts"] == 1


def _launch(sweep, *extra):
    """The sweep main with the gpu_node launcher in its dry-run mode (nothing runs)."""
    return subprocess.run(
        [sys.executable, "-m", "xft_jax.sweep", "--config=configs/paper.py",
         f"--sweep_dir={sweep}", "--config.launcher=gpu_node", "--config.probe=False",
         "--config.sources=('coqa',)", "--config.axes=('naturalness',)",
         "--config.variants=('label_only','explanation')", "--config.seeds=(0,)", *extra],
        cwd=ROOT, env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True,
        timeout=120)


def _finish(sweep, cell):
    root = os.path.join(sweep, cell.rel)
    os.makedirs(os.path.join(root, "eval"), exist_ok=True)
    open(os.path.join(root, "eval", "metrics.json"), "w").write("{}")
    open(os.path.join(root, "eval", "predictions.csv"), "w").write("id,gold,predicted\n")


def test_launcher_mode_writes_one_job_per_pending_cell(tmp_path):
    """With a launcher, each pending cell becomes a job script handed to launch/; a cell
    finished under the same settings is not resubmitted."""
    sweep = str(tmp_path)
    done = grid.Cell("coqa", "naturalness", "explanation", 0)
    first = _launch(sweep)
    assert first.returncode == 0, first.stderr[-2000:]
    assert '"submitted": 2' in first.stdout
    recorded = json.load(open(os.path.join(sweep, done.rel, grid.DEFINITION_FILE)))
    assert set(recorded) == {"train", "evaluate"}      # probe=False: no probe command
    assert recorded["train"]["data"]["target"] == "explanation"
    assert recorded["train"]["data"]["prompt_room"] == ["label_only", "explanation"]
    assert recorded["evaluate"]["data"]["split"] == "test"
    shutil.rmtree(os.path.join(sweep, "jobs"))
    _finish(sweep, done)
    out = _launch(sweep)
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = sorted(os.listdir(os.path.join(sweep, "jobs")))
    assert jobs == ["coqa__naturalness__label_only__seed0.sh"]
    script = open(os.path.join(sweep, "jobs", jobs[0])).read()
    assert "-m xft_jax.train" in script and "--config.data.target=label_only" in script
    assert "-m xft_jax.evaluate" in script and "xft_jax.probe" not in script
    launched = [l for l in out.stdout.splitlines() if l.startswith("+ ")]
    assert len(launched) == 1 and jobs[0] in launched[0]
    assert '"submitted": 1' in out.stdout and '"skipped": 1' in out.stdout


def test_a_finished_cell_is_not_reused_under_other_settings(tmp_path):
    """Changed settings (an override, or a cell finished with no record of its settings)
    stop the sweep before it writes or submits anything, naming the cell and the keys."""
    sweep = str(tmp_path)
    done = grid.Cell("coqa", "naturalness", "explanation", 0)
    assert _launch(sweep).returncode == 0
    shutil.rmtree(os.path.join(sweep, "jobs"))
    _finish(sweep, done)
    sweep_json = open(os.path.join(sweep, "sweep.json")).read()
    changed = _launch(sweep, '--config.overrides=("--config.optim.lr=0.001",)',
                      "--config.seeds=(0,1)")
    assert changed.returncode != 0
    err = changed.stderr
    assert f"{os.path.join(sweep, done.rel, grid.DEFINITION_FILE)}: finished under other " \
           f"settings" in err
    assert "train.optim.lr: 0.0002 -> 0.001" in err
    assert "label_only" not in err.split("RunMismatchError")[-1]   # unfinished: may change
    assert not os.path.exists(os.path.join(sweep, "jobs"))          # nothing submitted
    assert open(os.path.join(sweep, "sweep.json")).read() == sweep_json
    dry = subprocess.run(
        [sys.executable, "-m", "xft_jax.sweep", "--config=configs/paper.py", "--dry_run",
         f"--sweep_dir={sweep}", "--config.probe=False", "--config.sources=('coqa',)",
         "--config.axes=('naturalness',)", "--config.variants=('explanation',)",
         "--config.seeds=(0,)", _inputs(tmp_path, ["coqa"])[0],
         '--config.overrides=("--config.optim.lr=0.001", '
         f'"--config.model.path={tmp_path}/inputs/model")'],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"# {done.rel} [done under other settings: " in dry and "train.optim.lr" in dry
    os.remove(os.path.join(sweep, done.rel, grid.DEFINITION_FILE))   # results, no record
    unrecorded = _launch(sweep)
    assert unrecorded.returncode != 0 and f"has no {grid.DEFINITION_FILE}" in unrecorded.stderr
    # The same settings as recorded, mesh and paths aside, reuse the cell.
    grid.record_definition(sweep, done, json.loads(json.dumps(recorded_for(sweep, done))))
    again = _launch(sweep, "--config.overrides=('--config.mesh.fsdp=8',)")
    assert again.returncode == 0, again.stderr[-2000:]
    assert '"skipped": 1' in again.stdout


def recorded_for(sweep, cell):
    """The definition the sweep main records for ``cell`` under configs/paper.py's
    defaults, built by the library the main uses."""
    cmds = grid.cell_commands(cell, sweep, "configs/mistral_7b.py", "data/rated/{source}",
                              probe=False, prompt_room=("label_only", "explanation"))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return grid.commands_definition(cmds)
    finally:
        os.chdir(cwd)


def test_cells_leave_prompt_room_for_every_variant_of_the_sweep():
    """Each training command carries the sweep's variants as ``data.prompt_room`` (parsed
    by the real config flag, as the sweep resolves a cell's definition), and an explicit
    override still wins."""
    cell = grid.Cell("coqa", "naturalness", "label_only", 0)
    variants = ("label_only", "explanation", "random_vocab")

    def parsed(overrides=()):
        cmds = grid.cell_commands(cell, "/sweep", os.path.join(ROOT, "configs/tiny.py"),
                                  "", overrides, probe=False, prompt_room=variants,
                                  eval_config=os.path.join(ROOT, "configs/eval.py"))
        return grid.commands_definition(cmds)["train"]["data"]

    d = parsed()
    assert d["target"] == "label_only" and tuple(d["prompt_room"]) == variants
    assert tuple(parsed(["--config.data.prompt_room=()"])["prompt_room"]) == ()


def test_launcher_mode_submits_the_base_probe_once_per_setting(tmp_path):
    sweep = str(tmp_path)
    out = _launch(sweep, "--config.probe=True", *_inputs(tmp_path, ["coqa"]))
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = sorted(os.listdir(os.path.join(sweep, "jobs")))
    assert jobs == ["coqa__naturalness__base.sh", "coqa__naturalness__explanation__seed0.sh",
                    "coqa__naturalness__label_only__seed0.sh"]
    script = open(os.path.join(sweep, "jobs", jobs[0])).read()
    assert "-m xft_jax.probe" in script and "xft_jax.train" not in script
    assert f"--out={sweep}/coqa/naturalness/base/probe" in script
    assert sum(l.startswith("+ ") for l in out.stdout.splitlines()) == 3
    # The job marks its probe finished after it (set -e: only when the probe succeeded),
    # so the next sweep does not submit it again.
    probe_line, record_line = script.strip().splitlines()[-2:]
    assert "-m xft_jax.probe" in probe_line and "record_base_probe" in record_line
    out_dir = os.path.join(sweep, "coqa", "naturalness", "base", "probe")
    os.makedirs(out_dir)
    json.dump({"runs": []}, open(os.path.join(out_dir, "probe.json"), "w"))
    rec = subprocess.run(["bash", "-c", record_line], cwd=ROOT, capture_output=True, text=True)
    assert rec.returncode == 0, rec.stderr
    shutil.rmtree(os.path.join(sweep, "jobs"))
    again = _launch(sweep, "--config.probe=True", *_inputs(tmp_path, ["coqa"]))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "coqa__naturalness__base.sh" not in os.listdir(os.path.join(sweep, "jobs"))
    changed = _launch(sweep, "--config.probe=True", *_inputs(tmp_path, ["coqa"]),
                      f"--config.overrides=('--config.model.path={tmp_path}/inputs/model',"
                      "'--config.data.max_len=64')")               # other settings: again
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "coqa__naturalness__base.sh" in os.listdir(os.path.join(sweep, "jobs"))


def test_base_probe_runs_once_per_command_and_reports_failure(tmp_path):
    from xft_jax import sweep as sweep_main
    from xft_jax.study import probe_summary

    sweep, setting = str(tmp_path), ("coqa", "naturalness")
    out_dir = probe_summary.base_probe_dir(sweep, *setting)
    write = ("import json, os, sys; d = sys.argv[1]; "
             "open(os.path.join(d, 'calls'), 'a').write('x'); "
             "json.dump({'runs': []}, open(os.path.join(d, 'probe.json'), 'w'))")
    cmd = [sys.executable, "-c", write, out_dir]
    lines = []
    assert sweep_main.run_base_probe(sweep, setting, cmd, lines.append) is None
    assert sweep_main.base_probe_done(sweep, setting, cmd)
    assert sweep_main.run_base_probe(sweep, setting, cmd, lines.append) is None
    assert open(os.path.join(out_dir, "calls")).read() == "x"       # skipped the second time
    assert lines[-1] == "[sweep] finished earlier, skipped: coqa/naturalness/base"
    changed = cmd + ["--config.data.max_len=64"]                      # other settings: runs again
    assert not sweep_main.base_probe_done(sweep, setting, changed)
    assert sweep_main.run_base_probe(sweep, setting, changed, lines.append) is None
    assert open(os.path.join(out_dir, "calls")).read() == "xx"
    err = sweep_main.run_base_probe(sweep, setting, [sys.executable, "-c", "raise SystemExit(4)"])
    assert err.startswith("exit 4: ") and err.endswith(f"(see {out_dir}/log.txt)")
    assert not sweep_main.base_probe_done(sweep, setting, [sys.executable, "-c",
                                                            "raise SystemExit(4)"])
