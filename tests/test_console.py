"""The console of the mains: --help exits 0, --print_config prints the resolved config,
third-party records below WARNING are hidden unless --verbosity asks."""

import json
import logging
import os
import subprocess
import sys

from xft_jax import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_help_exits_zero_and_says_how_to_see_the_config_keys():
    p = _main("xft_jax.train", "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--workdir" in p.stdout and "--print_config" in p.stdout
    assert "--config.KEY=value" in p.stdout


def test_print_config_prints_the_resolved_config_and_exits(tmp_path):
    wd = tmp_path / "run"
    p = _main("xft_jax.train", "--config=configs/tiny.py", f"--workdir={wd}",
              "--config.lora.rank=3", "--print_config")
    assert p.returncode == 0, p.stderr[-2000:]
    config = json.loads(p.stdout)
    assert config["lora"]["rank"] == 3 and config["model"]["random"]["hidden_size"] == 64
    assert {"data", "optim", "train", "mesh"} <= set(config)
    assert not wd.exists()                                   # nothing ran


def _record(pathname, level=logging.INFO):
    return logging.LogRecord("absl", level, pathname, 1, "m", None, None)


def test_only_our_own_info_lines_pass():
    keep = console.OwnLinesOnly()
    ours = os.path.join(os.path.dirname(console.__file__), "training", "trainer.py")
    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert keep.filter(_record(ours))
    assert not keep.filter(_record(orbax))
    assert not keep.filter(_record("/site-packages/jax/_src/xla_bridge.py", logging.DEBUG))
    assert keep.filter(_record(orbax, logging.WARNING))      # warnings always pass


def test_transformers_advice_is_off_once_a_main_imports_the_console():
    code = ("import xft_jax.console\n"
            "from transformers.utils import logging\n"
            "logging.get_logger('transformers').warning_advice('ADVICE-LINE')\n"
            "logging.get_logger('transformers').warning('WARNING-LINE')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ADVICE-LINE" not in p.stderr and "WARNING-LINE" in p.stderr
