"""What every figure of the project shares: the non-interactive backend and one colour per
target variant, so a variant looks the same in the report, the probe and the bench plots."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402,F401  (re-exported: import pyplot from here)

# Fixed before any result is seen; the untuned base model is drawn in grey, dashed.
VARIANT_COLORS = {
    "label_only": "#1f77b4",
    "explanation": "#d62728",
    "shuffled": "#2ca02c",
    "bag_of_words": "#ff7f0e",
    "random_vocab": "#9467bd",
    "base": "#7f7f7f",
}
_SPARE = ("#8c564b", "#e377c2", "#bcbd22", "#17becf")


def variant_color(variant: str) -> str:
    """The colour of ``variant`` in every figure (unknown names get a stable spare)."""
    if variant in VARIANT_COLORS:
        return VARIANT_COLORS[variant]
    return _SPARE[sum(map(ord, variant)) % len(_SPARE)]


__all__ = ["plt", "variant_color", "VARIANT_COLORS"]
