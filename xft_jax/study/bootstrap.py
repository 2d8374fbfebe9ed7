"""Statistics of a variant-vs-baseline comparison: a paired hierarchical bootstrap over
seeds and test examples, and Holm's correction across the settings of a study.

A run's test accuracy varies with its training seed as well as with the test examples it
happens to be scored on; an interval that resamples examples only (after averaging over
seeds) leaves the seed variance out. Here each bootstrap replicate first draws the seeds
(with replacement) and then, within each drawn seed, the examples (with replacement).
Both variants of a seed are paired: the resampled quantity is the per-seed, per-example
difference ``other - base`` of correctness, on the examples every run of both scored.

    d = paired_difference({0: {"ex1": 1.0, ...}, 1: {...}}, {0: {...}, 1: {...}})
    d["diff"], d["ci_low"], d["ci_high"], d["p_value"]
    rejected, adjusted = holm([d["p_value"] for d in per_setting], alpha=0.05)
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

ALPHA = 0.05
_MAX_DISTINCT = 64   # beyond this many distinct differences, resample indices directly


def hierarchical_bootstrap(diff: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """[n_boot] bootstrap replicates of ``diff.mean()`` for ``diff`` [seeds, examples]:
    draw seeds with replacement, then examples with replacement within each drawn seed.

    With few distinct values (correctness differences are -1, 0 or 1) the examples drawn
    for a seed are summarised by a multinomial draw of how often each value is drawn,
    which has exactly the distribution of resampling the indices, at a fraction of the
    cost for thousands of examples."""
    diff = np.asarray(diff, np.float64)
    if diff.ndim != 2 or diff.shape[0] == 0 or diff.shape[1] == 0:
        raise ValueError(f"diff must be a non-empty [seeds, examples] array, got {diff.shape}")
    s, n = diff.shape
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, s, size=(n_boot, s))                  # stage 1: seeds
    values, inverse = np.unique(diff, return_inverse=True)
    if values.size <= _MAX_DISTINCT:
        inverse = inverse.reshape(s, n)
        freq = np.stack([np.bincount(inverse[k], minlength=values.size) / n for k in range(s)])
        counts = rng.multinomial(n, freq[drawn])                  # stage 2: examples
        seed_means = counts @ values / n                          # [n_boot, s]
    else:
        idx = rng.integers(0, n, size=(n_boot, s, n))
        seed_means = np.take_along_axis(diff[drawn], idx, axis=2).mean(axis=2)
    return seed_means.mean(axis=1)


def two_sided_p(boot: np.ndarray) -> float:
    """Bootstrap p-value of "no difference": twice the smaller tail mass at zero (ties
    count in both tails), with the +1 correction so that it is never 0."""
    b = boot.size
    below = (1 + np.count_nonzero(boot <= 0)) / (b + 1)
    above = (1 + np.count_nonzero(boot >= 0)) / (b + 1)
    return float(min(1.0, 2 * min(below, above)))


def paired_difference(base: Mapping[int, Mapping[str, float]],
                      other: Mapping[int, Mapping[str, float]], n_boot: int = 2000,
                      seed: int = 0, alpha: float = ALPHA) -> dict | None:
    """Accuracy difference ``other - base`` (mean over paired seeds of the mean over
    examples) with a ``1 - alpha`` percentile interval and a two-sided p-value.

    ``base`` / ``other``: seed -> {example id -> correctness}. Seeds run for both variants
    are paired; examples scored by every one of those runs are used. None when nothing
    pairs up."""
    seeds = sorted(set(base) & set(other))
    if not seeds:
        return None
    runs = [base[k] for k in seeds] + [other[k] for k in seeds]
    ids = sorted(set.intersection(*[set(r) for r in runs]))
    if not ids:
        return None
    b = np.array([[base[k][i] for i in ids] for k in seeds], np.float64)
    o = np.array([[other[k][i] for i in ids] for k in seeds], np.float64)
    d = o - b
    boot = hierarchical_bootstrap(d, n_boot, seed)
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "p_value": two_sided_p(boot), "n_examples": len(ids), "n_seeds": len(seeds),
            "seeds": seeds, "n_seeds_base": len(base), "n_seeds_other": len(other)}


def holm(p_values: Sequence[float], alpha: float = ALPHA) -> tuple[list[bool], list[float]]:
    """Holm's step-down correction: (rejected at family-wise level ``alpha``, adjusted
    p-values), both in the order given."""
    p = np.asarray(p_values, np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    rejected = np.zeros(m, bool)
    running, still = 0.0, True
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
        still = still and p[i] <= alpha / (m - rank)
        rejected[i] = still
    return rejected.tolist(), adjusted.tolist()
