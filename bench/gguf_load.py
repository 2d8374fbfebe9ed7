"""GGUF loading: ours (``models.load_pretrained(file.gguf)``: dequantise, un-permute,
place into device arrays) vs ``transformers.AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)``; time and peak RSS, same run.

    python bench/gguf_load.py                  # the bundled SmolLM2-135M-Instruct Q4_1
    python bench/gguf_load.py --gguf=/models/x.gguf --dtype=bfloat16 --reps=3

Each loader runs in a fresh child process, ``reps`` times, interleaved; the file is in
the page cache (read once before), so the numbers compare the loaders' own work. Imports
happen before the clock; transformers' child reads every weight once before the clock
stops, as in ``load.py``. Peak RSS: the child resets its high-water mark after its
imports and reads ``VmHWM`` afterwards; "extra" is that peak minus the RSS before loading,
reported against the dequantised model's size in the load dtype.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402

GGUF = flags.DEFINE_string("gguf", None, "GGUF file (default: the bundled SmolLM2).")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Load dtype.")
REPS = flags.DEFINE_integer("reps", 3, "Loads per loader (medians reported).")
OUT = flags.DEFINE_string("out", None, "Directory for the JSON result.")
NO_RECORD = flags.DEFINE_bool("no_record", False, "Do not append to bench/RESULTS.md.")
TIMEOUT = flags.DEFINE_integer("timeout", 900, "Seconds per child process.")
CHILD = flags.DEFINE_enum("child", None, ["ours", "hf"], "Internal: run one side.")
CHILD_OUT = flags.DEFINE_string("child_out", None, "Internal: the child's JSON path.")

RSS_TARGET = 1.5


def load_ours(path: str, dtype: str) -> int:
    import jax
    import jax.numpy as jnp

    from xft_jax.models import hf_io

    model = hf_io.load_pretrained(path, dtype=jnp.dtype(dtype))
    jax.block_until_ready(model.params())
    return sum(x.nbytes for x in jax.tree.leaves(model.params()))


def load_hf(path: str, dtype: str) -> int:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.float().sum().item()
    return sum(p.numel() * p.element_size() for p in model.parameters())


def child(kind: str, path: str, dtype: str) -> dict:
    if kind == "ours":
        import jax

        from xft_jax.models import hf_io  # noqa: F401
        jax.devices()
    else:
        common.torch_setup()
        import transformers  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401
    before = common.reset_peak_rss()
    t0 = time.perf_counter()
    size = (load_ours if kind == "ours" else load_hf)(path, dtype)
    seconds = time.perf_counter() - t0
    peak = common.peak_rss()
    return {"seconds": seconds, "rss_before": before, "peak_rss": peak,
            "extra_rss": peak - before, "model_bytes": size}


def run(argv: list[str]) -> str:
    from xft_jax.models import bundled

    path = GGUF.value or bundled.bundled_gguf("smollm2-135m-instruct")
    with open(path, "rb") as f:                       # into the page cache (not reported)
        while f.read(64 * 2**20):
            pass
    args = [f"--gguf={path}", f"--dtype={DTYPE.value}"]
    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    for _ in range(REPS.value):
        for k in runs:
            runs[k].append(common.run_child("gguf_load.py", args + [f"--child={k}"],
                                            TIMEOUT.value))
    med = {k: common.median([r["seconds"] for r in rs]) for k, rs in runs.items()}
    extra = {k: max(r["extra_rss"] for r in rs) for k, rs in runs.items()}
    size = runs["ours"][0]["model_bytes"]
    case = (f"{os.path.basename(path)} -> {common.fmt(size, 'B')} {DTYPE.value}, "
            f"median of {REPS.value}")
    rows = [
        dict(case=case, metric="load time vs transformers (+ read every weight)",
             ours=f"{med['ours']:.2f} s", peer=f"{med['hf']:.2f} s",
             ratio=med["hf"] / med["ours"]),
        dict(case=case, metric="peak extra host RSS / dequantised model",
             ours=f"{extra['ours'] / size:.2f}x", peer=f"{extra['hf'] / size:.2f}x",
             ratio=extra["ours"] / extra["hf"], target=f"<= {RSS_TARGET}x",
             met=extra["ours"] / size <= RSS_TARGET),
        dict(case=case, metric="peak extra host RSS", ours=common.fmt(extra["ours"], "B"),
             peer=common.fmt(extra["hf"], "B"), ratio=extra["ours"] / extra["hf"]),
    ]
    return common.record("gguf_load", DTYPE.value, rows,
                         {"gguf": path, "runs": runs, "model_bytes": size}, OUT.value,
                         not NO_RECORD.value, argv)


def main(argv):
    if CHILD.value:
        path = GGUF.value
        common.write_child(CHILD_OUT.value, child(CHILD.value, path, DTYPE.value))
        return
    print(run(sys.argv))


if __name__ == "__main__":
    app.run(main)
