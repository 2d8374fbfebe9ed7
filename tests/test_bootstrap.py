"""The paired hierarchical bootstrap and Holm's correction against cases computed by hand."""

import itertools

import numpy as np
import pytest

from xft_jax.study import bootstrap

# 2 seeds x 3 examples. Correctness of label_only (base) and of another variant (other):
BASE = {0: {"a": 1.0, "b": 0.0, "c": 1.0}, 1: {"a": 0.0, "b": 0.0, "c": 1.0}}
OTHER = {0: {"a": 1.0, "b": 1.0, "c": 1.0}, 1: {"a": 1.0, "b": 0.0, "c": 0.0}}
# per-seed differences: seed 0 (0, 1, 0), seed 1 (1, 0, -1)
# seed means m = (1/3, 0), overall mean 1/6; within-seed variances v = (2/9, 2/3).
# T = mean over 2 drawn seeds of the mean of 3 examples drawn within each:
#   E[T] = 1/6
#   Var[T] = (1/S) * (Var_seed(m) + mean(v) / n)
#          = (1/2) * ((1/6)^2 + (2/9 + 2/3) / 2 / 3) = (1/2) * (1/36 + 4/27) = 19/216
HAND_MEAN, HAND_VAR = 1 / 6, 19 / 216


def _exact_distribution():
    """All 2^2 seed draws x 3^3 example draws per drawn seed, equally likely."""
    d = np.array([[0, 1, 0], [1, 0, -1]], float)
    per_seed = [[d[s][list(idx)].mean() for idx in itertools.product(range(3), repeat=3)]
                for s in range(2)]
    out = []
    for s1, s2 in itertools.product(range(2), repeat=2):
        out += [(x + y) / 2 for x in per_seed[s1] for y in per_seed[s2]]
    return np.array(out)


def test_bootstrap_distribution_matches_the_hand_computed_moments():
    exact = _exact_distribution()
    assert exact.size == 4 * 27 * 27
    assert exact.mean() == pytest.approx(HAND_MEAN) and exact.var() == pytest.approx(HAND_VAR)
    d = np.array([[OTHER[k][i] - BASE[k][i] for i in "abc"] for k in (0, 1)])
    boot = bootstrap.hierarchical_bootstrap(d, n_boot=200_000, seed=1)
    assert boot.mean() == pytest.approx(HAND_MEAN, abs=0.003)
    assert boot.var() == pytest.approx(HAND_VAR, abs=0.003)
    # many distinct values take the index-resampling path: same moments by the formula
    c = np.random.default_rng(0).normal(size=(3, 40)) + np.array([[0.0], [0.5], [2.0]])
    assert np.unique(c).size > 64
    slow = bootstrap.hierarchical_bootstrap(c, n_boot=20_000, seed=2)
    var = (c.mean(1).var() + c.var(1).mean() / 40) / 3
    assert slow.mean() == pytest.approx(c.mean(), abs=4 * var ** 0.5 / 20_000 ** 0.5)
    assert slow.var() == pytest.approx(var, rel=0.05)


def test_paired_difference_ci_and_p_value_against_the_exact_distribution():
    out = bootstrap.paired_difference(BASE, OTHER, n_boot=100_000, seed=0)
    exact = _exact_distribution()
    assert out["diff"] == pytest.approx(HAND_MEAN)
    assert out["n_seeds"] == 2 and out["n_examples"] == 3
    p_exact = min(1.0, 2 * min(np.mean(exact <= 0), np.mean(exact >= 0)))
    assert out["p_value"] == pytest.approx(p_exact, abs=0.01)
    lo, hi = np.percentile(exact, [2.5, 97.5])
    assert out["ci_low"] == pytest.approx(lo, abs=1 / 6 + 1e-9)   # T moves in steps of 1/6
    assert out["ci_high"] == pytest.approx(hi, abs=1 / 6 + 1e-9)


def test_seed_variance_enters_the_interval():
    """Seeds that disagree completely: averaging over seeds first (examples-only
    bootstrap) would give a zero-width interval around 0; seeds resampled give [-1, 1]."""
    base = {0: {"a": 0.0, "b": 0.0}, 1: {"a": 1.0, "b": 1.0}}
    other = {0: {"a": 1.0, "b": 1.0}, 1: {"a": 0.0, "b": 0.0}}
    out = bootstrap.paired_difference(base, other, n_boot=4000)
    assert out["diff"] == 0.0 and out["ci_low"] == -1.0 and out["ci_high"] == 1.0
    assert out["p_value"] == 1.0


def test_only_paired_seeds_and_common_examples():
    base = {0: {"x": 1.0, "y": 0.0, "z": 1.0}, 2: {"x": 1.0, "y": 1.0}}
    other = {0: {"x": 1.0, "y": 1.0}, 1: {"x": 0.0, "y": 0.0}}
    out = bootstrap.paired_difference(base, other, n_boot=50)
    assert out["seeds"] == [0] and out["n_examples"] == 2 and out["diff"] == pytest.approx(0.5)
    assert bootstrap.paired_difference(base, {3: {"x": 1.0}}) is None
    assert bootstrap.paired_difference({}, other) is None


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02 <= 0.05 reject; 0.01*3 = 0.03 reject; 0.03*2 = 0.06 stop.
    rejected, adjusted = bootstrap.holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert rejected == [True, False, False, True]
    # adjusted: running max of (m - rank) * p: 0.02, 0.03, 0.06, max(0.06, 0.04) = 0.06
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # all four would pass uncorrected; one large p does not block earlier rejections
    assert bootstrap.holm([0.001, 0.9], 0.05) == ([True, False], [0.002, 0.9])
    assert bootstrap.holm([], 0.05) == ([], [])
