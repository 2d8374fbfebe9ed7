"""Tiny GGUF files written with ``gguf.GGUFWriter``, laid out as llama.cpp's converter
writes them (Llama Q/K rows permuted for its rotary kernel, weights [out, in])."""

from __future__ import annotations

import numpy as np

DIMS = dict(vocab=64, hidden=256, ffn=256, layers=2, heads=4, kv_heads=2)
# A byte-level BPE vocabulary: 3 special tokens, 'Ġ' (space), 50 letters, 10 merges.
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
    chr(c) for c in range(ord("A"), ord("X") + 1)]
TOKENS = ["<unk>", "<s>", "</s>", "Ġ"] + _LETTERS + [
    "th", "the", "Ġt", "Ġth", "Ġthe", "in", "an", "er", "on", "at"]
MERGES = ["t h", "th e", "Ġ t", "Ġt h", "Ġth e", "i n", "a n", "e r", "o n", "a t"]
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, as written there."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_weights(arch: str = "llama", seed: int = 0, tie: bool = False, **dims) -> dict:
    """Random weights under GGUF names, in HF's layout and order (before any permute)."""
    d = dict(DIMS, **dims)
    rng = np.random.default_rng(seed)
    h, f, hd = d["hidden"], d["ffn"], d["hidden"] // d["heads"]
    out = {"token_embd.weight": rng.standard_normal((d["vocab"], h), np.float32) * 0.5,
           "output_norm.weight": 1 + 0.1 * rng.standard_normal(h, np.float32)}
    if not tie:
        out["output.weight"] = rng.standard_normal((d["vocab"], h), np.float32) * 0.1
    for i in range(d["layers"]):
        p = f"blk.{i}."
        shapes = {"attn_q.weight": (d["heads"] * hd, h), "attn_k.weight": (d["kv_heads"] * hd, h),
                  "attn_v.weight": (d["kv_heads"] * hd, h), "attn_output.weight": (h, d["heads"] * hd),
                  "ffn_gate.weight": (f, h), "ffn_up.weight": (f, h), "ffn_down.weight": (h, f)}
        for name, shape in shapes.items():
            out[p + name] = (rng.standard_normal(shape, np.float32) / np.sqrt(shape[1]))
        out[p + "attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(h, np.float32)
        out[p + "ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(h, np.float32)
        if arch == "qwen2":
            for name in ("attn_q", "attn_k", "attn_v"):
                out[p + name + ".bias"] = 0.1 * rng.standard_normal(
                    shapes[name + ".weight"][0], np.float32)
    return out


def random_q4_k(shape, seed: int) -> np.ndarray:
    """Q4_K blocks (the gguf package dequantises K-quants but cannot quantise to them):
    random 4-bit codes and 6-bit scales, and small finite fp16 super-block scales."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K]
    rows, cols = shape
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), np.uint8)
    raw[..., 0:2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)   # d
    raw[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)   # dmin
    return raw.reshape(rows, -1)


def write_gguf(path: str, weights: dict, arch: str = "llama", qtypes: dict | None = None,
               metadata: dict | None = None, **dims) -> str:
    """Writes ``weights`` (HF layout) as a GGUF: Q/K permuted for Llama, each tensor in the
    type ``qtypes[name]`` (a GGMLQuantizationType name; default F32). ``metadata``
    overrides or adds keys ({arch}.* keys given without the prefix as '.key')."""
    import gguf

    d = dict(DIMS, **dims)
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(d["layers"])
    w.add_context_length(256)
    w.add_embedding_length(d["hidden"])
    w.add_feed_forward_length(d["ffn"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d["hidden"] // d["heads"])
    w.add_vocab_size(d["vocab"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS[:d["vocab"]])
    w.add_token_merges(MERGES)
    w.add_token_types([3, 3, 3] + [1] * (d["vocab"] - 3))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        key = arch + key if key.startswith(".") else key
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))
    for name, arr in weights.items():
        if arch == "llama" and name.endswith("attn_q.weight"):
            arr = llama_cpp_permute(arr, d["heads"])
        elif arch == "llama" and name.endswith("attn_k.weight"):
            arr = llama_cpp_permute(arr, d["kv_heads"])
        kind = qtypes.get(name, qtypes.get("*", "F32")) if arr.ndim == 2 else "F32"
        qt = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
        elif kind == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        elif kind == "Q4_K":
            w.add_tensor(name, random_q4_k(arr.shape, len(name)), raw_dtype=qt)
        elif kind == "Q8_1":      # no numpy (de)quantisation in the gguf package: zeros
            block, size = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor(name, np.zeros((arr.shape[0], arr.shape[1] // block * size),
                                        np.uint8), raw_dtype=qt)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
