"""safetensors load/save, loader errors, config reading, host-memory peak."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.hf_fixtures import load_hf_model, load_peak_rss, make_hf_checkpoint

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from xft_jax import models  # noqa: E402
from xft_jax.models.config import ConfigError, ModelConfig  # noqa: E402


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _tensors(path):
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _write_tensors(path, tensors):
    from safetensors.numpy import save_file

    save_file(tensors, os.path.join(path, "model.safetensors"))


def test_round_trip_is_bit_exact_and_loads_in_transformers(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen2")
    model = models.load_pretrained(src)
    out = str(tmp_path / "saved")
    models.save_pretrained(model, out)
    again = models.load_pretrained(out)
    for a, b in zip(jax.tree.leaves(model.params()), jax.tree.leaves(again.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # every tensor of the original file comes back unchanged
    orig, saved = _tensors(src), _tensors(out)
    assert set(saved) == set(orig) - {"lm_head.weight"}
    for k in saved:
        np.testing.assert_array_equal(saved[k], orig[k])
    ids = np.random.default_rng(0).integers(3, 128, (2, 9))
    with torch.no_grad():
        ref = load_hf_model(out)(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(again(jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4


def test_sharded_save_writes_index(hf_checkpoint, tmp_path):
    model = models.load_pretrained(hf_checkpoint("llama"))
    out = str(tmp_path / "sharded")
    models.save_pretrained(model, out, max_shard_size="40KB")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not os.path.exists(os.path.join(out, "model.safetensors"))
    again = models.load_pretrained(out)
    for a, b in zip(jax.tree.leaves(model.params()), jax.tree.leaves(again.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hf = load_hf_model(out)  # transformers reads the sharded layout too
    ids = np.arange(3, 12)[None]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(again(jnp.asarray(ids))) - ref).max() <= 1e-4


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16, torch.float32])
def test_every_tensor_cast_like_torch_for_each_dtype_and_mesh(tmp_path, source):
    """Source dtype x parameter dtype x (one device, a 2x2x2 mesh): every tensor equals
    torch's own cast of the stored tensor, bit for bit, and every leaf has the dtype."""
    from safetensors.torch import load_file

    from xft_jax import sharding

    path = make_hf_checkpoint(str(tmp_path / "ckpt"), "llama", dtype=source)
    src = load_file(os.path.join(path, "model.safetensors"))
    for target in (jnp.float32, jnp.bfloat16, jnp.float16):
        for mesh in (None, sharding.create_mesh(2, 2, 2)):
            model = models.load_pretrained(path, dtype=target, mesh=mesh)
            got = dict(models.hf_io.hf_state_items(model))
            assert set(got) == set(src)
            for name, tensor in src.items():
                want = tensor.to(getattr(torch, jnp.dtype(target).name)).float().numpy()
                np.testing.assert_array_equal(got[name].astype(np.float32), want,
                                              err_msg=f"{name} {source}->{target}")
            assert all(leaf.dtype == target for leaf in jax.tree.leaves(model.params()))


# ------------------------------------------------------------------ loader errors
def test_missing_tensor(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    t = _tensors(path)
    del t["model.layers.1.mlp.up_proj.weight"]
    _write_tensors(path, t)
    with pytest.raises(models.CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        models.load_pretrained(str(path))


def test_unexpected_tensor(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "u")
    t = _tensors(path)
    t["model.layers.0.extra.weight"] = np.zeros((2, 2), np.float32)
    _write_tensors(path, t)
    with pytest.raises(models.CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        models.load_pretrained(str(path))


def test_wrong_shape(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "s")
    t = _tensors(path)
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    _write_tensors(path, t)
    with pytest.raises(models.CheckpointError,
                       match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 64\), expected \(32, 64\)"):
        models.load_pretrained(str(path))


def test_truncated_file(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "t")
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(models.SafetensorsError, match=r"model\.safetensors: truncated safetensors file: tensor '.*' ends at byte"):
        models.load_pretrained(str(path))


def test_corrupt_header(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "c")
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff\xfe garbage")
    with pytest.raises(models.SafetensorsError, match=r"model\.safetensors: corrupt safetensors header"):
        models.load_pretrained(str(path))


def test_pickle_only_directory_is_refused(hf_checkpoint, tmp_path):
    path = tmp_path / "pkl"
    path.mkdir()
    shutil.copy(os.path.join(hf_checkpoint("llama"), "config.json"), path)
    (path / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(models.CheckpointError, match=r"only pytorch_model\.bin found\. Pickle checkpoints are refused.*safe_serialization=True"):
        models.load_pretrained(str(path))


def test_index_pointing_at_missing_file(hf_checkpoint, tmp_path):
    model = models.load_pretrained(hf_checkpoint("llama"))
    out = tmp_path / "idx"
    models.save_pretrained(model, str(out), max_shard_size="40KB")
    victim = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))[0]
    os.remove(out / victim)
    with pytest.raises(models.CheckpointError, match=rf"lists {victim}, which does not exist"):
        models.load_pretrained(str(out))


# ------------------------------------------------------------------ config reading
def _hf_dict(**kw):
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
         "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
    d.update(kw)
    return d


def test_config_v4_and_v5_rope_styles_agree():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    v4 = ModelConfig.from_hf_dict(_hf_dict(rope_theta=500000.0, rope_scaling=scaling))
    v5 = ModelConfig.from_hf_dict(_hf_dict(rope_parameters=dict(scaling, rope_theta=500000.0)))
    assert v4 == v5 and v4.rope_type == "llama3" and v4.rope_theta == 500000.0
    legacy = ModelConfig.from_hf_dict(_hf_dict(rope_scaling={"type": "linear", "factor": 2.0}))
    assert legacy.rope_type == "linear"


def test_config_fields_per_family():
    m = ModelConfig.from_hf_dict(_hf_dict(architectures=["MistralForCausalLM"],
                                          model_type="mistral", sliding_window=4096))
    assert m.sliding_window == 4096 and not m.qkv_bias
    q = ModelConfig.from_hf_dict(_hf_dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                          tie_word_embeddings=True, sliding_window=4096,
                                          use_sliding_window=False))
    assert q.qkv_bias and not q.o_bias and q.tie_word_embeddings and q.sliding_window is None
    h = ModelConfig.from_hf_dict(_hf_dict(head_dim=24))
    assert h.head_dim == 24 and ModelConfig.from_hf_dict(_hf_dict()).head_dim == 16


@pytest.mark.parametrize("kw, message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), r"unsupported architecture \['GPT2LMHeadModel'\]"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling type 'yarn' is not supported"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (dict(num_key_value_heads=3), r"not a multiple of num_key_value_heads=3"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True), r"use_sliding_window=True is not supported"),
])
def test_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(_hf_dict(**kw), source="some/config.json")


def test_config_missing_key_names_file_and_key(tmp_path):
    d = _hf_dict()
    del d["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json: missing required key 'intermediate_size'"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_dynamic_rope_matches_transformers(tmp_path):
    path = make_hf_checkpoint(str(tmp_path / "dyn"), "llama", max_position_embeddings=8,
                              rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    model = models.load_pretrained(path)
    ids = np.random.default_rng(0).integers(3, 128, (1, 14))  # longer than 8: scaling active
    with torch.no_grad():
        ref = load_hf_model(path)(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - ref).max() <= 1e-4


def test_tokenizer_loads_real_mistral_vocabulary(mistral_tokenizer_dir):
    tok = models.load_tokenizer(mistral_tokenizer_dir)
    assert len(tok) == 32000
    assert tok.convert_ids_to_tokens(tok("Rating: 4")["input_ids"]) == ["<s>", "▁Rating", ":", "▁", "4"]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        models.load_tokenizer(os.path.dirname(__file__) + "/../xft_jax")


# ------------------------------------------------------------------ host memory
def test_peak_host_memory_while_loading(tmp_path):
    """A Mistral-shaped checkpoint (GQA 4:1, mlp 3.5x) of ~400 MB fp32 loads with a peak
    of at most 1.3x its size above the interpreter's baseline."""
    from safetensors.numpy import save_file

    path = tmp_path / "big"
    path.mkdir()
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
           "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1792,
           "num_hidden_layers": 28, "num_attention_heads": 8, "num_key_value_heads": 2,
           "sliding_window": 4096, "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(cfg))
    shapes = models.hf_io.expected_hf_shapes(ModelConfig.from_hf_dict(cfg))
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    size = sum(t.nbytes for t in tensors.values())
    save_file(tensors, str(path / "model.safetensors"))
    del tensors
    m = load_peak_rss(str(path))
    ratio = (m["peak"] - m["base"]) / size
    print(f"checkpoint {size / 1e6:.0f} MB, base {m['base'] / 1e6:.0f} MB, "
          f"peak {m['peak'] / 1e6:.0f} MB, peak above baseline {ratio:.3f} x")
    assert m["peak"] - m["base"] >= size, "the loaded weights must show in resident memory"
    assert ratio <= 1.3, f"peak host memory {ratio:.3f} x checkpoint size"


SAVE_MEASURE = textwrap.dedent("""
    import json, os, sys
    import jax
    from flax import nnx
    from xft_jax import models
    from xft_jax.models.config import ModelConfig
    from xft_jax.models.decoder import Decoder
    cfg = ModelConfig.from_hf_dict(json.loads(sys.argv[1]))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    jax.block_until_ready(model.params())
    size = sum(x.nbytes for x in jax.tree.leaves(model.params()))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/status") as f:
        base = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:")][0]
    models.save_pretrained(model, sys.argv[2] + "/saved", max_shard_size=int(sys.argv[3]))
    with open("/proc/self/status") as f:
        peak = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")][0]
    print(json.dumps({"base": base, "peak": peak, "model": size}))
""")


def test_save_holds_about_one_shard_on_the_host(tmp_path):
    """A ~125 MB model saved in ~12 MB shards: the host's peak above what it held before
    the save is a shard plus the save's fixed costs (~45 MB here), not the whole model
    (holding every shard until the end peaked at ~135 MB), and the files load in
    transformers and ours."""
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
           "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1792,
           "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
           "sliding_window": 4096, "tie_word_embeddings": False}
    shard = 12 * 10**6
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SAVE_MEASURE, json.dumps(cfg),
                          str(tmp_path), str(shard)], capture_output=True, text=True,
                         timeout=300, env=env, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    extra = m["peak"] - m["base"]
    saved = str(tmp_path / "saved")
    files = [n for n in os.listdir(saved) if n.endswith(".safetensors")]
    print(f"model {m['model'] / 1e6:.0f} MB in {len(files)} shards of <= {shard / 1e6:.0f} "
          f"MB; peak above the pre-save RSS {extra / 1e6:.0f} MB")
    assert len(files) >= 8 and m["model"] >= 10 * shard
    assert extra <= m["model"] / 2, f"saving held {extra / 1e6:.0f} MB at its peak"
    with open(os.path.join(saved, "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"].values()) == set(files)
    ours = models.load_pretrained(saved)
    ids = np.arange(3, 12)[None]
    with torch.no_grad():
        ref = load_hf_model(saved)(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours(jnp.asarray(ids))) - ref).max() <= 1e-4
