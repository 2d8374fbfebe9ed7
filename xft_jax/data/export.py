"""Writes one source's rated splits: JSONL, the TFDS dataset, and a summary, all-or-nothing.

Layout under ``out_dir``::

    <source>/train.jsonl  <source>/test.jsonl  <source>/summary.json
    tfds/xft_rated/<source>/1.0.0/...          (array_record, see tfds_builder.py)

Everything for a source is first written to a staging directory; the TFDS dataset is
built from it and swapped in, then the staging directory replaces ``<source>/``. A run
that fails part-way leaves the previous output untouched and no partial files behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Sequence

from xft_jax import atomic
from xft_jax.data import tfds_builder
from xft_jax.data.aggregate import annotator_agreement, label_distribution
from xft_jax.data.readers import write_rated_jsonl
from xft_jax.data.schema import AXES, RatedExample
from xft_jax.data.targets import ExplanationVocab, target_length_stats


def split_summary(train: Sequence[RatedExample], test: Sequence[RatedExample]) -> dict:
    """Sizes, label distributions, annotator agreement and target lengths per variant."""
    both = list(train) + list(test)
    out = {"num_train": len(train), "num_test": len(test),
           "labels": {"train": label_distribution(train), "test": label_distribution(test)},
           "annotator_agreement": annotator_agreement(both)}
    if train:
        out["target_lengths"] = {
            axis: target_length_stats(train, axis,
                                      vocab=ExplanationVocab.from_examples(train, axis))
            for axis in AXES}
    return out


def export(out_dir: str, source: str, train: Sequence[RatedExample],
           test: Sequence[RatedExample], summary: dict, *, with_tfds: bool = True) -> dict:
    """Writes the layout above; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    staging_root = tempfile.mkdtemp(dir=out_dir, prefix=f".{source}-staging-")
    try:
        staging = os.path.join(staging_root, source)
        write_rated_jsonl(os.path.join(staging, "train.jsonl"), train)
        write_rated_jsonl(os.path.join(staging, "test.jsonl"), test)
        atomic.write_json(os.path.join(staging, "summary.json"), summary, sort_keys=True)
        paths = {"jsonl": os.path.join(out_dir, source)}
        if with_tfds:
            paths["tfds"] = tfds_builder.build(staging_root, os.path.join(out_dir, "tfds"),
                                               source)
        atomic.replace_dir(staging, os.path.join(out_dir, source))
        return paths
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging_root)
