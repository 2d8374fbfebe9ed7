"""The demo's steps as library calls: base model -> LoRA runs on a generated rated corpus ->
eval -> probe (with the untuned base as reference) -> report. Every run lives in a grid
cell, so an interrupted demo resumes where it stopped."""

from __future__ import annotations

import copy
import json
import os
import sys
import time

from tqdm import tqdm

from xft_jax import config_defaults
from xft_jax.eval import evaluation, probe_runs
from xft_jax.data import synthetic
from xft_jax.models.bundled import bundled_model
from xft_jax.models.tokenizer import load_tokenizer, mistral_v1_tokenizer_dir
from xft_jax.study import grid, pretrain, probe_summary, report_io
from xft_jax.training import trainer
from xft_jax.training.preemption import Preemption

def eval_config(workdir: str, c):
    ec = config_defaults.eval_config()
    ec.model.workdir = workdir
    ec.eval.batch_size = int(c.eval.batch_size)
    ec.data.max_examples = c.eval.max_examples
    ec.mesh.fsdp = 1
    return ec


def cell_configs(c, cell: grid.Cell, base_dir: str, sweep_dir: str):
    """(train, evaluate, probe or None) configs of one demo cell."""
    workdir = os.path.join(sweep_dir, cell.rel, "train")
    tc = copy.deepcopy(c.train)
    with tc.unlocked():
        tc.model.path = base_dir
        tc.model.tokenizer = base_dir
        tc.data.source = c.source
        tc.data.axis = cell.axis
        tc.data.target = cell.variant
        tc.data.num_synthetic = int(c.num_items)
        tc.train.seed = cell.seed
    ec = eval_config(workdir, c)
    pc = None
    if c.probe:
        pc = copy.deepcopy(ec)
        pc.data.max_examples = int(c.eval.probe_examples)
    return tc, ec, pc


def cell_definition(c, cell: grid.Cell, base_dir: str, sweep_dir: str, base_model: dict) -> dict:
    """What a finished cell must have run under to be reused (``grid.DEFINITION_FILE``):
    its configs and the recipe of the base model it fine-tuned."""
    configs = cell_configs(c, cell, base_dir, sweep_dir)
    out = {name: json.loads(cfg.to_json_best_effort())
           for name, cfg in zip(("train", "evaluate", "probe"), configs) if cfg is not None}
    out["base_model"] = base_model
    return out


def run_cell(c, cell: grid.Cell, base_dir: str, sweep_dir: str, log=print) -> int | None:
    """Trains, evaluates and probes one cell; returns the step training stopped at when a
    SIGTERM or Ctrl-C stopped it (nothing is evaluated then), else None."""
    root = os.path.join(sweep_dir, cell.rel)
    tc, ec, pc = cell_configs(c, cell, base_dir, sweep_dir)
    result = trainer.train(tc, ec.model.workdir)
    if result.status != "done":
        return result.step
    evaluation.run_evaluation(ec, os.path.join(root, "eval"))
    if pc is not None:
        probe_runs.run_probes(pc, os.path.join(root, "probe"), [ec.model.workdir])
    return None


def base_probe_config(c, axis: str, base_dir: str, sweep_dir: str):
    """The probe config of the untuned base on ``axis``: the cells' probe config pointed
    at the base with the axis's first run's model and data settings
    (``probe_summary.base_probe_settings``, as the sweep's base probe)."""
    tc, _, pc = cell_configs(c, grid.Cell(c.source, axis, c.variants[0], c.seeds[0]),
                             base_dir, sweep_dir)
    bc = copy.deepcopy(pc)
    settings = probe_summary.base_probe_settings(json.loads(tc.to_json_best_effort()))
    bc.model.workdir = ""
    bc.lock()                                 # a key the eval config lacks fails here
    for key, value in settings.items():
        section, leaf = key.split(".")
        bc[section][leaf] = value
    return bc


def run_base_probe(c, axis: str, base_dir: str, sweep_dir: str) -> None:
    """Probes the untuned base once per axis (again only when its settings changed)."""
    bc = base_probe_config(c, axis, base_dir, sweep_dir)
    out_dir = probe_summary.base_probe_dir(sweep_dir, c.source, axis)
    definition = json.loads(bc.to_json_best_effort())
    if probe_summary.base_probe_done(out_dir, definition):
        return
    probe_runs.run_base_probe(bc, out_dir)
    probe_summary.record_base_probe(out_dir, definition)


def base_of(c, out: str) -> tuple[str, dict]:
    """(HF directory of the base model, its identity for cell.json): the bundled real
    model (converted once into the cache) or the toy base, known from its recipe before
    it is pre-trained."""
    if c.base != "toy":
        path = bundled_model(c.base)
        return path, {"bundled": c.base, "dir": os.path.basename(path)}
    tok = load_tokenizer(mistral_v1_tokenizer_dir(os.path.join(out, "tokenizer")))
    recipe = pretrain.PretrainRecipe(**c.pretrain.to_dict())
    return os.path.join(out, "base_model"), recipe.identity(len(tok), _toy_data_tag(recipe))


def _toy_data_tag(recipe) -> str:
    return f"synthetic-dialogues:{recipe.num_texts}:{recipe.seed}"


def pretrain_toy_base(c, out: str, base_dir: str, log=print) -> None:
    """Pre-trains the toy base once (a cached one with the same recipe is reused)."""
    tok = load_tokenizer(mistral_v1_tokenizer_dir(os.path.join(out, "tokenizer")))
    recipe = pretrain.PretrainRecipe(**c.pretrain.to_dict())
    texts = synthetic.pretraining_texts(recipe.num_texts, seed=recipe.seed)
    pretrain.pretrain(texts, tok, recipe, base_dir, data_tag=_toy_data_tag(recipe), log=log)


def run_demo(c, log=print) -> dict:
    t0 = time.time()
    out = os.path.abspath(c.out)
    os.makedirs(out, exist_ok=True)
    sweep_dir = os.path.join(out, "runs")
    cells = grid.cells([c.source], c.axes, c.variants, c.seeds)
    base_dir, base_model = base_of(c, out)
    log(f"[demo] base model: {c.base} ({base_dir})")

    def definition_of(cell):
        return cell_definition(c, cell, base_dir, sweep_dir, base_model)

    # Before the base model is rebuilt for a changed recipe: runs that fine-tuned the old
    # one must not be lost or reported under the new settings.
    grid.check_definitions(sweep_dir, cells, definition_of, c.probe)
    if c.base == "toy":
        pretrain_toy_base(c, out, base_dir, log)
    t_pre = time.time() - t0
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump({"sources": [c.source], "axes": list(c.axes), "variants": list(c.variants),
                   "seeds": list(c.seeds), "probe": bool(c.probe)}, f, indent=2)

    def stop(where, msg):
        tqdm.write(msg, file=sys.stderr)
        # The stopped invocation's time counts towards the study's (timing.json).
        report_io.record_timing(sweep_dir, cells, t0, t_pre, base_dir)
        return {"report": msg, "report_dir": None, "majority": None,
                "seconds": time.time() - t0, "stopped": where}

    # SIGTERM or Ctrl-C while a run trains: the trainer saves and returns. While one is
    # evaluated or probed, or the base probed: that step finishes, then the demo stops.
    with Preemption("stopping after this run's evaluation and probe") as signalled:
        for cell in tqdm(cells, desc="demo runs", unit="run"):
            if grid.is_done(sweep_dir, cell, c.probe):
                tqdm.write(f"[demo] finished earlier, skipped: "
                           f"{grid.score_line(sweep_dir, cell)}", file=sys.stderr)
                continue
            if signalled.flag:
                return stop(cell.rel, f"[demo] stopped by SIGTERM or Ctrl-C before "
                                      f"{cell.rel}; the same command resumes there")
            log(f"[demo] {cell.rel}: LoRA fine-tuning, evaluation"
                + (", probe" if c.probe else ""))
            grid.record_definition(sweep_dir, cell, definition_of(cell))
            stopped = run_cell(c, cell, base_dir, sweep_dir, log)
            if stopped is not None:
                return stop(cell.rel, f"[demo] stopped by SIGTERM or Ctrl-C in {cell.rel} "
                                      f"at step {stopped} (saved); the same command "
                                      f"resumes it")
            tqdm.write(f"[demo] done: {grid.score_line(sweep_dir, cell)}", file=sys.stderr)
        for axis in (c.axes if c.probe else ()):
            if signalled.flag:
                return stop("base probe", "[demo] stopped by SIGTERM or Ctrl-C before the "
                                          "base probe; the same command resumes there")
            run_base_probe(c, axis, base_dir, sweep_dir)
    report_dir = os.path.join(out, "report")
    report_io.record_timing(sweep_dir, cells, t0, t_pre, base_dir)
    text = report_io.write_report(
        sweep_dir, report_dir, [c.source], c.axes, c.variants, c.seeds,
        probe_summary=probe_summary.summarize if c.probe else None)
    return {"report": text, "report_dir": report_dir,
            "majority": report_io.majority_rates(sweep_dir, cells),
            "seconds": time.time() - t0}


__all__ = ["run_demo", "run_cell", "cell_configs", "cell_definition"]
