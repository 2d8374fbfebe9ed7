"""Rating metrics against scikit-learn / scipy and hand computations."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from xft_jax.eval import metrics


def _random_case(seed, n=200):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 5, n)
    logits = rng.normal(size=(n, 5)) + 2.0 * np.eye(5)[gold] * rng.uniform(0, 2, (n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return gold, probs


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_sklearn_and_scipy(seed):
    gold, probs = _random_case(seed)
    pred = probs.argmax(1)
    m = metrics.rating_metrics(gold, probs)
    assert m["n"] == len(gold)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(gold, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(gold, pred, average="macro"))
    assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(gold, pred, weights="quadratic"))
    assert m["mae"] == pytest.approx(np.abs(gold - pred).mean())
    assert m["spearman"] == pytest.approx(stats.spearmanr(gold, pred)[0])
    assert m["within1_accuracy"] == pytest.approx(np.mean(np.abs(gold - pred) <= 1))
    assert m["confusion_matrix"] == skm.confusion_matrix(gold, pred, labels=range(5)).tolist()
    assert np.allclose(m["gold_distribution"], np.bincount(gold, minlength=5) / len(gold))
    assert np.allclose(m["predicted_distribution"], np.bincount(pred, minlength=5) / len(gold))
    # NLL and multi-class Brier, by hand
    assert m["nll"] == pytest.approx(-np.mean([np.log(p[g]) for p, g in zip(probs, gold)]))
    assert m["brier"] == pytest.approx(
        np.mean([sum((p[k] - (k == g)) ** 2 for k in range(5)) for p, g in zip(probs, gold)]))


def test_ece_by_hand():
    # Four examples; confidences 0.9 (right), 0.9 (wrong), 0.5 (right), 0.3 (wrong).
    probs = np.array([[0.9, 0.05, 0.05, 0, 0], [0.9, 0.1, 0, 0, 0],
                      [0.5, 0.2, 0.1, 0.1, 0.1], [0.3, 0.25, 0.25, 0.1, 0.1]])
    gold = np.array([0, 1, 0, 4])
    # 15 bins of width 1/15: 0.9 -> bin 13, 0.5 -> bin 7, 0.3 -> bin 4.
    expect = 0.5 * abs(0.5 - 0.9) + 0.25 * abs(1 - 0.5) + 0.25 * abs(0 - 0.3)
    assert metrics.expected_calibration_error(gold, probs) == pytest.approx(expect)
    m = metrics.rating_metrics(gold, probs)
    assert m["ece"] == pytest.approx(expect)
    assert m["accuracy"] == 0.5


def test_constant_predictions_give_none_not_nan():
    gold = np.array([0, 1, 2, 3, 4])
    probs = np.tile([0.1, 0.1, 0.6, 0.1, 0.1], (5, 1))
    m = metrics.rating_metrics(gold, probs)
    assert m["spearman"] is None
    assert m["accuracy"] == pytest.approx(0.2)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        metrics.rating_metrics([0, 1], np.ones((2, 4)) / 4)
    with pytest.raises(ValueError, match="0..4"):
        metrics.rating_metrics([0, 5], np.ones((2, 5)) / 5)
