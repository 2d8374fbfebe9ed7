"""LoRA: init, merge/unmerge, and PEFT interop in both directions (logits vs PyTorch)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_fixtures import load_hf_model
from xft_jax import lora as lora_lib
from xft_jax.models import hf_io

IDS = np.array([[1, 5, 9, 17, 33, 65, 100, 3, 7, 11], [1, 8, 2, 4, 99, 120, 6, 12, 0, 0]],
               np.int32)
MASK = np.array([[1] * 10, [1] * 8 + [0] * 2], np.int32)


def _torch_logits(model):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS, dtype=torch.long),
                    attention_mask=torch.tensor(MASK, dtype=torch.long)).logits
    return out.numpy()


def _ours(model):
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))


def _randomise_b(model, seed=1):
    """B starts at zero; give it values so the adapter actually changes the logits."""
    tree = model.lora_params()
    key = jax.random.key(seed)
    new = {"layers": {}}
    for i, (t, ab) in enumerate(sorted(tree["layers"].items())):
        b = 0.05 * jax.random.normal(jax.random.fold_in(key, i), ab["b"].shape)
        new["layers"][t] = {"a": ab["a"], "b": b}
    lora_lib.set_lora_tree(model, new)


def _valid(x):
    return x[MASK.astype(bool)]


def test_init_matches_peft_default():
    from xft_jax.models.config import ModelConfig

    mc = ModelConfig(vocab_size=32, hidden_size=256, intermediate_size=64, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=64)
    cfg = lora_lib.LoRAConfig(rank=16, alpha=32, targets=("q_proj", "down_proj"))
    arrays = lora_lib.init_lora_arrays(mc, cfg, jax.random.key(0))
    a, b = np.asarray(arrays["q_proj"]["a"]), np.asarray(arrays["q_proj"]["b"])
    assert a.shape == (3, 256, 16) and b.shape == (3, 16, 256)
    assert a.dtype == np.float32 and not b.any()
    bound = 1 / np.sqrt(256)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound        # uniform's std
    assert np.abs(np.asarray(arrays["down_proj"]["a"])).max() <= 1 / np.sqrt(64)
    again = lora_lib.init_lora_arrays(mc, cfg, jax.random.key(0))
    assert np.array_equal(a, np.asarray(again["q_proj"]["a"]))
    other = lora_lib.init_lora_arrays(mc, cfg, jax.random.key(1))
    assert not np.array_equal(a, np.asarray(other["q_proj"]["a"]))
    assert cfg.scale == 2.0
    assert lora_lib.LoRAConfig(rank=16, alpha=32, rslora=True).scale == 8.0
    with pytest.raises(lora_lib.LoRAError, match="qkv"):
        lora_lib.LoRAConfig(targets=("qkv",))


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_peft_export_matches_pytorch(family, hf_checkpoint, tmp_path):
    import peft

    path = hf_checkpoint(family)
    model = hf_io.load_pretrained(path)
    cfg = lora_lib.LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj",
                                                         "gate_proj", "down_proj"))
    lora_lib.attach(model, cfg, jax.random.key(3))
    base_logits = _ours(model)
    _randomise_b(model)
    ours = _ours(model)
    assert np.abs(_valid(ours) - _valid(base_logits)).max() > 1e-2   # adapter matters
    out = tmp_path / "adapter"
    lora_lib.save_peft_adapter(model, str(out), base_model_path=path)
    assert json.load(open(out / "adapter_config.json"))["r"] == 4
    meta = json.load(open(out / lora_lib.METADATA_FILE))
    assert meta["base_config_hash"] == model.config.hash() and meta["alpha"] == 8
    ref = peft.PeftModel.from_pretrained(load_hf_model(path), str(out)).eval()
    theirs = _torch_logits(ref)
    np.testing.assert_allclose(_valid(ours), _valid(theirs), atol=1e-4, rtol=0)

    # merged export: a plain HF checkpoint that transformers loads without PEFT
    merged_dir = tmp_path / "merged"
    lora_lib.save_merged(model, str(merged_dir))
    assert model.lora is None
    merged = _torch_logits(load_hf_model(str(merged_dir)))
    np.testing.assert_allclose(_valid(merged), _valid(ours), atol=1e-4, rtol=0)


def test_peft_import_from_pytorch(hf_checkpoint, tmp_path):
    import peft
    import torch

    path = hf_checkpoint("llama")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=12, use_rslora=True, init_lora_weights=False,
                          target_modules=["k_proj", "up_proj", "down_proj", "o_proj"],
                          task_type="CAUSAL_LM")
    ref = peft.get_peft_model(load_hf_model(path), cfg).eval()
    ref.save_pretrained(str(tmp_path / "a"))
    theirs = _torch_logits(ref)
    model = hf_io.load_pretrained(path)
    lora = lora_lib.load_peft_adapter(model, str(tmp_path / "a"))
    assert lora.scale == pytest.approx(12 / 2.0) and lora.config.rank == 4
    ours = _ours(model)
    np.testing.assert_allclose(_valid(ours), _valid(theirs), atol=1e-4, rtol=0)
    assert np.abs(_valid(ours) - _valid(_torch_logits(load_hf_model(path)))).max() > 1e-2


def test_merge_unmerge_and_errors(hf_checkpoint, tmp_path):
    path = hf_checkpoint("llama")
    model = hf_io.load_pretrained(path)
    before = jax.tree.map(np.asarray, model.params())
    lora_lib.attach(model, lora_lib.LoRAConfig(rank=2, alpha=4), jax.random.key(0))
    _randomise_b(model)
    with_lora = _ours(model)
    detached = lora_lib.merge(model)
    np.testing.assert_allclose(_ours(model), with_lora, atol=1e-5)
    lora_lib.unmerge(model, detached)
    np.testing.assert_allclose(_ours(model), with_lora, atol=1e-5)
    after = jax.tree.map(np.asarray, model.params())
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), before, after)

    # a wrongly shaped tensor is named in the error
    lora_lib.save_peft_adapter(model, str(tmp_path / "a"), base_model_path=path)
    from safetensors.numpy import load_file, save_file
    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = lora_lib.peft_key(1, "q_proj", "A")
    t[key] = np.zeros((3, 64), np.float32)
    save_file(t, str(tmp_path / "a" / "adapter_model.safetensors"))
    os.remove(tmp_path / "a" / lora_lib.METADATA_FILE)
    with pytest.raises(lora_lib.LoRAError, match="layers.1.self_attn.q_proj.lora_A"):
        lora_lib.load_peft_adapter(hf_io.load_pretrained(path), str(tmp_path / "a"))
