"""Self-attention over a batch whose query and key positions coincide (no KV cache).

Two forms of causal self-attention, picked by ``ForwardOptions.attention_impl``:

* masked (None / 'xla'): an explicit [B,1,T,T] mask carries padding, packed segments and
  the sliding window. ``jax.nn.dot_product_attention`` computes the full score square,
  half of which the causal mask throws away, so the queries are split into blocks and
  block [s, e) gets only the keys [s - window + 1, e) it can see: the masked-out blocks
  above the diagonal (and left of the window) are never computed.
* mask-free ('cudnn'): no mask tensor at all, only ``is_causal`` and
  ``local_window_size``, the form cuDNN's fused (flash) attention runs without a bias.
  It is exact for rows that hold one example each, right-padded: padding keys then lie
  after every real query, so the causal rule alone hides them (padding queries see
  padding keys, but nothing real ever reads their outputs). ``check_right_padded``
  enforces that layout on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MASK_FREE_IMPLS = ("cudnn",)


def key_range(start: int, end: int, window: int | None) -> tuple[int, int]:
    """Keys visible to queries [start, end) under a causal mask and a sliding window."""
    lo = 0 if window is None else max(0, start - window + 1)
    return lo, end


def causal_self_attention(q, k, v, mask, *, window: int | None, block: int,
                          implementation: str | None = None):
    """q [B,T,H,hd], k/v [B,T,KVH,hd], mask [B,1,T,T] (causal, see decoder's
    attention_mask_matrix) -> [B,T,H,hd]. ``block`` <= 0 or >= T: one block."""
    t = q.shape[1]
    if block <= 0 or block >= t:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    outs = []
    for start in range(0, t, block):
        end = min(t, start + block)
        lo, hi = key_range(start, end, window)
        outs.append(jax.nn.dot_product_attention(
            q[:, start:end], k[:, lo:hi], v[:, lo:hi], mask=mask[:, :, start:end, lo:hi],
            implementation=implementation))
    return jnp.concatenate(outs, axis=1)


def mask_free_self_attention(q, k, v, *, window: int | None, implementation: str = "cudnn"):
    """Key j is visible to query i iff j <= i and i - j < window (right-padded rows of
    one example each, see the module doc)."""
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation)


def check_right_padded(segment_ids, what: str = "batch") -> None:
    """Raises unless every row is one example (segment id 1) followed by padding (0):
    the only layout the mask-free form of attention may be given."""
    seg = np.asarray(segment_ids)
    bad = ~np.isin(seg, (0, 1))
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{what}: row {row} holds packed segments "
                         f"(ids {sorted(set(seg[row].tolist()))}); attention_impl='cudnn' "
                         f"needs one example per row: set data.pack=False or "
                         f"model.attention_impl=xla")
    rising = np.diff(seg.astype(np.int8), axis=1) > 0
    if rising.any():
        row = int(np.argwhere(rising)[0][0])
        raise ValueError(f"{what}: row {row} is not right-padded (padding before tokens); "
                         f"attention_impl='cudnn' needs right padding")
