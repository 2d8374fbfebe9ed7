"""The probe's study section: the paired middle-layer test against hand cases, and the
untuned base model as reference, end to end from a tiny random base to the report."""

import copy
import json
import os

import ml_collections
import numpy as np
import pytest

from xft_jax.eval import outputs, probe as probe_lib, probe_runs
from xft_jax.errors import ConfigValueError
from xft_jax.study import bootstrap, probe_summary


def test_paired_test_pairs_by_example_id_and_seed():
    base = {0: {"a": 1.0, "b": 2.0, "c": 3.5}, 1: {"a": 2.0, "b": 2.25, "c": 2.0}}
    # other = base + 0.5 on every example, written in another order; an unpaired seed and
    # an unpaired example are left out
    other = {0: {"c": 4.0, "a": 1.5, "b": 2.5, "extra": 9.0},
             1: {"b": 2.75, "c": 2.5, "a": 2.5}, 7: {"a": 0.0}}
    t = probe_summary.paired_test(base, other, n_boot=500)
    assert t["diff"] == pytest.approx(0.5) and (t["n_seeds"], t["n_examples"]) == (2, 3)
    assert t["ci_low"] == pytest.approx(0.5) and t["ci_high"] == pytest.approx(0.5)
    assert t["p_value"] == pytest.approx(2 / 501)         # every replicate above zero
    flipped = probe_summary.paired_test(other, base, n_boot=500)
    assert flipped["diff"] == pytest.approx(-0.5)
    assert probe_summary.paired_test(base, {5: {"a": 1.0}}) is None


def test_paired_bootstrap_in_chunks_has_the_hand_computed_moments(monkeypatch):
    """2 seeds x 40 distinct per-example differences (the index-resampling path), the
    replicates drawn in chunks of 10: E[T] = mean(d); Var[T] = (Var_seed(m) + mean(v) / n)
    / S for seed means m and within-seed variances v (as in tests/test_bootstrap.py)."""
    rng = np.random.default_rng(3)
    d = np.stack([rng.normal(0.3, 1.0, 40), rng.normal(-0.1, 0.5, 40)])
    m, v = d.mean(1), d.var(1)
    want_var = (m.var() + v.mean() / 40) / 2
    monkeypatch.setattr(probe_summary, "_BOOT_CELLS", 800)          # 10 replicates a chunk
    calls = []
    real = bootstrap.hierarchical_bootstrap
    monkeypatch.setattr(bootstrap, "hierarchical_bootstrap",
                        lambda x, n, s: calls.append((n, s)) or real(x, n, s))
    boot = probe_summary.paired_bootstrap(d, n_boot=40_000)
    assert boot.shape == (40_000,) and len(calls) == 4000
    assert {n for n, _ in calls} == {10} and len({s for _, s in calls}) == 4000  # new draws
    assert boot.mean() == pytest.approx(d.mean(), abs=0.01)
    assert boot.var() == pytest.approx(want_var, rel=0.03)
    base = {s: {f"e{i:02d}": 0.0 for i in range(40)} for s in (0, 1)}
    other = {s: {f"e{i:02d}": float(d[s, i]) for i in range(40)} for s in (0, 1)}
    t = probe_summary.paired_test(base, other, n_boot=2000)
    lo, hi = np.percentile(probe_summary.paired_bootstrap(d, 2000), [2.5, 97.5])
    assert (t["ci_low"], t["ci_high"]) == (lo, hi) and t["diff"] == pytest.approx(d.mean())


@pytest.fixture(scope="module")
def base_probe(tmp_path_factory):
    """The untuned tiny random base probed through the interface the demo calls."""
    from configs import eval as eval_config
    from configs import tiny
    from xft_jax.training.base_model import build_random_checkpoint

    root = tmp_path_factory.mktemp("base")
    path = build_random_checkpoint(str(root / "model"), tiny.get_config().model.random)
    c = eval_config.get_config()
    c.model.path = path
    c.data.source, c.data.axis = "synthetic", "naturalness"
    c.data.num_synthetic, c.data.max_len, c.data.max_examples = 40, 320, 6
    c.eval.batch_size = 4
    sweep = str(root / "sweep")
    out = probe_summary.base_probe_dir(sweep, "synthetic", "naturalness")
    return c, sweep, out, probe_runs.run_base_probe(c, out)


def test_base_probe_writes_the_reference(base_probe):
    c, sweep, out, doc = base_probe
    assert out == os.path.join(sweep, "synthetic", "naturalness", "base", "probe")
    with open(os.path.join(out, "probe.json")) as f:
        saved = json.load(f)
    (run,) = saved["runs"]
    assert run["variant"] == "base" and set(saved["variants"]) == {"base"}
    assert run["model"]["kind"] == "merged_or_base" and run["n"] == 6
    pe = run["per_example"]
    assert len(pe["ids"]) == len(set(pe["ids"])) == 6
    for k in probe_lib.METRICS:
        assert len(pe["middle"][k]) == len(pe["last"][k]) == 6, k
        assert os.path.getsize(os.path.join(out, f"probe_{k}.png")) > 0
    assert os.path.getsize(os.path.join(out, "probe.json")) < 200_000      # small
    for bad in ({"adapter": "/x"}, {"workdir": "/x"}, {"path": ""}):
        cc = copy.deepcopy(c)
        for k, v in bad.items():
            setattr(cc.model, k, v)
        with pytest.raises(ConfigValueError, match="base probe"):
            probe_runs.run_base_probe(cc, out)


def _fake_cell(sweep, base_run, variant, seed, shift):
    """A cell's probe.json: the base's run with ``shift`` added to act_entropy."""
    r = copy.deepcopy(base_run)
    r.update(variant=variant, seed=seed)
    r["summary"]["act_entropy"]["mean"] = [x + shift for x in r["summary"]["act_entropy"]["mean"]]
    r["per_example"]["middle"]["act_entropy"] = [
        x + shift for x in r["per_example"]["middle"]["act_entropy"]]
    d = os.path.join(sweep, "synthetic", "naturalness", variant, f"seed{seed}", "probe")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "probe.json"), "w") as f:
        json.dump({"runs": [r]}, f)


def test_summary_draws_the_base_and_tests_the_middle_layers(base_probe, tmp_path,
                                                            monkeypatch):
    _, sweep, _, doc = base_probe
    (run,) = doc["runs"]
    for seed in (0, 1):
        _fake_cell(sweep, run, "label_only", seed, 0.0)
        _fake_cell(sweep, run, "explanation", seed, 0.25 + 0.1 * seed)
    drawn = {}
    real = outputs.curve_figure
    monkeypatch.setattr(outputs, "curve_figure", lambda k, curves, path, **kw: (
        drawn.__setitem__(k, curves), real(k, curves, path, **kw))[1])
    text = probe_summary.summarize(sweep, str(tmp_path), ["synthetic"], ["naturalness"],
                                   ["label_only", "explanation"], [0, 1])
    assert "| base (untuned) | 1 |" in text and "grey dashed reference" in text
    assert set(drawn) == set(probe_summary.CURVES)
    for k, curves in drawn.items():              # every figure carries the base curve
        assert list(curves) == ["label_only", "explanation", "base"], k
        assert curves["explanation"][2] == 2 and curves["base"][2] == 1
        assert os.path.getsize(tmp_path / f"probe_{k}.png") > 0
        assert f"*{k}*: {outputs.CAPTIONS[k]}" in text
    row = next(l for l in text.splitlines() if l.startswith("| synthetic / naturalness | "
                                                            "explanation"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].startswith("+0.3000 [+0.2500, +0.3500]")   # mean of 0.25 and 0.35
    assert cells[3].startswith("+0.0000 [+0.0000, +0.0000] p=1.000")   # untouched
    mid = probe_lib.middle_layers(run["num_layers"] + 1)
    assert f"Middle layers: {mid.start}–{mid.stop - 1} of {run['num_layers']}" in text


def test_summary_without_a_base_says_so(tmp_path):
    run = {"variant": "label_only", "seed": 0, "num_layers": 2,
           "summary": {k: {"mean": [0.1, 0.2, 0.3], "std": [0, 0, 0]}
                       for k in probe_lib.METRICS}}
    d = tmp_path / "s" / "a" / "label_only" / "seed0" / "probe"
    d.mkdir(parents=True)
    (d / "probe.json").write_text(json.dumps({"runs": [run]}))
    text = probe_summary.summarize(str(tmp_path), str(tmp_path), ["s"], ["a"],
                                   ["label_only", "explanation"], [0])
    assert "no base-model reference was probed" in text and "| base" not in text
    assert "| explanation | 0 | missing" in text
    assert "0.3000 ± n/a (1 run)" in text                     # the output-layer value


def test_base_probe_command_carries_the_runs_model_and_data():
    train = {"model": {"path": "/m", "tokenizer": "", "dtype": "bfloat16",
                       "quantization": "nf4"},
             "data": {"source": "coqa", "path": "/d/coqa", "axis": "on_topic",
                      "target": "explanation", "max_len": 512, "seed": 0,
                      "prompt_room": ["label_only", "explanation"], "num_train": None}}
    cmd = probe_summary.base_probe_command("/sw", "coqa", "on_topic", train, python="py")
    assert cmd[:4] == ["py", "-m", "xft_jax.probe", "--config=configs/eval.py"]
    assert "--out=/sw/coqa/on_topic/base/probe" in cmd
    for flag in ("--config.model.path=/m", "--config.model.dtype=bfloat16",
                 "--config.model.quantization=nf4", "--config.data.axis=on_topic",
                 "--config.data.max_len=512",
                 "--config.data.prompt_room=('label_only', 'explanation')"):
        assert flag in cmd, flag
    assert not any("tokenizer" in a or "num_train" in a for a in cmd)
    assert ml_collections  # the flags parse as the eval config's (tests/test_sweep.py)


def test_the_demo_and_the_sweep_point_the_base_probe_alike(tmp_path):
    """The demo's in-process base probe and the sweep's command carry the same settings
    (base_probe_settings), and both count a base probe done by one marker."""
    import json

    from xft_jax.study import demo_configs, demo_lib, grid

    c = demo_configs.demo_config("smoke")
    tc, _, _ = demo_lib.cell_configs(c, grid.Cell(c.source, "naturalness", "label_only", 0),
                                     "/base", str(tmp_path))
    bc = demo_lib.base_probe_config(c, "naturalness", "/base", str(tmp_path))
    train = json.loads(tc.to_json_best_effort())
    settings = probe_summary.base_probe_settings(train)
    assert settings["model.path"] == "/base" and settings["model.dtype"] == "float32"
    assert settings["data.prompt_room"] == tuple(train["data"]["prompt_room"])
    assert bc.model.workdir == ""
    for key, value in settings.items():
        section, leaf = key.split(".")
        assert bc[section][leaf] == value, key
    cmd = probe_summary.base_probe_command(str(tmp_path), c.source, "naturalness", train)
    assert all(any(a.startswith(f"--config.{k}=") for a in cmd) for k in settings)

    out_dir = str(tmp_path / "base")
    os.makedirs(out_dir)
    definition = json.loads(bc.to_json_best_effort())
    probe_summary.record_base_probe(out_dir, definition)
    assert not probe_summary.base_probe_done(out_dir, definition)    # no probe.json yet
    open(os.path.join(out_dir, "probe.json"), "w").write("{}")
    assert probe_summary.base_probe_done(out_dir, definition)
    assert not probe_summary.base_probe_done(out_dir, dict(definition, data={}))
