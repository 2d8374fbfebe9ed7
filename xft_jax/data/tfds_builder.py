"""The rated data as a TFDS dataset (array_record files, read with ``as_data_source()``).

One builder, ``xft_rated``, with one config per source. Its input is the JSONL export
written by ``python -m xft_jax.annotate`` (``<manual_dir>/<source>/{train,test}.jsonl``),
so the TFDS dataset and the JSONL always hold the same examples. array_record gives
random access, which grain needs for global shuffling and exact iterator checkpoints;
no TensorFlow is needed to write or read it.

    build(jsonl_dir, data_dir, source) -> path of the dataset version directory
    load(data_dir, source) -> {"train": data source, "test": data source}
    record_to_example(record) -> RatedExample
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from xft_jax import atomic
from xft_jax.data.schema import AXES, AxisRating, Conversation, RatedExample
from xft_jax.data.sources import SOURCES
from xft_jax.data.readers import read_rated_jsonl

NAME = "xft_rated"
VERSION = "1.0.0"
SPLITS = ("train", "test")


def _features() -> tfds.features.FeaturesDict:
    text, seq = tfds.features.Text, tfds.features.Sequence

    def f64(shape=()):  # tf.Example floats are float32; raw bytes keep float64 exact
        return tfds.features.Tensor(shape=shape, dtype=np.float64,
                                    encoding=tfds.features.Encoding.BYTES)

    rating = {"scores": f64((None,)), "raters": seq(text()), "mean": f64(), "spread": f64(),
              "median": f64(), "majority": np.int32, "label": np.int32, "agreement": f64(),
              "explanation": text()}
    return tfds.features.FeaturesDict({
        "id": text(), "source": text(), "context_speakers": seq(text()),
        "context_texts": seq(text()), "response": text(),
        "ratings": {axis: dict(rating) for axis in AXES}})


class XftRated(tfds.core.GeneratorBasedBuilder):
    """Conversations rated on naturalness, comprehensiveness and on-topic adherence."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=src.description)
                       for name, src in SOURCES.items()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Run `python -m xft_jax.annotate`; it writes "
                                    "<manual_dir>/<source>/{train,test}.jsonl.")

    # TFDS's default looks the module up through `importlib_resources`, a backport that
    # is not a dependency here; the answer is simply this file.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def _log_download_bytes(self) -> None:
        """TFDS would announce a download of "Unknown size"; nothing is downloaded."""
        print(f"Writing the TFDS dataset {NAME}/{self.builder_config.name} (array_record) "
              f"from the rated JSONL export; nothing is downloaded.", file=sys.stderr)

    def _log_download_done(self) -> None:
        """``build`` says where the finished dataset is, once it is in place."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=_features())

    def _split_generators(self, dl_manager):
        base = os.path.join(os.fspath(dl_manager.manual_dir), self.builder_config.name)
        return {s: self._generate_examples(os.path.join(base, f"{s}.jsonl")) for s in SPLITS}

    def _generate_examples(self, path):
        for ex in read_rated_jsonl(path):
            yield ex.id, example_to_record(ex)


def example_to_record(ex: RatedExample) -> dict:
    conv = ex.conversation
    return {"id": conv.id, "source": conv.source,
            "context_speakers": [s for s, _ in conv.context],
            "context_texts": [t for _, t in conv.context], "response": conv.response,
            "ratings": {a: {k: v for k, v in r.to_dict().items()}
                        for a, r in ex.ratings.items()}}


def _str(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def record_to_example(rec: dict) -> RatedExample:
    """A decoded TFDS record (bytes for text, numpy scalars) back to a ``RatedExample``."""
    conv = Conversation(id=_str(rec["id"]), source=_str(rec["source"]),
                        context=tuple(zip(map(_str, rec["context_speakers"]),
                                          map(_str, rec["context_texts"]))),
                        response=_str(rec["response"]))
    ratings = {}
    for axis, r in rec["ratings"].items():
        ratings[axis] = AxisRating(
            scores=tuple(float(s) for s in r["scores"]), raters=tuple(map(_str, r["raters"])),
            mean=float(r["mean"]), spread=float(r["spread"]), median=float(r["median"]),
            majority=int(r["majority"]), label=int(r["label"]),
            agreement=float(r["agreement"]), explanation=_str(r["explanation"]))
    return RatedExample(conversation=conv, ratings=ratings)


def dataset_dir(data_dir: str, source: str) -> str:
    return os.path.join(data_dir, NAME, source, VERSION)


def build(jsonl_dir: str, data_dir: str, source: str) -> str:
    """Builds ``xft_rated/<source>`` under ``data_dir`` from the JSONL export.

    Generated in a temporary directory and swapped into place only when complete, so a
    failure leaves any previous version intact and nothing half-written.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {sorted(SOURCES)}")
    os.makedirs(data_dir, exist_ok=True)
    tmp_root = tempfile.mkdtemp(dir=data_dir, prefix=f".{NAME}-{source}-build-")
    try:
        builder = XftRated(config=source, data_dir=tmp_root, file_format="array_record")
        with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress to stdout
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=jsonl_dir))
        final = dataset_dir(data_dir, source)
        atomic.replace_dir(os.fspath(builder.data_dir), final)
        print(f"TFDS dataset {NAME}/{source} written to {final}", file=sys.stderr)
        return final
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp_root)


def load(path: str, source: str) -> dict:
    """Train/test data sources from a TFDS data_dir or the dataset version directory."""
    directory = path if os.path.isfile(os.path.join(path, "dataset_info.json")) \
        else dataset_dir(path, source)
    if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
        raise FileNotFoundError(f"{path}: no {NAME}/{source} TFDS dataset "
                                f"(looked for {directory}/dataset_info.json)")
    builder = tfds.builder_from_directory(directory)
    return {s: builder.as_data_source(split=s) for s in SPLITS}
