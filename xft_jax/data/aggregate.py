"""Turns an ensemble's answers for one item and axis into an ``AxisRating``.

The paper averages 12 scores per item and axis (3 annotators x 4 prompt variants, on
1-4 and 1-5 scales). 1-4 scores are mapped onto 1-5 by the rubric's anchors (the 1..5
score whose descriptor the 1..4 prompt showed: 1->1, 2->2, 3->4, 4->5) before averaging; the label is the mean rounded half-up and clipped to 1..5. Median, majority
and agreement are kept so a reader can see how contested a label was. Used by the real
annotation run and by the synthetic corpus alike, so both share one definition.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterable, Sequence

from xft_jax.data.rubrics import SCALE4_ANCHORS
from xft_jax.data.schema import AXES, MAX_LABEL, MIN_LABEL, AxisRating, RatedExample


class AggregationError(ValueError):
    """No usable answers for an item and axis."""


@dataclasses.dataclass(frozen=True)
class ScoredAnswer:
    """One valid annotator answer; ``score`` is already on the 1..5 scale."""

    annotator: str
    variant: str
    score: float
    explanation: str

    @property
    def rater(self) -> str:
        return f"{self.annotator}/{self.variant}"


def rescale(score: int, scale: int) -> float:
    """Maps an integer score on 1..scale onto 1..5: a 1..4 score to the 1..5 level whose
    descriptor it was shown with (``rubrics.SCALE4_ANCHORS``)."""
    if scale not in (4, 5):
        raise ValueError(f"scale must be 4 or 5, got {scale}")
    if isinstance(score, bool) or int(score) != score or not 1 <= score <= scale:
        raise ValueError(f"score {score!r} is not an integer in 1..{scale}")
    return float(score if scale == 5 else SCALE4_ANCHORS[int(score) - 1])


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def to_label(mean: float) -> int:
    return min(MAX_LABEL, max(MIN_LABEL, round_half_up(mean)))


def closest_explanation(answers: Sequence[ScoredAnswer], mean: float) -> str:
    """The explanation whose score is nearest the consensus; first in order on ties."""
    candidates = [a for a in answers if a.explanation.strip()]
    if not candidates:
        raise AggregationError("no answer carries an explanation")
    return min(candidates, key=lambda a: abs(a.score - mean)).explanation.strip()


def aggregate_axis(answers: Sequence[ScoredAnswer], explanation: str | None = None
                   ) -> AxisRating:
    """Mean, spread (population std), median, majority, label and agreement of answers.

    ``explanation`` is the summariser's text when there is one; otherwise the
    explanation closest to the consensus is used.
    """
    if not answers:
        raise AggregationError("no valid answers")
    scores = [float(a.score) for a in answers]
    mean = sum(scores) / len(scores)
    spread = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    ordered = sorted(scores)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    label = to_label(mean)
    votes = collections.Counter(to_label(s) for s in scores)
    top = max(votes.values())
    majority = min((v for v, n in votes.items() if n == top), key=lambda v: (abs(v - mean), v))
    agreement = votes.get(label, 0) / len(scores)
    if explanation is None or not explanation.strip():
        explanation = closest_explanation(answers, mean)
    return AxisRating(scores=tuple(scores), raters=tuple(a.rater for a in answers),
                      mean=mean, spread=spread, median=median, majority=majority,
                      label=label, agreement=agreement, explanation=explanation.strip())


def annotator_agreement(examples: Iterable[RatedExample], axes: Sequence[str] = AXES
                        ) -> dict[str, dict[str, float]]:
    """Per annotator and axis: the fraction of its scores that round to the final label."""
    hits: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    for ex in examples:
        for axis in axes:
            r = ex.ratings[axis]
            for rater, score in zip(r.raters, r.scores):
                cell = hits[rater.split("/", 1)[0]][axis]
                cell[0] += to_label(score) == r.label
                cell[1] += 1
    return {ann: {axis: h / n for axis, (h, n) in sorted(per.items())}
            for ann, per in sorted(hits.items())}


def label_distribution(examples: Iterable[RatedExample], axes: Sequence[str] = AXES
                       ) -> dict[str, dict[int, int]]:
    counts = {axis: collections.Counter() for axis in axes}
    for ex in examples:
        for axis in axes:
            counts[axis][ex.ratings[axis].label] += 1
    return {axis: {k: c.get(k, 0) for k in range(MIN_LABEL, MAX_LABEL + 1)}
            for axis, c in counts.items()}
