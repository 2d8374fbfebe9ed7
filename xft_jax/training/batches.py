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
from xft_jax.data import pipeline
from xft_jax.data.encode import run_target_room
from xft_jax.data.splits import build_splits
from xft_jax.data.targets import explanation_vocab, prompt_room
from xft_jax.training.step import TRAIN_KEYS


@dataclasses.dataclass
class RunData:
    train: Any            # data.pipeline.Batches (train=True)
    eval: Any | None      # Batches (train=False) over the validation split, or None
    label_token_ids: list[int]
    info: dict


def build(config, tokenizer) -> RunData:
    d = config.data
    splits = build_splits(d)
    room = prompt_room(d)
    vocab = explanation_vocab(splits, d.axis, (d.target, *room))
    troom = run_target_room(d, splits, tokenizer, vocab)
    common = dict(axis=d.axis, variant=d.target, max_len=int(d.max_len),
                  batch_size=int(d.batch_size), process_index=0, process_count=1,
                  vocab=vocab, target_seed=int(d.seed), prompt_room=room,
                  target_room=troom, chat_template=bool(d.chat_template),
                  rubric=bool(d.rubric))
    pack = bool(d.pack)
    # Unpacked rows pad to the batch's bucket width, not max_len: every process builds the
    # same global batch, so all agree on the width (a few compiled shapes).
    buckets = pipeline.length_buckets(int(d.max_len), step=int(d.bucket_step))
    train = pipeline.train_batches(splits.train, tokenizer, seed=int(config.train.seed),
                                   pack=pack, buckets=None if pack else buckets, **common)
    ev = None
    if int(config.train.eval_every) > 0 and splits.validation:
        # Length-sorted: validation sums over examples, so order is free and short rows
        # share narrow batches.
        ev = pipeline.eval_batches(splits.validation[:d.eval_examples], tokenizer, seed=0,
                                   buckets=buckets, sort_by_length=True, **common)
    info = {"origin": splits.origin, "num_train": len(splits.train),
            "num_validation": len(splits.validation), "num_test": len(splits.test),
            "target_room": troom, "train_encode": train.stats.to_dict(),
            "train_digest": train.digest}
    return RunData(train, ev, list(train.label_token_ids), info)


def train_steps(t, num_examples: int, batch_size: int) -> int:
    """Optimiser steps of a run: ``train.epochs`` passes over the encoded training
    examples (rounded down to whole batches over all epochs); ``train.steps``, when set,
    replaces them (short test and smoke runs)."""
    epochs, steps = t.epochs, t.steps
    if steps is not None:
        return int(steps)
    if epochs is None:
        raise ConfigValueError("set config.train.epochs (or config.train.steps)")
    if float(epochs) <= 0:
        raise ConfigValueError(f"config.train.epochs={epochs}: must be positive")
    out = int(float(epochs) * num_examples // batch_size)
    if out < 1:
        raise ConfigValueError(f"config.train.epochs={epochs} of {num_examples} training "
                               f"examples at data.batch_size={batch_size} is less than one "
                               f"step")
    return out


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


def to_global(mesh, batch: dict) -> dict:
    """The training keys and target positions of a global host batch, on the mesh."""
    full = {k: batch[k] for k in TRAIN_KEYS}
    full["target_pos"] = target_positions(batch["loss_mask"])
    return sharding.global_batch_from_host(mesh, full)


def eval_batches(run_data: RunData, max_batches: int | None = None) -> Iterator[dict]:
    for i, batch in enumerate(run_data.eval.dataset):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def real_tokens(batch: dict) -> int:
    """Non-padding tokens of the (global) batch, for tokens/s."""
    return int(np.count_nonzero(np.asarray(batch["segment_ids"])))
