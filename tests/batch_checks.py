"""Checks on padded batches shared by the data-pipeline and evaluation tests."""

from __future__ import annotations

import numpy as np


def assert_padded_to_step(coarse, fine, step: int, smallest: int = 64) -> list[int]:
    """Each ``fine`` batch pads to the smallest multiple of ``step`` (from ``smallest``)
    that holds its longest row, no wider than its ``coarse`` twin, which holds the same
    rows with only padding beyond that width. Returns the fine batches' widths."""
    widths = []
    for a, b in zip(coarse, fine, strict=True):
        n = b["input_ids"].shape[1]
        longest = int(b["segment_ids"].sum(1).max())
        assert n == max(smallest, -(-longest // step) * step) and a["input_ids"].shape[1] >= n
        assert not a["segment_ids"][:, n:].any()         # only padding was left out
        for k in a:
            np.testing.assert_array_equal(a[k][:, :n] if a[k].ndim == 2 else a[k], b[k])
        widths.append(n)
    return widths
