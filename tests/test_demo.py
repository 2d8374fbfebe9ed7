"""The demo end to end at smoke size, on the real base (SmolLM2 on degraded real chats) and
on the toy base: every report file appears, the untuned base is probed as reference; a
second run reuses the base and skips the finished runs; a run under changed settings
stops before it rebuilds or overwrites anything."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(out, arg, *extra):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "xft_jax.demo", f"--config=configs/demo.py:{arg}",
         f"--config.out={out}", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_smoke_demo_on_the_real_base_writes_every_report_file(tmp_path):
    out = str(tmp_path / "demo")
    first = _demo(out, "smoke")
    assert first.returncode == 0, first.stderr[-3000:]
    report = os.path.join(out, "report")
    for name in ("report.md", "results.csv", "accuracy.png", "differences.png",
                 "probe_act_entropy.png", "probe_lens_label_mass.png", "probe_attn_entropy.png"):
        assert os.path.getsize(os.path.join(report, name)) > 0, name
    text = _read(os.path.join(report, "report.md"))
    assert "| chitchat_degraded / naturalness |" in text
    assert "| missing" not in text.split("## Probe")[0]
    assert "majority-class rate on the evaluated naturalness examples" in text
    assert "selected by validation accuracy: label_only seed 0: step " in text
    assert "## Accuracy" in text and text in first.stdout  # the table is printed too
    rows = list(csv.DictReader(open(os.path.join(report, "results.csv"), encoding="utf-8")))
    assert {r["variant"] for r in rows} == {"label_only", "explanation"}
    assert all(0.0 <= float(r["accuracy_mean"]) <= 1.0 for r in rows)
    runs = os.path.join(out, "runs", "chitchat_degraded", "naturalness")
    for v in ("label_only", "explanation"):
        for f in ("eval/metrics.json", "eval/predictions.csv", "probe/probe.json",
                  "train/metrics.jsonl", "train/validation.json"):
            assert os.path.exists(os.path.join(runs, v, "seed0", f)), f
    base = json.load(open(os.path.join(runs, "base", "probe", "probe.json"), encoding="utf-8"))
    assert [r["variant"] for r in base["runs"]] == ["base"]          # the untuned reference
    assert base["runs"][0]["model"]["path"].endswith("float32")
    run_config = json.load(open(os.path.join(runs, "label_only", "seed0", "train",
                                             "config.json"), encoding="utf-8"))
    assert run_config["data"]["source"] == "chitchat_degraded"
    assert "[demo] done: chitchat_degraded/naturalness/label_only/seed0: accuracy " in first.stderr
    for noise in ("checkpoint_manager.py", "xla_bridge.py", "PyTorch was not found"):
        assert noise not in first.stderr, noise          # third-party INFO stays hidden
    second = _demo(out, "smoke")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("finished earlier, skipped") == 2
    kept = os.path.join(runs, "explanation", "seed0", "eval", "metrics.json")
    before = open(kept, "rb").read()
    changed = _demo(out, "smoke", "--config.train.optim.lr=0.05")
    assert changed.returncode == 2                     # a user error: one line, no traceback
    assert "Traceback" not in changed.stderr
    assert "finished under other settings" in changed.stderr
    assert "train.optim.lr: " in changed.stderr and "-> 0.05" in changed.stderr
    assert open(kept, "rb").read() == before           # nothing overwritten


def test_smoke_demo_on_the_toy_base_caches_it_and_names_a_changed_recipe(tmp_path):
    out = str(tmp_path / "toy")
    first = _demo(out, "toy_smoke", "--config.probe=False")
    assert first.returncode == 0, first.stderr[-3000:]
    text = _read(os.path.join(out, "report", "report.md"))
    assert "| synthetic / naturalness |" in text and "base model pre-training: LM loss" in text
    second = _demo(out, "toy_smoke", "--config.probe=False")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing cached base model" in second.stderr
    assert second.stderr.count("finished earlier, skipped") == 2
    kept = {f: open(os.path.join(out, f), "rb").read()
            for f in ("base_model/pretrain.json", "base_model/model.safetensors",
                      "runs/synthetic/naturalness/explanation/seed0/eval/metrics.json")}
    changed = _demo(out, "toy_smoke", "--config.probe=False", "--config.pretrain.steps=7")
    assert changed.returncode == 2
    err = changed.stderr
    assert "Traceback" not in err and "finished under other settings" in err
    assert "base_model.steps: " in err and "naturalness/label_only/seed0/cell.json" in err
    for f, data in kept.items():                       # nothing rebuilt or overwritten
        assert open(os.path.join(out, f), "rb").read() == data, f


def _demo_with_training(tmp_path, monkeypatch, status: str, step: int):
    """The smoke demo's config, its base faked and every training run ending with
    ``status`` at ``step`` at once, for tests of how the demo stops."""
    from xft_jax.study import demo_configs, demo_lib
    from xft_jax.training.trainer import TrainResult

    c = demo_configs.demo_config("smoke")
    c.out = str(tmp_path / "demo")
    monkeypatch.setattr(demo_lib, "base_of", lambda c, out: (str(tmp_path / "base"),
                                                               {"bundled": "fake"}))
    monkeypatch.setattr(demo_lib.trainer, "train", lambda tc, wd: TrainResult(
        step=step, status=status, last_metrics={}, workdir=wd))
    return c


def test_a_demo_stopped_by_sigterm_evaluates_nothing_and_says_how_to_resume(tmp_path,
                                                                            monkeypatch):
    """The trainer returns 'preempted' after SIGTERM (saved, resumable): the demo must
    stop there, not evaluate a half-trained run as a finished cell."""
    from xft_jax.study import demo_lib, grid

    c = _demo_with_training(tmp_path, monkeypatch, "preempted", step=1)

    def no_eval(*a, **k):
        raise AssertionError("evaluated an unfinished run")

    monkeypatch.setattr(demo_lib.evaluation, "run_evaluation", no_eval)
    result = demo_lib.run_demo(c, log=lambda *_: None)
    first = grid.cells([c.source], c.axes, c.variants, c.seeds)[0]
    assert result["stopped"] == first.rel
    assert "stopped by SIGTERM" in result["report"] and "at step 1" in result["report"]
    sweep_dir = os.path.join(c.out, "runs")
    assert not grid.is_done(sweep_dir, first, c.probe)
    assert not os.path.exists(os.path.join(c.out, "report"))
    with open(os.path.join(sweep_dir, "timing.json")) as f:      # its time is kept
        entry, = json.load(f)["invocations"]
    assert entry["complete"] is False and entry["runs_trained"] == 0 and entry["wall_s"] > 0


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_evaluation_finishes_that_run_then_stops(tmp_path, monkeypatch,
                                                                  sig):
    """SIGTERM or Ctrl-C while a run is evaluated: that run is finished (evaluated and
    probed), the next is not started, the invocation's time is kept."""
    import signal

    from xft_jax.study import demo_lib, grid

    c = _demo_with_training(tmp_path, monkeypatch, "done", step=2)

    def evaluate(ec, out_dir):
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({"metrics": {"accuracy": 0.5, "macro_f1": 0.5, "n": 2}}, f)
        open(os.path.join(out_dir, "predictions.csv"), "w").write("id,gold,predicted\n")
        os.kill(os.getpid(), getattr(signal, sig))              # arrives mid-evaluation

    def probe(pc, out_dir, workdirs):
        os.makedirs(out_dir)
        open(os.path.join(out_dir, "probe.json"), "w").write("{}")

    monkeypatch.setattr(demo_lib.evaluation, "run_evaluation", evaluate)
    monkeypatch.setattr(demo_lib.probe_runs, "run_probes", probe)
    handlers = [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)]
    result = demo_lib.run_demo(c, log=lambda *_: None)
    assert [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)] == handlers
    first, second = grid.cells([c.source], c.axes, c.variants, c.seeds)[:2]
    sweep_dir = os.path.join(c.out, "runs")
    assert grid.is_done(sweep_dir, first, c.probe)
    assert result["stopped"] == second.rel and "before " + second.rel in result["report"]
    assert not os.path.exists(os.path.join(sweep_dir, second.rel))
    with open(os.path.join(sweep_dir, "timing.json")) as f:
        entry, = json.load(f)["invocations"]
    assert entry["runs_trained"] == 1 and entry["complete"] is False


def test_the_mini_study_is_the_demo_with_its_validated_recipe():
    """configs/smollm2_study.py differs from the demo only in the keys its docstring
    names: three seeds, 1,000 items, the longer recipe chosen on validation data, and
    the powers-of-two padding it ran with."""
    import importlib.util

    from xft_jax.study.demo_configs import demo_config

    spec = importlib.util.spec_from_file_location("study", "configs/smollm2_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    study, demo = module.get_config().to_dict(), demo_config("").to_dict()

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    diff = {k: v for (k, v), (k2, v2) in zip(flat(study), flat(demo), strict=True)
            if (k, v) != (k2, v2)}
    assert diff == {"out": "xft_smollm2_study", "seeds": (0, 1, 2), "num_items": 1000,
                    "train.data.batch_size": 4, "train.optim.lr": 2e-3,
                    "train.optim.warmup_steps": 20, "train.train.epochs": 2.0,
                    "train.train.eval_every": 30, "train.data.bucket_step": 0}
    assert study["variants"] == ("label_only", "explanation", "shuffled", "bag_of_words",
                                 "random_vocab")
    assert study["train"]["data"]["rubric"] is False
    assert study["train"]["train"]["label_loss_weight"] == 1.0
