"""LoRA train-step throughput: ours (xft_jax.training's jitted step) vs transformers + PEFT.

    python bench/train_step.py --size=cpu        # smoke | cpu | gpu | gpu_smoke

Both sides load the same random HF checkpoint, put LoRA (rank 16, alpha 32) on all seven
linear layers, and run the same batch (full rows, loss on the last 1/8 of each row) with
AdamW + global-norm clipping; the host->device batch copy and the read-back of the loss
are inside the timed step on both sides. Reported: tokens/s of the best timed step
(best-of-N, because other processes share the machine; medians are in the JSON), MFU by the
model-FLOP count in ``common.train_flops`` against a matmul peak measured in the same
child (``jnp.dot`` for ours, ``torch.matmul`` for the peer), the first-step loss of each
(LoRA B starts at zero, so both must equal the base model's loss), and peak memory.

GPU sizes also time our NF4 QLoRA step (the base quantised while loading) against our
bf16 step, report MFU against the datasheet's dense bf16 peak, and size the batch from
the card's memory (``sizing.train_cases``: the same batch on every side, capped at the
size's tokens per step; ``--max_tokens=0`` fills the card).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import common, sizing  # noqa: E402

F = common.define_flags(["ours", "ours_full_head", "ours_nf4", "torch"])
_DROPOUT = flags.DEFINE_float("lora_dropout", common.LORA["dropout"], "LoRA dropout (both).")
_CE_CHUNK = flags.DEFINE_integer("ce_chunk", 256, "Our loss's sequence chunk (StepConfig).")
_BEFORE = flags.DEFINE_bool("before", True, "Also time ours with the LM head at every "
                             "position (the loss before the target-positions change).")
_CASE = flags.DEFINE_integer("case", 0, "Internal: index into the size's train cases.")
_BATCH = flags.DEFINE_integer("batch", None, "Internal: the case's batch (the parent sizes "
                              "it, so every side runs the same rows).")
_CASES = flags.DEFINE_list("cases", None, "Indices of the size's train cases to run "
                           "(default: all), e.g. --cases=0 for the first sequence length.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Cap on tokens per step for batches "
                                   "sized from device memory (0: none, fill the card); "
                                   "default: the size's.")
_NF4 = flags.DEFINE_bool("nf4", True, "Also time our NF4 QLoRA step (sizes with nf4=True), "
                         "with the attention implementation 'ours' ended on.")


def _steps(sp):
    t = sp["train"]
    return t["warmup"], t["steps"]


def child_ours(sp: dict, batch_size: int, seq: int, ckpt: str,
               full_head: bool = False, nf4: bool = False) -> dict:
    """The trainer's own path: ``training.batches.to_global`` then the jitted step.
    ``full_head``: the same step with the LM head at every position (``target_pos`` =
    all T positions), i.e. the loss as it was before the target-positions change.
    ``nf4``: QLoRA, the frozen linears quantised to NF4 while loading (the trainer's
    ``model.quantization=nf4``)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from xft_jax import lora as lora_lib
    from xft_jax import config_defaults, quantization, sharding
    from xft_jax.models import partitioning
    from xft_jax.models import hf_io
    from xft_jax.training import batches as data_lib
    from xft_jax.training import optim
    from xft_jax.training.step import (StepConfig, jit_step, make_step_fn,
                                       opt_state_shardings)

    dtype = jnp.dtype(sp["dtype"])
    peak = common.jax_matmul_peak(sp["matmul"], sp["dtype"])
    warmup, steps = _steps(sp)
    mesh = sharding.create_mesh(1, -1, 1)
    kw = dict(dtype=dtype, mesh=mesh, compute_dtype=dtype, remat=sp["remat"],
              attention_impl=F.attention_impl.value)
    transform = quantization.layer_transform(quantization.QuantConfig(kind="nf4")) if nf4 else None
    model = hf_io.load_pretrained(ckpt, transform=transform, **kw)
    lcfg = lora_lib.LoRAConfig(rank=common.LORA["rank"], alpha=common.LORA["alpha"],
                               dropout=_DROPOUT.value, targets=common.LINEAR)
    lora_lib.attach(model, lcfg, jax.random.key(0), mesh)
    opts = model.forward_options()
    base, lora = model.params(), model.lora_params()
    model.lora = None
    base_sh = partitioning.param_shardings(mesh, base)
    lora_sh = lora_lib.lora_shardings(model.config, lcfg, mesh)
    ocfg = config_defaults.base_config().optim
    ocfg.update(dict(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.0,
                     clip_norm=1.0))
    tx, _ = optim.make_optimizer(ocfg, warmup + steps)
    opt_sh = opt_state_shardings(tx, lora, lora_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(lora)
    step_fn = jit_step(make_step_fn(model.config, opts, tx, StepConfig(ce_chunk=_CE_CHUNK.value),
                                    mesh), mesh, lora_sh, opt_sh, base_sh)
    rng = jax.device_put(jax.random.key_data(jax.random.key(1)), NamedSharding(mesh, P()))
    batch = common.train_batch(model.config.vocab_size, batch_size, seq, sp["target_frac"])
    if full_head:
        import numpy as np
        all_pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch_size, seq)).copy()
    common.reset_peak_rss()
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        g = data_lib.to_global(mesh, batch)
        if full_head and "target_pos" in g:   # (a step without target_pos is full-head)
            g["target_pos"] = jax.device_put(all_pos, g["target_pos"].sharding)
        lora, opt_state, m = step_fn(lora, opt_state, base, g, rng, jnp.int32(i))
        m = jax.device_get(m)
        times.append(time.perf_counter() - t0)
        losses.append(float(m["loss"]))
    return {"times": times, "losses": losses, "peak_flops": peak,
            "device_peak_bytes": common.jax_device_memory(), "peak_rss": common.peak_rss(),
            "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend()}


def child_torch(sp: dict, batch_size: int, seq: int, ckpt: str) -> dict:
    device = common.torch_setup()
    import peft
    import torch
    import transformers

    dt = getattr(torch, sp["dtype"])
    peak = common.torch_matmul_peak(sp["matmul"], sp["dtype"], device)
    warmup, steps = _steps(sp)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=dt, attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    if sp["remat"] != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=common.LORA["rank"], lora_alpha=common.LORA["alpha"], lora_dropout=_DROPOUT.value,
        target_modules=list(common.LINEAR), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    batch = common.train_batch(model.config.vocab_size, batch_size, seq, sp["target_frac"])
    labels = common.torch_labels(batch)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    common.reset_peak_rss()
    times, losses = [], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        ids = torch.from_numpy(batch["input_ids"]).long().to(device)
        lab = torch.from_numpy(labels).to(device)
        out = model(input_ids=ids, labels=lab)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss.item())
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    return {"times": times, "losses": losses, "peak_flops": peak,
            "device_peak_bytes": (torch.cuda.max_memory_allocated() if device == "cuda"
                                  else None),
            "peak_rss": common.peak_rss(), "device": device,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def run(size: str, out: str | None, write_md: bool, argv: list[str]) -> dict:
    sp = common.spec(size)
    ckpt = common.checkpoint(sp["model"], sp["dtype"])
    warmup, _ = _steps(sp)
    device_bytes = sizing.device_memory_bytes()
    cases, batch_sizing = sizing.train_cases(sp, device_bytes, _MAX_TOKENS.value)
    rows, details = [], {"checkpoint": ckpt, "cases": [], "batch_sizing": batch_sizing}
    gpu = size.startswith("gpu")
    picked = range(len(cases)) if _CASES.value is None else [int(c) for c in _CASES.value]
    if any(not 0 <= i < len(cases) for i in picked):
        raise app.UsageError(f"--cases={','.join(_CASES.value)}: size {size} has cases "
                             f"0..{len(cases) - 1} ({cases})")
    for i in picked:
        b, t = cases[i]
        case = f"B={b} T={t}"
        args = [f"--size={size}", f"--case={i}", f"--batch={b}", f"--ckpt={ckpt}",
                f"--lora_dropout={_DROPOUT.value}", f"--ce_chunk={_CE_CHUNK.value}"]
        res, failed = common.run_ours_per_attention("train_step.py", sp, args,
                                                    F.timeout.value, sp["train"]["warmup"])
        res["torch"] = common.run_child("train_step.py", args + ["--child=torch"],
                                        F.timeout.value)
        if _BEFORE.value:      # "before" uses the attention implementation "ours" ended on
            impl = res["ours"]["attention_impl"]
            res["ours_full_head"] = common.run_child(
                "train_step.py", args + ["--child=ours_full_head"] + (
                    [f"--attention_impl={impl}"] if impl else []), F.timeout.value)
        if _NF4.value and sp.get("nf4"):
            impl = res["ours"]["attention_impl"]
            res["ours_nf4"] = common.run_child(
                "train_step.py", args + ["--child=ours_nf4"] + (
                    [f"--attention_impl={impl}"] if impl else []), F.timeout.value)
        fl = common.train_flops(sp["model"], b, t, common.LORA["rank"])
        stats = {}
        best = max(r["peak_flops"] for r in res.values())
        for impl, r in res.items():
            step = min(r["times"][warmup:])
            stats[impl] = dict(step_s=step, median_step_s=common.median(r["times"][warmup:]),
                               tokens_per_s=fl["tokens"] / step,
                               mfu=fl["total"] / step / r["peak_flops"],
                               mfu_best=fl["total"] / step / best,
                               first_step_s=r["times"][0], loss0=r["losses"][0],
                               mem=r["device_peak_bytes"] or r["peak_rss"])
            if sp.get("dense_peak"):
                stats[impl]["mfu_dense"] = fl["total"] / step / sp["dense_peak"]
        o, p = stats["ours"], stats["torch"]
        loss_ok = common.check_close(o["loss0"], p["loss0"], 2e-2 if gpu else 1e-3)
        tok_target = 2.0 if gpu else 1.5
        rows += [
            dict(case=case, metric="tokens/s", ours=f"{o['tokens_per_s']:.1f}",
                 peer=f"{p['tokens_per_s']:.1f}", ratio=o["tokens_per_s"] / p["tokens_per_s"],
                 target=f">= {tok_target}x",
                 met=o["tokens_per_s"] / p["tokens_per_s"] >= tok_target),
            dict(case=case, metric="MFU (own matmul peak)", ours=common.fmt(o["mfu"], "%"),
                 peer=common.fmt(p["mfu"], "%"), ratio=o["mfu"] / p["mfu"],
                 target=">= 50% (ours)" if gpu else "", met=(o["mfu"] >= 0.5) if gpu else None),
            dict(case=case, metric="MFU (best measured peak)",
                 ours=common.fmt(o["mfu_best"], "%"), peer=common.fmt(p["mfu_best"], "%"),
                 ratio=o["mfu_best"] / p["mfu_best"]),
        ]
        if sp.get("dense_peak"):
            rows.append(dict(
                case=case, metric=f"MFU (dense bf16 peak {sp['dense_peak'] / 1e12:.0f} TFLOP/s)",
                ours=common.fmt(o["mfu_dense"], "%"), peer=common.fmt(p["mfu_dense"], "%"),
                ratio=o["mfu_dense"] / p["mfu_dense"], target=">= 50% (ours)",
                met=o["mfu_dense"] >= 0.5))
        rows += [
            dict(case=case, metric="matmul peak", ours=common.fmt(res["ours"]["peak_flops"],
                                                                  "FLOP/s"),
                 peer=common.fmt(res["torch"]["peak_flops"], "FLOP/s"),
                 ratio=res["ours"]["peak_flops"] / res["torch"]["peak_flops"]),
            dict(case=case, metric="step time (best)", ours=f"{o['step_s'] * 1e3:.0f} ms",
                 peer=f"{p['step_s'] * 1e3:.0f} ms", ratio=p["step_s"] / o["step_s"]),
            dict(case=case, metric="first step (compile)",
                 ours=f"{o['first_step_s']:.1f} s", peer=f"{p['first_step_s']:.1f} s"),
            dict(case=case, metric="loss at step 1 (same weights)", ours=f"{o['loss0']:.5f}",
                 peer=f"{p['loss0']:.5f}", target="equal", met=loss_ok),
            dict(case=case, metric="peak memory (" + ("device" if gpu else "host RSS") + ")",
                 ours=common.fmt(o["mem"], "B"), peer=common.fmt(p["mem"], "B"),
                 ratio=o["mem"] / p["mem"] if o["mem"] and p["mem"] else None),
        ]
        rows += common.attention_rows(
            case, "tokens/s", res, failed,
            lambda r: fl["tokens"] / min(r["times"][warmup:]), p["tokens_per_s"])
        if "ours_nf4" in stats:
            rows += nf4_rows(case, stats["ours_nf4"], o, p, gpu)
        if "ours_full_head" in stats:
            q = stats["ours_full_head"]
            rows += [
                dict(case=case, metric="tokens/s, before: LM head at all positions",
                     ours=f"{q['tokens_per_s']:.1f}", peer=f"{p['tokens_per_s']:.1f}",
                     ratio=q["tokens_per_s"] / p["tokens_per_s"],
                     target=f"(now/before: {o['tokens_per_s'] / q['tokens_per_s']:.2f}x)"),
                dict(case=case, metric="loss at step 1, before", ours=f"{q['loss0']:.5f}",
                     peer=f"{p['loss0']:.5f}", target="equal",
                     met=common.check_close(q["loss0"], p["loss0"], 2e-2 if gpu else 1e-3)),
            ]
        details["cases"].append({"batch": b, "seq": t, "flops": fl, "raw": res,
                                 "stats": stats})
    section = common.record("train_step", size, rows, details, out, write_md, argv)
    print(section)
    return {"rows": rows, "details": details}


def nf4_rows(case: str, q: dict, o: dict, p: dict, gpu: bool) -> list[dict]:
    """Our NF4 QLoRA step against our bf16 step (the issue's >= 0.7x) and the peer.
    Its first loss differs from the bf16 one by the quantisation error only."""
    rel = abs(q["loss0"] - o["loss0"]) / max(abs(o["loss0"]), 1e-6)
    return [
        dict(case=case, metric="NF4 QLoRA tokens/s vs ours bf16", ours=f"{q['tokens_per_s']:.1f}",
             peer=f"{o['tokens_per_s']:.1f}", ratio=q["tokens_per_s"] / o["tokens_per_s"],
             target=">= 0.7x" if gpu else "",
             met=(q["tokens_per_s"] / o["tokens_per_s"] >= 0.7) if gpu else None),
        dict(case=case, metric="NF4 QLoRA tokens/s vs peer bf16", ours=f"{q['tokens_per_s']:.1f}",
             peer=f"{p['tokens_per_s']:.1f}", ratio=q["tokens_per_s"] / p["tokens_per_s"]),
        dict(case=case, metric="NF4 loss at step 1 vs ours bf16 (quantised weights)",
             ours=f"{q['loss0']:.5f}", peer=f"{o['loss0']:.5f}", target="within 5%",
             met=bool(rel <= 0.05)),
        dict(case=case, metric="NF4 peak memory vs ours bf16", ours=common.fmt(q["mem"], "B"),
             peer=common.fmt(o["mem"], "B"),
             ratio=q["mem"] / o["mem"] if q["mem"] and o["mem"] else None),
        dict(case=case, metric="NF4 first step (compile)", ours=f"{q['first_step_s']:.1f} s",
             peer=f"{o['first_step_s']:.1f} s"),
    ]


def child(sp: dict, kind: str, ckpt: str) -> dict:
    b, t = sp["train"]["cases"][_CASE.value]
    b = _BATCH.value or b
    if kind == "torch":
        return child_torch(sp, b, t, ckpt)
    return child_ours(sp, b, t, ckpt, full_head=kind == "ours_full_head",
                      nf4=kind == "ours_nf4")


if __name__ == "__main__":
    app.run(common.bench_main(F, run, child))
