"""Rating metrics a reviewer asks for, from gold labels and predicted distributions.

Labels are class indices 0..4 (ratings 1..5). Everything that scikit-learn or scipy
already implements is delegated to them; only ECE, NLL and the multi-class Brier score
are written here (each is one line of arithmetic).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from xft_jax.data.schema import NUM_LABELS

ECE_BINS = 15


def _check(gold, probs) -> tuple[np.ndarray, np.ndarray]:
    gold = np.asarray(gold)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] != NUM_LABELS:
        raise ValueError(f"probs has shape {probs.shape}; expected [N, {NUM_LABELS}]")
    if gold.shape != (probs.shape[0],):
        raise ValueError(f"gold has shape {gold.shape}; expected ({probs.shape[0]},)")
    if gold.size == 0:
        raise ValueError("no examples")
    if gold.min() < 0 or gold.max() >= NUM_LABELS:
        raise ValueError(f"gold labels must be class indices 0..{NUM_LABELS - 1}, "
                         f"got range {gold.min()}..{gold.max()}")
    if not np.allclose(probs.sum(1), 1.0, atol=1e-4):
        raise ValueError("probs rows do not sum to 1")
    return gold.astype(np.int64), probs


def expected_calibration_error(gold, probs, bins: int = ECE_BINS) -> float:
    """Top-label ECE with equal-width confidence bins (0,1/b], ..., ((b-1)/b, 1]."""
    gold, probs = _check(gold, probs)
    conf = probs.max(1)
    correct = (probs.argmax(1) == gold).astype(np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def nll(gold, probs, eps: float = 1e-12) -> float:
    gold, probs = _check(gold, probs)
    return float(-np.mean(np.log(np.maximum(probs[np.arange(gold.size), gold], eps))))


def brier(gold, probs) -> float:
    """Multi-class Brier score: mean over examples of sum_k (p_k - 1[k = gold])^2."""
    gold, probs = _check(gold, probs)
    onehot = np.eye(NUM_LABELS)[gold]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def rating_metrics(gold, probs) -> dict[str, Any]:
    """All metrics as JSON-ready values (undefined ones, e.g. Spearman of a constant
    prediction, are None)."""
    gold, probs = _check(gold, probs)
    pred = probs.argmax(1)
    labels = list(range(NUM_LABELS))
    with np.errstate(all="ignore"):
        rho = stats.spearmanr(gold, pred).statistic if np.ptp(gold) and np.ptp(pred) else math.nan
        qwk = skm.cohen_kappa_score(gold, pred, labels=labels, weights="quadratic")
    n = gold.size
    return {
        "n": int(n),
        "accuracy": float(skm.accuracy_score(gold, pred)),
        "within1_accuracy": float(np.mean(np.abs(gold - pred) <= 1)),
        "macro_f1": float(skm.f1_score(gold, pred, labels=labels, average="macro",
                                       zero_division=0)),
        "qwk": _finite(qwk),
        "mae": float(skm.mean_absolute_error(gold, pred)),
        "spearman": _finite(rho),
        "ece": expected_calibration_error(gold, probs),
        "nll": nll(gold, probs),
        "brier": brier(gold, probs),
        "confusion_matrix": skm.confusion_matrix(gold, pred, labels=labels).tolist(),
        "gold_distribution": (np.bincount(gold, minlength=NUM_LABELS) / n).tolist(),
        "predicted_distribution": (np.bincount(pred, minlength=NUM_LABELS) / n).tolist(),
        "mean_predicted_probs": probs.mean(0).tolist(),
    }
