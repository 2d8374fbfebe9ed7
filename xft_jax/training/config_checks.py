"""Checks of a training config that need no data and no model: run before a run
creates anything, so a mistyped value fails in a second with the key named."""

from __future__ import annotations

import math

from xft_jax.data.schema import AXES
from xft_jax.data.sources import SOURCES
from xft_jax.data.targets import TARGET_VARIANTS
from xft_jax.errors import ConfigValueError


def _number(c, key: str) -> float:
    section, leaf = key.split(".")
    v = c[section][leaf]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigValueError(f"config.{key}={v!r}: expected a finite number")
    return float(v)


def check_train_config(config) -> None:
    """Raises ``ConfigValueError`` naming the first key whose value cannot work."""
    lr = _number(config, "optim.lr")
    if lr <= 0:
        raise ConfigValueError(f"config.optim.lr={lr}: the learning rate must be > 0")
    if config.train.steps is None:      # the run's length follows from train.epochs
        epochs = _number(config, "train.epochs")
        if epochs <= 0:
            raise ConfigValueError(f"config.train.epochs={epochs}: must be positive")
    for key in ("train.steps", "data.batch_size", "data.max_len"):
        if key == "train.steps" and config.train.steps is None:
            continue
        v = _number(config, key)
        if v < 1 or v != int(v):
            raise ConfigValueError(f"config.{key}={v}: must be a positive integer")
    for key in ("data.eval_examples", "train.eval_batches"):   # None: the whole split
        section, leaf = key.split(".")
        if config[section][leaf] is not None:
            v = _number(config, key)
            if v < 1 or v != int(v):
                raise ConfigValueError(f"config.{key}={v}: must be a positive integer, or "
                                       f"None for the whole validation split")
    step = _number(config, "data.bucket_step")
    if step < 0 or step != int(step):
        raise ConfigValueError(f"config.data.bucket_step={step}: must be 0 (powers of two) "
                               f"or a positive integer width step")
    d = config.data
    if d.source not in SOURCES:
        raise ConfigValueError(f"config.data.source={d.source!r} is not a known source; "
                               f"known: {', '.join(sorted(SOURCES))}")
    if d.target not in TARGET_VARIANTS:
        raise ConfigValueError(f"config.data.target={d.target!r}; expected one of "
                               f"{', '.join(TARGET_VARIANTS)}")
    if d.axis not in AXES:
        raise ConfigValueError(f"config.data.axis={d.axis!r}; expected one of "
                               f"{', '.join(AXES)}")
