"""Training targets: the label alone, or followed by an explanation or a pseudo-explanation.

    label_only    "Rating: 4"
    explanation   "Rating: 4\\nExplanation: <the ensemble's explanation>"
    shuffled      the explanation's words in a seeded random order
    bag_of_words  words drawn with replacement from the explanation's own words
    random_vocab  words drawn from the corpus-wide explanation vocabulary by frequency

The pseudo variants keep the explanation's length in words and its "Explanation: "
frame, so they differ from ``explanation`` only in meaning. The label always comes first
(``LABEL_PREFIX`` + digit), so the label token sits at the same place in every variant
and a rating is read from one position at inference.

    make_target(example, axis, variant, seed=0, rng=None, vocab=None) -> str
"""

from __future__ import annotations

import collections
import hashlib
from typing import Iterable, Sequence

import numpy as np

from xft_jax.errors import ConfigValueError
from xft_jax.data.schema import AXES, RatedExample, check_axis

TARGET_VARIANTS = ("label_only", "explanation", "shuffled", "bag_of_words", "random_vocab")
# The variants the paper compares (label only, label + explanation, and the three
# pseudo-explanations: shuffled words, a bag of words, random explanation-vocabulary
# tokens): the study's default grid; every prompt leaves room for their targets.
PAPER_VARIANTS = TARGET_VARIANTS
LABEL_PREFIX = "Rating: "
EXPLANATION_PREFIX = "\nExplanation: "


def label_text(label: int) -> str:
    """The label part of every target, e.g. "Rating: 4"."""
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 1 <= label <= 5:
        raise ValueError(f"label must be an integer in 1..5, got {label!r}")
    return f"{LABEL_PREFIX}{int(label)}"


def words(text: str) -> list[str]:
    """Whitespace words, punctuation attached: the unit the pseudo variants permute."""
    return text.split()


class ExplanationVocab:
    """Word frequencies over a corpus of explanations, sampled by frequency.

    Build it from the training split only (``from_examples(train, axis)``) so test
    explanations never leak into training targets.
    """

    def __init__(self, counts: collections.Counter):
        if not counts:
            raise ValueError("explanation vocabulary is empty")
        items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        self.words = [w for w, _ in items]
        self.counts = np.array([c for _, c in items], dtype=np.float64)
        self._cdf = np.cumsum(self.counts / self.counts.sum())

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "ExplanationVocab":
        counts = collections.Counter()
        for t in texts:
            counts.update(words(t))
        return cls(counts)

    @classmethod
    def from_examples(cls, examples: Iterable[RatedExample], axis: str | None = None
                      ) -> "ExplanationVocab":
        """Vocabulary of ``axis``'s explanations, or of all axes when ``axis`` is None."""
        axes = AXES if axis is None else (check_axis(axis),)
        return cls.from_texts(ex.explanation(a) for ex in examples for a in axes)

    def sample(self, rng: np.random.Generator, n: int) -> list[str]:
        idx = np.searchsorted(self._cdf, rng.random(n), side="right")
        return [self.words[min(i, len(self.words) - 1)] for i in idx]

    def __len__(self) -> int:
        return len(self.words)


def example_rng(seed: int, example_id: str, axis: str, variant: str) -> np.random.Generator:
    """A generator that depends only on (seed, example, axis, variant): order-independent."""
    digest = hashlib.sha256(f"{seed}\x1f{example_id}\x1f{axis}\x1f{variant}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def pseudo_words(expl: Sequence[str], variant: str, rng: np.random.Generator,
                 vocab: ExplanationVocab | None = None) -> list[str]:
    """The words of a pseudo-explanation of the same length as ``expl``."""
    n = len(expl)
    if variant == "shuffled":
        return [expl[i] for i in rng.permutation(n)]
    if variant == "bag_of_words":
        return [expl[i] for i in rng.integers(0, n, size=n)]
    if variant == "random_vocab":
        if vocab is None:
            raise ValueError("random_vocab needs vocab=ExplanationVocab.from_examples(train)")
        return vocab.sample(rng, n)
    raise ValueError(f"{variant!r} is not a pseudo-explanation variant")


def make_target(example: RatedExample, axis: str, variant: str, seed: int = 0,
                rng: np.random.Generator | None = None,
                vocab: ExplanationVocab | None = None) -> str:
    """The target text for ``example`` on ``axis`` under ``variant`` (see module doc).

    Randomness comes from ``rng`` if given, else from (``seed``, example id, axis,
    variant), so a target does not depend on the order examples are visited in.
    """
    check_axis(axis)
    if variant not in TARGET_VARIANTS:
        raise ValueError(f"unknown target variant {variant!r}; variants are {TARGET_VARIANTS}")
    head = label_text(example.label(axis))
    if variant == "label_only":
        return head
    expl = words(example.explanation(axis))
    if not expl:
        raise ValueError(f"example {example.id!r}: empty explanation on {axis}")
    if variant != "explanation":
        rng = rng if rng is not None else example_rng(seed, example.id, axis, variant)
        expl = pseudo_words(expl, variant, rng, vocab)
    return head + EXPLANATION_PREFIX + " ".join(expl)


def target_length_stats(examples: Sequence[RatedExample], axis: str, *, seed: int = 0,
                        vocab: ExplanationVocab | None = None, tokenizer=None,
                        variants: Sequence[str] = TARGET_VARIANTS) -> dict[str, dict]:
    """Per variant: mean/median/max length in words (and tokens when given a tokenizer)."""
    out = {}
    for variant in variants:
        if variant == "random_vocab" and vocab is None:
            vocab = ExplanationVocab.from_examples(examples, axis)
        texts = [make_target(ex, axis, variant, seed=seed, vocab=vocab) for ex in examples]
        stats = {"words": _summary([len(words(t)) for t in texts])}
        if tokenizer is not None and texts:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            stats["tokens"] = _summary([len(x) for x in ids])
        out[variant] = stats
    return out


def _summary(lengths: list[int]) -> dict:
    if not lengths:
        return {"count": 0, "mean": 0.0, "median": 0.0, "max": 0}
    a = np.asarray(lengths)
    return {"count": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)),
            "max": int(a.max())}


def prompt_room(d) -> tuple[str, ...]:
    """``data.prompt_room`` as a tuple of target variants; None gives the paper's variants.
    A run stored before the key existed has it from ``config_defaults.with_defaults``."""
    room = PAPER_VARIANTS if d.prompt_room is None else d.prompt_room
    if isinstance(room, str) or not all(v in TARGET_VARIANTS for v in room):
        raise ConfigValueError(f"config.data.prompt_room={room!r}: expected a tuple of "
                               f"target variants from {TARGET_VARIANTS}")
    return tuple(room)


def explanation_vocab(splits, axis: str, variants):
    """The training split's explanation vocabulary when ``random_vocab`` is among
    ``variants`` (its targets are drawn from it), else None. Built from the training split
    only, so test explanations never leak into training targets."""
    return (ExplanationVocab.from_examples(splits.train, axis)
            if "random_vocab" in variants else None)
