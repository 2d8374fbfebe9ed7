"""The optax optimiser: global-norm clipping, AdamW, a learning-rate schedule.

Gradient accumulation is not an optax wrapper here: the step scans over micro-batches and
applies one update per step, so ``step`` always counts optimiser updates.
"""

from __future__ import annotations

import jax
import optax

from xft_jax.errors import ConfigValueError

SCHEDULES = ("constant", "linear", "cosine")


def make_schedule(lr: float, steps: int, warmup_steps: int = 0, kind: str = "cosine",
                  end_lr_ratio: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0, then constant / linear decay / cosine decay to
    ``lr * end_lr_ratio`` at ``steps``."""
    if kind not in SCHEDULES:
        raise ConfigValueError(f"optim.schedule={kind!r}; expected one of {SCHEDULES}")
    if steps < 1:
        raise ConfigValueError(f"train.steps={steps}: must be >= 1")
    warmup_steps = max(0, min(int(warmup_steps), steps))
    decay = max(1, steps - warmup_steps)
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "linear":
        main = optax.linear_schedule(lr, lr * end_lr_ratio, decay)
    else:
        main = optax.cosine_decay_schedule(lr, decay, alpha=end_lr_ratio)
    if warmup_steps == 0:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def _is_lora_b(params):
    """True at the adapters' B matrices (the leaves keyed ``'b'``), False elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "b", params)


def make_optimizer(optim_cfg, steps: int) -> tuple[optax.GradientTransformation,
                                                   optax.Schedule]:
    """From ``config.optim``: lr, schedule, warmup_steps, end_lr_ratio, b1, b2, eps,
    weight_decay, clip_norm (0 disables clipping), lora_plus_ratio.

    ``lora_plus_ratio`` is LoRA+ (Hayou et al., 2024): the B matrices learn at that many
    times the schedule's rate. Adam's update does not depend on the gradient's scale, so
    scaling B's final update is the same as giving B its own learning rate (its weight
    decay scales with it). At 1 the chain is the plain one, so its state, and old
    checkpoints, keep their structure."""
    c = optim_cfg
    schedule = make_schedule(float(c.lr), steps, int(c.warmup_steps), str(c.schedule),
                             float(c.end_lr_ratio))
    ratio = float(c.get("lora_plus_ratio", 1.0))
    if not ratio > 0 or ratio == float("inf"):
        raise ConfigValueError(f"config.optim.lora_plus_ratio={ratio}: must be a finite "
                               f"number > 0 (1 turns LoRA+ off)")
    parts = []
    if float(c.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(c.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(c.b1), b2=float(c.b2), eps=float(c.eps),
                             weight_decay=float(c.weight_decay)))
    if ratio != 1.0:
        parts.append(optax.masked(optax.scale(ratio), _is_lora_b))
    return optax.chain(*parts), schedule
