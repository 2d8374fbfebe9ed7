"""Prompt template and tokenisation of one rated example into next-token training arrays.

A sequence is ``[bos] prompt target [eos]``; the arrays are ``input_ids = seq[:-1]`` and
``targets = seq[1:]``. ``loss_mask`` is 1 where ``targets`` is a target token (the label,
the explanation and the closing eos), ``label_mask`` 1 only where ``targets`` is the label
digit. The prompt is built from three separately tokenised pieces (instructions +
rubric, the context turns, the response + question) so the context can be cut from the
left, token-exactly, when the whole does not fit ``max_len``; the response and the target
are never cut. With ``chat_template`` (config ``data.chat_template``, for instruct models)
the prompt is one user message rendered by the tokenizer's chat template, and the target
is the assistant's answer. Otherwise a bos token starts the sequence only when the
tokenizer itself adds one (Llama / Mistral sentencepiece do; SmolLM2's byte-level BPE
does not).

How much of the context is cut depends on the room left for the target. The study gives
every example the same room (``target_room``: a high percentile of the training split's
longest target among the study's variants): a prompt is then cut to the same length
whatever its own target, so a cut prompt's length carries nothing about its gold label
(an explanation's length goes with its label), and every variant trains and is scored on
the same prompts and keeps the same examples, so variants differ only in their target. A
target longer than the room loses its tail (the label always stays).
Without ``target_room``, each example's prompt leaves room for its own longest target
among ``prompt_room`` variants (or its own target), which lets the cut encode the label.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from xft_jax.data import rubrics
from xft_jax.data.schema import RatedExample, check_axis
from xft_jax.data.targets import (LABEL_PREFIX, TARGET_VARIANTS, ExplanationVocab,
                                  make_target, prompt_room)

SEQ_FIELDS = ("input_ids", "targets", "loss_mask", "label_mask")
ROOM_PERCENTILE = 99.0  # default percentile of the training targets' length for the room


def prompt_parts(example: RatedExample, axis: str,
                 rubric: bool = True) -> tuple[str, str, str]:
    """(head, context, tail) of the rating prompt; only ``context`` may be truncated.
    ``rubric=False`` leaves the axis' rubric out (a short prompt, for a CPU demo)."""
    check_axis(axis)
    conv = example.conversation
    head = ("Rate the response that ends this conversation.\n"
            + (f"{rubrics.rubric(axis, 5)}\n" if rubric else "") + "\nConversation:\n")
    context = "".join(f"{speaker}: {text}\n" for speaker, text in conv.context)
    tail = (f"\nResponse:\n{conv.response}\n\n"
            f"How would you rate the {axis.replace('_', '-')} of the response, from 1 to 5?\n")
    return head, context, tail


def label_token_ids(tokenizer) -> list[int]:
    """The five token ids that carry the digits "1".."5" in ``LABEL_PREFIX`` + digit.

    Derived from how the target template really tokenises (for Mistral "Rating: 4" is
    ``▁Rating : ▁ 4`` and the label token is "4", not "▁4"; SmolLM2's byte-level BPE gives
    ``R ating : Ġ 4``, again a bare "4"; a vocabulary with "Ġ4" would give that). Raises
    if the five
    tokenisations do not share one prefix and end in exactly one digit token each.
    """
    seqs = [tokenizer(f"{LABEL_PREFIX}{d}", add_special_tokens=False)["input_ids"]
            for d in range(1, 6)]
    prefix = seqs[0][:-1]
    out = []
    for d, ids in enumerate(seqs, start=1):
        if len(ids) != len(prefix) + 1 or ids[:-1] != prefix:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"label {d} is not a single token after the prefix "
                             f"{LABEL_PREFIX!r}: {LABEL_PREFIX + str(d)!r} -> {pieces}")
        if tokenizer.decode([ids[-1]]).strip() != str(d):
            raise ValueError(f"label token {ids[-1]} decodes to "
                             f"{tokenizer.decode([ids[-1]])!r}, not {str(d)!r}")
        out.append(ids[-1])
    if len(set(out)) != 5:
        raise ValueError(f"label tokens are not distinct: {out}")
    return out


def _added_prefix(tokenizer) -> list[int]:
    """The special ids the tokenizer itself puts before a text (its bos, if it adds one)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    n = len(full) - len(plain)
    if n < 0 or full[n:][:len(plain)] != plain:
        return []
    return [int(i) for i in full[:n]]


@dataclasses.dataclass
class EncodeStats:
    """How many examples were encoded, had their context cut, or did not fit at all."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_ids: list = dataclasses.field(default_factory=list)
    max_len: int = 0
    mean_tokens: float = 0.0
    max_tokens: int = 0
    mean_target_tokens: float = 0.0
    prompt_room: list = dataclasses.field(default_factory=list)
    target_room: int | None = None
    target_cut: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Encoder:
    """Encodes ``RatedExample``s for one axis and target variant at a fixed ``max_len``.

    prompt_room: target variants each prompt leaves room for besides ``variant`` (see the
    module doc); ``random_vocab`` among them needs ``vocab``. target_room: the same room
    (in target tokens, eos not counted) for every example (``target_room``); it replaces
    the per-example room of ``prompt_room``.
    chat_template: render the prompt with the tokenizer's chat template (it must have one).
    rubric: state the axis' rubric in the prompt (``prompt_parts``).
    """

    def __init__(self, tokenizer, *, axis: str, variant: str, max_len: int, seed: int = 0,
                 vocab: ExplanationVocab | None = None, prompt_room: Sequence[str] = (),
                 target_room: int | None = None, chat_template: bool = False,
                 rubric: bool = True):
        self.tok = tokenizer
        self.axis, self.variant = check_axis(axis), variant
        self.max_len, self.seed, self.vocab = int(max_len), seed, vocab
        unknown = [v for v in prompt_room if v not in TARGET_VARIANTS]
        if unknown:
            raise ValueError(f"prompt_room: unknown target variants {unknown}; variants are "
                             f"{TARGET_VARIANTS}")
        if "random_vocab" in prompt_room and vocab is None:
            raise ValueError("prompt_room includes random_vocab, which needs "
                             "vocab=ExplanationVocab.from_examples(train, axis)")
        self.prompt_room = tuple(dict.fromkeys(v for v in prompt_room if v != variant))
        self.label_ids = label_token_ids(tokenizer)
        self.prefix_ids = tokenizer(LABEL_PREFIX + "1", add_special_tokens=False)["input_ids"][:-1]
        if target_room is not None and not len(self.prefix_ids) < int(target_room) < max_len:
            raise ValueError(f"target_room={target_room}: must leave room for the label "
                             f"({len(self.prefix_ids) + 1} tokens) and be below "
                             f"max_len={max_len}")
        self.target_room = None if target_room is None else int(target_room)
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos token; targets must end with one")
        self.eos = int(tokenizer.eos_token_id)
        self.bos = _added_prefix(tokenizer)
        self.chat = bool(chat_template)
        self.rubric = bool(rubric)
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.chat_template=True, but the tokenizer has no chat template")

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def _chat_prompt(self, head: str, ctx_ids: list[int], tail: str, budget: int):
        """Chat-template prompt ids, cutting context from the left to fit ``budget``."""
        keep = len(ctx_ids)
        for _ in range(8):
            ctx = self.tok.decode(ctx_ids[len(ctx_ids) - keep:]) if keep else ""
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": head + ctx + tail}], tokenize=False,
                add_generation_prompt=True)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            over = len(ids) - budget
            if over <= 0:
                return ids, keep < len(ctx_ids)
            if keep == 0:
                return None, True
            keep = max(0, keep - over)
        return None, True

    def encode_all(self, examples: Sequence[RatedExample]) -> tuple[list[dict], EncodeStats]:
        """Encodes every example; returns the ones that fit, in order, and the stats."""
        stats = EncodeStats(total=len(examples), max_len=self.max_len)
        parts = [prompt_parts(ex, self.axis, self.rubric) for ex in examples]
        heads = self._ids(sorted({p[0] for p in parts}))
        head_ids = dict(zip(sorted({p[0] for p in parts}), heads))
        ctx_ids = self._ids([p[1] for p in parts])
        tail_ids = self._ids([p[2] for p in parts])
        tgt_texts = [make_target(ex, self.axis, self.variant, seed=self.seed, vocab=self.vocab)
                     for ex in examples]
        tgt_ids = self._ids(tgt_texts)
        if self.target_room is None:
            room = self._room(examples, [len(t) for t in tgt_ids])
        else:
            room = [self.target_room] * len(examples)
        stats.prompt_room = [self.variant, *self.prompt_room]
        stats.target_room = self.target_room
        out, lengths, tlens = [], [], []
        for i, ex in enumerate(examples):
            label = ex.label(self.axis)
            target = tgt_ids[i] + [self.eos]
            if len(target) > room[i] + 1:       # only with target_room: cut the tail
                target = target[:room[i] + 1]
                stats.target_cut += 1
            want = self.prefix_ids + [self.label_ids[label - 1]]
            if target[:len(want)] != want:
                raise ValueError(
                    f"example {ex.id!r}: target {tgt_texts[i][:40]!r} does not start with the "
                    f"label tokens {want}; got {target[:len(want)]}")
            budget = self.max_len - room[i]  # prompt length that leaves room (+ eos)
            if self.chat:
                prompt, cut = self._chat_prompt(parts[i][0], ctx_ids[i], parts[i][2], budget)
            else:
                fixed = self.bos + head_ids[parts[i][0]]
                ctx, tail = ctx_ids[i], tail_ids[i]
                keep = budget - len(fixed) - len(tail)
                cut = keep < len(ctx)
                prompt = None if keep < 0 else fixed + ctx[len(ctx) - min(keep, len(ctx)):] + tail
            if prompt is None:
                stats.dropped += 1
                if len(stats.dropped_ids) < 100:
                    stats.dropped_ids.append(ex.id)
                continue
            stats.truncated += int(cut)
            out.append(self._arrays(prompt, target, label, i))
            lengths.append(len(prompt) + len(target) - 1)
            tlens.append(len(target))
        stats.kept = len(out)
        if out:
            stats.mean_tokens = float(np.mean(lengths))
            stats.max_tokens = int(np.max(lengths))
            stats.mean_target_tokens = float(np.mean(tlens))
        return out, stats

    def _room(self, examples: Sequence[RatedExample], own: list[int]) -> list[int]:
        """Per example, the longest target (in tokens, without eos) among the run's own
        and the ``prompt_room`` variants."""
        room = list(own)
        for variant in self.prompt_room:
            ids = self._ids([make_target(ex, self.axis, variant, seed=self.seed,
                                         vocab=self.vocab) for ex in examples])
            room = [max(r, len(t)) for r, t in zip(room, ids)]
        return room

    def _arrays(self, prompt: list[int], target: list[int], label: int, index: int) -> dict:
        seq = np.asarray(prompt + target, dtype=np.int32)
        n = len(seq) - 1
        loss_mask = np.zeros(n, np.float32)
        loss_mask[len(prompt) - 1:] = 1.0
        label_pos = len(prompt) - 1 + len(self.prefix_ids)
        label_mask = np.zeros(n, np.float32)
        label_mask[label_pos] = 1.0
        return {"input_ids": seq[:-1], "targets": seq[1:], "loss_mask": loss_mask,
                "label_mask": label_mask, "label": np.int32(label - 1),
                "label_pos": np.int32(label_pos), "index": np.int32(index)}


def target_room(examples: Sequence[RatedExample], tokenizer, *, axis: str,
                variants: Sequence[str], percentile: float, seed: int = 0,
                vocab: ExplanationVocab | None = None) -> int:
    """The one target room (tokens, eos not counted) every prompt leaves: the
    ``percentile`` of the longest target among ``variants`` over ``examples`` (the
    training split; never validation or test examples)."""
    if not examples:
        raise ValueError("target_room needs training examples")
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"data.prompt_room_percentile={percentile}: expected (0, 100]")
    unknown = [v for v in variants if v not in TARGET_VARIANTS]
    if unknown or not variants:
        raise ValueError(f"target_room: variants {list(variants)}; expected some of "
                         f"{TARGET_VARIANTS}")
    longest = np.zeros(len(examples), np.int64)
    for v in dict.fromkeys(variants):
        texts = [make_target(ex, axis, v, seed=seed, vocab=vocab) for ex in examples]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        longest = np.maximum(longest, [len(t) for t in ids])
    return int(np.percentile(longest, float(percentile), method="higher"))


def run_target_room(d, splits, tokenizer, vocab: ExplanationVocab | None) -> int:
    """The one target room of a run's prompts (``target_room``) from a config's ``data``
    section: the ``data.prompt_room_percentile`` of the training split's longest target
    among the run's own and the ``data.prompt_room`` variants. Training and evaluation
    both derive it here, from the training split, so every split is cut alike."""
    pct = d.prompt_room_percentile
    return target_room(splits.train, tokenizer, axis=d.axis,
                       variants=(d.target, *prompt_room(d)),
                       percentile=ROOM_PERCENTILE if pct is None else float(pct),
                       seed=int(d.seed), vocab=vocab)
