"""Launch scripts: valid bash, dry runs print the commands and run nothing, and a real run
(with fake gcloud / srun / nvidia-smi on PATH) issues exactly what the dry run printed."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("_common.sh", "tpu_pod.sh", "gpu_node.sh", "slurm.sbatch")
TRAIN = ["python", "-m", "xft_jax.train", "--config=configs/mistral_7b.py",
         "--workdir=/runs/run 1"]


@pytest.fixture()
def fakes(tmp_path):
    """A bin dir whose gcloud/srun/sbatch/nvidia-smi append their argv (JSON) to a log."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.jsonl"
    for tool in ("gcloud", "srun", "sbatch", "nvidia-smi"):
        body = (f"#!{sys.executable}\nimport json, os, sys\n"
                f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0])]"
                f" + sys.argv[1:]) + '\\n')\n"
                # files copied whose name says they carry environment: content and mode
                f"for a in sys.argv[1:]:\n"
                f"    if 'xft_jax_env' in a and os.path.isfile(a):\n"
                f"        open({str(log) + '.files'!r}, 'a').write(json.dumps([a, "
                f"oct(os.stat(a).st_mode & 0o777), open(a).read()]) + '\\n')\n")
        if tool == "nvidia-smi":
            body += "print('GPU 0: fake\\nGPU 1: fake')\n"
        if tool == "srun":   # run the command once, like a 1-task step would
            body += ("args = [a for a in sys.argv[1:] if not a.startswith('--')]\n"
                     "os.execvp(args[0], args)\n")
        path = bindir / tool
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TPU_", "DRY_RUN", "RUN_ENV", "FORWARD_ENV"))}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", TMPDIR=str(tmp_path))

    def calls():
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    return env, calls


def fakes_log(env):
    """The fakes' call log (beside their bin dir)."""
    return os.path.join(os.path.dirname(env["PATH"].split(os.pathsep)[0]), "calls.jsonl")


def _run(script, args, env, check=True):
    p = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _printed(stdout):
    """The commands a dry run printed ('+ ' lines), split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    p = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr


def test_tpu_pod_dry_run_then_real_run(fakes):
    env, calls = fakes
    env = dict(env, TPU_NAME="pod-v4-32", ZONE="us-central2-b", PROJECT="proj",
               HF_TOKEN="hf_secret_value", FORWARD_ENV="HF_TOKEN")
    p = _run("tpu_pod.sh", ["--dry_run", "--", *TRAIN], env)
    assert calls() == []                                  # a dry run executes nothing
    assert "hf_secret_value" not in p.stdout              # secrets are masked
    cmds = _printed(p.stdout)
    assert "tar -czf" in p.stdout.splitlines()[0]
    scp, install, env_scp, train = cmds[1], cmds[2], cmds[3], cmds[4]
    where = ["--zone=us-central2-b", "--worker=all", "--project=proj"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[-3:] == where
    assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-v4-32"]
    assert install[6:9] == where and train[6:9] == where
    remote_install = install[9].removeprefix("--command=")
    assert "tar -xzf /tmp/xft_jax_src.tgz -C xft_jax" in remote_install
    assert shlex.split(remote_install)[-4:] == ["install", "jax[tpu]>=0.10,<0.12", "-e",
                                                "xft_jax"]
    env_file = env_scp[5]
    assert env_scp[:5] == scp[:5] and env_scp[6:] == [f"pod-v4-32:/tmp/"
                                                      f"{os.path.basename(env_file)}", *where]
    remote = shlex.split(train[9].removeprefix("--command="))
    on_worker = f"/tmp/{os.path.basename(env_file)}"
    # the values are read from the copied file, which is deleted before the command runs
    assert remote[:12] == ["trap", f"rm -f {on_worker}", "EXIT", "&&", ".", on_worker, "&&",
                           "rm", "-f", on_worker, "&&", "cd"]
    assert remote[12:14] == ["xft_jax", "&&"]
    assert remote[14:] == TRAIN                           # the command survives quoting

    # the real run issues the same gcloud commands (with the secret's value this time)
    _run("tpu_pod.sh", ["--", *TRAIN], env)
    real = calls()
    assert [c[:5] for c in real] == [["gcloud", "compute", "tpus", "tpu-vm", c[4]]
                                     for c in real]
    assert [c[4] for c in real] == ["scp", "ssh", "scp", "ssh"]
    assert real[0] == cmds[1] and real[1] == cmds[2]
    assert real[3][:9] == cmds[4][:9]
    # the secret is on no command line; it reached the workers in a 0600 file, removed here
    assert not any("hf_secret_value" in arg for call in real for arg in call)
    copied = [json.loads(line) for line in open(str(fakes_log(env)) + ".files")]
    assert len(copied) == 1 and copied[0][1] == "0o600"
    assert copied[0][2] == "export HF_TOKEN=hf_secret_value\n"
    assert real[2][6] == f"pod-v4-32:/tmp/{os.path.basename(copied[0][0])}"
    assert f". /tmp/{os.path.basename(copied[0][0])} &&" in real[3][9]
    assert not os.path.exists(copied[0][0])
    assert os.path.getsize(scp[5]) > 1000                 # the source tarball was packed
    listing = subprocess.run(["tar", "-tzf", scp[5]], capture_output=True, text=True,
                             timeout=60).stdout.split()
    assert "xft_jax/sharding.py" in listing and "launch/tpu_pod.sh" in listing

    # --skip_install: only the run; missing settings fail before doing anything
    no_fwd = {k: v for k, v in env.items() if k != "FORWARD_ENV"}
    p = _run("tpu_pod.sh", ["--dry_run", "--skip_install", "--", "echo", "hi"], no_fwd)
    assert len(_printed(p.stdout)) == 1
    p = _run("tpu_pod.sh", ["--dry_run", "--skip_install", "--", "echo", "hi"], env)
    assert [c[4] for c in _printed(p.stdout)] == ["scp", "ssh"]   # the env file, the run
    for drop in ("TPU_NAME", "ZONE"):
        p = _run("tpu_pod.sh", ["--", "echo"], {k: v for k, v in env.items() if k != drop},
                 check=False)
        assert p.returncode == 2 and drop in p.stderr
    p = _run("tpu_pod.sh", ["--dry_run"], env, check=False)
    assert p.returncode == 2 and "no command" in p.stderr


def test_gpu_node_dry_run_then_real_run(fakes, tmp_path):
    env, calls = fakes
    p = _run("gpu_node.sh", ["--dry_run", "--gpus=0,1", "--", *TRAIN], env)
    assert calls() == []
    assert _printed(p.stdout) == [["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
                                   "CUDA_VISIBLE_DEVICES=0,1", *TRAIN]]
    probe = [sys.executable, "-c", "import json, os; print(json.dumps({k: os.environ.get(k) "
             "for k in ('XLA_PYTHON_CLIENT_MEM_FRACTION', 'CUDA_VISIBLE_DEVICES', 'X')}))"]
    p = _run("gpu_node.sh", ["--gpus=1", "--", *probe], dict(env, MEM_FRACTION="0.5",
                                                           RUN_ENV="X=7"))
    assert json.loads(p.stdout) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5",
                                    "CUDA_VISIBLE_DEVICES": "1", "X": "7"}
    assert "2 GPU(s)" in p.stderr and calls()[0] == ["nvidia-smi", "-L"]
    p = _run("gpu_node.sh", ["--gpus=a", "--", "true"], env, check=False)
    assert p.returncode == 2 and "--gpus" in p.stderr


def test_slurm_dry_run_and_srun_line(fakes):
    env, calls = fakes
    header = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
    assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --nodes=" in header
    # outside an allocation: the dry run shows the sbatch submission and the srun step
    p = _run("slurm.sbatch", ["--dry_run", "--", *TRAIN], env)
    assert calls() == []
    sbatch, srun = _printed(p.stdout)
    assert sbatch[0] == "sbatch" and sbatch[1].endswith("launch/slurm.sbatch")
    assert sbatch[2:] == ["--", *TRAIN]
    assert srun == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "env",
                    "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90", *TRAIN]
    p = _run("slurm.sbatch", ["--", *TRAIN], env, check=False)
    assert p.returncode == 2 and "not inside a SLURM allocation" in p.stderr
    # inside an allocation (as sbatch runs it): srun starts the command
    job = dict(env, SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="g[1-2]",
               SRUN_ARGS="--mpi=none")
    probe = [sys.executable, "-c", "import os; print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])"]
    p = _run("slurm.sbatch", ["--", *probe], job)
    assert p.stdout.strip() == "0.90" and "job 77, 2 node(s)" in p.stderr
    assert calls() == [["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "--mpi=none",
                        "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90", *probe]]
