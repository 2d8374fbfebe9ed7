"""Multi-host start-up: one ``initialize`` that every main calls before touching JAX.

Why one function: the same trainer runs on one CPU, a GPU node, several GPU nodes under
SLURM, a TPU pod, and several CPU processes in tests. ``resolve`` decides from explicit
arguments (the mains' ``--coordinator/--num_processes/--process_id`` flags, passed in)
and the environment which of these it is; ``initialize`` then starts
``jax.distributed`` accordingly. Only process 0 should write single files and logs
(``is_primary``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, Sequence

import jax

MODES = ("auto", "none", "explicit", "slurm", "tpu")
# Signals that this is a Cloud TPU VM besides its TPU chips on the PCI bus.
_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID",
            "TPU_ACCELERATOR_TYPE", "MEGASCALE_COORDINATOR_ADDRESS")


class DistributedError(RuntimeError):
    """Multi-host start-up that cannot work as configured."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """What ``initialize`` will do. ``mode`` 'none' means a single process."""
    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    platform: str | None = None           # 'cpu' selects gloo collectives

    def describe(self) -> str:
        if self.mode == "none":
            return "single process"
        if self.mode == "tpu":
            return "TPU pod (jax.distributed.initialize() detects the workers)"
        dev = "" if self.local_device_ids is None else f", local devices {self.local_device_ids}"
        return (f"{self.mode}: process {self.process_id} of {self.num_processes}, coordinator "
                f"{self.coordinator_address}{dev}"
                + (f", {self.platform} collectives" if self.platform == "cpu" else ""))


# --------------------------------------------------------------- SLURM
def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,9],login1' -> 'gpu003'."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise DistributedError(f"SLURM node list {nodelist!r}: cannot read its first host")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges)[0]
    return prefix + first


def slurm_spec(env: Mapping[str, str], port: int | None = None) -> Spec | None:
    """Spec from SLURM variables (srun with one task per node or one per GPU), or None
    when this is not a multi-task SLURM step."""
    try:
        ntasks = int(env["SLURM_NTASKS"])
        procid = int(env["SLURM_PROCID"])
        nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        job = int(env["SLURM_JOB_ID"])
    except KeyError:
        return None
    except ValueError as e:
        raise DistributedError(f"SLURM variables are not integers: {e}") from e
    if ntasks <= 1:
        return None
    port = port or (job % 4096) + 61440          # the same rule as jax's SLURM detection
    per_node = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    local = None                                 # one task per node: all its GPUs
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if per_node.isdigit() and int(per_node) > 1 and "SLURM_LOCALID" in env \
            and len(visible) != 1:
        local = (int(env["SLURM_LOCALID"]),)     # one task per GPU: this task's GPU
    return Spec("slurm", f"{first_slurm_host(nodelist)}:{port}", ntasks, procid, local)


def tpu_chips() -> int:
    """TPU chips on this host, from the PCI ids (what jax checks; starts no backend)."""
    try:
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # private helper moved or unreadable /sys: fall back to env only
        return 0


def on_tpu_vm(env: Mapping[str, str]) -> bool:
    return any(env.get(k) for k in _TPU_ENV) or tpu_chips() > 0


# --------------------------------------------------------------- resolve / initialize
def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, *, mode: str = "auto",
            platform: str | None = None, local_device_ids: Sequence[int] | None = None,
            env: Mapping[str, str] | None = None) -> Spec:
    """Which start-up applies. Explicit arguments win, then SLURM, then a TPU VM."""
    env = os.environ if env is None else env
    if mode not in MODES:
        raise DistributedError(f"distributed mode {mode!r}: expected one of {MODES}")
    local = None if local_device_ids is None else tuple(int(i) for i in local_device_ids)
    # Flag defaults (num_processes=1, process_id=0, no coordinator) mean 'not explicit'.
    explicit = coordinator is not None or (num_processes or 1) > 1
    if mode == "explicit" or (mode == "auto" and explicit):
        missing = [n for n, v in (("coordinator", coordinator),
                                  ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing:
            raise DistributedError(
                f"multi-process start-up needs coordinator, num_processes and process_id "
                f"together; missing {missing}")
        if ":" not in coordinator:
            raise DistributedError(f"coordinator {coordinator!r}: expected host:port")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"process_id={process_id} is outside 0..{num_processes - 1}")
        return Spec("explicit", coordinator, int(num_processes), int(process_id), local,
                    platform)
    if mode in ("auto", "slurm"):
        spec = slurm_spec(env)
        if spec is not None:
            return dataclasses.replace(spec, platform=platform,
                                       local_device_ids=local or spec.local_device_ids)
        if mode == "slurm":
            raise DistributedError("mode 'slurm' but SLURM_NTASKS/SLURM_PROCID/"
                                   "SLURM_JOB_NODELIST/SLURM_JOB_ID describe no multi-task "
                                   "step (run the main under srun)")
    if mode == "tpu" or (mode == "auto" and on_tpu_vm(env)):
        return Spec("tpu", platform=platform)
    return Spec("none", platform=platform)


def is_initialized() -> bool:
    return bool(jax.distributed.is_initialized())


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, mode: str = "auto",
               platform: str | None = None, local_device_ids: Sequence[int] | None = None,
               cpu_devices: int | None = None, timeout_s: int = 300,
               env: Mapping[str, str] | None = None) -> Spec:
    """Starts multi-host JAX as ``resolve`` decides; call first in every main.

    platform='cpu' uses gloo collectives over TCP (several CPU processes, tests);
    cpu_devices sets the number of CPU devices per process. A second call is a no-op.
    """
    spec = resolve(coordinator, num_processes, process_id, mode=mode, platform=platform,
                   local_device_ids=local_device_ids, env=env)
    from jax._src import xla_bridge

    started = xla_bridge.backends_are_initialized()
    if platform == "cpu" and not started:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if cpu_devices is not None:
            jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    elif platform == "cpu" and cpu_devices is not None and \
            jax.local_device_count() != int(cpu_devices):
        raise DistributedError(
            f"cpu_devices={cpu_devices}, but JAX already started with "
            f"{jax.local_device_count()} devices; call initialize before any JAX use")
    if spec.mode == "none" or is_initialized():
        return spec
    if started:
        raise DistributedError(
            f"distributed.initialize ({spec.describe()}) must run before any JAX "
            f"computation or jax.devices() call; move it to the top of main()")
    if spec.mode == "tpu":
        jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
        # 'deactivate': everything is resolved here. jax's own SLURM detection would
        # otherwise narrow a one-task-per-node process to GPU [SLURM_LOCALID] only.
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes, process_id=spec.process_id,
            local_device_ids=(list(spec.local_device_ids)
                              if spec.local_device_ids is not None else None),
            cluster_detection_method="deactivate", initialization_timeout=timeout_s)
    return spec


def define_flags():
    """The multi-process flags every main takes (absl), read by ``initialize_from_flags``."""
    from types import SimpleNamespace

    from absl import flags

    return SimpleNamespace(
        coordinator=flags.DEFINE_string("coordinator", None,
                                        "host:port of process 0 (multi-process)."),
        num_processes=flags.DEFINE_integer("num_processes", None, "Number of processes."),
        process_id=flags.DEFINE_integer("process_id", None, "This process's index."),
        platform=flags.DEFINE_string("platform", None, "'cpu' for gloo CPU collectives."),
        cpu_devices=flags.DEFINE_integer("cpu_devices", None, "CPU devices per process."))


def initialize_from_flags(f) -> Spec:
    """``initialize`` from ``define_flags``' flags (or SLURM / a TPU pod, detected); says
    on stderr how it started when there are several processes."""
    import sys

    spec = initialize(f.coordinator.value, f.num_processes.value, f.process_id.value,
                      platform=f.platform.value, cpu_devices=f.cpu_devices.value)
    if spec.mode != "none":
        print(f"start-up: {spec.describe()}", file=sys.stderr)
    return spec


def shutdown() -> None:
    if is_initialized():
        jax.distributed.shutdown()


def is_primary() -> bool:
    """True on the process that writes single files, logs and summaries (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across processes (e.g. before process 0 reads what all wrote)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_info() -> dict:
    """Where this process sits: for the first log line of a run."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
            "platform": jax.devices()[0].platform}


__all__ = ["initialize", "resolve", "Spec", "is_primary", "is_initialized", "shutdown",
           "sync", "process_info", "slurm_spec", "first_slurm_host", "DistributedError"]
