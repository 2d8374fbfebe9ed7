"""The demo's steps as library calls: corpus -> base model -> LoRA runs -> eval -> probe ->
report. Every run lives in a grid cell, so an interrupted demo resumes where it stopped."""

from __future__ import annotations

import copy
import json
import os
import sys
import time

from tqdm import tqdm

from xft_jax import atomic, config_defaults
from xft_jax.eval import evaluation, probe_runs
from xft_jax.data import synthetic
from xft_jax.models.tokenizer import load_tokenizer, mistral_v1_tokenizer_dir
from xft_jax.study import grid, pretrain, probe_summary, report_io
from xft_jax.training import selection, trainer

SOURCE = "synthetic"


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
        tc.data.source = SOURCE
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


def run_cell(c, cell: grid.Cell, base_dir: str, sweep_dir: str, log=print) -> None:
    root = os.path.join(sweep_dir, cell.rel)
    tc, ec, pc = cell_configs(c, cell, base_dir, sweep_dir)
    trainer.train(tc, ec.model.workdir)
    evaluation.run_evaluation(ec, os.path.join(root, "eval"))
    if pc is not None:
        probe_runs.run_probes(pc, os.path.join(root, "probe"), [ec.model.workdir])


def majority_rates(sweep_dir: str, cells) -> dict[str, float]:
    """Majority-class rate of each axis's evaluated examples (from gold_distribution)."""
    rates = {}
    for cell in cells:
        path = os.path.join(sweep_dir, cell.rel, "eval", "metrics.json")
        if os.path.exists(path) and cell.axis not in rates:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            m = doc.get("metrics", doc)
            rates[cell.axis] = float(max(m["gold_distribution"]))
    return rates


def selected_steps(sweep_dir: str, cells) -> list[str]:
    """One line per run: the step selected on validation and its validation accuracy."""
    out = []
    for cell in cells:
        doc = selection.read(os.path.join(sweep_dir, cell.rel, "train"))
        if doc is not None and doc.get("best_step") is not None:
            out.append(f"{cell.variant} seed {cell.seed}: step {doc['best_step']} of "
                       f"{doc['curve'][-1]['step']} (validation accuracy "
                       f"{doc['best_accuracy']:.3f})")
    return out


def run_demo(c, log=print) -> dict:
    t0 = time.time()
    out = os.path.abspath(c.out)
    os.makedirs(out, exist_ok=True)
    tok_dir = mistral_v1_tokenizer_dir(os.path.join(out, "tokenizer"))
    tok = load_tokenizer(tok_dir)
    recipe = pretrain.PretrainRecipe(**c.pretrain.to_dict())
    data_tag = f"synthetic-dialogues:{recipe.num_texts}:{recipe.seed}"
    base_dir, sweep_dir = os.path.join(out, "base_model"), os.path.join(out, "runs")
    cells = grid.cells([SOURCE], c.axes, c.variants, c.seeds)
    base_model = recipe.identity(len(tok), data_tag)

    def definition_of(cell):
        return cell_definition(c, cell, base_dir, sweep_dir, base_model)

    # Before the base model is rebuilt for a changed recipe: runs that fine-tuned the old
    # one must not be lost or reported under the new settings.
    grid.check_definitions(sweep_dir, cells, definition_of, c.probe)
    texts = synthetic.pretraining_texts(recipe.num_texts, seed=recipe.seed)
    pretrain.pretrain(texts, tok, recipe, base_dir, data_tag=data_tag, log=log)
    t_pre = time.time() - t0
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump({"sources": [SOURCE], "axes": list(c.axes), "variants": list(c.variants),
                   "seeds": list(c.seeds), "probe": bool(c.probe)}, f, indent=2)
    for cell in tqdm(cells, desc="demo runs", unit="run"):
        if grid.is_done(sweep_dir, cell, c.probe):
            tqdm.write(f"[demo] finished earlier, skipped: {grid.score_line(sweep_dir, cell)}",
                       file=sys.stderr)
            continue
        log(f"[demo] {cell.rel}: LoRA fine-tuning, evaluation" + (", probe" if c.probe else ""))
        grid.record_definition(sweep_dir, cell, definition_of(cell))
        run_cell(c, cell, base_dir, sweep_dir, log)
        tqdm.write(f"[demo] done: {grid.score_line(sweep_dir, cell)}", file=sys.stderr)
    report_dir = os.path.join(out, "report")
    text = report_io.write_report(
        sweep_dir, report_dir, [SOURCE], c.axes, c.variants, c.seeds,
        probe_summary=probe_summary.summarize if c.probe else None)
    majority = majority_rates(sweep_dir, cells)
    with open(os.path.join(base_dir, "pretrain.json"), encoding="utf-8") as f:
        pre = json.load(f)
    extra = ["", "## Baselines and timing", ""]
    extra += [f"- majority-class rate on the evaluated {axis} examples: {r:.3f}"
              for axis, r in majority.items()]
    steps = selected_steps(sweep_dir, cells)
    if steps:
        extra += ["- checkpoints scored on test, selected by validation accuracy: "
                  + "; ".join(steps)]
    extra += [f"- base model pre-training: LM loss {pre['first_loss']:.2f} -> "
              f"{pre['last_loss']:.2f} ({recipe.steps} steps; cached after the first run)",
              f"- wall time: {time.time() - t0:.0f} s (of which pre-training or cache check "
              f"{t_pre:.0f} s)"]
    text = text + "\n".join(extra) + "\n"
    atomic.write_text(os.path.join(report_dir, "report.md"), text)
    return {"report": text, "report_dir": report_dir, "majority": majority,
            "seconds": time.time() - t0}


__all__ = ["run_demo", "run_cell", "cell_configs", "cell_definition", "majority_rates"]
