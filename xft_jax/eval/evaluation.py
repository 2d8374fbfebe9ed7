"""Evaluation behind ``python -m xft_jax.evaluate`` (and the model/data half of the probe).

A model comes from one of: a training workdir (orbax checkpoint of LoRA params on the
base named in its metadata, via ``training.restore.load_trained``), an HF base model plus
an optional PEFT adapter, or a merged HF checkpoint. Data come from the same pipeline as
training; fields the eval config leaves empty are taken from the run's own config, so by
default a run is evaluated on exactly its own test split (an export of a run carries its
config for this, ``training.export_run.RUN_FILE``). A training run is evaluated at
the checkpoint it selected on validation (``<workdir>/validation.json``) unless a step is
given; a run that recorded no validation curve, at its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from xft_jax import atomic, config_defaults
from xft_jax import lora as lora_lib
from xft_jax import sharding
from xft_jax.data import pipeline
from xft_jax.data.encode import ROOM_PERCENTILE, run_target_room
from xft_jax.data.splits import VALIDATION_FRACTION, build_splits
from xft_jax.data.targets import PAPER_VARIANTS, explanation_vocab, prompt_room
from xft_jax.errors import ConfigValueError
from xft_jax import console
from xft_jax.eval import batching, metrics, outputs, scoring
from xft_jax.models import generation
from xft_jax.models.tokenizer import load_tokenizer
from xft_jax.quantization import QuantConfig
from xft_jax.training import selection
from xft_jax.training.base_model import load_base, tokenizer_path
from xft_jax.training.export_run import RUN_FILE
from xft_jax.training.restore import check_finished, load_trained

# Used only when neither the eval config nor a training run says (config_defaults).
DATA_DEFAULTS = {"source": "synthetic", "axis": "naturalness", "target": "label_only",
                 "max_len": 1024, "seed": 0, "prompt_room": PAPER_VARIANTS,
                 "validation_fraction": VALIDATION_FRACTION,
                 "prompt_room_percentile": ROOM_PERCENTILE, "chat_template": False,
                 "rubric": True}
SCORED_TARGET = "label_only"   # eval rows: prompt + label (see eval_batches)
DATA_KEYS = ("source", "path", "axis", "target", "max_len", "seed", "num_train", "num_test",
             "num_synthetic", "prompt_room", "validation_fraction", "prompt_room_percentile",
             "chat_template", "rubric")
SPLITS = ("test", "validation", "train")


@dataclasses.dataclass
class Loaded:
    model: Any                      # xft_jax.models.Decoder (LoRA attached or not)
    tokenizer: Any
    run_config: Any                 # the training run's ConfigDict, or None
    info: dict                      # what was loaded, for metrics.json


def load_model(mc, mesh) -> Loaded:
    """The model named by ``config.model`` (see module doc), placed on ``mesh``."""
    if bool(mc.workdir) == bool(mc.path):
        raise ConfigValueError("set exactly one of config.model.workdir (a training run) and "
                               "config.model.path (an HF base or merged checkpoint)")
    if mc.workdir:
        if mc.adapter:
            raise ConfigValueError("config.model.adapter is for config.model.path, not a workdir")
        step, chosen = checkpoint_step(mc.workdir, mc.step)
        model, meta, step = load_trained(mc.workdir, step, dtype=mc.dtype or None,
                                         mesh=mesh)
        run = config_defaults.with_defaults(meta["config"])
        base = meta["lora"]["base_model_path"]
        tok = mc.tokenizer or tokenizer_path(run, base)
        info = {"kind": "workdir", "workdir": os.path.abspath(mc.workdir), "step": int(step),
                "selected_by": chosen, "base_model_path": base,
                "lora": {k: meta["lora"].get(k) for k in ("rank", "alpha", "targets",
                                                          "rslora")}}
        return Loaded(model, load_tokenizer(tok), run, info)
    model = load_base(mc, mc.path, mesh, inference=True)
    info = {"kind": "merged_or_base", "path": os.path.abspath(mc.path),
            "quantization": QuantConfig.from_config(mc).kind}
    if mc.adapter:
        lora_lib.load_peft_adapter(model, mc.adapter, mesh)
        info.update(kind="base+adapter", adapter=os.path.abspath(mc.adapter))
    run, run_file = exported_run_config(mc.adapter or mc.path)
    if run_file:
        info["run_config_from"] = run_file
    return Loaded(model, load_tokenizer(mc.tokenizer or mc.path), run, info)


def exported_run_config(path: str):
    """(run config, its file) of a run exported by ``xft_jax.export`` to ``path``, else
    (None, None): an export is then evaluated on its run's own data by default, the
    same split as evaluating the run's workdir."""
    run_file = os.path.join(path, RUN_FILE)
    if not os.path.exists(run_file):
        return None, None
    try:
        with open(run_file, encoding="utf-8") as f:
            return config_defaults.with_defaults(json.load(f)["config"]), run_file
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigValueError(f"{run_file}: not a readable export record ({e!r})") from e


def checkpoint_step(workdir: str, step: int | None) -> tuple[int | None, str]:
    """(step to load, how it was chosen): the given step, else the run's best-validation
    step, else its latest (None) when it recorded no validation curve; without a given
    step the run must have finished (``restore.check_finished``)."""
    if step is not None:
        return int(step), "config.model.step"
    check_finished(workdir, "set --config.model.step=N")
    best = selection.selected_step(workdir)
    if best is None:
        return None, "latest checkpoint (the run recorded no validation curve)"
    return best, f"best validation accuracy ({selection.VALIDATION_FILE})"


def resolve_data(dc, run_config) -> ml_collections.ConfigDict:
    """Eval data fields: the eval config's own, else the run's, else the defaults."""
    run = run_config.data if run_config is not None else None
    out = ml_collections.ConfigDict()
    for k in DATA_KEYS:
        v = dc[k]
        if v in (None, ""):
            v = run[k] if run is not None else None
        if v in (None, "") and k in DATA_DEFAULTS:
            v = DATA_DEFAULTS[k]
        out[k] = v
    out.split = dc.split
    out.max_examples = dc.max_examples
    # Padding widths only (results equal up to float rounding): the run's, not a key of
    # the eval config, so the eval configs of finished studies are unchanged.
    out.bucket_step = int(run.get("bucket_step", 0)) if run is not None else 0
    return out


def eval_batches(d, tokenizer, batch_size: int):
    """pipeline.Batches over ``d.split`` (eval mode: padded rows, ``valid`` marks).

    Every row is encoded as prompt + label, whatever target the run trained on: the
    rating is read at ``label_pos``, so tokens after it cannot change it, and a longer
    training target would otherwise leave less room for the prompt (and drop other
    examples), so runs of different variants would be scored on different inputs. The
    prompt is cut as in training (``data.prompt_room``, the run's own by default), so an
    example is scored on the prompt the run would have trained on."""
    if d.split not in SPLITS:
        raise ConfigValueError(f"config.data.split={d.split!r}: expected one of {SPLITS}")
    splits = build_splits(d)
    examples = list(getattr(splits, d.split))[:d.max_examples]
    if not examples:
        raise ConfigValueError(f"{splits.origin}: the {d.split} split is empty")
    room = prompt_room(d)
    vocab = explanation_vocab(splits, d.axis, (d.target, *room))
    troom = run_target_room(d, splits, tokenizer, vocab)
    batches = pipeline.eval_batches(examples, tokenizer, axis=d.axis, variant=SCORED_TARGET,
                                    max_len=int(d.max_len), batch_size=batch_size,
                                    seed=int(d.seed), prompt_room=room, vocab=vocab,
                                    target_room=troom, chat_template=bool(d.chat_template),
                                    rubric=bool(d.rubric),
                                    process_index=0, process_count=1, sort_by_length=True,
                                    buckets=pipeline.length_buckets(
                                        int(d.max_len), step=int(d.bucket_step)))
    if batches.stats.kept == 0:
        raise ConfigValueError(
            f"{splits.origin}: none of the {len(examples)} {d.split} examples fits "
            f"data.max_len={d.max_len} (longest prompts are dropped, not cut); raise "
            f"--config.data.max_len")
    info = {"origin": splits.origin, "split": d.split, "examples": len(examples),
            "encode": batches.stats.to_dict(), "scored_target": SCORED_TARGET,
            "target_room": troom,
            **{k: d[k] for k in DATA_KEYS}}
    return batches, info


def score(loaded: Loaded, batches, batch_size: int, mesh) -> tuple[dict, dict]:
    """(collected results, timing) over every real example exactly once."""
    m = loaded.model
    fn = scoring.make_score_fn(m.config, m.forward_options(), batches.label_token_ids, mesh)
    params, lora = m.params(), m.lora_params()
    first_done, n_after, t0 = None, 0, time.perf_counter()
    parts = []
    bars = console.progress(batches, total=batches.num_batches, desc="evaluate")
    for r in scoring.score_batches(fn, params, lora, bars, batch_size, mesh,
                                   names=batches.example_ids):
        parts.append(r)
        if first_done is None:              # the first batch includes the compile
            first_done = time.perf_counter()
        else:
            n_after += len(r["id"])
    end = time.perf_counter()
    res = scoring.collect(parts, order=batches.example_ids)
    steady = end - first_done if first_done is not None else 0.0
    timing = {"wall_s": end - t0,
              "examples_per_s": (n_after / steady) if n_after and steady > 0
              else len(res["id"]) / max(end - t0, 1e-9),
              "examples_per_s_incl_compile": len(res["id"]) / max(end - t0, 1e-9)}
    return res, timing


def generate(loaded: Loaded, batches, batch_size: int, mesh, ec) -> dict[str, dict]:
    """{example id: {'text', 'label' (1..5 or None)}} from KV-cache decoding. The prompt is
    the scoring input up to and including ``label_pos`` (the template's "Rating: "), so
    the model writes the label digit and then its explanation."""
    m = loaded.model
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    fn = generation.make_generate_fn(
        m.config, m.forward_options(), max_new_tokens=int(ec.max_new_tokens),
        temperature=float(ec.temperature), top_p=float(ec.top_p), eos_id=tok.eos_token_id,
        pad_id=pad, mesh=mesh)
    params, lora = m.params(), m.lora_params()
    key = jax.random.key(int(ec.seed))

    def prompts(padded):
        ids_, seg, lp = (np.asarray(padded[k]) for k in ("input_ids", "segment_ids",
                                                           "label_pos"))
        rows = [ids_[b, :lp[b] + 1][seg[b, :lp[b] + 1] > 0] for b in range(batch_size)]
        pids, pmask = generation.left_pad(rows, pad, length=ids_.shape[1])
        return {"input_ids": pids, "attention_mask": pmask}

    def run(dev, i):
        return fn(params, lora, dev["input_ids"], dev["attention_mask"],
                  jax.random.fold_in(key, i))

    out: dict[str, dict] = {}
    for names, rows, _, res in batching.map_batches(
            run, batches, batch_size, mesh, keys=("input_ids", "attention_mask"),
            names=batches.example_ids, feed=prompts):
        toks, lengths = np.asarray(res["tokens"]), np.asarray(res["lengths"])
        for name, b in zip(names, rows):
            text = tok.decode(toks[b, :lengths[b]].tolist(), skip_special_tokens=True)
            out[name] = {"text": text, "label": generation.parse_label(text)}
    return out


def run_evaluation(config, out_dir: str) -> dict:
    """Loads, scores (and optionally generates), writes ``metrics.json`` and
    ``predictions.csv`` under ``out_dir`` (process 0 only); returns the metrics doc."""
    mesh = sharding.mesh_from_config(config.mesh)
    loaded = load_model(config.model, mesh)
    d = resolve_data(config.data, loaded.run_config)
    bs = batching.batch_size_for(mesh, int(config.eval.batch_size))
    batches, data_info = eval_batches(d, loaded.tokenizer, bs)
    res, timing = score(loaded, batches, bs, mesh)
    doc = {"metrics": metrics.rating_metrics(res["label"], np.exp(res["log_probs"])),
           "timing": timing, "model": loaded.info, "data": data_info, "batch_size": bs,
           "mesh": dict(mesh.shape), "label_token_ids": list(batches.label_token_ids),
           "devices": jax.device_count(), "platform": jax.devices()[0].platform}
    gen = None
    if config.eval.generate:
        t0 = time.perf_counter()
        gen = generate(loaded, batches, bs, mesh, config.eval)
        doc["generation"] = outputs.generation_summary(res, gen)
        doc["generation"].update(
            wall_s=time.perf_counter() - t0, max_new_tokens=int(config.eval.max_new_tokens),
            temperature=float(config.eval.temperature), top_p=float(config.eval.top_p))
    if jax.process_index() == 0:
        atomic.write_json(os.path.join(out_dir, "metrics.json"), doc, sort_keys=True)
        atomic.write_text(os.path.join(out_dir, "predictions.csv"),
                          outputs.predictions_csv(res, gen))
    return doc
