"""Ensemble annotation: every item x axis x annotator x prompt variant, cached, aggregated.

Requests run on a bounded thread pool. Every raw answer is committed to an on-disk
cache keyed by (item, axis, annotator, variant) as soon as it arrives, so a rerun after a
crash or Ctrl-C sends no request twice; failed requests are not cached and are retried
by the rerun. Answers are parsed strictly: malformed ones are counted per annotator and
excluded, never guessed. An item whose axis ends with no valid answer is left out of
the output and counted. Explanations are summarised by a designated annotator when one
is given (falling back, counted, to the explanation closest to the consensus).

    annotate(conversations, annotators, cache, *, variants, summarizer, concurrency)
        -> (list[RatedExample], AnnotationReport)
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import os
import sqlite3
import threading
from typing import Sequence

from xft_jax.data.aggregate import (AggregationError, ScoredAnswer, aggregate_axis,
                                    closest_explanation, rescale)
from xft_jax.data.annotation_prompts import (SUMMARY_VARIANT, VARIANTS, MalformedAnswer,
                                             build_messages, build_summary_messages,
                                             parse_answer, parse_summary, scale_of)
from xft_jax.data.openai_client import Annotator, AnnotatorError
from xft_jax.data.schema import AXES, Conversation, RatedExample

log = logging.getLogger(__name__)


class AnswerCache:
    """SQLite store of raw answers, keyed by (item, axis, annotator, variant).

    A row also holds a fingerprint of the exact request; if the item's text or the prompt
    changed since, the stale answer is not reused. Thread-safe; one commit per answer.
    """

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (item TEXT, axis TEXT, "
                         "annotator TEXT, variant TEXT, fingerprint TEXT, answer TEXT, "
                         "PRIMARY KEY (item, axis, annotator, variant))")
        self._db.commit()

    def get(self, key: tuple[str, str, str, str], fingerprint: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT fingerprint, answer FROM answers WHERE item=? AND "
                                   "axis=? AND annotator=? AND variant=?", key).fetchone()
        return row[1] if row and row[0] == fingerprint else None

    def put(self, key: tuple[str, str, str, str], fingerprint: str, answer: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                             (*key, fingerprint, answer))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def fingerprint(annotator: Annotator, messages: list[dict]) -> str:
    blob = json.dumps([getattr(annotator, "model", ""), messages], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclasses.dataclass
class AnnotationReport:
    """What was asked, answered, reused, failed, malformed and left unrated."""

    items: int = 0
    rated: int = 0
    requests: int = 0
    cache_hits: int = 0
    failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    malformed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unrated: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    summaries: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 50:
            self.examples.append(text)

    def to_dict(self) -> dict:
        return {"items": self.items, "rated": self.rated, "requests": self.requests,
                "cache_hits": self.cache_hits, "failed": dict(self.failed),
                "malformed": dict(self.malformed), "unrated": dict(self.unrated),
                "summaries": dict(self.summaries), "examples": list(self.examples)}


@dataclasses.dataclass
class _Task:
    conv: Conversation
    axis: str
    annotator: Annotator
    variant: str
    messages: list
    answer: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.conv.id, self.axis, self.annotator.name, self.variant)


def _run(tasks: list[_Task], cache: AnswerCache, report: AnnotationReport,
         pool: cf.ThreadPoolExecutor) -> None:
    """Fills ``task.answer`` from the cache or by asking; failures stay None (counted)."""
    pending = []
    for t in tasks:
        fp = fingerprint(t.annotator, t.messages)
        t.answer = cache.get(t.key, fp)
        if t.answer is None:
            pending.append((t, fp))
        else:
            report.cache_hits += 1

    def work(task: _Task, fp: str) -> None:
        answer = task.annotator.complete(task.messages)
        cache.put(task.key, fp, answer)
        task.answer = answer

    futures = {pool.submit(work, t, fp): t for t, fp in pending}
    report.requests += len(futures)
    for fut in cf.as_completed(futures):
        try:
            fut.result()
        except AnnotatorError as e:
            t = futures[fut]
            report.failed[f"{t.annotator.name}: {e.kind}"] += 1
            report.note(f"{'/'.join(t.key)}: request failed: {e}")


def _parse(tasks: list[_Task], report: AnnotationReport) -> dict:
    """(item id, axis) -> valid ScoredAnswers; malformed answers counted and dropped."""
    answers: dict = collections.defaultdict(list)
    for t in tasks:
        if t.answer is None:
            continue
        scale = scale_of(t.variant)
        try:
            score, expl = parse_answer(t.answer, scale)
        except MalformedAnswer as e:
            report.malformed[f"{t.annotator.name}: {e.kind}"] += 1
            report.note(f"{'/'.join(t.key)}: malformed answer ({e}): {t.answer[:80]!r}")
            continue
        answers[(t.conv.id, t.axis)].append(
            ScoredAnswer(t.annotator.name, t.variant, rescale(score, scale), expl))
    return answers


def _summarise(convs, answers, ratings, summarizer, cache, report, pool) -> None:
    """Replaces each rating's explanation by the summariser's, where it gives a usable one."""
    tasks = []
    for c in convs:
        if all((c.id, axis) in ratings for axis in AXES):
            for axis in AXES:
                got = answers[(c.id, axis)]
                msgs = build_summary_messages(c, axis, ratings[(c.id, axis)].label,
                                              [a.explanation for a in got if a.explanation])
                tasks.append(_Task(c, axis, summarizer, SUMMARY_VARIANT, msgs))
    _run(tasks, cache, report, pool)
    for t in tasks:
        key = (t.conv.id, t.axis)
        try:
            if t.answer is None:
                raise MalformedAnswer("request failed", "request failed")
            ratings[key] = aggregate_axis(answers[key], parse_summary(t.answer))
            report.summaries["summarised"] += 1
        except MalformedAnswer as e:
            report.summaries[f"fallback to closest ({e.kind})"] += 1
            report.note(f"{t.conv.id}/{t.axis}: summary unusable ({e}); using "
                        f"{closest_explanation(answers[key], ratings[key].mean)[:40]!r}")


def annotate(conversations: Sequence[Conversation], annotators: Sequence[Annotator],
             cache: AnswerCache, *, variants: Sequence[str] = VARIANTS,
             summarizer: Annotator | None = None, concurrency: int = 8,
             chunk_size: int = 256) -> tuple[list[RatedExample], AnnotationReport]:
    """Rates every conversation on all axes with the ensemble; see module doc.

    Items are processed ``chunk_size`` at a time (prompts for 15,000 items x 3 axes x
    12 requests would not fit in memory at once) on one pool of ``concurrency`` threads.
    """
    for v in variants:
        scale_of(v)
    names = [a.name for a in annotators]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"annotator names must be unique and non-empty: {names}")
    report = AnnotationReport(items=len(conversations))
    out = []
    pool = cf.ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        for start in range(0, len(conversations), chunk_size):
            convs = conversations[start:start + chunk_size]
            tasks = [_Task(c, axis, ann, v, build_messages(c, axis, v))
                     for c in convs for axis in AXES for ann in annotators for v in variants]
            _run(tasks, cache, report, pool)
            answers = _parse(tasks, report)
            ratings = {}
            for c in convs:
                for axis in AXES:
                    try:
                        ratings[(c.id, axis)] = aggregate_axis(answers.get((c.id, axis), []))
                    except AggregationError as e:
                        report.unrated[f"{axis}: {e}"] += 1
                        report.note(f"{c.id}/{axis}: not rated: {e}")
            if summarizer is not None:
                _summarise(convs, answers, ratings, summarizer, cache, report, pool)
            out += [RatedExample(c, {axis: ratings[(c.id, axis)] for axis in AXES})
                    for c in convs if all((c.id, axis) in ratings for axis in AXES)]
            log.info("annotated %d/%d items", start + len(convs), len(conversations))
    except BaseException:  # Ctrl-C: drop queued work, let in-flight answers reach the cache
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    report.rated = len(out)
    log.info("annotation: %s", report.to_dict())
    return out, report
