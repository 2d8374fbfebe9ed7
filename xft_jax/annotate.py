r"""Rates a source's conversations with an LLM ensemble and writes JSONL + a TFDS dataset.

    python -m xft_jax.annotate --source=hh_rlhf_chosen --path=data/hh-rlhf/train.jsonl.gz \
        --annotators=annotators.json --summarizer=mixtral --out_dir=rated/

annotators.json is a list of OpenAI-compatible endpoints (keys come from the environment
variables they name, never from the file) and/or local xft_jax checkpoints:

    [{"name": "mixtral", "base_url": "http://localhost:8000/v1",
      "model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "api_key_env": "VLLM_KEY"},
     {"type": "local", "name": "mistral7b", "path": "/models/Mistral-7B-Instruct-v0.2",
      "dtype": "bfloat16", "max_new_tokens": 128}]

Each item is rated per axis by every annotator under four prompt variants; answers are
cached in --cache, so rerunning after a crash or Ctrl-C sends no request twice. For
``--source=synthetic`` without --annotators, the corpus's simulated ensemble is used.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

from xft_jax import errors

from xft_jax import console
from xft_jax.data import (annotation, export, local_annotator, openai_client, sources, splits,
                          synthetic)
from xft_jax.data.annotation_prompts import VARIANTS
from xft_jax.data.readers import LoadReport

_SOURCE = flags.DEFINE_enum("source", None, sorted(sources.SOURCES), "Source to rate.")
_PATH = flags.DEFINE_string("path", None, "Local file/dir in the source's schema (default: "
                                          "the Hugging Face Hub dataset).")
_LIMIT = flags.DEFINE_integer("limit", None, "Read at most this many conversations.")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", ["raise", "skip"],
                              "Bad input rows: stop with file:line, or skip and count them.")
_ANNOTATORS = flags.DEFINE_string("annotators", None, "JSON file listing the annotators.")
_SUMMARIZER = flags.DEFINE_string("summarizer", None, "Annotator name that summarises the "
                                  "explanations (default: the one closest to consensus).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory.")
_CACHE = flags.DEFINE_string("cache", None, "Answer cache (default: <out_dir>/cache.sqlite).")
_NUM_TRAIN = flags.DEFINE_integer("num_train", splits.PAPER_NUM_TRAIN, "Train items sampled.")
_NUM_TEST = flags.DEFINE_integer("num_test", splits.PAPER_NUM_TEST, "Test items sampled.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Prompt variants to ask.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 8, "Requests in flight at most.")
_TIMEOUT = flags.DEFINE_float("timeout", 60.0, "Seconds per HTTP request.")
_MAX_RETRIES = flags.DEFINE_integer("max_retries", 5, "Retries on 429/5xx/timeouts.")
_BACKOFF = flags.DEFINE_float("backoff", 1.0, "First retry delay in seconds (doubles).")
_TFDS = flags.DEFINE_bool("tfds", True, "Also build the TFDS (array_record) dataset.")
_NUM_SYNTHETIC = flags.DEFINE_integer("num_synthetic", synthetic.DEFAULT_NUM_ITEMS,
                                      "Items generated for --source=synthetic.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic corpus.")
_MAX_FAILED_FRACTION = flags.DEFINE_float(
    "max_failed_fraction", 0.05, "Stop without writing when more than this fraction of "
    "the annotation requests failed (network, HTTP errors); 0 tolerates none.")


def _load_annotators(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        try:
            cfgs = json.load(f)
        except json.JSONDecodeError as e:
            raise errors.ConfigValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(cfgs, list) or not cfgs:
        raise errors.ConfigValueError(f"{path}: expected a non-empty JSON list of annotators")
    defaults = {"timeout": _TIMEOUT.value, "max_retries": _MAX_RETRIES.value,
                "backoff": _BACKOFF.value}
    try:
        return [local_annotator.from_config(c) if isinstance(c, dict) and c.get("type") == "local"
                else openai_client.from_config(c, **defaults) for c in cfgs]
    except (ValueError, OSError) as e:
        raise errors.ConfigValueError(f"{path}: {e}") from None


def check_failures(report: annotation.AnnotationReport, max_fraction: float) -> None:
    """Stops (before anything is written) when no item was rated, or when more than
    ``max_fraction`` of the requests sent failed; the failures are named by kind."""
    failed = sum(report.failed.values())
    sent = report.requests
    kinds = ", ".join(f"{n} x {k}" for k, n in sorted(report.failed.items())) or "none"
    if report.items and not report.rated:
        raise AnnotationFailedError(f"no item was rated ({report.items} items, {failed} of "
                                    f"{sent} requests failed: {kinds}); nothing written")
    if sent and failed / sent > max_fraction:
        raise AnnotationFailedError(
            f"{failed} of {sent} annotation requests failed ({kinds}), more than "
            f"--max_failed_fraction={max_fraction}; nothing written. Answers received are "
            f"cached: fix the endpoint and rerun")


class AnnotationFailedError(errors.UserError, RuntimeError):
    """Too many annotation requests failed for the result to stand for the ensemble."""

console.define_flags(with_config=False)


def main(argv):
    del argv
    console.start()
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    source, out_dir = _SOURCE.value, _OUT_DIR.value
    summary: dict = {"source": source, "path": _PATH.value}
    if source == "synthetic" and not _ANNOTATORS.value:
        examples = synthetic.generate(_NUM_SYNTHETIC.value, _SEED.value)
        parts = splits.sample_split(examples, _NUM_TRAIN.value, _NUM_TEST.value)
        summary["annotation"] = {"simulated": [a[0] for a in synthetic.ANNOTATORS],
                                 "seed": _SEED.value, "items": len(examples)}
    else:
        if not _ANNOTATORS.value:
            raise errors.ConfigValueError("--annotators is required for real sources")
        annotators = _load_annotators(_ANNOTATORS.value)
        by_name = {a.name: a for a in annotators}
        if _SUMMARIZER.value and _SUMMARIZER.value not in by_name:
            raise errors.ConfigValueError(f"--summarizer={_SUMMARIZER.value} is not in "
                                          f"{sorted(by_name)}")
        report = LoadReport()
        # A DataError names file and line; nothing has been written yet.
        convs = sources.load_source(source, _PATH.value, _LIMIT.value, _ON_ERROR.value,
                                    report)
        summary["load"] = report.to_dict()
        logging.info("loaded %s: %s", source, report.summary())
        picked = splits.sample_split(convs, _NUM_TRAIN.value, _NUM_TEST.value)
        todo = picked["train"] + picked["test"]
        cache = annotation.AnswerCache(_CACHE.value or os.path.join(out_dir, "cache.sqlite"))
        try:
            rated, ann_report = annotation.annotate(
                todo, annotators, cache, variants=_VARIANTS.value,
                summarizer=by_name.get(_SUMMARIZER.value), concurrency=_CONCURRENCY.value)
        finally:
            cache.close()
        summary["annotation"] = ann_report.to_dict()
        summary["annotators"] = [{"name": a.name, "model": a.model, "url": a.url,
                                  "api_key_env": a.api_key_env} for a in annotators]
        check_failures(ann_report, _MAX_FAILED_FRACTION.value)
        ids = {ex.id: ex for ex in rated}
        parts = {s: [ids[c.id] for c in picked[s] if c.id in ids] for s in ("train", "test")}
    for split in ("train", "test"):
        if not parts[split]:
            raise errors.UserError(
                f"the {split} split is empty ({len(parts['train'])} train, "
                f"{len(parts['test'])} test items rated): nothing written to {out_dir}; "
                f"rate more items (raise --limit / --num_{split})")
    summary.update(export.split_summary(parts["train"], parts["test"]))
    paths = export.export(out_dir, source, parts["train"], parts["test"], summary,
                          with_tfds=_TFDS.value)
    print(json.dumps({"written": paths, "num_train": len(parts["train"]),
                      "num_test": len(parts["test"]),
                      "annotation": summary.get("annotation"), "load": summary.get("load")},
                     indent=2, default=str))


if __name__ == "__main__":
    flags.mark_flags_as_required(["source", "out_dir"])
    errors.run_main(main)
