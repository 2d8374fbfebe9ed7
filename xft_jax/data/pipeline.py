"""Tokenised, masked batches as a checkpointable grain iterator (the DESIGN batch contract).

    batches = train_batches(train_examples, tokenizer, axis="naturalness",
                            variant="explanation", max_len=512, batch_size=8, seed=0)
    it = iter(batches)           # a grain DatasetIterator
    batch = next(it)             # dict of numpy arrays, per host
    state = it.get_state()       # store with the checkpoint; it.set_state(state) resumes

Per host, every batch holds ``input_ids`` int32 [B,T]; ``targets`` int32 [B,T] (within
an example ``targets[t] == input_ids[t+1]``; at the end of a packed example it is that
example's eos); ``loss_mask`` float32 (1 on label, explanation and eos targets, never on
the prompt); ``label_mask`` float32 (1 only where ``targets`` is the label digit);
``segment_ids`` int32 (0 = padding, 1..k = examples in the row); ``positions`` int32
(restarting at 0 per example).

Eval batches (``eval_batches``) are padded, never packed, one example per row, and add
``label_pos`` int32 [B], ``label`` int32 [B] (0..4), ``example_index`` int32 [B] (index
into ``Batches.example_ids``) and ``valid`` int32 [B]. Each host gets the same number of
batches; rows beyond the data are padding rows with ``valid = 0``, ``label = -1``,
``example_index = -1`` and all masks 0, so an evaluator that sums over ``valid`` rows
counts every example exactly once across hosts.

Training iterates forever by default (``num_epochs=None``), reshuffling each epoch from
``seed``; batches never straddle a partial remainder (``drop_remainder``). Host
``process_index`` of ``process_count`` reads every ``process_count``-th example.
Examples that do not fit ``max_len`` even with no context are dropped and counted in
``Batches.stats`` (``EncodeStats``: ``truncated``, ``dropped``, ``dropped_ids``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any, Sequence

import grain
import numpy as np

from xft_jax.data.encode import SEQ_FIELDS, EncodeStats, Encoder, label_token_ids
from xft_jax.data.readers import DataError
from xft_jax.data.schema import RatedExample
from xft_jax.data.targets import ExplanationVocab
from xft_jax.data.tfds_builder import record_to_example

__all__ = ["Batches", "train_batches", "eval_batches", "make_batches", "encoded_digest",
           "label_token_ids", "to_examples"]


@dataclasses.dataclass
class Batches:
    """An iterable of batches plus what was done to the data to make them."""

    dataset: Any  # grain.IterDataset
    stats: EncodeStats
    label_token_ids: list[int]
    example_ids: list[str]  # ids of encoded examples; ``example_index`` points here
    num_batches: int | None  # per host; None when training repeats forever
    train: bool
    digest: str  # sha256 of every encoded example in order (``encoded_digest``)

    def __iter__(self):
        """A fresh grain ``DatasetIterator`` (has ``get_state()`` / ``set_state()``)."""
        return iter(self.dataset)


def encoded_digest(encoded: Sequence[dict]) -> str:
    """sha256 over every field (name, dtype, shape, bytes) of every encoded example in
    order: equal digests mean the same token sequences and masks, whatever file, tokenizer
    or encoding produced them (a resumed run checks its data by it)."""
    h = hashlib.sha256()
    for r in encoded:
        for key in sorted(r):
            a = np.ascontiguousarray(r[key])
            h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def to_examples(data) -> list[RatedExample]:
    """RatedExamples from a list of them or from a random-access TFDS data source."""
    if len(data) and not isinstance(data[0], RatedExample):
        return [record_to_example(data[i]) for i in range(len(data))]
    return list(data)


def length_buckets(max_len: int, smallest: int = 64, step: int = 0) -> tuple[int, ...]:
    """The widths batches pad to, then ``max_len``. ``step`` 0: powers of two from
    ``smallest`` (at most 2x padding per batch, log2(max_len / smallest) + 1 compiled
    widths; for accelerators, where a compile costs more than some padding). ``step`` > 0:
    every multiple of ``step`` from ``smallest`` (at most ``step`` - 1 padding tokens per
    row, more compiled widths; for a CPU, which pays for every padded token)."""
    if step < 0:
        raise ValueError(f"bucket step {step} must be >= 0")
    widths, w = [], smallest
    while w < max_len:
        widths.append(w)
        w = w + step if step else w * 2
    return tuple(widths) + (max_len,)


def _bucket_width(n: int, max_len: int, buckets: Sequence[int] | None) -> int:
    if not buckets:
        return max_len
    for b in sorted(buckets):
        if b >= n:
            return min(b, max_len)
    return max_len


def _collate(rows: Sequence[dict | None], *, max_len: int, buckets, pad_id: int,
             eval_mode: bool) -> dict:
    """Pads one example per row; ``None`` rows are eval padding rows."""
    real = [r for r in rows if r is not None]
    width = _bucket_width(max((len(r["input_ids"]) for r in real), default=1), max_len, buckets)
    b = len(rows)
    out = {"input_ids": np.full((b, width), pad_id, np.int32),
           "targets": np.full((b, width), pad_id, np.int32),
           "loss_mask": np.zeros((b, width), np.float32),
           "label_mask": np.zeros((b, width), np.float32),
           "segment_ids": np.zeros((b, width), np.int32),
           "positions": np.zeros((b, width), np.int32)}
    if eval_mode:
        out.update(label_pos=np.zeros(b, np.int32), label=np.full(b, -1, np.int32),
                   example_index=np.full(b, -1, np.int32), valid=np.zeros(b, np.int32))
    for i, r in enumerate(rows):
        if r is None:
            continue
        n = len(r["input_ids"])
        for k in SEQ_FIELDS:
            out[k][i, :n] = r[k]
        out["segment_ids"][i, :n] = 1
        out["positions"][i, :n] = np.arange(n)
        if eval_mode:
            out["label_pos"][i] = r["label_pos"]
            out["label"][i] = r["label"]
            out["example_index"][i] = r["index"]
            out["valid"][i] = 1
    return out


def _seq_only(r: dict) -> dict:
    return {k: r[k] for k in SEQ_FIELDS}


def _from_packed(batch: dict) -> dict:
    out = {k: batch[k] for k in SEQ_FIELDS}
    out["segment_ids"] = batch["input_ids_segment_ids"].astype(np.int32)
    out["positions"] = batch["input_ids_positions"].astype(np.int32)
    return out


def _process_slot(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(this host's index, the number of hosts), from jax where not given."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


@dataclasses.dataclass(frozen=True)
class _Encoded:
    """Encoded examples and what both builders report about them."""
    rows: list[dict]
    stats: EncodeStats
    label_ids: list[int]
    example_ids: list[str]
    digest: str
    pad_id: int


def _encode(data, tokenizer, *, axis: str, variant: str, max_len: int, batch_size: int,
            seed: int, vocab: ExplanationVocab | None, target_seed: int | None,
            prompt_room: Sequence[str], target_room: int | None,
            chat_template: bool, rubric: bool) -> _Encoded:
    """Checks the shared options and encodes every example (``encode.Encoder``)."""
    if batch_size <= 0 or max_len <= 0:
        raise ValueError("batch_size and max_len must be positive")
    examples = to_examples(data)
    if variant == "random_vocab" and vocab is None:
        raise ValueError("random_vocab needs vocab=ExplanationVocab.from_examples(train, axis)")
    if target_room is not None and int(target_room) >= max_len:
        raise DataError(f"none of the {len(examples)} examples fits max_len={max_len}: every "
                        f"prompt leaves {target_room} target tokens (the training split's "
                        f"long targets) and the label needs a prompt: raise data.max_len")
    encoder = Encoder(tokenizer, axis=axis, variant=variant, max_len=max_len,
                      seed=seed if target_seed is None else target_seed, vocab=vocab,
                      prompt_room=prompt_room, target_room=target_room,
                      chat_template=chat_template, rubric=rubric)
    encoded, stats = encoder.encode_all(examples)
    kept_ids = [examples[int(r["index"])].id for r in encoded]
    for j, r in enumerate(encoded):  # example_index points into kept_ids
        r["index"] = np.int32(j)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return _Encoded(encoded, stats, encoder.label_ids, kept_ids, encoded_digest(encoded),
                    pad_id)


def _default_read_options(read_options: grain.ReadOptions | None) -> grain.ReadOptions:
    """2 threads, 8 batches ahead: batching in-memory arrays is cheap, and grain's default
    of 500 batches wastes host memory."""
    return read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def train_batches(data, tokenizer, *, axis: str, variant: str = "label_only", max_len: int,
                  batch_size: int, seed: int = 0, shuffle: bool = True, pack: bool = False,
                  buckets: Sequence[int] | None = None, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  vocab: ExplanationVocab | None = None, target_seed: int | None = None,
                  prompt_room: Sequence[str] = (), target_room: int | None = None,
                  chat_template: bool = False, rubric: bool = True,
                  read_options: grain.ReadOptions | None = None) -> Batches:
    """Training batches for one axis and target variant (see module doc).

    data: RatedExamples, or a TFDS data source of records written by ``tfds_builder``.
    pack: first-fit packing of several examples per row. buckets: pad each batch to the
    smallest of these widths that fits it (fewer wasted tokens, a few compiled shapes;
    with process_count > 1 each host buckets its own rows and hosts may disagree on T, so
    build the global batch on every host instead, as ``training.batches`` does).
    vocab: needed for ``random_vocab``; build it from the training split. target_seed:
    seeds the pseudo-explanations (default ``seed``). prompt_room: target variants each
    prompt leaves room for (``encode.Encoder``), so runs of these variants see the same
    prompts and keep the same examples. target_room: one room for every example
    (``encode.target_room`` of the training split), so that a cut prompt carries nothing
    about its label; replaces the per-example room of ``prompt_room``.
    chat_template: render prompts with the tokenizer's chat template (instruct models).
    rubric: state the axis' rubric in each prompt (False: a shorter prompt).
    read_options: grain prefetching (default: 2 threads, 8 batches ahead).
    """
    pi, pc = _process_slot(process_index, process_count)
    enc = _encode(data, tokenizer, axis=axis, variant=variant, max_len=max_len,
                  batch_size=batch_size, seed=seed, vocab=vocab, target_seed=target_seed,
                  prompt_room=prompt_room, target_room=target_room,
                  chat_template=chat_template, rubric=rubric)
    read_options = _default_read_options(read_options)
    stats = enc.stats
    ds = grain.MapDataset.source(enc.rows)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds[pi::pc]
    if len(ds) == 0:
        if stats.kept == 0:
            raise DataError(f"none of the {stats.total} training examples fits max_len="
                            f"{max_len} ({stats.dropped} are longer even with their context "
                            f"cut): raise data.max_len")
        raise ValueError(f"host {pi}/{pc} has no training examples "
                         f"({stats.kept} encoded of {stats.total})")
    if shuffle:
        ds = ds.shuffle(seed=seed + 1)  # reshuffles this host's slice every epoch
    ds = ds.repeat(num_epochs)
    if pack:
        it = ds.map(_seq_only).to_iter_dataset(read_options)
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={k: max_len for k in SEQ_FIELDS},
            num_packing_bins=batch_size, shuffle_bins=False)
        it = it.batch(batch_size, drop_remainder=True).map(_from_packed)
    else:
        collate = functools.partial(_collate, max_len=max_len, buckets=buckets,
                                    pad_id=enc.pad_id, eval_mode=False)
        it = ds.batch(batch_size, drop_remainder=True, batch_fn=collate)
        it = it.to_iter_dataset(read_options)
    num_batches = None if num_epochs is None or pack else len(ds) // batch_size
    return Batches(it, stats, enc.label_ids, enc.example_ids, num_batches, True, enc.digest)


def eval_batches(data, tokenizer, *, axis: str, variant: str = "label_only", max_len: int,
                 batch_size: int, seed: int = 0, buckets: Sequence[int] | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 vocab: ExplanationVocab | None = None, target_seed: int | None = None,
                 prompt_room: Sequence[str] = (), target_room: int | None = None,
                 chat_template: bool = False, rubric: bool = True,
                 read_options: grain.ReadOptions | None = None, sort_by_length: bool = False) -> Batches:
    """Eval batches: padded, one example per row, in input order, each example once across
    hosts (see module doc). The encoding options are those of ``train_batches``; seed
    seeds the pseudo-explanations only.

    sort_by_length: batch examples of similar length together, so that with ``buckets``
    most batches pad to far less than ``max_len``; rows keep their ``example_index``, so
    callers can restore the dataset's order.
    """
    pi, pc = _process_slot(process_index, process_count)
    enc = _encode(data, tokenizer, axis=axis, variant=variant, max_len=max_len,
                  batch_size=batch_size, seed=seed, vocab=vocab, target_seed=target_seed,
                  prompt_room=prompt_room, target_room=target_room,
                  chat_template=chat_template, rubric=rubric)
    ds = grain.MapDataset.source(enc.rows)[pi::pc]
    per_process = math.ceil(len(enc.rows) / pc)
    num_batches = math.ceil(per_process / batch_size)
    rows = [ds[i] for i in range(len(ds))]
    if sort_by_length:
        rows.sort(key=lambda r: len(r["input_ids"]))     # stable: ties keep their order
    rows += [None] * (num_batches * batch_size - len(rows))
    collate = functools.partial(_collate, max_len=max_len, buckets=buckets, pad_id=enc.pad_id,
                                eval_mode=True)
    ds = grain.MapDataset.source(rows).batch(batch_size, batch_fn=collate)
    return Batches(ds.to_iter_dataset(_default_read_options(read_options)), enc.stats,
                   enc.label_ids, enc.example_ids, num_batches, False, enc.digest)


def make_batches(data, tokenizer, *, train: bool = True, **options) -> Batches:
    """``train_batches`` or ``eval_batches`` by a flag, refusing the other kind's options."""
    if train and options.pop("sort_by_length", False):
        raise ValueError("sort_by_length is for eval batches (train=False)")
    if not train and options.pop("pack", False):
        raise ValueError("eval batches are padded, one example per row; pack=False")
    return (train_batches if train else eval_batches)(data, tokenizer, **options)
