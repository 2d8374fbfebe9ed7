"""Train/test splits by hashed id, per-source sampling, and loading rated splits for training.

An item's split depends only on its id (its group: the part before '#', so the two
Chatbot Arena responses to one prompt, or all answers to one AmazonQA question, land
together), never on the order or number of rows read, so it never changes between runs.
Sampling takes the items with the smallest second hash, so growing a source only adds
items to a sample in the order that hash gives them.

    build_datasets(source, path=None, *, num_train=None, num_test=None, seed=0,
                   num_synthetic=None) -> DatasetSplits(train, test, source, origin)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Sequence, TypeVar

from xft_jax.data import synthetic, tfds_builder
from xft_jax.data.readers import DataError, read_rated_jsonl
from xft_jax.data.schema import RatedExample

T = TypeVar("T")
TEST_FRACTION = 1 / 3  # the paper's 10,000 train / 5,000 test
PAPER_NUM_TRAIN, PAPER_NUM_TEST = 10_000, 5_000


def split_key(item_id: str) -> str:
    return item_id.split("#", 1)[0]


def _unit(salt: str, key: str) -> float:
    h = hashlib.sha256(f"{salt}\x1f{key}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def split_of(item_id: str, test_fraction: float = TEST_FRACTION) -> str:
    """'test' for a fixed ``test_fraction`` of id groups, 'train' for the rest."""
    return "test" if _unit("xft_jax/split", split_key(item_id)) < test_fraction else "train"


def sample_split(items: Sequence[T], num_train: int | None = None, num_test: int | None = None,
                 test_fraction: float = TEST_FRACTION,
                 key: Callable[[T], str] = lambda x: x.id) -> dict[str, list[T]]:
    """Splits by hashed id and keeps the first ``num_*`` of each split in sample order."""
    out = {"train": [], "test": []}
    for item in items:
        out[split_of(key(item), test_fraction)].append(item)
    for name, n in (("train", num_train), ("test", num_test)):
        out[name].sort(key=lambda x: (_unit("xft_jax/sample", key(x)), key(x)))
        if n is not None:
            out[name] = out[name][:n]
    return out


@dataclasses.dataclass
class DatasetSplits:
    """Rated train and test examples of one source, and where they came from."""

    train: list[RatedExample]
    test: list[RatedExample]
    source: str
    origin: str


def _jsonl_dir(path: str, source: str) -> str | None:
    for d in (path, os.path.join(path, source)):
        if all(os.path.isfile(os.path.join(d, f"{s}.jsonl")) for s in ("train", "test")):
            return d
    return None


def build_datasets(source: str, path: str | None = None, *, num_train: int | None = None,
                   num_test: int | None = None, seed: int = 0,
                   num_synthetic: int | None = None,
                   test_fraction: float = TEST_FRACTION) -> DatasetSplits:
    """Train/test RatedExamples of ``source`` for a training run (``data.source/path``).

    ``synthetic`` without a path generates ``num_synthetic`` items (default 3000) with
    ``seed`` and splits them by hashed id. Otherwise ``path`` is what
    ``python -m xft_jax.annotate`` wrote: its output directory (JSONL
    ``<source>/{train,test}.jsonl``), a TFDS data_dir holding the ``xft_rated/<source>``
    dataset, or that dataset's version directory.
    """
    if source == "synthetic" and path is None:
        n = synthetic.DEFAULT_NUM_ITEMS if num_synthetic is None else num_synthetic
        parts = sample_split(synthetic.generate(n, seed), num_train, num_test, test_fraction)
        return DatasetSplits(parts["train"], parts["test"], source, f"synthetic(n={n}, "
                                                                     f"seed={seed})")
    if path is None:
        raise DataError(f"{source}: data.path is required (the output of xft_jax.annotate)")
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a directory of rated data")
    jsonl = _jsonl_dir(path, source)
    if jsonl is not None:
        train = read_rated_jsonl(os.path.join(jsonl, "train.jsonl"))
        test = read_rated_jsonl(os.path.join(jsonl, "test.jsonl"))
        origin = jsonl
    else:
        sources = tfds_builder.load(path, source)
        train = [tfds_builder.record_to_example(r) for r in _records(sources["train"])]
        test = [tfds_builder.record_to_example(r) for r in _records(sources["test"])]
        origin = f"tfds:{path}"
    for ex in train + test:
        if ex.conversation.source != source:
            raise DataError(f"{origin}: example {ex.id!r} is from {ex.conversation.source!r}, "
                            f"not {source!r}")
    train.sort(key=lambda x: (_unit("xft_jax/sample", x.id), x.id))
    test.sort(key=lambda x: (_unit("xft_jax/sample", x.id), x.id))
    return DatasetSplits(train[:num_train], test[:num_test], source, origin)


def _records(ds):
    return (ds[i] for i in range(len(ds)))
