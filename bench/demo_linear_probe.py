"""Are the demo's labels decodable from the frozen base at all? A linear probe.

    python bench/demo_linear_probe.py                    # the demo's data and base
    python bench/demo_linear_probe.py --arg=smoke --axis=on_topic

The untuned base reads each training and validation prompt (as evaluation encodes them:
prompt + "Rating:", cut as in training); a logistic regression (scikit-learn) on its final
hidden state at the label position is fitted on the training split and scored on the
validation split, next to validation's majority-class rate. It reads no test example. A
design whose labels a linear probe cannot decode gives LoRA little to start from; one it
can decode but LoRA does not learn points at the training budget instead.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import demo_flags  # noqa: E402
from xft_jax import config_defaults, sharding  # noqa: E402
from xft_jax.eval import evaluation  # noqa: E402
from xft_jax.models.bundled import bundled_model  # noqa: E402
from xft_jax.models.decoder import OutputRequest, TokenInputs, forward  # noqa: E402
from xft_jax.study import demo_configs, demo_lib, grid  # noqa: E402

_ARG = flags.DEFINE_string("arg", "", "configs/demo.py arg ('' or 'smoke').")
_AXIS = flags.DEFINE_string("axis", "naturalness", "Rating axis.")
_C = flags.DEFINE_list("c", ["0.01", "0.1", "1"], "Inverse L2 strengths to report.")


def features(loaded, data, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(final hidden state at the label position [N, D], label index [N]) of a split."""
    m = loaded.model
    fn = jax.jit(lambda p, ids, pos, seg, lp: forward(
        p, m.config, TokenInputs(ids, positions=pos, segment_ids=seg),
        OutputRequest("hidden", lp[:, None]), opts=m.forward_options())["hidden"][:, 0])
    d = evaluation.resolve_data(data, None)
    d.split = split
    batches, _ = evaluation.eval_batches(d, loaded.tokenizer, 16)
    xs, ys = [], []
    for b in batches:
        h = np.asarray(fn(m.params(), b["input_ids"], b.get("positions"), b["segment_ids"],
                          jnp.asarray(b["label_pos"])))
        valid = np.asarray(b["valid"]).astype(bool)
        xs.append(h[valid])
        ys.append(np.asarray(b["label"])[valid])
    return np.concatenate(xs).astype(np.float64), np.concatenate(ys)


def main(argv):
    del argv
    c = demo_configs.demo_config(_ARG.value)
    demo_flags.apply_items(c)
    if c.base == "toy":
        raise app.UsageError("the toy base is pre-trained by the demo itself; use the real one")
    base = bundled_model(c.base)
    tc, _, _ = demo_lib.cell_configs(c, grid.Cell(c.source, _AXIS.value, "label_only", 0),
                                     base, "unused")
    demo_flags.apply(tc, demo_flags.DATA_OVERRIDES)
    ec = config_defaults.eval_config()
    ec.model.path = base
    ec.mesh.fsdp = 1
    ec.mesh.num_devices = 1         # one device, whatever else is visible
    for k in evaluation.DATA_KEYS:
        ec.data[k] = tc.data[k]
    loaded = evaluation.load_model(ec.model, sharding.mesh_from_config(ec.mesh))
    xt, yt = features(loaded, ec.data, "train")
    xv, yv = features(loaded, ec.data, "validation")
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    print(f"{c.source}/{_AXIS.value}: {len(yt)} training, {len(yv)} validation examples; "
          f"validation majority-class rate {np.bincount(yv).max() / len(yv):.3f}")
    for strength in _C.value:
        clf = LogisticRegression(C=float(strength), max_iter=3000).fit((xt - mu) / sd, yt)
        print(f"C={strength}: train accuracy {clf.score((xt - mu) / sd, yt):.3f}, "
              f"validation accuracy {clf.score((xv - mu) / sd, yv):.3f}")


if __name__ == "__main__":
    app.run(main)
