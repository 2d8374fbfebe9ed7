"""Token cross-entropy under the batch contract's masks, without a [B, T, V] tensor.

The LM head is applied to chunks of the sequence inside a rematerialised scan, so at most
[B, chunk, V] float32 logits exist at once (forward and backward). Cross-entropy is always
computed in float32. Functions return *sums*; the step normalises by the target-token count
of the whole (accumulated) batch, so gradient accumulation is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUM_KEYS = ("ce_sum", "n_tok", "label_ce_sum", "label_correct", "n_label", "expl_ce_sum",
            "n_expl", "objective_sum")


def chunked_token_ce(hidden, head, targets, chunk: int = 256):
    """Per-token CE and argmax-correctness. hidden [B,T,D], head [D,V], targets [B,T]."""
    b, t, d = hidden.shape
    c = max(1, min(chunk, t))
    pad = (-t) % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // c
    hs = hidden.reshape(b, n, c, d).swapaxes(0, 1)            # [n, B, c, D]
    ts = targets.reshape(b, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(h, tg):
        logits = jnp.einsum("bcd,dv->bcv", h, head.astype(h.dtype),
                            preferred_element_type=jnp.float32).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tg[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, axis=-1) == tg).astype(jnp.float32)
        return lse - tgt, correct

    def body(_, xs):
        return None, one(*xs)

    _, (ce, correct) = jax.lax.scan(body, None, (hs, ts))
    ce = ce.swapaxes(0, 1).reshape(b, t + pad)[:, :t]
    correct = correct.swapaxes(0, 1).reshape(b, t + pad)[:, :t]
    return ce, correct


def masked_sums(ce, correct, loss_mask, label_mask, label_loss_weight: float = 1.0) -> dict:
    """Sums over the masks. ``objective_sum`` weights label tokens by label_loss_weight
    (1.0 = plain CE over all target tokens)."""
    lm = loss_mask.astype(jnp.float32)
    lab = label_mask.astype(jnp.float32)
    expl = lm * (1.0 - lab)
    ce_sum = jnp.sum(ce * lm)
    label_ce = jnp.sum(ce * lab)
    return {
        "ce_sum": ce_sum, "n_tok": jnp.sum(lm),
        "label_ce_sum": label_ce, "label_correct": jnp.sum(correct * lab),
        "n_label": jnp.sum(lab),
        "expl_ce_sum": jnp.sum(ce * expl), "n_expl": jnp.sum(expl),
        "objective_sum": ce_sum + (label_loss_weight - 1.0) * label_ce,
    }


def finalize(sums: dict) -> dict:
    """Means from sums: loss is normalised by the number of target tokens."""
    def div(a, b):
        return a / jnp.maximum(b, 1.0)
    return {
        "loss": div(sums["ce_sum"], sums["n_tok"]),
        "objective": div(sums["objective_sum"], sums["n_tok"]),
        "label_loss": div(sums["label_ce_sum"], sums["n_label"]),
        "label_accuracy": div(sums["label_correct"], sums["n_label"]),
        "explanation_loss": div(sums["expl_ce_sum"], sums["n_expl"]),
        "target_tokens": sums["n_tok"], "label_tokens": sums["n_label"],
    }
