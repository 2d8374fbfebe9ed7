"""Train/validation/test splits by hashed id, per-source sampling, and loading rated
splits for training.

An item's split depends only on its id (its group: the part before '#', so the two
Chatbot Arena responses to one prompt, or all answers to one AmazonQA question, land
together), never on the order or number of rows read, so it never changes between runs.
Sampling takes the items with the smallest second hash, so growing a source only adds
items to a sample in the order that hash gives them. The validation split is carved from
the sampled training split by a third hash (``validation_fraction`` of its id groups): it
is what a run selects its checkpoint on, so the test split is read by the final
evaluation only.

    build_datasets(source, path=None, *, num_train=None, num_test=None, seed=0,
                   num_synthetic=None, validation_fraction=0.0)
        -> DatasetSplits(train, test, source, origin, validation)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence, TypeVar

from xft_jax.data import chitchat_degraded, synthetic, tfds_builder
from xft_jax.data.id_hash import TEST_FRACTION, is_validation, split_key, split_of, unit_hash
from xft_jax.data.readers import DataError, read_rated_jsonl
from xft_jax.data.schema import RatedExample

T = TypeVar("T")
VALIDATION_FRACTION = 0.1  # of the training split, for checkpoint selection
PAPER_NUM_TRAIN, PAPER_NUM_TEST = 10_000, 5_000
# Sources generated offline as rated examples: name -> module with generate(n, seed) and
# DEFAULT_NUM_ITEMS (data.num_synthetic overrides the number of items).
GENERATORS = {"synthetic": synthetic, "chitchat_degraded": chitchat_degraded}


def carve_validation(train: Sequence[T], fraction: float,
                     key: Callable[[T], str] = lambda x: x.id) -> tuple[list[T], list[T]]:
    """(train, validation): ``fraction`` of the training id groups, by hashed id, in the
    order given."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.validation_fraction={fraction}: expected a number in [0, 1)")
    rest, val = [], []
    for item in train:
        (val if is_validation(key(item), fraction) else rest).append(item)
    return rest, val


def sample_split(items: Sequence[T], num_train: int | None = None, num_test: int | None = None,
                 test_fraction: float = TEST_FRACTION,
                 key: Callable[[T], str] = lambda x: x.id) -> dict[str, list[T]]:
    """Splits by hashed id and keeps the first ``num_*`` of each split in sample order."""
    out = {"train": [], "test": []}
    for item in items:
        out[split_of(key(item), test_fraction)].append(item)
    for name, n in (("train", num_train), ("test", num_test)):
        out[name].sort(key=lambda x: (unit_hash("xft_jax/sample", key(x)), key(x)))
        if n is not None:
            out[name] = out[name][:n]
    return out


@dataclasses.dataclass
class DatasetSplits:
    """Rated train, validation and test examples of one source, and where they came from."""

    train: list[RatedExample]
    test: list[RatedExample]
    source: str
    origin: str
    validation: list[RatedExample] = dataclasses.field(default_factory=list)


def _jsonl_dir(path: str, source: str) -> str | None:
    for d in (path, os.path.join(path, source)):
        if all(os.path.isfile(os.path.join(d, f"{s}.jsonl")) for s in ("train", "test")):
            return d
    return None


def _check_both_splits(path: str, source: str) -> None:
    """A directory with one of train.jsonl / test.jsonl but not the other is named as
    such, not mistaken for a missing TFDS dataset."""
    for d in (path, os.path.join(path, source)):
        have = [s for s in ("train", "test") if os.path.isfile(os.path.join(d, f"{s}.jsonl"))]
        if len(have) == 1:
            other = "test" if have == ["train"] else "train"
            raise DataError(f"{os.path.join(d, other + '.jsonl')}: missing (found "
                            f"{have[0]}.jsonl beside it): rerun xft_jax.annotate, which "
                            f"writes both splits")


def check_splits(train: Sequence[RatedExample], test: Sequence[RatedExample],
                 train_where: str, test_where: str) -> None:
    """Rated splits a run can trust: a non-empty train split, unique ids within each
    split (duplicates with different content are ambiguous; identical ones would count
    twice) and no example in both train and test."""
    if not train:
        raise DataError(f"{train_where}: the training split has no examples")
    for examples, where in ((train, train_where), (test, test_where)):
        seen: dict = {}
        for ex in examples:
            if ex.id in seen:
                kind = "identical" if seen[ex.id] == ex else "different content"
                raise DataError(f"{where}: example id {ex.id!r} appears twice ({kind}); "
                                f"ids must be unique")
            seen[ex.id] = ex
    train_ids = {ex.id for ex in train}
    train_text = {(ex.conversation.context, ex.conversation.response) for ex in train}
    for ex in test:
        if ex.id in train_ids or (ex.conversation.context,
                                  ex.conversation.response) in train_text:
            raise DataError(f"{test_where}: example {ex.id!r} is also in the training split "
                            f"({train_where}): train and test must not overlap")


def build_datasets(source: str, path: str | None = None, *, num_train: int | None = None,
                   num_test: int | None = None, seed: int = 0,
                   num_synthetic: int | None = None,
                   test_fraction: float = TEST_FRACTION,
                   validation_fraction: float = 0.0) -> DatasetSplits:
    """Train/validation/test RatedExamples of ``source`` for a training run
    (``data.source/path``). The validation split is carved from the ``num_train`` sampled
    training examples (``carve_validation``), so ``train`` holds the rest.

    A generated source (``synthetic``, ``chitchat_degraded``) without a path generates
    ``num_synthetic`` items (default: the module's ``DEFAULT_NUM_ITEMS``) with ``seed`` and
    splits them by hashed id. Otherwise ``path`` is what
    ``python -m xft_jax.annotate`` wrote: its output directory (JSONL
    ``<source>/{train,test}.jsonl``), a TFDS data_dir holding the ``xft_rated/<source>``
    dataset, or that dataset's version directory.
    """
    if source in GENERATORS and path is None:
        module = GENERATORS[source]
        n = module.DEFAULT_NUM_ITEMS if num_synthetic is None else num_synthetic
        parts = sample_split(module.generate(n, seed), num_train, num_test, test_fraction)
        train, val = carve_validation(parts["train"], validation_fraction)
        return DatasetSplits(train, parts["test"], source, f"{source}(n={n}, seed={seed})",
                             val)
    if path is None:
        raise DataError(f"{source}: data.path is required (the output of xft_jax.annotate)")
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a directory of rated data")
    _check_both_splits(path, source)
    jsonl = _jsonl_dir(path, source)
    if jsonl is not None:
        train = read_rated_jsonl(os.path.join(jsonl, "train.jsonl"))
        test = read_rated_jsonl(os.path.join(jsonl, "test.jsonl"))
        origin = jsonl
        check_splits(train, test, os.path.join(jsonl, "train.jsonl"),
                     os.path.join(jsonl, "test.jsonl"))
    else:
        sources = tfds_builder.load(path, source)
        train = [tfds_builder.record_to_example(r) for r in _records(sources["train"])]
        test = [tfds_builder.record_to_example(r) for r in _records(sources["test"])]
        origin = f"tfds:{path}"
    if jsonl is None:
        check_splits(train, test, f"{origin} (train)", f"{origin} (test)")
    for ex in train + test:
        if ex.conversation.source != source:
            raise DataError(f"{origin}: example {ex.id!r} is from {ex.conversation.source!r}, "
                            f"not {source!r}")
    train.sort(key=lambda x: (unit_hash("xft_jax/sample", x.id), x.id))
    test.sort(key=lambda x: (unit_hash("xft_jax/sample", x.id), x.id))
    train, val = carve_validation(train[:num_train], validation_fraction)
    return DatasetSplits(train, test[:num_test], source, origin, val)


def validation_fraction(d) -> float:
    """``data.validation_fraction`` of a config's data section; None (an eval config that
    leaves it to the run) gives the default."""
    f = d.validation_fraction
    return VALIDATION_FRACTION if f is None else float(f)


def build_splits(d) -> DatasetSplits:
    """The run's train / validation / test splits from a config's ``data`` section;
    validation is carved from the training split by hashed id
    (``data.validation_fraction``)."""
    return build_datasets(d.source, d.path or None, num_train=d.num_train,
                          num_test=d.num_test, seed=int(d.seed),
                          num_synthetic=d.num_synthetic,
                          validation_fraction=validation_fraction(d))


def _records(ds):
    return (ds[i] for i in range(len(ds)))
