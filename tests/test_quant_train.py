"""LoRA training over an NF4 base (QLoRA) with the real trainer and configs/tiny.py:
the loss goes down, a resumed run equals the uninterrupted one bit for bit, and the
exported PEFT adapter loads in PyTorch onto the UNquantised base."""

import os
import shutil

import jax
import numpy as np
import pytest
import torch

from configs import tiny
from xft_jax import quantization as Q
from xft_jax.models import hf_io
from xft_jax.training import metrics_log, trainer

STEPS = 4
OVERRIDES = {"train.steps": STEPS, "train.checkpoint_every": 2, "data.num_synthetic": 64,
             "data.batch_size": 4, "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 1,
             "optim.lr": 1e-2, "optim.warmup_steps": 0, "model.quantization": "nf4",
             "lora.dropout": 0.1}


def _config():
    c = tiny.get_config()
    for key, value in OVERRIDES.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a copy of it resumed from its step-2 checkpoint. The
    loaded bases are recorded to check that they really were quantised."""
    loaded = []
    real_load = hf_io.load_pretrained

    def spy(*args, **kwargs):
        m = real_load(*args, **kwargs)
        loaded.append(m)
        return m

    mp = pytest.MonkeyPatch()
    mp.setattr(hf_io, "load_pretrained", spy)
    try:
        devices = jax.devices()[:2]
        full = str(tmp_path_factory.mktemp("full"))
        trainer.train(_config(), full, devices=devices)
        resumed = str(tmp_path_factory.mktemp("resumed"))
        shutil.copytree(full, resumed, dirs_exist_ok=True)
        shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))
        result = trainer.train(_config(), resumed, devices=devices)
    finally:
        mp.undo()
    return full, resumed, result, loaded


def _lora_at(workdir, step):
    """The LoRA params saved at ``step`` (read as saved, no target tree needed)."""
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path)["lora"])


def test_base_is_nf4_and_loss_decreases(runs):
    full, _, _, loaded = runs
    assert len(loaded) == 2
    for m in loaded:
        q = Q.quantized_leaves(m.params())
        assert len(q) == 7 and all(w.kind == "nf4" for w in q.values())
    losses = [r["loss"] for r in metrics_log.read_metrics(full)]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05, losses


def test_restored_run_is_evaluated_on_its_quantised_base(runs):
    """load_trained (evaluation, probe) rebuilds the NF4 base the adapters were trained on;
    dense=True (merged export) gives the unquantised one."""
    from xft_jax.training.restore import load_trained

    full = runs[0]
    model, _, step = load_trained(full)
    assert step == STEPS
    q = Q.quantized_leaves(model.params())
    assert len(q) == 7 and all(w.kind == "nf4" for w in q.values())
    np.testing.assert_array_equal(
        np.asarray(model.lora_params()["layers"]["q_proj"]["b"]),
        _lora_at(full, STEPS)["layers"]["q_proj"]["b"])
    dense, _, _ = load_trained(full, dense=True)
    assert not Q.quantized_leaves(dense.params())


def test_resume_is_exact(runs):
    full, resumed, result, _ = runs
    assert result.step == STEPS
    a, b = _lora_at(full, STEPS), _lora_at(resumed, STEPS)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    la = [r["loss"] for r in metrics_log.read_metrics(full)]
    lb = [r["loss"] for r in metrics_log.read_metrics(resumed)]
    assert la == lb


def test_peft_adapter_loads_in_pytorch_on_the_unquantised_base(runs, tmp_path):
    import peft
    from tests.hf_fixtures import load_hf_model
    from xft_jax.training.export_run import export_run
    from xft_jax.training.restore import load_trained

    full, _, _, _ = runs
    out = str(tmp_path / "adapter")
    export_run(full, "peft", out)
    model, meta, _ = load_trained(full, dtype="float32", dense=True)  # fp32 dense base + adapters
    base_path = meta["lora"]["base_model_path"]
    assert np.abs(np.asarray(model.lora_params()["layers"]["q_proj"]["b"])).max() > 0
    ids = np.random.default_rng(0).integers(3, 32000, (2, 10)).astype(np.int32)
    ours = np.asarray(model(ids))
    ref = peft.PeftModel.from_pretrained(load_hf_model(base_path), out).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # And the adapter changes PyTorch's output (it is not a no-op).
    with torch.no_grad(), ref.disable_adapter():
        plain = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(plain - theirs).max() > 1e-3
