"""What makes two attempts at a run the same run.

A resumed run must be the run its checkpoint belongs to: resumed under another learning
rate, target variant or data file it would equal neither run, and its numbers would be
reported under settings it never had. The same holds for a finished study cell that a
re-run would skip. So both compare the configuration (every key except the operational
ones below) and the digest of the encoded training data, and refuse a mismatch with the
keys that differ.
"""

from __future__ import annotations

from typing import Any, Mapping

from xft_jax.errors import UserError

# Keys that change how a run is executed or where its inputs live, not what it computes:
# layout on devices, logging/checkpoint cadence, kernels and recomputation, the loss's
# chunking, and paths (a moved base model or data file is checked by content where that
# is cheap: the data by its digest). The validation cadence and size are not among them:
# they decide which checkpoint is the run's result.
OPERATIONAL_KEYS = (
    "mesh", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.ce_chunk", "model.remat", "model.attention_impl", "model.path",
    "model.tokenizer", "data.path")
LOCATION_KEYS = ("model.path", "model.tokenizer", "data.path")
# The same for an evaluation / probe config (configs/eval.py).
EVAL_OPERATIONAL_KEYS = ("mesh", "model.workdir", "model.path", "model.adapter",
                         "model.tokenizer", "data.path", "eval.batch_size", "eval.vocab_chunk")

# Keys added after runs were saved without them, with the value that computes what those
# runs computed: a saved config lacking the key equals one holding that value, so an
# older run resumes and an older study's finished cells count as done.
LATER_KEYS = {"optim.lora_plus_ratio": 1.0, "data.bucket_step": 0}


class _Absent:
    """The value of a key a config does not have (written before the key existed)."""

    def __repr__(self):
        return "(absent)"


_ABSENT = _Absent()


class RunMismatchError(UserError, ValueError):
    """A run or cell was asked to continue under settings it did not start with."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for every leaf of nested mappings (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _matches(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def differences(old: Mapping, new: Mapping, ignore=OPERATIONAL_KEYS,
                later: Mapping = LATER_KEYS) -> list[str]:
    """``"key: old -> new"`` for every flattened key whose value differs (or exists on
    one side only), leaving out keys under ``ignore``; a key of ``later`` missing on one
    side counts as its value there; sorted by key."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if _matches(key, ignore):
            continue
        absent = later.get(key, _ABSENT)
        va, vb = a.get(key, absent), b.get(key, absent)
        if va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


def cell_differences(old: Mapping, new: Mapping) -> list[str]:
    """``differences`` of two study-cell definitions ({"train": config, "evaluate":
    config, "probe": config or None, ...}), each config's operational keys left out."""
    ignore = ([f"train.{k}" for k in OPERATIONAL_KEYS]
              + [f"{step}.{k}" for step in ("evaluate", "probe") for k in EVAL_OPERATIONAL_KEYS])
    later = {f"train.{k}": v for k, v in LATER_KEYS.items()}
    return differences(old, new, ignore=ignore, later=later)


def mismatch_message(what: str, diffs: list[str], remedy: str) -> str:
    shown = diffs[:12] + ([f"... and {len(diffs) - 12} more"] if len(diffs) > 12 else [])
    return f"{what}:\n  " + "\n  ".join(shown) + (f"\n{remedy}" if remedy else "")


def check_resume_config(saved: Mapping | None, config: Mapping, checkpoint: str) -> list[str]:
    """Raises RunMismatchError when ``config`` (a JSON-like dict) differs from the config
    saved in ``checkpoint`` in any non-operational key; returns a note per moved path."""
    if saved is None:
        raise RunMismatchError(f"{checkpoint}: the checkpoint records no config, so resuming "
                               f"from it cannot be checked; start the run in a new workdir")
    diffs = differences(saved, config)
    if diffs:
        raise RunMismatchError(mismatch_message(
            f"{checkpoint}: this run was started with a different config; resuming it would "
            f"give a run that equals neither (checkpoint value -> requested value)", diffs,
            "Resume with the original values, or start the changed run in a new workdir."))
    moved = differences(saved, config, ignore=())
    return [f"{d} (a location; the run continues)" for d in moved
            if _matches(d.split(":", 1)[0], LOCATION_KEYS)]


def check_resume_data(saved: Mapping | None, info: Mapping, checkpoint: str) -> None:
    """Raises RunMismatchError when the encoded training data differs from the data the
    checkpoint was trained on (a changed data file, tokenizer or encoding)."""
    before = (saved or {}).get("train_digest")
    if before is None:
        raise RunMismatchError(f"{checkpoint}: the checkpoint records no training-data "
                               f"digest, so resuming from it cannot be checked; start the "
                               f"run in a new workdir")
    if before != info["train_digest"]:
        raise RunMismatchError(
            f"{checkpoint}: the training data differs from the data this run was trained on "
            f"(digest {before[:12]} in the checkpoint, {info['train_digest'][:12]} now; "
            f"from {info.get('origin')}). Restore the original data, or start a new run in a "
            f"new workdir.")


__all__ = ["OPERATIONAL_KEYS", "LOCATION_KEYS", "LATER_KEYS", "EVAL_OPERATIONAL_KEYS",
           "RunMismatchError", "flatten", "differences", "cell_differences", "mismatch_message",
           "check_resume_config", "check_resume_data"]
