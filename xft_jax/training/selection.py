"""Checkpoint selection by validation accuracy, recorded with the run.

Every ``train.eval_every`` steps the trainer scores the validation split (carved from the
training split, ``data.splits``) the way the final evaluation scores test: the argmax over
the five label tokens at the label position. The checkpoint with the highest validation
accuracy (the earliest on ties) is the run's result: the trainer keeps it from deletion,
and ``<workdir>/validation.json`` records the curve and the selected step, which the
evaluator loads by default. The test split plays no part in it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from xft_jax import atomic

VALIDATION_FILE = "validation.json"
METRIC = "validation accuracy (argmax over the five label tokens)"
RULE = "highest validation accuracy; the earliest step on ties"


@dataclasses.dataclass
class ValidationCurve:
    """Validation points of a run, oldest first: {"step", "accuracy", "nll", "n"}."""

    points: list[dict] = dataclasses.field(default_factory=list)

    @property
    def best(self) -> dict | None:
        if not self.points:
            return None
        top = max(p["accuracy"] for p in self.points)
        return min((p for p in self.points if p["accuracy"] == top), key=lambda p: p["step"])

    def add(self, step: int, accuracy: float, nll: float, n: int) -> bool:
        """Appends a point; True when it is the new best (strictly better accuracy)."""
        if self.points and step <= self.points[-1]["step"]:
            raise ValueError(f"validation point at step {step} after step "
                             f"{self.points[-1]['step']}")
        before = self.best
        self.points.append({"step": int(step), "accuracy": float(accuracy),
                            "nll": float(nll), "n": int(n)})
        return before is None or accuracy > before["accuracy"]

    def to_dict(self) -> dict:
        best = self.best
        return {"metric": METRIC, "rule": RULE, "curve": list(self.points),
                "best_step": None if best is None else best["step"],
                "best_accuracy": None if best is None else best["accuracy"]}

    @classmethod
    def from_dict(cls, doc: dict | None) -> "ValidationCurve":
        return cls([dict(p) for p in (doc or {}).get("curve", [])])


def rating_accuracy(label: np.ndarray, log_probs: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean NLL of the gold label) of 5-way label log-probs [N, 5]."""
    label = np.asarray(label, np.int64)
    log_probs = np.asarray(log_probs, np.float64)
    acc = float(np.mean(log_probs.argmax(axis=1) == label))
    nll = float(-np.mean(log_probs[np.arange(label.size), label]))
    return acc, nll


def write(workdir: str, curve: ValidationCurve) -> None:
    atomic.write_json(os.path.join(workdir, VALIDATION_FILE), curve.to_dict())


def read(workdir: str) -> dict | None:
    """The run's validation record, or None when it recorded none (``eval_every=0``)."""
    path = os.path.join(workdir, VALIDATION_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "curve" not in doc:
        raise ValueError(f"{path}: not a validation record (no 'curve')")
    return doc


def selected_step(workdir: str) -> int | None:
    """The step the run selected on validation, or None without a validation record."""
    doc = read(workdir)
    return None if doc is None or doc.get("best_step") is None else int(doc["best_step"])
