"""Canonical records: what every adapter produces and every later stage consumes.

A ``Conversation`` is one response to rate, with the turns that led to it. A
``RatedExample`` adds, for each of the three axes, the ensemble's scores (already on
the 1..5 scale), their summary statistics, the integer label and one explanation.
Both validate on construction so a bad record fails where it is made, with a message
that says which field of which item is wrong, instead of deep inside training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from xft_jax.errors import UserError

AXES = ("naturalness", "comprehensiveness", "on_topic")
RATED_FIELDS = ("id", "source", "context", "response", "ratings")
MIN_LABEL, MAX_LABEL = 1, 5
NUM_LABELS = MAX_LABEL - MIN_LABEL + 1


class SchemaError(UserError, ValueError):
    """A record that breaks the canonical schema; the message names item and field."""


def _check_text(value: Any, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise SchemaError(f"{what} is empty")
    return value


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One response to rate. ``context`` holds (speaker, text) turns, oldest first.

    ``id`` is deterministic (derived from the source's own key or a content hash) so the
    hashed train/test split and the annotation cache never change between runs.
    """

    id: str
    source: str
    context: tuple[tuple[str, str], ...]
    response: str

    def __post_init__(self):
        _check_text(self.id, "conversation id")
        where = f"conversation {self.id!r}"
        _check_text(self.source, f"{where}: source")
        _check_text(self.response, f"{where}: response")
        if isinstance(self.context, (str, bytes)) or not isinstance(self.context, Sequence):
            raise SchemaError(f"{where}: context must be a list of (speaker, text) turns")
        turns = []
        for i, turn in enumerate(self.context):
            if isinstance(turn, (str, bytes)) or not isinstance(turn, Sequence) or len(turn) != 2:
                raise SchemaError(f"{where}: context turn {i} must be a (speaker, text) pair")
            speaker = _check_text(turn[0], f"{where}: context turn {i} speaker")
            text = _check_text(turn[1], f"{where}: context turn {i} text")
            turns.append((speaker, text))
        object.__setattr__(self, "context", tuple(turns))

    def to_dict(self) -> dict:
        return {"id": self.id, "source": self.source,
                "context": [list(t) for t in self.context], "response": self.response}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Conversation":
        missing = [k for k in ("id", "source", "context", "response") if k not in d]
        if missing:
            raise SchemaError(f"conversation {d.get('id')!r}: missing field(s) {missing}")
        return cls(id=d["id"], source=d["source"], context=d["context"], response=d["response"])


@dataclasses.dataclass(frozen=True)
class AxisRating:
    """The ensemble's verdict on one axis.

    ``scores`` are every valid annotator answer rescaled to 1..5 and ``raters`` names
    who gave each ("annotator/variant"). ``label`` = mean rounded half-up and clipped to
    1..5. ``agreement`` is the fraction of scores that round to the label.
    """

    scores: tuple[float, ...]
    raters: tuple[str, ...]
    mean: float
    spread: float
    median: float
    majority: int
    label: int
    agreement: float
    explanation: str

    def __post_init__(self):
        scores = tuple(float(s) for s in self.scores)
        raters = tuple(self.raters)
        if not scores:
            raise SchemaError("scores is empty")
        if len(raters) != len(scores):
            raise SchemaError(f"{len(scores)} scores but {len(raters)} raters")
        for s in scores:
            if not (MIN_LABEL <= s <= MAX_LABEL) or math.isnan(s):
                raise SchemaError(f"score {s} outside {MIN_LABEL}..{MAX_LABEL}")
        for name in ("label", "majority"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not MIN_LABEL <= v <= MAX_LABEL:
                raise SchemaError(f"{name} {v!r} is not an integer in {MIN_LABEL}..{MAX_LABEL}")
        for name in ("mean", "median"):
            v = float(getattr(self, name))
            if not MIN_LABEL <= v <= MAX_LABEL:
                raise SchemaError(f"{name} {v} outside {MIN_LABEL}..{MAX_LABEL}")
        if not 0.0 <= float(self.agreement) <= 1.0 or float(self.spread) < 0:
            raise SchemaError(f"agreement {self.agreement} / spread {self.spread} out of range")
        _check_text(self.explanation, "explanation")
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "raters", raters)
        for name in ("mean", "spread", "median", "agreement"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scores"], d["raters"] = list(self.scores), list(self.raters)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AxisRating":
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in names if k not in d]
        if missing:
            raise SchemaError(f"missing field(s) {missing}")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise SchemaError(f"unknown field(s) {unknown}; fields are {names}")
        rating = cls(**{k: d[k] for k in names})
        rating.check_consistent()
        return rating

    def check_consistent(self) -> None:
        """The label must be what its own scores give (``aggregate``: the mean of the
        scores, rounded half-up): a record that contradicts itself is refused."""
        mean = sum(self.scores) / len(self.scores)
        if abs(mean - self.mean) > 1e-6:
            raise SchemaError(f"mean {self.mean} is not the mean of its scores ({mean:g})")
        expected = min(MAX_LABEL, max(MIN_LABEL, math.floor(self.mean + 0.5)))
        if self.label != expected:
            raise SchemaError(f"label {self.label} contradicts its scores (mean "
                              f"{self.mean:g} gives label {expected})")


@dataclasses.dataclass(frozen=True)
class RatedExample:
    """A conversation with one ``AxisRating`` for each of ``AXES``."""

    conversation: Conversation
    ratings: Mapping[str, AxisRating]

    def __post_init__(self):
        if not isinstance(self.conversation, Conversation):
            raise SchemaError("RatedExample.conversation must be a Conversation")
        where = f"example {self.conversation.id!r}"
        unknown = sorted(set(self.ratings) - set(AXES))
        if unknown:
            raise SchemaError(f"{where}: unknown axis {unknown}; axes are {AXES}")
        missing = [a for a in AXES if a not in self.ratings]
        if missing:
            raise SchemaError(f"{where}: no rating for axis {missing}")
        for axis, r in self.ratings.items():
            if not isinstance(r, AxisRating):
                raise SchemaError(f"{where}: rating for {axis} must be an AxisRating")
        object.__setattr__(self, "ratings", {a: self.ratings[a] for a in AXES})

    @property
    def id(self) -> str:
        return self.conversation.id

    def rating(self, axis: str) -> AxisRating:
        check_axis(axis)
        return self.ratings[axis]

    def label(self, axis: str) -> int:
        return self.rating(axis).label

    def explanation(self, axis: str) -> str:
        return self.rating(axis).explanation

    def to_dict(self) -> dict:
        d = self.conversation.to_dict()
        d["ratings"] = {a: r.to_dict() for a, r in self.ratings.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RatedExample":
        unknown = sorted(set(d) - set(RATED_FIELDS))
        if unknown:
            raise SchemaError(f"example {d.get('id')!r}: unknown field(s) {unknown}; fields "
                              f"are {list(RATED_FIELDS)}")
        conv = Conversation.from_dict(d)
        ratings = d.get("ratings")
        if not isinstance(ratings, Mapping):
            raise SchemaError(f"example {conv.id!r}: missing or non-object field 'ratings'")
        parsed = {}
        for axis, r in ratings.items():
            if not isinstance(r, Mapping):
                raise SchemaError(f"example {conv.id!r}: rating for {axis!r} is not an object")
            try:
                parsed[axis] = AxisRating.from_dict(r)
            except (SchemaError, TypeError, ValueError) as e:
                raise SchemaError(f"example {conv.id!r}, axis {axis!r}: {e}") from None
        return cls(conversation=conv, ratings=parsed)


def check_axis(axis: str) -> str:
    if axis not in AXES:
        raise SchemaError(f"unknown axis {axis!r}; axes are {AXES}")
    return axis
