"""The four annotator prompt variants, the summary prompt, and strict answer parsing.

Variants (the paper's): a 1-4 or a 1-5 scale, each with or without worked examples.
Every prompt asks for a score and a brief explanation as JSON. Parsing accepts the ways
chat models really answer (bare JSON, JSON in a code fence or in prose, "Score: 4/5"
lines) but never guesses: no score, two different scores, a non-integer or an
out-of-range score make the answer malformed (``MalformedAnswer``), and it is excluded.
"""

from __future__ import annotations

import json
import re

from xft_jax.data import rubrics
from xft_jax.data.schema import Conversation, check_axis

VARIANTS = ("scale4", "scale4_examples", "scale5", "scale5_examples")
SUMMARY_VARIANT = "summary"


class MalformedAnswer(ValueError):
    """An annotator answer that does not contain exactly one valid score.

    ``kind`` is a short category for counting ("no score", "out of range", ...).
    """

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def scale_of(variant: str) -> int:
    if variant not in VARIANTS:
        raise ValueError(f"unknown prompt variant {variant!r}; variants are {VARIANTS}")
    return 4 if variant.startswith("scale4") else 5


# One short worked example per axis: (context, response, score on 1-5, explanation).
_EXAMPLES = {
    "naturalness": (
        ("User: What time does the museum open?", "museum open the at 9 yes open morning",
         1, "The words are jumbled and the sentence has no grammatical structure."),
        ("User: What time does the museum open?", "It opens at 9 in the morning, every day "
         "except Monday.", 5, "A fluent, grammatical sentence a person would say.")),
    "comprehensiveness": (
        ("User: What does the hotel cost and does it have parking?", "It costs 90 dollars a "
         "night.", 3, "It gives the price but does not say anything about parking."),
        ("User: What does the hotel cost and does it have parking?", "It costs 90 dollars a "
         "night and parking is free.", 5, "Both questions, price and parking, are answered.")),
    "on_topic": (
        ("User: Any tips for growing basil?", "Basil likes sun. By the way, my favourite "
         "football team won yesterday and the match was amazing.", 2,
         "Only the first sentence is about basil; the rest is about football."),
        ("User: Any tips for growing basil?", "Give it six hours of sun and pinch off the "
         "flowers.", 5, "Every sentence is about growing basil.")),
}


def _to_scale(score5: int, scale: int) -> int:
    return score5 if scale == 5 else {1: 1, 2: 2, 3: 2, 4: 3, 5: 4}[score5]


def render_conversation(conv: Conversation) -> str:
    lines = [f"{speaker}: {text}" for speaker, text in conv.context]
    return ("\n".join(lines) or "(no earlier turns)") + f"\n\nRESPONSE TO RATE:\n{conv.response}"


def build_messages(conv: Conversation, axis: str, variant: str) -> list[dict]:
    """Chat messages asking one annotator for one score on ``axis`` under ``variant``."""
    check_axis(axis)
    scale = scale_of(variant)
    system = ("You are a careful annotator of conversational responses. You rate one "
              "quality of the final response only and justify the rating briefly.")
    parts = [f"Rate the final response on this criterion, using a 1 to {scale} scale.\n\n"
             f"{rubrics.rubric(axis, scale)}"]
    if variant.endswith("_examples"):
        for ctx, resp, s5, why in _EXAMPLES[axis]:
            answer = json.dumps({"score": _to_scale(s5, scale), "explanation": why})
            parts.append(f"Example:\n{ctx}\nRESPONSE TO RATE:\n{resp}\nAnswer: {answer}")
    parts.append(f"Now the conversation to rate:\n{render_conversation(conv)}")
    parts.append(f'Answer with JSON only: {{"score": <integer 1-{scale}>, "explanation": '
                 '"<one or two sentences>"}')
    return [{"role": "system", "content": system},
            {"role": "user", "content": "\n\n".join(parts)}]


def build_summary_messages(conv: Conversation, axis: str, label: int,
                           explanations: list[str]) -> list[dict]:
    """Asks the designated summariser to merge the ensemble's explanations into one."""
    listed = "\n".join(f"- {e}" for e in explanations)
    return [{"role": "system", "content": "You summarise annotators' judgements faithfully."},
            {"role": "user", "content":
                f"Several annotators rated the {axis.replace('_', '-')} of this response; "
                f"the consensus rating is {label} out of 5.\n\n{render_conversation(conv)}\n\n"
                f"Their explanations:\n{listed}\n\nWrite one brief explanation (one or two "
                f"sentences) that supports the consensus rating. Reply with the explanation "
                f"only."}]


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)
_SCORE_LINE = re.compile(
    r"\b(?:score|rating)\b\**\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+))?", re.I)
_EXPL_LINE = re.compile(r"\b(?:explanation|reason|rationale)\b\**\s*[:=]\s*\**\s*(.+)",
                        re.I | re.S)
_SCORE_KEYS = ("score", "rating")
_EXPL_KEYS = ("explanation", "reason", "rationale", "justification")


def _json_objects(text: str) -> list[dict]:
    found, dec = [], json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def _check_score(value, scale: int, out_of: int | None = None) -> int:
    if out_of is not None and out_of != scale:
        raise MalformedAnswer(f"score given out of {out_of}, prompt asked 1-{scale}",
                              "wrong scale")
    if isinstance(value, bool):
        raise MalformedAnswer(f"score {value!r} is not a number", "not a number")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+))?\s*", value)
        if not m:
            raise MalformedAnswer(f"score {value!r} is not a number", "not a number")
        return _check_score(float(m.group(1)), scale, int(m.group(2)) if m.group(2) else None)
    if not isinstance(value, (int, float)):
        raise MalformedAnswer(f"score {value!r} is not a number", "not a number")
    if value != int(value):
        raise MalformedAnswer(f"score {value} is not an integer", "not an integer")
    if not 1 <= int(value) <= scale:
        raise MalformedAnswer(f"score {int(value)} outside 1-{scale}", "out of range")
    return int(value)


def parse_answer(text: str, scale: int) -> tuple[int, str]:
    """(score on 1..scale, explanation) from an annotator's reply; ``MalformedAnswer`` else."""
    if not isinstance(text, str) or not text.strip():
        raise MalformedAnswer("empty answer", "empty")
    body = "\n".join(_FENCE.findall(text)) or text
    candidates = []
    for obj in _json_objects(body):
        keys = {k.lower(): v for k, v in obj.items() if isinstance(k, str)}
        score_key = next((k for k in _SCORE_KEYS if k in keys), None)
        if score_key is None:
            continue
        expl = next((keys[k] for k in _EXPL_KEYS if k in keys), "")
        candidates.append((_check_score(keys[score_key], scale),
                           expl.strip() if isinstance(expl, str) else ""))
    if not candidates:
        for m in _SCORE_LINE.finditer(text):
            score = _check_score(float(m.group(1)), scale,
                                 int(m.group(2)) if m.group(2) else None)
            em = _EXPL_LINE.search(text, m.end())
            candidates.append((score, em.group(1).strip().strip('"') if em else ""))
    if not candidates:
        raise MalformedAnswer("no score found", "no score")
    if len({s for s, _ in candidates}) > 1:
        raise MalformedAnswer(f"conflicting scores {sorted({s for s, _ in candidates})}",
                              "conflicting scores")
    explanation = next((e for _, e in candidates if e), "")
    return candidates[0][0], " ".join(explanation.split())


def parse_summary(text: str) -> str:
    """The summariser's explanation, without a leading 'Explanation:' or quotes."""
    if not isinstance(text, str):
        raise MalformedAnswer("empty summary", "empty")
    t = re.sub(r"^\s*(?:explanation|summary)\s*:\s*", "", text.strip(), flags=re.I)
    t = " ".join(t.strip().strip('"').split())
    if not t:
        raise MalformedAnswer("empty summary", "empty")
    return t
