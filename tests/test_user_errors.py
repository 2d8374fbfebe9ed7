"""Bad input is refused with one line naming the file, key or value (issue cases 5-17 and
20), and a main reports it on stderr in one line with exit code 2, no traceback."""

import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from xft_jax.data import sources, splits
from xft_jax.data.readers import DataError
from xft_jax.data.schema import RatedExample, SchemaError
from xft_jax.data.synthetic import generate
from xft_jax.models import hf_io
from xft_jax.models.config import ConfigError, ModelConfig
from xft_jax.models.decoder import Decoder
from xft_jax.training import base_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "tests", "fixtures", "data")


# ------------------------------------------------------------------------ the wrapper
def test_user_error_is_one_line_exit_2_and_a_bug_keeps_its_traceback(capsys):
    from xft_jax import errors

    def bad_input(argv):
        raise DataError("rated/train.jsonl:3: label 5 contradicts\nits scores")

    assert errors.report_user_errors(bad_input)([]) == 2
    err = capsys.readouterr().err
    assert err == "error: rated/train.jsonl:3: label 5 contradicts its scores\n"

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        errors.report_user_errors(bug)([])


# ------------------------------------------------------------------------ config (5, 14)
@pytest.mark.parametrize("key,value,says", [
    ("optim.lr", 0.0, "optim.lr=0.0: the learning rate must be > 0"),
    ("optim.lr", -1e-3, "optim.lr=-0.001"),
    ("data.source", "cornel_movie", "data.source='cornel_movie' is not a known source"),
    ("data.target", "explanations", "data.target='explanations'"),
    ("data.eval_examples", 0, "data.eval_examples=0.0: must be a positive integer"),
    ("train.eval_batches", 0, "train.eval_batches=0.0: must be a positive integer"),
    ("data.bucket_step", -16, "data.bucket_step=-16.0: must be 0"),
])
def test_config_values_that_cannot_work_are_named(key, value, says):
    from xft_jax import errors
    from xft_jax.training.config_checks import check_train_config

    c = tiny.get_config()
    section, leaf = key.split(".")
    c[section][leaf] = value
    with pytest.raises(errors.ConfigValueError) as e:
        check_train_config(c)
    assert says in str(e.value)
    assert errors.is_user_error(e.value)


def test_validation_that_scores_nothing_names_the_keys_to_change():
    """A validation split with no scorable example stops the run with the fix named,
    rather than recording an empty selection point."""
    import types

    from xft_jax import errors
    from xft_jax.training import trainer

    run_data = types.SimpleNamespace(eval=types.SimpleNamespace(dataset=[]),
                                     label_token_ids=[1, 2, 3, 4, 5])
    with pytest.raises(errors.ConfigValueError, match="validation scored no example.*"
                       "data.max_len.*train.eval_every=0"):
        trainer.validate(None, None, None, run_data, mesh=None)


# ------------------------------------------------------------------------ data (6-9, 15)
def _rated(i=0, **ratings_kw):
    ex = generate(4, seed=0)[i]
    d = ex.to_dict()
    for axis in d["ratings"]:
        d["ratings"][axis].update(ratings_kw)
    return d


def test_duplicate_id_with_other_content_stops_even_when_skipping_bad_rows(tmp_path):
    row = json.loads(open(os.path.join(FIX, "chatbot_arena.jsonl")).readline())
    other = dict(row, conversation_b=row["conversation_a"])
    q = tmp_path / "arena.jsonl"
    q.write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    with pytest.raises(DataError, match=rf"{q}:2: duplicate id: .* than at {q}:1"):
        sources.load_source("chatbot_arena", str(q), on_error="skip")


def test_label_that_contradicts_its_scores_is_refused():
    d = _rated()
    r = d["ratings"]["naturalness"]
    r.update(scores=[1.0] * len(r["scores"]), mean=1.0, median=1.0, spread=0.0, majority=1,
             agreement=0.0, label=5)
    with pytest.raises(SchemaError, match="label 5 contradicts its scores"):
        RatedExample.from_dict(d)
    r.update(label=1, agreement=1.0)
    assert RatedExample.from_dict(d).label("naturalness") == 1


@pytest.mark.parametrize("where,key", [("top", "respnose"), ("axis", "lable")])
def test_unknown_keys_in_rated_jsonl_are_refused(where, key):
    d = _rated()
    target = d if where == "top" else d["ratings"]["on_topic"]
    target[key] = target["response" if where == "top" else "label"]
    with pytest.raises(SchemaError, match=rf"unknown field\(s\) \['{key}'\]"):
        RatedExample.from_dict(d)


def _write_split(path, examples):
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex if isinstance(ex, dict) else ex.to_dict()) + "\n")


def test_rated_splits_empty_missing_duplicated_or_overlapping(tmp_path):
    exs = generate(6, seed=0)
    d = tmp_path / "rated" / "synthetic"
    d.mkdir(parents=True)
    _write_split(d / "train.jsonl", exs[:4])
    with pytest.raises(DataError, match=rf"{d}/test.jsonl: missing \(found train.jsonl"):
        splits.build_datasets("synthetic", str(tmp_path / "rated"))
    _write_split(d / "test.jsonl", exs[4:])
    assert len(splits.build_datasets("synthetic", str(tmp_path / "rated")).train) == 4
    _write_split(d / "test.jsonl", exs[3:])                      # exs[3] in both splits
    with pytest.raises(DataError, match=rf"test.jsonl: example {exs[3].id!r} is also in the "
                                        "training split"):
        splits.build_datasets("synthetic", str(tmp_path / "rated"))
    _write_split(d / "test.jsonl", exs[4:])
    _write_split(d / "train.jsonl", exs[:4] + exs[:1])
    with pytest.raises(DataError, match=rf"train.jsonl: example id {exs[0].id!r} appears twice"):
        splits.build_datasets("synthetic", str(tmp_path / "rated"))
    _write_split(d / "train.jsonl", [])
    with pytest.raises(DataError, match="train.jsonl: the training split has no examples"):
        splits.build_datasets("synthetic", str(tmp_path / "rated"))


def test_max_len_too_short_for_any_prompt_names_data_max_len():
    from xft_jax.models.tokenizer import load_tokenizer, mistral_v1_tokenizer_dir
    from xft_jax.training import batches as data_lib

    c = tiny.get_config()
    c.data.num_synthetic = 40
    c.data.max_len = 16
    with pytest.raises(DataError, match="fits max_len=16.*raise data.max_len"):
        data_lib.build(c, load_tokenizer(mistral_v1_tokenizer_dir()))


# ------------------------------------------------------------------------ weights (10, 16, 17)
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("base") / "m")
    cfg = base_model.tiny_model_config(tiny.get_config().model.random)
    cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": 512})
    hf_io.save_pretrained(Decoder(cfg, rngs=nnx.Rngs(0)), path)
    return path


def _edit_header(src, dst, tensor, **changes):
    """Copies a safetensors checkpoint dir, rewriting one tensor's header entry."""
    import shutil

    shutil.copytree(src, dst)
    f = os.path.join(dst, "model.safetensors")
    raw = open(f, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header[tensor].update(changes)
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    open(f, "wb").write(raw[:8] + new + raw[8 + n:])
    return header[tensor]


def test_dtype_in_header_other_than_the_models_is_refused(tiny_base, tmp_path):
    name = "model.layers.0.input_layernorm.weight"
    _edit_header(tiny_base, tmp_path / "m", name, dtype="I32")
    with pytest.raises(hf_io.CheckpointError, match=rf"tensor '{name}' is stored as int32"):
        hf_io.load_pretrained(str(tmp_path / "m"))


def test_non_finite_weights_are_refused_at_load(tiny_base, tmp_path):
    import shutil

    shutil.copytree(tiny_base, tmp_path / "m")
    f = str(tmp_path / "m" / "model.safetensors")
    raw = bytearray(open(f, "rb").read())
    n = struct.unpack("<Q", raw[:8])[0]
    name = "model.layers.1.post_attention_layernorm.weight"
    begin = json.loads(raw[8:8 + n])[name]["data_offsets"][0] + 8 + n
    raw[begin:begin + 4] = np.float32(np.nan).tobytes()
    open(f, "wb").write(bytes(raw))
    with pytest.raises(hf_io.CheckpointError, match=rf"model.safetensors: tensor '{name}' "
                                                    "holds NaN or inf"):
        hf_io.load_pretrained(str(tmp_path / "m"))


def test_vocab_smaller_than_the_tokenizer_is_refused_before_training(tmp_path):
    from xft_jax.training.trainer import train

    c = tiny.get_config()
    c.model.random.vocab_size = 1000                  # the Mistral tokenizer has 32000
    wd = tmp_path / "run"
    with pytest.raises(ValueError, match="vocab_size=1000 is smaller than the "
                                                      "tokenizer's 32000 tokens"):
        train(c, str(wd), devices=jax.devices()[:1])
    assert not wd.exists()                            # nothing left of the failed run


@pytest.mark.parametrize("key,value", [("hidden_size", "64"), ("num_hidden_layers", 2.5),
                                       ("rms_norm_eps", "1e-5")])
def test_config_json_value_of_the_wrong_type_names_file_and_key(tiny_base, tmp_path, key,
                                                                value):
    d = json.load(open(os.path.join(tiny_base, "config.json")))
    d[key] = value
    f = tmp_path / "config.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=rf"{f}: {key}={value!r} must be"):
        ModelConfig.from_pretrained(str(f))


# ------------------------------------------------------------------------ annotate (11, 12)
def test_annotator_url_must_be_http_or_https():
    from xft_jax.data import openai_client

    for url in ("file:///etc/passwd#", "ftp://host/v1", "localhost:8000/v1"):
        with pytest.raises(ValueError, match="must be an http:// or https:// URL"):
            openai_client.from_config({"name": "a", "base_url": url, "model": "m"})
    openai_client.from_config({"name": "a", "base_url": "https://h/v1", "model": "m"})


def test_annotation_failure_fraction_is_bounded():
    from xft_jax.annotate import AnnotationFailedError, check_failures
    from xft_jax.data.annotation import AnnotationReport

    r = AnnotationReport(items=10, rated=10, requests=100)
    r.failed["a: http"] = 5
    check_failures(r, 0.05)
    r.failed["a: http"] = 6
    with pytest.raises(AnnotationFailedError, match=r"6 of 100 annotation requests failed "
                                                    r"\(6 x a: http\)"):
        check_failures(r, 0.05)
    check_failures(r, 0.1)
    with pytest.raises(AnnotationFailedError, match="no item was rated"):
        check_failures(AnnotationReport(items=3, rated=0, requests=0), 1.0)


# ------------------------------------------------------------------------ the mains
def _main(module, args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line(p, says):
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and says in lines[0], p.stderr[-3000:]


@pytest.mark.parametrize("case", ["file_url", "all_requests_fail", "empty_test_split"])
def test_annotate_main_refuses_in_one_line_and_writes_nothing(tmp_path, case):
    cfg = tmp_path / "annotators.json"
    url = "file:///etc/passwd#" if case == "file_url" else "http://127.0.0.1:9/v1"
    cfg.write_text(json.dumps([{"name": "a", "base_url": url, "model": "m"}]))
    out = tmp_path / "rated"
    if case == "empty_test_split":
        args = ["--source=synthetic", "--num_synthetic=30", "--num_train=10", "--num_test=0"]
        says = "the test split is empty (10 train, 0 test items rated)"
    else:
        args = ["--source=coqa", f"--path={FIX}/coqa.json", "--limit=2",
                f"--annotators={cfg}", "--max_retries=0", "--timeout=2"]
        says = ("must be an http:// or https:// URL" if case == "file_url"
                else "no item was rated")
    p = _main("xft_jax.annotate", [*args, f"--out_dir={out}", "--tfds=false"], tmp_path)
    _one_line(p, says)
    assert not any(f.endswith((".jsonl", "summary.json"))
                   for _, _, files in os.walk(tmp_path) for f in files)
    assert "root:" not in p.stdout + p.stderr                 # no byte of /etc/passwd


def test_train_main_bad_config_one_line_and_no_workdir(tmp_path):
    wd = tmp_path / "fresh"
    p = _main("xft_jax.train", [f"--config={REPO}/configs/tiny.py", f"--workdir={wd}",
                                "--config.optim.lr=0", "--config.mesh.num_devices=1",
                                "--config.train.steps=2"], tmp_path)
    _one_line(p, "config.optim.lr=0.0: the learning rate must be > 0")
    assert not wd.exists()


@pytest.mark.parametrize("module", ["xft_jax.export", "xft_jax.evaluate"])
def test_mistyped_workdir_is_named_and_not_created(tmp_path, module):
    typo = tmp_path / "runz"
    if module == "xft_jax.export":
        args = [f"--workdir={typo}", f"--out={tmp_path / 'out'}"]
    else:
        args = [f"--config={REPO}/configs/eval.py", f"--out={tmp_path / 'out'}",
                f"--config.model.workdir={typo}"]
    p = _main(module, args, tmp_path)
    _one_line(p, f"{typo}: no such training run directory")
    assert not typo.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", ["xft_jax.demo", "xft_jax.train", "xft_jax.sweep"])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, module):
    """A relative --config from another directory (or a wrong path) names the path in one
    line, exit 2, instead of ml_collections' double traceback."""
    extra = {"xft_jax.train": ["--workdir=w"], "xft_jax.sweep": ["--sweep_dir=s"]}
    p = _main(module, ["--config=configs/nope.py:smoke", *extra.get(module, [])], tmp_path)
    _one_line(p, "--config: Failed loading config file")
    assert "configs/nope.py" in p.stderr and "No such file or directory" in p.stderr
    assert not os.path.exists(tmp_path / "w") and not os.path.exists(tmp_path / "s")
