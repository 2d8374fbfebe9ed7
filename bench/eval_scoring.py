"""Rating-scoring throughput: ours (five LM-head rows at label_pos, xft_jax.eval.scoring) vs a
transformers + PEFT forward that produces the label logits.

    python bench/eval_scoring.py --size=cpu      # smoke | cpu | gpu | gpu_smoke

Both sides load the same random checkpoint with the same LoRA adapters attached (rank 16,
all linear layers, unmerged, as when evaluating a fine-tuned run) and score the same
right-padded batch (lengths in [T/2, T]). The peer is the usual transformers recipe:
``model(input_ids, attention_mask).logits[row, label_pos][:, label_ids]`` (full
[B, T, V] logits). A second peer passes ``logits_to_keep`` (transformers' own way to
skip most of the LM head) and is reported as well. Timed per batch: host->device copy,
forward, read-back of the [B, 5] log-probs. The log-probs of both sides are compared.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app  # noqa: E402

from bench import common  # noqa: E402

F = common.define_flags(["ours", "torch"])

TARGET = 3.0


def _lora_cfg(lora_lib):
    return lora_lib.LoRAConfig(rank=common.LORA["rank"], alpha=common.LORA["alpha"],
                               dropout=0.0, targets=common.LINEAR)


def child_ours(sp: dict, ckpt: str) -> dict:
    import jax
    import jax.numpy as jnp

    from xft_jax import lora as lora_lib
    from xft_jax import sharding
    from xft_jax.eval import batching, scoring
    from xft_jax.models import hf_io

    e = sp["eval"]
    dtype = jnp.dtype(sp["dtype"])
    mesh = sharding.create_mesh(1, -1, 1)
    model = hf_io.load_pretrained(ckpt, dtype=dtype, mesh=mesh, compute_dtype=dtype,
                                  attention_impl=F.attention_impl.value)
    lora_lib.attach(model, _lora_cfg(lora_lib), jax.random.key(0), mesh)
    params, lora, opts = model.params(), model.lora_params(), model.forward_options()
    vocab = model.config.vocab_size
    fn = scoring.make_score_fn(model.config, opts, common.label_ids(vocab), mesh)
    batch = common.eval_batch(vocab, e["batch"], e["seq"])
    common.reset_peak_rss()
    times, out = [], None
    for _ in range(e["warmup"] + e["reps"]):
        t0 = time.perf_counter()
        dev = sharding.global_batch_from_host(mesh, batch, batching.DEVICE_KEYS)
        out = np.asarray(jax.device_get(fn(params, lora, dev)))
        times.append(time.perf_counter() - t0)
    return {"times": times, "log_probs": out.tolist(), "peak_rss": common.peak_rss(),
            "device_peak_bytes": common.jax_device_memory()}


def child_torch(sp: dict, ckpt: str) -> dict:
    """Both peers in one process (one model load): full logits, then logits_to_keep."""
    device = common.torch_setup()
    import peft
    import torch
    import transformers

    e = sp["eval"]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=getattr(torch, sp["dtype"]), attn_implementation="sdpa").to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=common.LORA["rank"], lora_alpha=common.LORA["alpha"], lora_dropout=0.0,
        target_modules=list(common.LINEAR), task_type="CAUSAL_LM"))
    model.eval()
    vocab = model.config.vocab_size
    lab = torch.tensor(common.label_ids(vocab), device=device)
    batch = common.eval_batch(vocab, e["batch"], e["seq"])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return {"torch": _torch_variant(model, batch, lab, e, device, sync, keep=False),
            "torch_keep": _torch_variant(model, batch, lab, e, device, sync, keep=True)}


def _torch_variant(model, batch, lab, e, device, sync, keep: bool) -> dict:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    common.reset_peak_rss()
    times, out = [], None
    with torch.inference_mode():
        for _ in range(e["warmup"] + e["reps"]):
            t0 = time.perf_counter()
            ids = torch.from_numpy(batch["input_ids"]).long().to(device)
            mask = torch.from_numpy(batch["segment_ids"]).long().to(device)
            pos = torch.from_numpy(batch["label_pos"]).long().to(device)
            rows = torch.arange(ids.shape[0], device=device)
            if keep:
                uniq, inv = torch.unique(pos, return_inverse=True)
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=uniq).logits
                picked = logits[rows, inv]
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
                picked = logits[rows, pos]
            logp = torch.log_softmax(picked[:, lab].float(), dim=-1)
            out = logp.cpu().numpy()
            sync()
            times.append(time.perf_counter() - t0)
    return {"times": times, "log_probs": out.tolist(), "peak_rss": common.peak_rss(),
            "device_peak_bytes": (torch.cuda.max_memory_allocated() if device == "cuda"
                                  else None)}


def run(size: str, out: str | None, write_md: bool, argv: list[str]) -> dict:
    sp = common.spec(size)
    e = sp["eval"]
    ckpt = common.checkpoint(sp["model"], sp["dtype"])
    args = [f"--size={size}", f"--ckpt={ckpt}"]
    ours, failed = common.run_ours_per_attention("eval_scoring.py", sp, args, F.timeout.value,
                                                 e["warmup"])
    res = {"ours": ours.pop("ours")}
    res.update(common.run_child("eval_scoring.py", args + ["--child=torch"], F.timeout.value))
    # Best-of-N batch time: other processes share the machine (medians are in the JSON).
    eps = {k: e["batch"] / min(r["times"][e["warmup"]:]) for k, r in res.items()}
    eps_median = {k: e["batch"] / common.median(r["times"][e["warmup"]:])
                  for k, r in res.items()}
    gpu = size.startswith("gpu")
    tol = 5e-2 if gpu else 1e-3
    ours_lp = np.asarray(res["ours"]["log_probs"])
    diff = {k: float(np.max(np.abs(ours_lp - np.asarray(res[k]["log_probs"]))))
            for k in res if k != "ours"}
    case = f"B={e['batch']} T={e['seq']}"
    mem = {k: r["device_peak_bytes"] or r["peak_rss"] for k, r in res.items()}
    rows = [
        dict(case=case, metric="examples/s vs full-logits forward", ours=f"{eps['ours']:.2f}",
             peer=f"{eps['torch']:.2f}", ratio=eps["ours"] / eps["torch"],
             target=f">= {TARGET:g}x", met=eps["ours"] / eps["torch"] >= TARGET),
        dict(case=case, metric="examples/s vs logits_to_keep forward",
             ours=f"{eps['ours']:.2f}", peer=f"{eps['torch_keep']:.2f}",
             ratio=eps["ours"] / eps["torch_keep"]),
        dict(case=case, metric="first batch (compile)", ours=f"{res['ours']['times'][0]:.1f} s",
             peer=f"{res['torch']['times'][0]:.1f} s"),
        dict(case=case, metric="max abs log-prob diff vs ours (" + ", ".join(diff) + ")",
             ours="0", peer=", ".join(f"{v:.1e}" for v in diff.values()), target=f"<= {tol:g}",
             met=max(diff.values()) <= tol),
        dict(case=case, metric="peak memory (" + ("device" if gpu else "host RSS") + ")",
             ours=common.fmt(mem["ours"], "B"), peer=common.fmt(mem["torch"], "B"),
             ratio=mem["ours"] / mem["torch"] if mem["ours"] and mem["torch"] else None),
    ]
    rows += common.attention_rows(case, "examples/s vs full-logits forward", ours, failed,
                                  lambda r: e["batch"] / min(r["times"][e["warmup"]:]),
                                  eps["torch"])
    details = {"checkpoint": ckpt, "examples_per_s": eps, "examples_per_s_median": eps_median,
               "per_attention": ours, "raw": res, "max_diff": diff}
    section = common.record("eval_scoring", size, rows, details, out, write_md, argv)
    print(section)
    return {"rows": rows, "details": details}


def child(sp: dict, kind: str, ckpt: str) -> dict:
    return child_torch(sp, ckpt) if kind == "torch" else child_ours(sp, ckpt)


if __name__ == "__main__":
    app.run(common.bench_main(F, run, child))
