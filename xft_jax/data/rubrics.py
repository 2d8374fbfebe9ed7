"""What each axis means, in one place for the annotator prompts and the training prompt.

The annotators and the fine-tuned rater must be asked the same question, otherwise the
labels measure one thing and the model is trained on another.
"""

from __future__ import annotations

from xft_jax.data.schema import check_axis

AXIS_QUESTIONS = {
    "naturalness": "How natural and fluent is the response, as if written by a competent "
                   "human speaker (grammar, phrasing, coherence, tone)?",
    "comprehensiveness": "How completely does the response address everything the last "
                         "message asked for or needed?",
    "on_topic": "How well does the response stay on the topic of the conversation, "
                "without drifting to unrelated matters?",
}

# Level descriptors on the 1..5 scale, lowest first.
_LEVELS_5 = {
    "naturalness": ("incoherent or broken text", "many errors, hard to read",
                    "understandable but awkward", "mostly fluent, minor slips",
                    "fully fluent and natural"),
    "comprehensiveness": ("addresses none of what was asked", "addresses a small part",
                          "addresses about half", "addresses most of it",
                          "addresses everything asked"),
    "on_topic": ("entirely off topic", "mostly off topic", "partly off topic",
                 "mostly on topic with a small digression", "fully on topic"),
}

# The 1..4 scale drops the middle level (forcing a side), as 4-point Likert scales do.
_LEVELS_4_INDEX = (0, 1, 3, 4)
# The 1..5 score whose descriptor each 1..4 score shows: a 4-point answer means what its
# rubric line says, so "3" (mostly fluent, minor slips) is a 5-point 4, not 3.67.
SCALE4_ANCHORS = tuple(i + 1 for i in _LEVELS_4_INDEX)


def question(axis: str) -> str:
    return AXIS_QUESTIONS[check_axis(axis)]


def rubric(axis: str, scale: int = 5) -> str:
    """Multi-line rubric: the question, then one line per score of a 1..scale scale."""
    check_axis(axis)
    if scale == 5:
        levels = _LEVELS_5[axis]
    elif scale == 4:
        levels = tuple(_LEVELS_5[axis][i] for i in _LEVELS_4_INDEX)
    else:
        raise ValueError(f"scale must be 4 or 5, got {scale}")
    lines = [f"{axis.replace('_', '-')}: {AXIS_QUESTIONS[axis]}"]
    lines += [f"{i + 1} = {d}" for i, d in enumerate(levels)]
    return "\n".join(lines)
