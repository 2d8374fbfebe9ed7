"""Shared pieces of the side-by-side benchmarks: sizes, random checkpoints, FLOP counts,
matmul peaks, peak-RSS probes, child processes and the results record.

Every measurement runs in its own child process (``--child=<impl>``), one after the
other, so the two frameworks never share threads, allocators or page-cache effects, and
peak RSS is the child's own. The parent only builds inputs, collects the children's JSON
and writes ``bench/RESULTS.md`` (appended, never edited by hand) and ``bench/results/``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_MD = os.path.join(BENCH_DIR, "RESULTS.md")
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
CACHE = os.environ.get("XFT_BENCH_CACHE", os.path.join(tempfile.gettempdir(),
                                                       "xft_jax_bench_cache"))
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIZES = ("smoke", "cpu", "demo_cpu", "gpu", "gpu_smoke")

# ----------------------------------------------------------------------------- sizes
_TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_MID = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
            num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8)
# The demo's base, SmolLM2-135M-Instruct, by shape (random weights time the same).
_SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
_MISTRAL7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, sliding_window=4096)

# train: (batch, seq) per case; remat applies to both sides (ours: policy, torch:
# gradient checkpointing). gpu_smoke runs the GPU code path (bf16, SDPA, remat, two
# sequence lengths, device memory) at a tiny shape so it can be exercised on a CPU.
# attention: our implementations to time, each in its own child (the fastest is "ours";
# one that fails, e.g. cuDNN without a GPU, is reported as failed).
SPECS = {
    "smoke": dict(model=_TINY, dtype="float32", remat="none",
                  train=dict(cases=[(2, 32)], warmup=1, steps=2),
                  eval=dict(batch=4, seq=32, warmup=1, reps=2),
                  load=dict(model=_TINY, dtype="float32"), matmul=256, target_frac=0.25),
    "cpu": dict(model=_MID, dtype="float32", remat="none",
                train=dict(cases=[(2, 512)], warmup=1, steps=3),
                eval=dict(batch=4, seq=512, warmup=1, reps=5),
                load=dict(model=dict(_MID, num_hidden_layers=24), dtype="float32", reps=3),
                matmul=2048, target_frac=0.125),
    # demo_cpu: the demo's training step (batch 4) at the widths its rows pad to.
    "demo_cpu": dict(model=_SMOLLM2, dtype="float32", remat="none",
                     train=dict(cases=[(4, 64), (4, 96), (4, 128)], warmup=1, steps=4),
                     eval=dict(batch=32, seq=96, warmup=1, reps=3),
                     load=dict(model=_SMOLLM2, dtype="float32", reps=3),
                     matmul=1024, target_frac=0.05),
    # gpu: a None batch is sized from the card's memory (``train_cases``), capped at
    # ``max_tokens`` per step so that the whole 7B check fits a short lease (bench/README.md
    # has the time budget); ``dense_peak`` is the datasheet's dense bf16 rate of an
    # H100/H200 SXM, the MFU reference beside the matmul peak measured in the run.
    "gpu": dict(model=_MISTRAL7B, dtype="bfloat16", remat="full",
                attention=("xla", "cudnn"), nf4=True,
                train=dict(cases=[(None, 1024), (None, 512)], warmup=1, steps=3,
                           max_tokens=32768, fill=0.85),
                eval=dict(batch=16, seq=1024, warmup=1, reps=5),
                load=dict(model=_MISTRAL7B, dtype="bfloat16"), matmul=8192,
                target_frac=0.125, dense_peak=989e12),
    "gpu_smoke": dict(model=dict(_TINY, model_type="mistral", sliding_window=4096),
                      dtype="bfloat16", remat="full", attention=("xla", "cudnn"), nf4=True,
                      train=dict(cases=[(None, 64), (None, 32)], warmup=1, steps=2,
                                 max_tokens=64, fill=0.85),
                      eval=dict(batch=4, seq=64, warmup=1, reps=2),
                      load=dict(model=dict(_TINY, model_type="mistral", sliding_window=4096),
                                dtype="bfloat16"), matmul=256, target_frac=0.25,
                      dense_peak=989e12),
}
LORA = dict(rank=16, alpha=32.0, dropout=0.0)


def spec(size: str) -> dict:
    if size not in SPECS:
        raise ValueError(f"--size={size!r}; expected one of {SIZES}")
    return SPECS[size]


# ----------------------------------------------------------------------------- model shapes
def dims(m: dict) -> dict:
    d, f = m["hidden_size"], m["intermediate_size"]
    h, kv = m["num_attention_heads"], m["num_key_value_heads"]
    hd = m.get("head_dim") or d // h
    return dict(d=d, f=f, h=h, kv=kv, hd=hd, L=m["num_hidden_layers"], V=m["vocab_size"])


def linear_shapes(m: dict) -> dict[str, tuple[int, int]]:
    """[in, out] of each linear layer of one block."""
    x = dims(m)
    q, kv = x["h"] * x["hd"], x["kv"] * x["hd"]
    d, f = x["d"], x["f"]
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def train_flops(m: dict, batch: int, seq: int, rank: int) -> dict:
    """Model FLOPs of one LoRA train step (multiply-add = 2 FLOPs), per the issue's count:

    * frozen matmuls (7 linears per layer + LM head; the embedding is a gather):
      forward 2·N + backward 2·N (input gradients only: frozen weights get no weight
      gradient) = 4·N_matmul per token;
    * attention scores and values (QK^T, PV): forward 2·2·T·h·hd per token per layer,
      backward twice that -> 12·L·T·h·hd per token (the full T x T square, as in PaLM's
      appendix B; causal masking is not subtracted);
    * LoRA (x·A, then ·B, for each target): forward 2·r·(in+out), backward input
      gradient 2·r·(in+out) and weight gradients 2·r·(in+out) -> 6·r·(in+out) per token.
    Recomputation under remat is not counted (it is hardware work, not model work).
    """
    x = dims(m)
    tokens = batch * seq
    shapes = linear_shapes(m)
    n_layer = sum(i * o for i, o in shapes.values())
    n_matmul = x["L"] * n_layer + x["d"] * x["V"]
    dense = 4 * n_matmul * tokens
    attn = 12 * x["L"] * seq * x["h"] * x["hd"] * tokens
    lora = 6 * rank * x["L"] * sum(i + o for i, o in shapes.values()) * tokens
    return dict(total=dense + attn + lora, dense=dense, attention=attn, lora=lora,
                n_matmul=n_matmul, tokens=tokens)


# ----------------------------------------------------------------------------- checkpoints
def checkpoint(m: dict, dtype: str, seed: int = 0) -> str:
    """A random HF safetensors checkpoint of shape ``m`` (written once, then cached).

    Tensors are drawn one at a time (std 0.02, norms 1) and written in shards of at most
    ~512 MB, so writing never holds the whole model. The directory appears atomically.
    """
    # On a GPU the weights are drawn there (a 7B draw on the host takes minutes); the
    # stream differs from the host's, so such checkpoints get their own cache key. A
    # cached one of either kind is found without importing torch.
    key = "_".join(f"{k}{m[k]}" for k in sorted(m)) + f"_{dtype}_s{seed}"
    paths = {g: os.path.join(CACHE, "ckpt_" + (key + suffix).replace("/", "-"))
             for g, suffix in (("cuda", "_gcuda"), ("cpu", ""))}
    for p in paths.values():
        if os.path.exists(os.path.join(p, "config.json")):
            return p

    import torch
    import transformers
    from safetensors.torch import save_file

    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    path = paths[gen_device]
    os.makedirs(CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=CACHE, prefix=".tmp_ckpt")
    try:
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[m["model_type"]]
        kw = {k: v for k, v in m.items() if k != "model_type"}
        cfg = transformers.AutoConfig.for_model(
            m["model_type"], architectures=[arch], tie_word_embeddings=False,
            max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            **kw)
        cfg.dtype = dtype
        cfg.save_pretrained(tmp)
        tdt = getattr(torch, dtype)
        gen = torch.Generator(device=gen_device).manual_seed(seed)
        x = dims(m)

        def tensors():
            yield "model.embed_tokens.weight", (x["V"], x["d"])
            for i in range(x["L"]):
                p = f"model.layers.{i}."
                yield p + "input_layernorm.weight", (x["d"],)
                for name, (fi, fo) in linear_shapes(m).items():
                    blk = "self_attn" if name in LINEAR[:4] else "mlp"
                    yield f"{p}{blk}.{name}.weight", (fo, fi)
                yield p + "post_attention_layernorm.weight", (x["d"],)
            yield "model.norm.weight", (x["d"],)
            yield "lm_head.weight", (x["V"], x["d"])

        limit, files, cur, size = 512 * 2**20, [], {}, 0

        def flush(tensors):
            name = f"part-{len(files):05d}.safetensors"
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
            files.append((name, list(tensors)))

        for name, shape in tensors():
            if len(shape) == 1:
                t = torch.ones(shape, dtype=tdt)
            else:
                t = (torch.randn(shape, generator=gen, device=gen_device) * 0.02).to(tdt).cpu()
            nbytes = t.numel() * t.element_size()
            if cur and size + nbytes > limit:
                flush(cur)
                cur, size = {}, 0
            cur[name] = t
            size += nbytes
        flush(cur)
        del cur
        weight_map, total = {}, 0
        for i, (name, keys) in enumerate(files):
            new = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(os.path.join(tmp, name), os.path.join(tmp, new))
            weight_map.update({k: new for k in keys})
            total += os.path.getsize(os.path.join(tmp, new))
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
        if os.path.exists(path):          # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
               if n.endswith(".safetensors"))


# ----------------------------------------------------------------------------- batches
def train_batch(vocab: int, batch: int, seq: int, target_frac: float, seed: int = 0) -> dict:
    """A full (unpadded) batch of the DESIGN contract: random tokens, the loss on the last
    ``target_frac`` of each row (label first), as a label+explanation target would be."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int32)
    targets = np.concatenate([ids[:, 1:], np.full((batch, 1), 2, np.int32)], axis=1)
    n_t = max(1, int(seq * target_frac))
    loss_mask = np.zeros((batch, seq), np.float32)
    loss_mask[:, seq - 1 - n_t:seq - 1] = 1.0     # the last target is inside the row
    label_mask = np.zeros((batch, seq), np.float32)
    label_mask[:, seq - 1 - n_t] = 1.0
    return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask,
            "label_mask": label_mask, "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


def torch_labels(b: dict) -> np.ndarray:
    """HF labels equal to our (targets, loss_mask): HF shifts labels left by one."""
    labels = np.full(b["input_ids"].shape, -100, np.int64)
    t_idx = np.nonzero(b["loss_mask"])
    labels[t_idx[0], t_idx[1] + 1] = b["targets"][t_idx]
    return labels


def eval_batch(vocab: int, batch: int, seq: int, seed: int = 1) -> dict:
    """Right-padded eval rows of lengths in [seq/2, seq], label at the row's end - 2."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    lengths[0] = seq
    ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int32)
    seg = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(seg > 0, ids, 0).astype(np.int32)
    return {"input_ids": ids, "segment_ids": seg,
            "positions": np.where(seg > 0, np.arange(seq)[None, :], 0).astype(np.int32),
            "label_pos": (lengths - 2).astype(np.int32),
            "label": rng.integers(0, 5, size=batch).astype(np.int32)}


def label_ids(vocab: int) -> list[int]:
    """Five distinct token ids standing in for the digits "1".."5"."""
    return [vocab - 5 + i for i in range(5)] if vocab < 28800 else [
        28740, 28750, 28770, 28781, 28782]


# ----------------------------------------------------------------------------- measuring
def reset_peak_rss() -> int:
    """Resets VmHWM to the current RSS (Linux clear_refs "5"); returns the RSS in bytes.
    ru_maxrss cannot be reset and also counts threads that already exited."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def median(xs) -> float:
    return float(np.median(np.asarray(xs, np.float64)))


def jax_matmul_peak(n: int, dtype: str, reps: int = 5) -> float:
    """FLOP/s of ``jnp.dot`` on two n x n matrices in ``dtype`` (median of reps)."""
    return jax_matmul_rate(n, n, n, dtype, reps)


def jax_matmul_rate(m: int, k: int, n: int, dtype: str, reps: int = 5) -> float:
    """FLOP/s of a jitted ``jnp.dot`` of an [m, k] by a [k, n] matrix in ``dtype``
    (median of ``reps`` calls after one warm-up call)."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (m, k), jnp.float32).astype(dtype)
    b = jax.random.normal(k2, (k, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / median(times)


def torch_matmul_peak(n: int, dtype: str, device: str, reps: int = 5) -> float:
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / median(times)


def torch_setup() -> str:
    """Same threads as JAX's CPU client (all cores); returns the torch device."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return "cuda" if torch.cuda.is_available() else "cpu"


def jax_device_memory() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ----------------------------------------------------------------------------- children
def define_flags(children: list[str]):
    """The flags every bench script has (size, output, record, timeout) and the internal
    ones of its child processes (which side to run, where to write, which checkpoint)."""
    from types import SimpleNamespace

    from absl import flags

    return SimpleNamespace(
        size=flags.DEFINE_enum("size", "cpu", SIZES, "Benchmark size."),
        out=flags.DEFINE_string("out", None, "Directory for the JSON result (default "
                                "bench/results)."),
        no_record=flags.DEFINE_bool("no_record", False, "Do not append to bench/RESULTS.md."),
        timeout=flags.DEFINE_integer("timeout", 1800, "Seconds per child process."),
        child=flags.DEFINE_enum("child", None, children, "Internal: run one side."),
        child_out=flags.DEFINE_string("child_out", None, "Internal: the child's JSON path."),
        ckpt=flags.DEFINE_string("ckpt", None, "Internal: checkpoint directory."),
        attention_impl=flags.DEFINE_string("attention_impl", None, "Internal: our attention "
                                           "implementation (None: the decoder's default)."))


def bench_main(f, run, child):
    """The absl main of a bench script: as a child, ``child(spec, kind, ckpt)`` writes
    its JSON; else ``run(size, out, write_md, argv)`` runs the children and records."""
    def main(argv):
        sp = spec(f.size.value)
        if f.child.value:
            write_child(f.child_out.value, child(sp, f.child.value, f.ckpt.value))
            return
        run(f.size.value, f.out.value, not f.no_record.value, sys.argv)
    return main


def _error_line(log: str) -> str:
    """The exception line of a failed child's log (for a table cell)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (errors or lines or ["?"])[-1][:160].replace("|", "/")


GPU_ONLY_ATTENTION = ("cudnn",)
NOT_APPLICABLE = "n/a"


def run_ours_per_attention(script: str, sp: dict, args: list[str], timeout: float,
                           warmup: int) -> tuple[dict, dict]:
    """Our child (``--child=ours``) once per attention implementation of the size. With
    several, each is kept as "ours@<impl>" and the fastest (best time after ``warmup``)
    is also "ours". Returns (results, {impl: error line} of those that failed).

    When ``XFT_BENCH_BACKEND`` names a backend other than "gpu" (bench/gpu_check.py sets
    it from what JAX found), a GPU-only implementation is not started: its entry reads
    "n/a (...)" instead of an error line."""
    impls = sp.get("attention", (None,))
    backend = os.environ.get("XFT_BENCH_BACKEND")
    res, failed = {}, {}
    for impl in impls:
        if backend not in (None, "gpu") and impl in GPU_ONLY_ATTENTION:
            failed[str(impl)] = (f"{NOT_APPLICABLE} (JAX backend {backend}: {impl} "
                                 f"attention runs on GPUs only)")
            continue
        extra = [f"--attention_impl={impl}"] if impl else []
        try:
            r = run_child(script, args + ["--child=ours"] + extra, timeout)
        except RuntimeError as e:
            if len(impls) == 1:
                raise
            failed[str(impl)] = _error_line(str(e))
            continue
        r["attention_impl"] = impl
        res[f"ours@{impl}" if len(impls) > 1 else "ours"] = r
    if not res:
        raise RuntimeError(f"every attention implementation failed: {failed}")
    if len(impls) > 1:
        best = min(res, key=lambda k: min(res[k]["times"][warmup:]))
        res["ours"] = res[best]
    return res, failed


def attention_rows(case: str, metric: str, res: dict, failed: dict, value, peer: float
                   ) -> list[dict]:
    """One row per attention implementation ("<metric>, attention=<impl>"): ``value(r)``
    of each timed child against ``peer``, and the failed ones with their error."""
    rows = [dict(case=case, metric=f"{metric}, attention={name[5:]}", ours=f"{value(r):.2f}",
                 peer=f"{peer:.2f}", ratio=value(r) / peer)
            for name, r in res.items() if name.startswith("ours@")]
    return rows + [dict(case=case, metric=f"{metric}, attention={impl}",
                        ours=err if err.startswith(NOT_APPLICABLE) else "failed: " + err,
                        peer=f"{peer:.2f}")
                   for impl, err in failed.items()]


def run_child(script: str, args: list[str], timeout: float) -> dict:
    """Runs ``python bench/<script> <args> --child_out=<json>``; returns its JSON.
    The child's output goes to our stderr; a failure raises with its tail."""
    fd, out = tempfile.mkstemp(suffix=".json", prefix="xft_bench_")
    os.close(fd)
    cmd = [sys.executable, os.path.join(BENCH_DIR, script), *args, f"--child_out={out}"]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Real devices only: the test suite's 8 fake CPU devices would split one CPU 8 ways.
    xla = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(xla)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        os.remove(out)
        raise RuntimeError(f"{' '.join(cmd)}: timed out after {timeout:.0f} s")
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log[-4000:]}")
        with open(out) as f:
            return json.load(f)
    finally:
        os.remove(out)


def write_child(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------- records
def hardware() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = "none"
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            gpu = ", ".join(sorted(set(r.stdout.split("\n")) - {""}))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu,
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def git_commit() -> str:
    """HEAD's short hash, "+dirty" when tracked files differ from it (the results record
    itself, which each benchmark of a run appends to, does not count)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)bench/RESULTS.md"],
                               cwd=REPO, capture_output=True, text=True,
                               timeout=20).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if unit == "%":
        return f"{100 * v:.1f}%"
    if abs(v) >= 1e9 and unit in ("B", "FLOP/s"):
        return f"{v / 1e9:.2f} G{unit}"
    if abs(v) >= 1e6 and unit in ("B", "FLOP/s"):
        return f"{v / 1e6:.1f} M{unit}"
    if unit == "x":
        return f"{v:.2f}x"
    return f"{v:.4g}" + (f" {unit}" if unit else "")


def table(rows: list[dict]) -> str:
    """Markdown table of rows {'metric', 'ours', 'peer', 'ratio', 'target', 'met'}."""
    head = "| case | metric | ours | peer | ratio | target | met |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        met = r.get("met")
        lines.append("| " + " | ".join([
            r.get("case", ""), r["metric"], str(r.get("ours", "-")), str(r.get("peer", "-")),
            fmt(r.get("ratio"), "x") if r.get("ratio") is not None else "-",
            r.get("target", "") or "", "" if met is None else ("yes" if met else "NO")]) + " |")
    return "\n".join(lines)


def record(bench: str, size: str, rows: list[dict], details: dict, out_dir: str | None,
           write_md: bool, argv: list[str]) -> str:
    """Writes the JSON (always) and appends to RESULTS.md (unless ``write_md`` is False).
    Returns the rendered markdown section."""
    now = datetime.datetime.now(datetime.timezone.utc)
    hw = hardware()
    commit = git_commit()
    section = "\n".join([
        f"## {now:%Y-%m-%d %H:%M} UTC · {bench} · size={size}", "",
        f"- hardware: {hw['cpu']} ({hw['cores']} cores), GPU: {hw['gpu']}; "
        f"load average {hw['load_avg']}",
        f"- commit: {commit}",
        f"- command: `python bench/{os.path.basename(argv[0])} {' '.join(argv[1:])}`", "",
        table(rows), ""])
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    payload = {"bench": bench, "size": size, "date": now.isoformat(), "hardware": hw,
               "commit": commit, "rows": rows, "details": details}
    dest = os.path.join(out_dir, f"{now:%Y%m%dT%H%M%S}_{bench}_{size}.json")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, dest)
    if write_md:
        new = not os.path.exists(RESULTS_MD)
        with open(RESULTS_MD, "a", encoding="utf-8") as f:
            if new:
                f.write("# Benchmark results\n\nAppended by the bench scripts "
                        "(`python bench/run_all.py --size=cpu`); never edited by hand.\n\n")
            f.write(section + "\n")
    return section


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def check_close(a: float, b: float, rtol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(abs(b), 1e-6)
