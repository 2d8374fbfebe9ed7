"""The study's grid: sources x axes x target variants x seeds, one cell per run.

A cell is a directory ``<sweep_dir>/<source>/<axis>/<variant>/seed<k>`` holding ``train/``
(the training workdir), ``eval/`` (metrics.json, predictions.csv), ``probe/``,
``status.json`` and ``cell.json`` (the resolved configs it runs under). A finished cell is
skipped on re-runs, but only under the configs it ran with: a re-run that asks for other
settings stops with the keys that differ instead of reporting old results under new
settings. A failed cell is retried up to a limit and listed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Iterable, Sequence

from xft_jax import atomic
from xft_jax.data.sources import GENERATED
from xft_jax.data.targets import PAPER_VARIANTS  # noqa: F401 (part of this module's API)
from xft_jax.training import run_identity
from xft_jax.training.preemption import HandlesStopSignals

SOURCES = ("chatbot_arena", "hh_rlhf_chosen", "hh_rlhf_rejected", "amazon_qa", "coqa",
           "cornell_movie")
AXES = ("naturalness", "comprehensiveness", "on_topic")
DEFINITION_FILE = "cell.json"


@dataclasses.dataclass(frozen=True)
class Cell:
    source: str
    axis: str
    variant: str
    seed: int

    @property
    def rel(self) -> str:
        return os.path.join(self.source, self.axis, self.variant, f"seed{self.seed}")

    @property
    def setting(self) -> tuple[str, str]:
        return self.source, self.axis


def cells(sources: Sequence[str], axes: Sequence[str], variants: Sequence[str],
          seeds: Sequence[int]) -> list[Cell]:
    return [Cell(s, a, v, int(k)) for s, a, v, k in itertools.product(sources, axes, variants, seeds)]


def cell_commands(cell: Cell, sweep_dir: str, train_config: str, data_path_template: str,
                  overrides: Sequence[str] = (), probe: bool = True,
                  python: str = sys.executable,
                  eval_config: str = "configs/eval.py",
                  prompt_room: Sequence[str] | None = None) -> list[list[str]]:
    """train -> evaluate (-> probe) commands of one cell, as argv lists.

    prompt_room: the sweep's variants, so every cell's prompts leave room for each of
    their targets and the cells of one setting differ only in the target (an override of
    ``data.prompt_room`` in ``overrides`` replaces it)."""
    root = os.path.join(sweep_dir, cell.rel)
    data_path = data_path_template.format(source=cell.source) if data_path_template else ""
    cfg = [f"--config={train_config}",
           f"--config.data.source={cell.source}",
           f"--config.data.path={data_path}",
           f"--config.data.axis={cell.axis}",
           f"--config.data.target={cell.variant}",
           f"--config.train.seed={cell.seed}"]
    # Only when no override sets it: repeated tuple flags concatenate instead of replacing.
    if prompt_room is not None and not any(
            o.startswith("--config.data.prompt_room=") for o in overrides):
        cfg.append(f"--config.data.prompt_room={tuple(prompt_room)!r}")
    cfg += list(overrides)
    cmds = [[python, "-m", "xft_jax.train", f"--workdir={root}/train", *cfg],
            [python, "-m", "xft_jax.evaluate", f"--config={eval_config}", f"--out={root}/eval",
             f"--config.model.workdir={root}/train", "--config.data.split=test"]]
    if probe:
        cmds.append([python, "-m", "xft_jax.probe", f"--config={eval_config}",
                     f"--out={root}/probe", f"--workdirs={root}/train"])
    return cmds


def resolved_config(config_args: Sequence[str]) -> dict:
    """The config that ``--config=...`` / ``--config.key=...`` arguments give a main,
    parsed by ml_collections' own flag parser, as JSON-like data."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["xft_jax", *config_args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return json.loads(fv["config"].value.to_json_best_effort())


def commands_definition(cmds: Sequence[Sequence[str]]) -> dict:
    """{"train": config, "evaluate": config, "probe": config} that a cell's commands
    (``cell_commands``) run under."""
    out = {}
    for cmd in cmds:
        module = cmd[list(cmd).index("-m") + 1].rsplit(".", 1)[-1]
        out[module] = resolved_config([a for a in cmd if a.startswith("--config")])
    return out


def cell_inputs(train_config: dict) -> dict[str, str]:
    """The paths a cell's training run reads, by config key (unset ones left out)."""
    m, d = train_config["model"], train_config["data"]
    keys = {"model.path": m.get("path"), "model.tokenizer": m.get("tokenizer"),
            "data.path": d.get("path") if d.get("source") not in GENERATED else None}
    return {k: str(v) for k, v in keys.items() if v}


def is_missing(path: str) -> bool:
    """A local path that does not exist (remote URLs such as gs:// are not checked)."""
    return "://" not in path and not os.path.exists(path)


def definition_conflict(sweep_dir: str, cell: Cell, definition: dict) -> str | None:
    """Why the finished ``cell`` cannot stand for ``definition`` (it ran under other
    settings, or recorded none); None when it can."""
    path = os.path.join(sweep_dir, cell.rel, DEFINITION_FILE)
    if not os.path.exists(path):
        return (f"{os.path.join(sweep_dir, cell.rel)}: finished, but has no {DEFINITION_FILE} "
                f"recording the settings it ran under")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    diffs = run_identity.cell_differences(saved, definition)
    return run_identity.mismatch_message(
        f"{path}: finished under other settings (recorded -> requested)", diffs,
        remedy="") if diffs else None


def check_definitions(sweep_dir: str, cell_list: Iterable[Cell], definition_of,
                      probe: bool) -> None:
    """Raises RunMismatchError, before anything runs or is written, when a finished cell
    would be skipped although it ran under other settings than ``definition_of(cell)``."""
    conflicts = [m for cell in cell_list if is_done(sweep_dir, cell, probe)
                 and (m := definition_conflict(sweep_dir, cell, definition_of(cell)))]
    if conflicts:
        more = [f"... and {len(conflicts) - 5} more cells"] if len(conflicts) > 5 else []
        raise run_identity.RunMismatchError(
            "\n".join(conflicts[:5] + more) + "\nSkipping these cells would report their "
            "results under settings they never ran. Run the changed study in a new "
            "directory, or move these cells away to run them again.")


def record_definition(sweep_dir: str, cell: Cell, definition: dict) -> None:
    atomic.write_json(os.path.join(sweep_dir, cell.rel, DEFINITION_FILE), definition)


def read_status(sweep_dir: str, cell: Cell) -> dict:
    path = os.path.join(sweep_dir, cell.rel, "status.json")
    if not os.path.exists(path):
        return {"state": "pending", "attempts": 0}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_status(sweep_dir: str, cell: Cell, status: dict) -> None:
    atomic.write_json(os.path.join(sweep_dir, cell.rel, "status.json"), status)


def is_done(sweep_dir: str, cell: Cell, probe: bool) -> bool:
    """Done means its outputs exist, so cells finished by a launched job count too."""
    root = os.path.join(sweep_dir, cell.rel)
    needed = [os.path.join(root, "eval", "metrics.json"), os.path.join(root, "eval", "predictions.csv")]
    if probe:
        needed.append(os.path.join(root, "probe", "probe.json"))
    return all(os.path.exists(p) for p in needed)


def score_line(sweep_dir: str, cell: Cell) -> str:
    """One line for a finished cell: its test scores and where its results are."""
    eval_dir = os.path.join(sweep_dir, cell.rel, "eval")
    try:
        with open(os.path.join(eval_dir, "metrics.json"), encoding="utf-8") as f:
            m = json.load(f)["metrics"]
        scores = (f"accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} "
                  f"on {m['n']} test examples")
    except (OSError, ValueError, KeyError, TypeError) as e:
        scores = f"no readable scores ({type(e).__name__})"
    return f"{cell.rel}: {scores}; results in {eval_dir}"


class CommandRunner(HandlesStopSignals):
    """Runs a cell's commands one after another, their output appended to a log.

    Used as a context manager: while active, SIGTERM (a preempted job) or Ctrl-C is passed
    on to the running command as SIGTERM, where a training run saves its checkpoint and
    exits, and ``stopped`` turns True, so the caller runs nothing more and records the try
    as interrupted, not failed: an interruption costs none of a cell's ``max_attempts``.
    (Ctrl-C in a terminal reaches the command too; a training run counts the two as one
    request to stop.)"""

    def __init__(self):
        self.stopped = False
        self._child: subprocess.Popen | None = None

    def _handle(self, signum, frame):
        self.stopped = True
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)

    def run(self, cmds: Sequence[Sequence[str]], log_path: str) -> str | None:
        """Runs ``cmds`` until one fails or SIGTERM arrives; returns why one failed, or
        None (also when stopped: check ``stopped``)."""
        with open(log_path, "a", encoding="utf-8") as logf:
            for cmd in cmds:
                if self.stopped:
                    return None
                logf.write("$ " + shlex.join(cmd) + "\n")
                logf.flush()
                self._child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
                if self.stopped:      # SIGTERM came while the command was being started
                    self._child.send_signal(signal.SIGTERM)
                try:
                    rc = self._child.wait()
                finally:
                    self._child = None
                if self.stopped:
                    logf.write(f"[sweep] stopped by a signal after this command (exit {rc})\n")
                    return None
                if rc != 0:
                    return f"exit {rc}: {shlex.join(cmd[:4])} ... (see {log_path})"
        return None


def run_local(cell_list: Iterable[Cell], sweep_dir: str, commands_of, probe: bool,
              max_attempts: int = 2, log=print, definition_of=None,
              runner: CommandRunner | None = None) -> dict[str, list[Cell]]:
    """Runs pending and failed cells one after another; returns done/failed/skipped/
    interrupted lists. With ``definition_of``, each cell it runs records its definition;
    check the finished ones against it first (``check_definitions``). SIGTERM stops it
    after the running command (``CommandRunner``); the re-run resumes that cell."""
    if runner is None:
        with CommandRunner() as own:
            return run_local(cell_list, sweep_dir, commands_of, probe, max_attempts, log,
                             definition_of, own)
    result = {"done": [], "failed": [], "skipped": [], "interrupted": []}
    for cell in cell_list:
        if runner.stopped:
            break
        status = read_status(sweep_dir, cell)
        if is_done(sweep_dir, cell, probe):
            log(f"[sweep] finished earlier, skipped: {score_line(sweep_dir, cell)}")
            result["skipped"].append(cell)
            continue
        if status["state"] == "failed" and status["attempts"] >= max_attempts:
            log(f"[sweep] {cell.rel}: failed {status['attempts']} times, not retried")
            result["failed"].append(cell)
            continue
        attempts = status["attempts"] + 1
        write_status(sweep_dir, cell, {"state": "running", "attempts": attempts,
                                       "started": time.time()})
        os.makedirs(os.path.join(sweep_dir, cell.rel), exist_ok=True)
        if definition_of is not None:
            record_definition(sweep_dir, cell, definition_of(cell))
        error = runner.run(commands_of(cell), os.path.join(sweep_dir, cell.rel, "log.txt"))
        if runner.stopped:
            write_status(sweep_dir, cell, {"state": "interrupted",
                                           "attempts": status["attempts"]})
            log(f"[sweep] {cell.rel}: stopped by SIGTERM or Ctrl-C (a training run saves "
                f"its checkpoint); the same command resumes it")
            result["interrupted"].append(cell)
            break
        if not error and not is_done(sweep_dir, cell, probe):
            error = "commands succeeded but eval/metrics.json, eval/predictions.csv" + (
                " or probe/probe.json" if probe else "") + " is missing"
        if error:
            write_status(sweep_dir, cell, {"state": "failed", "attempts": attempts, "error": error})
            log(f"[sweep] {cell.rel}: FAILED ({error})")
            result["failed"].append(cell)
        else:
            write_status(sweep_dir, cell, {"state": "done", "attempts": attempts,
                                           "finished": time.time()})
            log(f"[sweep] done: {score_line(sweep_dir, cell)}")
            result["done"].append(cell)
    return result


def job_script(cell: Cell, cmds: list[list[str]]) -> str:
    """A bash script running one cell, for launch/ (GPU node, SLURM, TPU pod)."""
    lines = ["#!/usr/bin/env bash", "set -euo pipefail", f"# cell {cell.rel}"]
    lines += [shlex.join(c) for c in cmds]
    return "\n".join(lines) + "\n"
