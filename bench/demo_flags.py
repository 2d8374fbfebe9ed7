"""The demo-design overrides that the study-design checks share
(``demo_label_check.py``, ``demo_linear_probe.py``): what data the demo's runs see."""

from __future__ import annotations

from absl import flags

NUM_ITEMS = flags.DEFINE_integer("num_items", None, "num_items (rated items generated).")
MAX_LEN = flags.DEFINE_integer("max_len", None, "data.max_len.")
RUBRIC = flags.DEFINE_boolean("rubric", None, "data.rubric (the rubric in the prompt).")
VAL_FRACTION = flags.DEFINE_float("validation_fraction", None, "data.validation_fraction.")

DATA_OVERRIDES = {"data.max_len": MAX_LEN, "data.rubric": RUBRIC,
                  "data.validation_fraction": VAL_FRACTION}


def apply_items(c) -> dict:
    """``--num_items`` onto the demo config (before its cells' configs are built);
    returns ``{"num_items": N}`` when it was given, else ``{}``."""
    if NUM_ITEMS.value is None:
        return {}
    c.num_items = NUM_ITEMS.value
    return {"num_items": NUM_ITEMS.value}


def apply(tc, overrides: dict) -> dict:
    """Sets every given ``section.key`` flag on the run config ``tc``; returns them."""
    given = {k: f.value for k, f in overrides.items() if f.value is not None}
    with tc.unlocked():
        for key, value in given.items():
            section, name = key.split(".")
            tc[section][name] = value
    return given
