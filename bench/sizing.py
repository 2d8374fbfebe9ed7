"""Training batch sizes for the GPU benchmarks: a batch sized from the card's memory
(``fill_batch``), capped at a tokens-per-step budget (``train_cases``)."""

from __future__ import annotations

import os
import subprocess

from bench.common import dims, linear_shapes

JAX_MEM_FRACTION = 0.75          # XLA_PYTHON_CLIENT_MEM_FRACTION's default
OURS_FIXED_BYTES = 2 * 2**30     # LoRA params, AdamW state, gradients, workspaces


def train_token_bytes(m: dict, seq: int) -> dict:
    """Estimated device bytes per token of a LoRA train step with remat, by counting
    (bf16 activations): {'ours', 'peer'}. Both keep each layer's input (2·D per layer)
    and, while one layer is recomputed and differentiated, its activations and their
    gradients (q, k, v, attention out, o, norms, residuals: ~14·D; gate, up, act, product:
    ~8·F; twice over: 28·D + 16·F). Ours adds the masked attention's score blocks (float32
    scores, probabilities and their gradients, 12 bytes for each of the ~T/2 keys a query
    sees, per head); its LM head runs at the target positions only. The peer adds the
    full-vocab logits and loss (bf16 logits, their float32 copy, log-softmax and both
    gradients: 16·V). XLA's own plan (``memory_analysis`` on the CPU backend) was no
    better guide: 0.8 MiB per token at 2 layers, 0.27 at 4, with host-only copies."""
    x = dims(m)
    common_part = 2 * x["L"] * x["d"] + 28 * x["d"] + 16 * x["f"]
    return {"ours": common_part + 12 * x["h"] * (seq // 2),
            "peer": common_part + 16 * x["V"]}


def param_count(m: dict) -> int:
    x = dims(m)
    per_layer = sum(i * o for i, o in linear_shapes(m).values()) + 2 * x["d"]
    return x["L"] * per_layer + 2 * x["V"] * x["d"] + x["d"]


def fill_batch(m: dict, seq: int, device_bytes: int, fill: float, dtype_bytes: int = 2,
               multiple: int = 8) -> int:
    """The largest batch (a multiple of ``multiple`` when that is >= ``multiple``) whose
    estimated step memory fits ``fill`` of the card on both sides at once (equal batches,
    so both sides see the same rows): ours within JAX's default memory fraction, the peer
    within ``fill``. 0 when not even one row fits."""
    frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_MEM_FRACTION))
    weights = param_count(m) * dtype_bytes
    per_tok = train_token_bytes(m, seq)
    free = {"ours": device_bytes * min(fill, frac) - weights - OURS_FIXED_BYTES,
            "peer": device_bytes * fill - weights}
    b = min(int(free[k] // (per_tok[k] * seq)) for k in free)
    return max(0, b // multiple * multiple if b >= multiple else b)


def train_cases(sp: dict, device_bytes: int | None, max_tokens: int | None = None
                ) -> tuple[list[tuple[int, int]], list[dict]]:
    """The size's train cases with every ``None`` batch sized: filled from
    ``device_bytes`` (``fill_batch``) and capped at ``max_tokens`` per step (default the
    size's; 0: no cap). Returns ([(batch, seq)], how each batch was chosen)."""
    t = sp["train"]
    cap = t.get("max_tokens", 0) if max_tokens is None else max_tokens
    cases, how = [], []
    for b, seq in t["cases"]:
        if b is not None:
            cases.append((b, seq))
            how.append(dict(batch=b, seq=seq, rule="fixed"))
            continue
        fill = fill_batch(sp["model"], seq, device_bytes, t["fill"]) if device_bytes else None
        capped = max(1, cap // seq) if cap else None
        if fill is None and capped is None:
            raise ValueError(f"seq {seq}: no device memory reading to size the batch from "
                             f"and no --max_tokens cap; pass --max_tokens")
        if fill == 0:
            raise ValueError(f"seq {seq}: not one row fits {100 * t['fill']:.0f}% of "
                             f"{device_bytes / 2**30:.1f} GiB by the estimate")
        batch = min(v for v in (fill, capped) if v is not None)
        cases.append((batch, seq))
        how.append(dict(batch=batch, seq=seq, fill_batch=fill, cap_batch=capped,
                        device_bytes=device_bytes, fill=t["fill"],
                        token_bytes=train_token_bytes(sp["model"], seq),
                        rule="fill" if capped is None or (fill is not None and fill <= capped)
                        else f"cap {cap} tokens/step"))
    return cases, how


def device_memory_bytes() -> int | None:
    """Total memory of the first GPU by ``nvidia-smi`` (no framework import), else None."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                            "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    first = r.stdout.strip().splitlines()[:1]
    if r.returncode != 0 or not first or not first[0].strip().isdigit():
        return None
    return int(first[0].strip()) * 2**20
