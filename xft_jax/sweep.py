"""The study's sweep: one train + evaluate (+ probe) run per grid cell.

    python -m xft_jax.sweep --config=configs/paper.py --sweep_dir=runs/paper [--dry_run]

Finished cells are skipped on re-runs, failed ones retried (up to config.max_attempts)
and listed. A finished cell is skipped only under the settings it ran with (its
``cell.json``): when the configs its commands resolve to differ, the sweep stops before
running anything and names the cells and keys. With a launcher other than 'local', one
job script per pending cell is written under <sweep_dir>/jobs and submitted through
launch/.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys

from absl import flags, logging
from ml_collections import config_flags

from xft_jax import console, errors
from xft_jax.study import grid, probe_summary

_CONFIG = config_flags.DEFINE_config_file("config", "configs/paper.py", "Sweep config.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Directory of all cells.", required=True)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the cells and their commands only.")

LAUNCHERS = {"gpu_node": "launch/gpu_node.sh", "slurm": "launch/slurm.sbatch",
             "tpu_pod": "launch/tpu_pod.sh"}

console.define_flags()


def main(argv):
    del argv
    console.start(_CONFIG)
    c = _CONFIG.value
    sweep_dir = _SWEEP_DIR.value
    cell_list = grid.cells(c.sources, c.axes, c.variants, c.seeds)

    def commands_of(cell):
        return grid.cell_commands(cell, sweep_dir, c.train_config, c.data_path,
                                  list(c.overrides), c.probe,
                                  prompt_room=tuple(c.variants))

    @functools.cache
    def definition_of(cell):
        return grid.commands_definition(commands_of(cell))

    missing = show_inputs(cell_list, definition_of)
    if missing and (_DRY_RUN.value or c.launcher == "local"):
        print(f"error: {len(missing)} input path(s) missing: " + "; ".join(missing)
              + ". Fetch and rate the data (README: Data), download the model (README: "
              "The model), or point --config.data_path / --config.overrides at them.",
              file=sys.stderr)
        if not _DRY_RUN.value:
            return 2
    probes = base_probes(cell_list, sweep_dir, definition_of) if c.probe else []
    if _DRY_RUN.value:
        for setting, cmd in probes:
            state = "done" if base_probe_done(sweep_dir, setting, cmd) else "pending"
            print(f"base probe {os.path.join(*setting, probe_summary.BASE)} [{state}] (the "
                  f"untuned base, the probe's reference)")
            print(shlex.join(cmd))
        for cell in cell_list:
            state = "done" if grid.is_done(sweep_dir, cell, c.probe) else "pending"
            conflict = (state == "done" and
                        grid.definition_conflict(sweep_dir, cell, definition_of(cell)))
            if conflict:
                state = "done under other settings: " + conflict.replace("\n", " ")
            print(f"# {cell.rel} [{state}]")
            for cmd in commands_of(cell):
                print(shlex.join(cmd))
        print(f"{len(cell_list)} cells = {len(c.sources)} sources x {len(c.axes)} axes x "
              f"{len(c.variants)} variants x {len(c.seeds)} seeds")
        return 2 if missing else 0
    grid.check_definitions(sweep_dir, cell_list, definition_of, c.probe)  # before any write
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump({"sources": list(c.sources), "axes": list(c.axes),
                   "variants": list(c.variants), "seeds": list(c.seeds),
                   "probe": bool(c.probe), "train_config": c.train_config}, f, indent=2)
    if c.launcher == "local":
        with grid.CommandRunner() as runner:
            result = grid.run_local(cell_list, sweep_dir, commands_of, c.probe,
                                    c.max_attempts, log=logging.info,
                                    definition_of=definition_of, runner=runner)
            failed_probes = [f"{os.path.join(*s, probe_summary.BASE)} ({err})"
                             for s, cmd in probes
                             if (err := run_base_probe(sweep_dir, s, cmd, logging.info,
                                                       runner))]
        if runner.stopped:
            print(f"stopped by SIGTERM or Ctrl-C: {len(result['done'])} cell(s) finished in "
                  f"this invocation; rerun the same command to resume")
            return 0
    elif c.launcher in LAUNCHERS:
        result = submit_jobs(cell_list, sweep_dir, commands_of, c.probe, LAUNCHERS[c.launcher],
                             definition_of, probes)
        failed_probes = []
    else:
        raise ValueError(f"config.launcher={c.launcher!r}; expected local or one of "
                         f"{sorted(LAUNCHERS)}")
    summary = {k: [cell.rel for cell in v] for k, v in result.items()}
    print(json.dumps({k: len(v) for k, v in summary.items()}))
    for rel in summary.get("failed", []) + failed_probes:
        print(f"FAILED {rel}")
    if failed_probes:
        sys.exit(1)
    if summary.get("failed"):
        sys.exit(1)


def show_inputs(cell_list, definition_of) -> list[str]:
    """Prints the model and data paths the training runs will read (one resolved train
    config per source); returns the missing ones as "key (source): path"."""
    missing, seen = [], set()
    for cell in cell_list:
        if cell.source in seen:
            continue
        seen.add(cell.source)
        for key, path in grid.cell_inputs(definition_of(cell)["train"]).items():
            if key.startswith("model.") and key in seen:
                continue
            seen.add(key)
            where = f"{key} ({cell.source})" if key.startswith("data.") else key
            state = "MISSING" if grid.is_missing(path) else "found"
            print(f"input {where}: {path} [{state}]")
            if state == "MISSING":
                missing.append(f"{where}: {path}")
    return missing


def base_probes(cell_list, sweep_dir, definition_of) -> list[tuple[tuple[str, str], list]]:
    """[(setting, argv)]: the untuned base's probe per setting (source, axis), the reference
    curve of the report's probe section, on the model and test data of the setting's first
    cell (the setting's cells differ only in target and seed)."""
    out: dict[tuple[str, str], list[str]] = {}
    for cell in cell_list:
        if cell.setting not in out:
            out[cell.setting] = probe_summary.base_probe_command(
                sweep_dir, *cell.setting, definition_of(cell)["train"])
    return list(out.items())


def _probe_definition(cmd) -> list[str]:
    """What a base probe is recorded as finished under: its command, the interpreter
    aside (another venv's python runs the same probe)."""
    return list(cmd[1:])


def base_probe_done(sweep_dir, setting, cmd) -> bool:
    """Its probe.json exists and was written by the same command (the interpreter aside)."""
    return probe_summary.base_probe_done(probe_summary.base_probe_dir(sweep_dir, *setting),
                                         _probe_definition(cmd))


def run_base_probe(sweep_dir, setting, cmd, log=print,
                   runner: grid.CommandRunner | None = None) -> str | None:
    """Runs one base probe unless it is done under the same command; returns why it
    failed, or None (also when SIGTERM stopped it: see ``runner.stopped``)."""
    where = os.path.join(*setting, probe_summary.BASE)
    if base_probe_done(sweep_dir, setting, cmd):
        log(f"[sweep] finished earlier, skipped: {where}")
        return None
    if runner is None:
        with grid.CommandRunner() as own:
            return run_base_probe(sweep_dir, setting, cmd, log, own)
    if runner.stopped:
        return None
    out_dir = probe_summary.base_probe_dir(sweep_dir, *setting)
    os.makedirs(out_dir, exist_ok=True)
    error = runner.run([cmd], os.path.join(out_dir, "log.txt"))
    if error or runner.stopped:
        return error
    probe_summary.record_base_probe(out_dir, _probe_definition(cmd))
    log(f"[sweep] done: {where} (results in {out_dir})")
    return None


_RECORD = ("import json, sys; from xft_jax.study import probe_summary; "
           "probe_summary.record_base_probe(sys.argv[1], json.loads(sys.argv[2]))")


def _record_base_probe_command(sweep_dir, setting, cmd) -> list[str]:
    """The job's last command: marks the base probe finished under ``cmd``, as
    ``run_base_probe`` does locally (the job script stops at a failed probe first), so
    the next sweep skips it."""
    return [cmd[0], "-c", _RECORD, probe_summary.base_probe_dir(sweep_dir, *setting),
            json.dumps(_probe_definition(cmd))]


def submit_jobs(cell_list, sweep_dir, commands_of, probe, launcher, definition_of,
                probes=()):
    jobs = os.path.join(sweep_dir, "jobs")
    os.makedirs(jobs, exist_ok=True)
    result = {"submitted": [], "skipped": []}
    for setting, cmd in probes:
        if base_probe_done(sweep_dir, setting, cmd):
            continue
        script = os.path.join(jobs, "__".join((*setting, probe_summary.BASE)) + ".sh")
        with open(script, "w", encoding="utf-8") as f:
            f.write(grid.job_script(grid.Cell(*setting, probe_summary.BASE, 0),
                                    [cmd, _record_base_probe_command(sweep_dir, setting, cmd)]))
        os.chmod(script, 0o755)
        _submit(launcher, script)
    for cell in cell_list:
        if grid.is_done(sweep_dir, cell, probe):
            result["skipped"].append(cell)
            continue
        script = os.path.join(jobs, cell.rel.replace(os.sep, "__") + ".sh")
        with open(script, "w", encoding="utf-8") as f:
            f.write(grid.job_script(cell, commands_of(cell)))
        os.chmod(script, 0o755)
        grid.record_definition(sweep_dir, cell, definition_of(cell))
        _submit(launcher, script)
        result["submitted"].append(cell)
    return result


def _submit(launcher: str, script: str) -> None:
    cmd = (["sbatch", launcher, "--", "bash", script] if launcher.endswith(".sbatch")
           else ["bash", launcher, "--", "bash", script])
    logging.info("submitting %s", shlex.join(cmd))
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    errors.run_main(main)
