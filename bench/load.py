"""Checkpoint loading: ours (``models.load_pretrained`` into device arrays) vs reading the
raw bytes vs ``transformers.AutoModelForCausalLM.from_pretrained``; time and peak RSS.

    python bench/load.py --size=cpu      # smoke | cpu | gpu | gpu_smoke
    python bench/load.py --size=cpu --shape=peak_test --reps=5   # the peak-memory test's

The checkpoint is a random HF safetensors directory (cpu size: ~1.4 GB float32, sharded
at 512 MB like HF's own saves). Each loader runs in a fresh child process, twice:

* cold: the shards are first dropped from the page cache (``posix_fadvise``
  DONTNEED, no root needed), so every loader reads from storage, as a first load of a
  downloaded checkpoint does; the raw read into one reused 64 MB buffer is then the
  storage's own read speed, the target's reference (a raw read into fresh arrays is
  reported too);
* warm: after one unreported raw read, everything comes from the page cache and the
  numbers compare the loaders' own work. Two raw reads are reported: into the reused
  buffer (page-cache copy speed) and into fresh arrays (what any loader must at least
  do; on a VM, first-touch page faults dominate it).

Each size repeats both rounds ``reps`` times, the loaders interleaved, and reports
medians: on a shared VM one load can take twice another's time. transformers' CPU
weights can stay lazily memory-mapped after ``from_pretrained``, so its child reads
every weight once (a sum) before the clock stops. Imports (ours: the loader's module;
transformers: the model's class) happen before the clock. Peak RSS: the child resets
its high-water mark (``/proc/self/clear_refs`` = 5) after its imports and reads
``VmHWM`` afterwards; "extra" is that peak minus the RSS before loading (imports
excluded). On the GPU sizes the model lands in GPU memory, so host RSS is staging only.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402

F = common.define_flags(["raw", "raw_fresh", "ours", "hf"])
REPS = flags.DEFINE_integer("reps", None, "Rounds of cold and warm loads (default: the "
                            "size's own).")
SHAPE = flags.DEFINE_enum("shape", "size", ["size", "peak_test"],
                          "Checkpoint shape: the size's own, or the ~400 MB Mistral shape "
                          "of tests/test_hf_io.py's peak-memory test (float32).")

# tests/test_hf_io.py::test_peak_host_memory_while_loading (GQA 4:1, mlp 3.5x).
PEAK_TEST_MODEL = dict(model_type="mistral", vocab_size=4096, hidden_size=512,
                       intermediate_size=1792, num_hidden_layers=28, num_attention_heads=8,
                       num_key_value_heads=2, sliding_window=4096)
LOADER_ORDER = ("raw", "raw_fresh", "ours", "hf")

SPEED_TARGET, RSS_TARGET = 0.7, 1.3


def _files(ckpt: str) -> list[str]:
    return sorted(os.path.join(ckpt, n) for n in os.listdir(ckpt) if n.endswith(".safetensors"))


def load_raw(ckpt: str, dtype: str):
    """Reads every byte of every shard into one reused 64 MB buffer."""
    buf = bytearray(min(64 * 2**20, max(os.path.getsize(p) for p in _files(ckpt))))
    view = memoryview(buf)
    total = 0
    for path in _files(ckpt):
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total


def load_raw_fresh(ckpt: str, dtype: str):
    """Reads every byte into newly allocated arrays (one per shard file): the least any
    loader must do, since the weights must end up in fresh memory."""
    return [np.fromfile(p, dtype=np.uint8) for p in _files(ckpt)]


def load_ours(ckpt: str, dtype: str):
    import jax
    import jax.numpy as jnp

    from xft_jax.models import hf_io

    model = hf_io.load_pretrained(ckpt, dtype=jnp.dtype(dtype))
    jax.block_until_ready(model.params())
    return model


def load_hf(ckpt: str, dtype: str):
    import torch
    import transformers

    kw = {"device_map": "cuda"} if torch.cuda.is_available() else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=getattr(torch, dtype), **kw)
    # from_pretrained may leave CPU weights as lazy views of the memory-mapped files;
    # reading every weight once makes "loaded" mean the same on both sides.
    with torch.no_grad():
        for p in model.parameters():
            p.float().sum().item()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return model


LOADERS = {"raw": load_raw, "raw_fresh": load_raw_fresh, "ours": load_ours, "hf": load_hf}


def child(sp: dict, kind: str, ckpt: str) -> dict:
    # Imports (the loader's module and, for transformers, the model's class) and runtime
    # start-up happen before the clock and the RSS reset.
    if kind == "ours":
        import jax

        from xft_jax.models import hf_io  # noqa: F401
        jax.devices()
    elif kind == "hf":
        common.torch_setup()
        import transformers
        from transformers.models.auto import modeling_auto
        config = transformers.AutoConfig.from_pretrained(ckpt)
        model_class = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        del model_class                     # looking it up imported its module
    before = common.reset_peak_rss()
    t0 = time.perf_counter()
    obj = LOADERS[kind](ckpt, sp["load"]["dtype"])
    seconds = time.perf_counter() - t0
    peak = common.peak_rss()
    del obj
    return {"seconds": seconds, "rss_before": before, "peak_rss": peak,
            "extra_rss": peak - before}


def evict(ckpt: str) -> None:
    """Drops the checkpoint's shards from the page cache (clean pages need no root)."""
    for path in _files(ckpt):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _median_runs(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per loader: the median time of its runs; peak RSS the largest seen (the bound)."""
    return {k: {"seconds": common.median([r["seconds"] for r in rs]),
                "all_seconds": [r["seconds"] for r in rs],
                "extra_rss": max(r["extra_rss"] for r in rs),
                "peak_rss": max(r["peak_rss"] for r in rs)} for k, rs in runs.items()}


def _spread(r: dict) -> str:
    """min-max of one loader's times: how noisy its runs were."""
    return f"{min(r['all_seconds']):.2f}-{max(r['all_seconds']):.2f} s"


def run(size: str, out: str | None, write_md: bool, argv: list[str]) -> dict:
    sp = common.spec(size)
    ld = dict(sp["load"])
    if SHAPE.value == "peak_test":
        ld.update(model=PEAK_TEST_MODEL, dtype="float32")
    ckpt = common.checkpoint(ld["model"], ld["dtype"])
    size_b = common.checkpoint_bytes(ckpt)
    args = [f"--size={size}", f"--ckpt={ckpt}"]
    reps = REPS.value or ld.get("reps", 1)
    load_avg = [os.getloadavg()]
    cold_runs, warm_runs = {}, {}
    for _ in range(reps):       # rounds, so drift on a shared machine hits every loader
        for k in LOADER_ORDER:
            evict(ckpt)
            cold_runs.setdefault(k, []).append(
                common.run_child("load.py", args + [f"--child={k}"], F.timeout.value))
        load_raw(ckpt, ld["dtype"])                 # warm the page cache (not reported)
        for k in LOADER_ORDER:
            warm_runs.setdefault(k, []).append(
                common.run_child("load.py", args + [f"--child={k}"], F.timeout.value))
        load_avg.append(os.getloadavg())
    cold, res = _median_runs(cold_runs), _median_runs(warm_runs)
    cspeed = {k: size_b / r["seconds"] for k, r in cold.items()}
    speed = {k: size_b / r["seconds"] for k, r in res.items()}
    rss = {k: r["extra_rss"] / size_b for k, r in res.items()}
    cold_rss = {k: r["extra_rss"] / size_b for k, r in cold.items()}
    case = f"{common.fmt(size_b, 'B')} {ld['dtype']}" + (f", median of {reps}" if reps > 1
                                                          else "")
    mbs = lambda v: common.fmt(v, "B") + "/s"  # noqa: E731
    rows = [
        dict(case=case, metric="cold: load speed vs raw read from storage",
             ours=mbs(cspeed["ours"]), peer=mbs(cspeed["raw"]),
             ratio=cspeed["ours"] / cspeed["raw"], target=f">= {SPEED_TARGET}x",
             met=cspeed["ours"] / cspeed["raw"] >= SPEED_TARGET),
        dict(case=case, metric="cold: load speed vs raw read into fresh arrays",
             ours=mbs(cspeed["ours"]), peer=mbs(cspeed["raw_fresh"]),
             ratio=cspeed["ours"] / cspeed["raw_fresh"]),
        dict(case=case, metric="cold: load time vs transformers (+ read every weight)",
             ours=f"{cold['ours']['seconds']:.2f} s", peer=f"{cold['hf']['seconds']:.2f} s",
             ratio=cold["hf"]["seconds"] / cold["ours"]["seconds"]),
        dict(case=case, metric="cold: spread of load times (ours, transformers)",
             ours=_spread(cold["ours"]), peer=_spread(cold["hf"])),
        dict(case=case, metric="warm: load speed vs raw read (page-cache copy)",
             ours=mbs(speed["ours"]), peer=mbs(speed["raw"]),
             ratio=speed["ours"] / speed["raw"],
             target=f">= {SPEED_TARGET}x", met=speed["ours"] / speed["raw"] >= SPEED_TARGET),
        dict(case=case, metric="warm: load speed vs raw read into fresh arrays",
             ours=mbs(speed["ours"]), peer=mbs(speed["raw_fresh"]),
             ratio=speed["ours"] / speed["raw_fresh"]),
        dict(case=case, metric="warm: load time vs transformers (+ read every weight)",
             ours=f"{res['ours']['seconds']:.2f} s",
             peer=f"{res['hf']['seconds']:.2f} s",
             ratio=res["hf"]["seconds"] / res["ours"]["seconds"]),
        dict(case=case, metric="warm: spread of load times (ours, transformers)",
             ours=_spread(res["ours"]), peer=_spread(res["hf"])),
        dict(case=case, metric="peak extra RSS / checkpoint (ours, raw)",
             ours=f"{rss['ours']:.2f}", peer=f"{rss['raw']:.2f}", target=f"<= {RSS_TARGET}",
             met=rss["ours"] <= RSS_TARGET),
        dict(case=case, metric="peak extra RSS / checkpoint (ours, transformers)",
             ours=f"{rss['ours']:.2f}", peer=f"{rss['hf']:.2f}",
             ratio=rss["ours"] / rss["hf"] if rss["hf"] > 0 else None),
        dict(case=case, metric="peak extra RSS / checkpoint, cold (ours, raw)",
             ours=f"{cold_rss['ours']:.2f}", peer=f"{cold_rss['raw']:.2f}",
             target=f"<= {RSS_TARGET}", met=cold_rss["ours"] <= RSS_TARGET),
        dict(case=case, metric="peak RSS incl. imports (ours, transformers)",
             ours=common.fmt(res["ours"]["peak_rss"], "B"),
             peer=common.fmt(res["hf"]["peak_rss"], "B")),
        dict(case=case, metric="load average (1 min) at start, after each round",
             ours=" ".join(f"{a[0]:.2f}" for a in load_avg)),
    ]
    details = {"checkpoint": ckpt, "bytes": size_b, "raw": res, "speed": speed,
               "cold": cold, "cold_speed": cspeed, "rss_ratio": rss,
               "cold_rss_ratio": cold_rss, "load_avg": load_avg}
    section = common.record("load", size, rows, details, out, write_md, argv)
    print(section)
    return {"rows": rows, "details": details}


if __name__ == "__main__":
    app.run(common.bench_main(F, run, child))
