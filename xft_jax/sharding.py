"""Device mesh and logical-axis sharding.

Every parameter and activation is described by logical axis names ('batch', 'embed',
'heads', ...). One table (``LOGICAL_RULES``) maps them onto the mesh axes
('data', 'fsdp', 'tensor'), so the same model code runs on one CPU, eight fake devices,
a GPU node or a TPU pod.

Also here: global batches assembled from each host's slice (``make_global_batch``) and
host views of multi-host arrays (``to_host``). The parameters' axes and shardings live in
``xft_jax.models.partitioning``; multi-host start-up in ``xft_jax.distributed``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xft_jax.errors import ConfigValueError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "lora_rank": None,
    "norm": None,
    "head_dim": None,
    "quant_block": None,
}

# Activations: the residual stream is sharded over batch only (weights carry fsdp).
ACTIVATION_RULES: dict[str, Any] = dict(LOGICAL_RULES, embed=None)


def create_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all global devices; one size may be -1."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigValueError(f"mesh: at most one axis may be -1, got {sizes}")
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigValueError(f"mesh.{k}={v}: sizes must be positive or -1")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if n % fixed:
            raise ConfigValueError(
                f"mesh {sizes}: the fixed sizes multiply to {fixed}, which does not divide "
                f"the {n} available devices")
        sizes[free[0]] = n // fixed
    total = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    if total != n:
        raise ConfigValueError(
            f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} "
            f"= {total} devices, but {n} are available")
    shape = (sizes["data"], sizes["fsdp"], sizes["tensor"])
    try:
        from jax.experimental import mesh_utils

        dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-TPU topologies that mesh_utils cannot lay out
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES)


def mesh_from_config(m, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of a run's ``mesh`` config section (data, fsdp, tensor, num_devices);
    ``num_devices`` > 0 uses only the first N devices (one process only, e.g. to debug
    on part of a node)."""
    n = int(m.num_devices)
    if devices is None and n > 0:
        if jax.process_count() > 1:
            raise ConfigValueError("mesh.num_devices is for single-process runs; leave it -1")
        if n > jax.device_count():
            raise ConfigValueError(f"mesh.num_devices={n} but only {jax.device_count()} devices")
        devices = jax.devices()[:n]
    return create_mesh(int(m.data), int(m.fsdp), int(m.tensor), devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], rules: dict[str, Any] | None = None,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axes.

    With ``mesh``, mesh axes of size 1 are dropped. With ``shape`` too, a dim is sharded
    over the longest prefix of its mesh axes whose product divides it (e.g. a batch of 4
    on data=2 x fsdp=4 shards over 'data' only), else replicated, so sizes such as 4 heads
    on tensor=8 never fail at placement.
    """
    rules = LOGICAL_RULES if rules is None else rules
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape "
                         f"{tuple(shape)} (rank {len(shape)})")
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical_axes):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule (known: "
                           f"{sorted(rules)})")
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            unknown = [a for a in axes if a not in mesh.shape]
            if unknown:
                raise KeyError(f"logical axis {name!r} maps to mesh axes {unknown} that the "
                               f"mesh {dict(mesh.shape)} does not have")
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None:
                while axes and shape[i] % int(np.prod([mesh.shape[a] for a in axes])):
                    axes = axes[:-1]
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None],
                   shape: Sequence[int] | None = None, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, shape, mesh))


# --------------------------------------------------------------- activation constraints
_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: dict[str, Any] | None = None):
    """Within this context, ``constrain`` pins activations to the mesh."""
    prev = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, ACTIVATION_RULES if rules is None else rules) if mesh else None
    try:
        yield
    finally:
        _ACTIVE.value = prev


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint at a block boundary; a no-op outside ``activation_sharding``."""
    active = getattr(_ACTIVE, "value", None)
    if not active:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical_axes, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# --------------------------------------------------------------- global batches
# Logical axes of the batch contract (DESIGN.md); other keys default to ('batch', None..).
BATCH_AXES: dict[str, tuple[str | None, ...]] = {
    "input_ids": ("batch", "length"), "targets": ("batch", "length"),
    "loss_mask": ("batch", "length"), "label_mask": ("batch", "length"),
    "segment_ids": ("batch", "length"), "positions": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "label_pos": ("batch",), "label": ("batch",),
    "target_pos": ("batch", None),
}


def batch_axes(key: str, ndim: int, axes: dict | None = None) -> tuple[str | None, ...]:
    table = BATCH_AXES if axes is None else {**BATCH_AXES, **axes}
    ax = table.get(key, ("batch",) + (None,) * (ndim - 1))
    if len(ax) != ndim:
        raise ValueError(f"batch[{key!r}] has rank {ndim}, but its logical axes are {ax}")
    return tuple(ax)


def batch_sharding(mesh: Mesh, key: str, ndim: int, axes: dict | None = None,
                   rules=None) -> NamedSharding:
    """Sharding of one batch field: batch over ('data', 'fsdp'), everything else whole."""
    return NamedSharding(mesh, logical_to_spec(batch_axes(key, ndim, axes), rules, None, mesh))


def process_batch_slice(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch of ``global_batch`` rows this process must feed.

    Hosts whose devices hold the same batch rows (batch not split across them) get the
    same slice and must feed identical data.
    """
    sh = batch_sharding(mesh, "input_ids", 2)
    ways = int(np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(sh.spec))]))
    if global_batch % ways:
        raise ValueError(f"global batch size {global_batch} does not divide over the "
                         f"{ways} batch shards of mesh {dict(mesh.shape)} (data x fsdp)")
    idx = sh.addressable_devices_indices_map((global_batch, 1))
    rows = sorted({(s[0].indices(global_batch)[:2]) for s in idx.values()})
    lo, hi = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != hi - lo:
        raise ValueError(f"mesh {dict(mesh.shape)}: this process's batch rows {rows} are "
                         f"not contiguous; reorder the mesh devices")
    return slice(lo, hi)


def make_global_batch(mesh: Mesh, local_batch: dict, axes: dict | None = None,
                      rules=None, global_batch_size: int | None = None) -> dict:
    """Global jax.Arrays from each process's numpy slice of the batch.

    Every process calls this with the rows of its ``process_batch_slice`` (the data
    pipeline shards per host); on one process this is just a sharded device_put.
    ``axes`` overrides ``BATCH_AXES`` for extra keys.
    """
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        sh = batch_sharding(mesh, key, value.ndim, axes, rules)
        gshape = None
        if global_batch_size is not None:
            gshape = (global_batch_size,) + value.shape[1:]
        try:
            out[key] = jax.make_array_from_process_local_data(sh, value, gshape)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"batch[{key!r}]: local shape {value.shape} cannot form a global array "
                f"with sharding {sh.spec} on mesh {dict(mesh.shape)} over "
                f"{jax.process_count()} process(es): the local batch must divide evenly "
                f"over this host's batch shards ({e})") from e
    return out


def global_batch_from_host(mesh: Mesh | None, batch: dict,
                           keys: Sequence[str] | None = None) -> dict:
    """Device arrays of ``keys`` of a batch that every process holds whole (the same
    global rows on every host, as the pipelines build them): each process feeds its own
    rows (``process_batch_slice``). Without a mesh, plain device arrays."""
    keys = list(batch) if keys is None else keys
    if mesh is None:
        return {k: jnp.asarray(np.asarray(batch[k])) for k in keys}
    b = int(np.asarray(batch[keys[0]]).shape[0])
    rows = process_batch_slice(mesh, b)
    local = {k: np.asarray(batch[k])[rows] for k in keys}
    return make_global_batch(mesh, local, global_batch_size=b)


# --------------------------------------------------------------- host views
def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-host) array as numpy, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def describe(mesh: Mesh) -> str:
    """One log line: mesh shape, device kind and process layout."""
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    d = mesh.devices.flat[0]
    return (f"mesh {shape} ({mesh.devices.size} x {d.platform}:{d.device_kind}) over "
            f"{jax.process_count()} process(es); this is process {jax.process_index()} "
            f"with {len(mesh.local_devices)} local device(s)")
