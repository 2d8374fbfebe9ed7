"""Training and eval batches from the data pipeline (``xft_jax.data``).

Every process builds the same *global* batch and keeps its own rows
(``sharding.process_batch_slice``). The pipeline tokenises every example on every host
anyway, so this costs little, and it makes the run independent of the process count: the
same seed gives the same global batches on 1 device, 8 devices or 2 processes, and the
iterator state is the same on every host (one copy in the checkpoint suffices).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from xft_jax.errors import ConfigValueError
from xft_jax import sharding
from xft_jax.training.step import TRAIN_KEYS


@dataclasses.dataclass
class RunData:
    train: Any            # data.pipeline.Batches (train=True)
    eval: Any | None      # Batches (train=False) over the validation split, or None
    label_token_ids: list[int]
    info: dict


def build_splits(d):
    """The run's train / validation / test splits (``data.*``); validation is carved from
    the training split by hashed id (``data.validation_fraction``)."""
    from xft_jax.data import pipeline

    return pipeline.build_datasets(
        d.source, d.get("path", None) or None, num_train=d.get("num_train", None),
        num_test=d.get("num_test", None), seed=int(d.get("seed", 0)),
        num_synthetic=d.get("num_synthetic", None),
        validation_fraction=validation_fraction(d))


def build(config, tokenizer) -> RunData:
    from xft_jax.data import pipeline

    d = config.data
    splits = build_splits(d)
    room = prompt_room(d)
    vocab = explanation_vocab(splits, d.axis, (d.target, *room))
    troom = target_room(d, splits, tokenizer, vocab)
    common = dict(axis=d.axis, variant=d.target, max_len=int(d.max_len),
                  batch_size=int(d.batch_size), process_index=0, process_count=1,
                  vocab=vocab, target_seed=int(d.get("seed", 0)), prompt_room=room,
                  target_room=troom, chat_template=bool(d.get("chat_template", False)))
    pack = bool(d.get("pack", False))
    # Unpacked rows pad to the batch's power-of-two width, not max_len: every process
    # builds the same global batch, so all agree on the width (a few compiled shapes).
    train = pipeline.make_batches(splits.train, tokenizer, seed=int(config.train.seed),
                                  train=True, pack=pack,
                                  buckets=None if pack else pipeline.length_buckets(
                                      int(d.max_len)), **common)
    ev = None
    if int(config.train.get("eval_every", 0)) > 0 and splits.validation:
        ev = pipeline.make_batches(splits.validation[:d.get("eval_examples", None)],
                                   tokenizer, seed=0, train=False,
                                   buckets=pipeline.length_buckets(int(d.max_len)), **common)
    info = {"origin": splits.origin, "num_train": len(splits.train),
            "num_validation": len(splits.validation), "num_test": len(splits.test),
            "target_room": troom, "train_encode": train.stats.to_dict(),
            "train_digest": train.digest}
    return RunData(train, ev, list(train.label_token_ids), info)


def validation_fraction(d) -> float:
    """``data.validation_fraction``; a config without the key gets the default."""
    from xft_jax.data.splits import VALIDATION_FRACTION

    f = d.get("validation_fraction", None)
    return VALIDATION_FRACTION if f is None else float(f)


def target_room(d, splits, tokenizer, vocab) -> int:
    """The one target room of every prompt (``encode.target_room``): the
    ``data.prompt_room_percentile`` of the training split's longest target among the run's
    own and the ``data.prompt_room`` variants. Training and evaluation both derive it
    here, from the training split, so every split is cut alike."""
    from xft_jax.data.encode import ROOM_PERCENTILE, target_room as room_of

    pct = d.get("prompt_room_percentile", None)
    return room_of(splits.train, tokenizer, axis=d.axis, variants=(d.target, *prompt_room(d)),
                   percentile=ROOM_PERCENTILE if pct is None else float(pct),
                   seed=int(d.get("seed", 0)), vocab=vocab)


def train_steps(t, num_examples: int, batch_size: int) -> int:
    """Optimiser steps of a run: ``train.epochs`` passes over the encoded training
    examples (rounded down to whole batches over all epochs); ``train.steps``, when set,
    replaces them (short test and smoke runs)."""
    epochs, steps = t.get("epochs", None), t.get("steps", None)
    if steps is not None:
        return int(steps)
    if epochs is None:
        raise ValueError("set config.train.epochs (or config.train.steps)")
    if float(epochs) <= 0:
        raise ValueError(f"config.train.epochs={epochs}: must be positive")
    out = int(float(epochs) * num_examples // batch_size)
    if out < 1:
        raise ValueError(f"config.train.epochs={epochs} of {num_examples} training examples "
                         f"at data.batch_size={batch_size} is less than one step")
    return out


def prompt_room(d) -> tuple[str, ...]:
    """``data.prompt_room`` as a tuple of target variants; a config without the key (one
    written before it existed) gets the default, the paper's variants."""
    from xft_jax.data.targets import PAPER_VARIANTS, TARGET_VARIANTS

    room = d.get("prompt_room", None)
    room = PAPER_VARIANTS if room is None else room
    if isinstance(room, str) or not all(v in TARGET_VARIANTS for v in room):
        raise ConfigValueError(f"config.data.prompt_room={room!r}: expected a tuple of target "
                               f"variants from {TARGET_VARIANTS}")
    return tuple(room)


def explanation_vocab(splits, axis: str, variants):
    """The training split's explanation vocabulary when ``random_vocab`` is among
    ``variants`` (its targets are drawn from it), else None. Built from the training split
    only, so test explanations never leak into training targets."""
    from xft_jax.data.targets import ExplanationVocab

    return (ExplanationVocab.from_examples(splits.train, axis)
            if "random_vocab" in variants else None)


def target_positions(loss_mask: np.ndarray, min_width: int = 16) -> np.ndarray:
    """[B, K] positions of each row's target tokens (label, explanation, eos), -1-padded.

    The LM head is then applied at these K positions only: targets are a few tokens of a
    row of hundreds, so this skips most of the vocabulary-sized matmul. K is the next
    power of two of the longest row's count (capped at T), so few shapes get compiled; it
    is computed from the *global* batch so every host agrees on it.
    """
    lm = np.asarray(loss_mask) > 0
    b, t = lm.shape
    most = int(lm.sum(axis=1).max()) if b else 0
    k = min(t, max(min_width, 1 << max(0, most - 1).bit_length()))
    out = np.full((b, k), -1, np.int32)
    for i in range(b):
        idx = np.flatnonzero(lm[i])
        out[i, :idx.size] = idx
    return out


def local_rows(mesh, batch: dict) -> dict:
    """This process's rows of a global batch (the training keys + target positions)."""
    rows = sharding.process_batch_slice(mesh, batch["input_ids"].shape[0])
    out = {k: np.asarray(batch[k])[rows] for k in TRAIN_KEYS}
    out["target_pos"] = target_positions(batch["loss_mask"])[rows]
    return out


def to_global(mesh, batch: dict) -> dict:
    b = batch["input_ids"].shape[0]
    return sharding.make_global_batch(mesh, local_rows(mesh, batch), global_batch_size=b)


def eval_batches(run_data: RunData, max_batches: int | None = None) -> Iterator[dict]:
    for i, batch in enumerate(run_data.eval.dataset):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def real_tokens(batch: dict) -> int:
    """Non-padding tokens of the (global) batch, for tokens/s."""
    return int(np.count_nonzero(np.asarray(batch["segment_ids"])))
