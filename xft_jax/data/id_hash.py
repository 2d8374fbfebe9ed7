"""Where an item belongs, from its id alone: the hashes behind the train / validation /
test splits and sampling order (``splits.py``). An item's id group is the part before '#',
so items that must stay together (the two Chatbot Arena responses to one prompt, all items
of one chat) share a split."""

from __future__ import annotations

import hashlib

TEST_FRACTION = 1 / 3  # the paper's 10,000 train / 5,000 test


def split_key(item_id: str) -> str:
    return item_id.split("#", 1)[0]


def unit_hash(salt: str, key: str) -> float:
    h = hashlib.sha256(f"{salt}\x1f{key}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def split_of(item_id: str, test_fraction: float = TEST_FRACTION) -> str:
    """'test' for a fixed ``test_fraction`` of id groups, 'train' for the rest."""
    return "test" if unit_hash("xft_jax/split", split_key(item_id)) < test_fraction else "train"


def is_validation(item_id: str, fraction: float) -> bool:
    """Whether a training item belongs to the validation split carved from it; depends on
    its id group only, independently of the train/test hash."""
    return unit_hash("xft_jax/validation", split_key(item_id)) < fraction


__all__ = ["split_key", "unit_hash", "split_of", "is_validation", "TEST_FRACTION"]
