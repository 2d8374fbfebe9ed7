"""A short configs/tiny.py run learns (train and eval loss go down), and its exports work in PyTorch:
the PEFT adapter (via the export main) on the transformers base, and the merged HF
checkpoint, both give our logits within 1e-4 (float32)."""

import json
import os
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from tests.hf_fixtures import load_hf_model
from xft_jax.training.export_run import export_run
from xft_jax.training import metrics_log
from xft_jax.training.restore import load_trained
from xft_jax.training.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.array([[1, 415, 2936, 9060, 1338, 28705, 28781, 2, 0, 0],
                [1, 22557, 28747, 28705, 28770, 28723, 415, 2899, 349, 1179]], np.int32)
MASK = np.array([[1] * 8 + [0] * 2, [1] * 10], np.int32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    c = tiny.get_config()
    c.train.steps = 12
    c.train.checkpoint_every = 12
    c.data.num_synthetic = 64
    c.data.batch_size = 4
    c.optim.lr = 1e-2
    c.train.eval_every = 6
    c.data.eval_examples = 8
    c.mesh.fsdp = 1
    wd = str(tmp_path_factory.mktemp("tiny"))
    train(c, wd, devices=jax.devices()[:1])
    return wd


def _torch_logits(model):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS, dtype=torch.long),
                     attention_mask=torch.tensor(MASK, dtype=torch.long)).logits.numpy()


def _ours(workdir):
    """Our logits at the checkpoint an export takes by default: the best-validation one."""
    from xft_jax.training import selection

    step = selection.selected_step(workdir)
    assert step in (6, 12)                                      # eval_every=6
    model, _, _ = load_trained(workdir, step, dtype="float32")
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))


def test_tiny_config_loss_decreases(run):
    rows = metrics_log.read_metrics(run)
    loss = [r["loss"] for r in rows]
    label = [r["label_loss"] for r in rows]
    assert len(loss) == 12
    assert np.mean(loss[-3:]) < loss[0] - 0.3, loss
    # the label token alone is noisy at batch 4 (4 tokens a step) on a random base
    assert np.mean(label[-3:]) < np.mean(label[:3]) - 0.1, label
    evals = [r for r in rows if "eval_loss" in r]               # eval_every=6
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert 0.0 <= evals[1]["eval_label_accuracy"] <= 1.0


def test_peft_export_matches_pytorch(run, tmp_path):
    import peft

    out = str(tmp_path / "adapter")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    p = subprocess.run([sys.executable, "-m", "xft_jax.export", f"--workdir={run}",
                        "--format=peft", f"--out={out}"], cwd=REPO, env=env,
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    mask = os.umask(0o022)
    os.umask(mask)                                  # the export respects the umask
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~mask
    for name in os.listdir(out):
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o666 & ~mask, name
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0 and cfg["peft_type"] == "LORA"
    base = os.path.join(run, "base_model")
    ours = _ours(run)
    ref = peft.PeftModel.from_pretrained(load_hf_model(base), out).eval()
    theirs = _torch_logits(ref)
    m = MASK.astype(bool)
    np.testing.assert_allclose(ours[m], theirs[m], atol=1e-4, rtol=0)
    # the trained adapter matters: the plain base differs
    assert np.abs(_torch_logits(load_hf_model(base))[m] - theirs[m]).max() > 1e-3


def test_merged_export_matches(run, tmp_path):
    out = str(tmp_path / "merged")
    export_run(run, "merged", out, dtype="float32")
    assert os.path.exists(os.path.join(out, "tokenizer.model"))
    theirs = _torch_logits(load_hf_model(out))
    m = MASK.astype(bool)
    np.testing.assert_allclose(_ours(run)[m], theirs[m], atol=1e-4, rtol=0)


def test_export_is_evaluated_on_the_runs_own_split(run, tmp_path):
    """model.path + adapter (and a merged export) default to the same test split as the
    run's workdir, from the run config the export carries."""
    from xft_jax import config_defaults
    from xft_jax.eval.evaluation import run_evaluation

    adapter = str(tmp_path / "adapter")
    export_run(run, "peft", adapter)
    base = json.load(open(os.path.join(adapter, "adapter_config.json")))[
        "base_model_name_or_path"]
    docs = {}
    for kind in ("workdir", "adapter"):
        ec = config_defaults.eval_config()
        ec.mesh.fsdp, ec.mesh.num_devices = 1, 1
        ec.eval.batch_size = 8
        ec.model.dtype = "float32"
        if kind == "workdir":
            ec.model.workdir = run
        else:
            ec.model.path, ec.model.adapter = base, adapter
        docs[kind] = run_evaluation(ec, str(tmp_path / f"eval_{kind}"))
    w, a = docs["workdir"], docs["adapter"]
    assert a["model"]["run_config_from"] == os.path.join(adapter, "xft_jax_run.json")
    assert a["data"]["examples"] == w["data"]["examples"]
    assert a["data"]["num_synthetic"] == w["data"]["num_synthetic"] == 64
    assert a["metrics"]["n"] == w["metrics"]["n"]
    assert a["metrics"]["accuracy"] == pytest.approx(w["metrics"]["accuracy"])
