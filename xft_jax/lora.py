"""LoRA adapters: parameters, merge / unmerge, PEFT adapter import / export.

The adapters live in an NNX module attached as ``model.lora``; the decoder reads the
``nnx.LoRAParam`` leaves at ``lora.layers.<target>.a`` [L, in, r] and ``.b`` [L, r, out]
(``model.lora_params()``) plus ``scale`` and ``dropout``, derived from the ``LoRAConfig``. Layouts follow the base weights ([in, out]),
so A shards like its base weight's input dim and B like its output dim (``leaf_axes``).

PEFT stores ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] per layer under
``base_model.model.model.layers.{i}.<self_attn|mlp>.<target>``; export and import
transpose and (un)stack. Nothing here pickles: safetensors and JSON only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xft_jax import atomic, sharding
from xft_jax.errors import MissingPathError, UserError
from xft_jax.models.config import ModelConfig
from xft_jax.models import hf_io
from xft_jax.models.decoder import LINEAR_NAMES, Decoder, linear_shape
from xft_jax.models.partitioning import leaf_axes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METADATA_FILE = "xft_jax_lora.json"  # our own record next to PEFT's files
PEFT_PREFIX = "base_model.model.model.layers.{i}.{block}.{target}.lora_{ab}.weight"
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class LoRAError(UserError, ValueError):
    """An adapter that does not fit the model or uses a PEFT feature we do not support."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LINEAR_NAMES
    rslora: bool = False              # scale alpha/sqrt(r) instead of alpha/r
    param_dtype: str = "float32"      # adapters stay float32 while the base may be bf16

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = [t for t in self.targets if t not in LINEAR_NAMES]
        if bad or not self.targets:
            raise LoRAError(f"lora.targets={list(self.targets)}: each must be one of "
                            f"{list(LINEAR_NAMES)} (PEFT module names), at least one")
        if len(set(self.targets)) != len(self.targets):
            raise LoRAError(f"lora.targets={list(self.targets)} has duplicates")
        if self.rank < 1:
            raise LoRAError(f"lora.rank={self.rank}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"lora.dropout={self.dropout}: must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_config(cls, c) -> "LoRAConfig":
        """From a config's ``lora`` section (``config_defaults`` declares its keys); a
        plain mapping may leave keys out, which then take the fields' defaults.
        ``targets`` may be a comma-separated string."""
        kw = {f.name: c[f.name] for f in dataclasses.fields(cls) if f.name in c}
        if isinstance(kw.get("targets"), str):
            kw["targets"] = tuple(t.strip() for t in kw["targets"].split(",") if t.strip())
        return cls(**kw)


class LoRA(nnx.Module):
    """LoRA A/B for every target module of every layer (stacked on the layer axis)."""

    def __init__(self, cfg: LoRAConfig, layers: dict):
        self.config = cfg
        self.layers = nnx.Dict({t: nnx.Dict(a=nnx.LoRAParam(v["a"]), b=nnx.LoRAParam(v["b"]))
                                for t, v in layers.items()})

    @property
    def scale(self) -> float:
        return float(self.config.scale)

    @property
    def dropout(self) -> float:
        return float(self.config.dropout)


def lora_shapes(model_cfg: ModelConfig, cfg: LoRAConfig) -> dict:
    """{target: {'a': [L, in, r], 'b': [L, r, out]}} shapes of the adapters."""
    out = {}
    for t in cfg.targets:
        d_in, d_out = linear_shape(model_cfg, t)
        out[t] = {"a": (model_cfg.num_layers, d_in, cfg.rank),
                  "b": (model_cfg.num_layers, cfg.rank, d_out)}
    return out


def lora_shardings(model_cfg: ModelConfig, cfg: LoRAConfig, mesh) -> dict:
    """NamedShardings of the LoRA pytree ``{'layers': {target: {'a','b'}}}``."""
    return {"layers": {t: {k: sharding.named_sharding(mesh, leaf_axes(("lora", "layers", t, k)),
                                                      s) for k, s in ab.items()}
                       for t, ab in lora_shapes(model_cfg, cfg).items()}}


def abstract_lora(model_cfg: ModelConfig, cfg: LoRAConfig) -> dict:
    """The LoRA pytree as ShapeDtypeStructs (a checkpoint's restore target)."""
    dtype = jnp.dtype(cfg.param_dtype)
    return {"layers": {t: {k: jax.ShapeDtypeStruct(s, dtype) for k, s in ab.items()}
                       for t, ab in lora_shapes(model_cfg, cfg).items()}}


def init_lora_arrays(model_cfg: ModelConfig, cfg: LoRAConfig, key: jax.Array,
                     mesh=None) -> dict:
    """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)),
    B = 0. Each target draws from ``fold_in(key, target index)``, so adding a target does
    not change the others' draws."""
    dtype = jnp.dtype(cfg.param_dtype)
    n, r = model_cfg.num_layers, cfg.rank

    def make():
        out = {}
        for t in cfg.targets:
            d_in, d_out = linear_shape(model_cfg, t)
            k = jax.random.fold_in(key, LINEAR_NAMES.index(t))
            bound = 1.0 / math.sqrt(d_in)
            # Drawn as PEFT's [L, r, in] then transposed, so per-layer values match a
            # torch-style [r, in] matrix filled in row-major order.
            a = jax.random.uniform(k, (n, r, d_in), jnp.float32, -bound, bound)
            out[t] = {"a": jnp.swapaxes(a, 1, 2).astype(dtype),
                      "b": jnp.zeros((n, r, d_out), dtype)}
        return out

    if mesh is None:
        return jax.jit(make)()
    shard = lora_shardings(model_cfg, cfg, mesh)["layers"]
    return jax.jit(make, out_shardings=shard)()


def attach(model: Decoder, cfg: LoRAConfig, key: jax.Array, mesh=None) -> LoRA:
    """Creates adapters for ``model`` from ``key`` and sets ``model.lora``."""
    return attach_arrays(model, cfg, init_lora_arrays(model.config, cfg, key, mesh))


def attach_arrays(model: Decoder, cfg: LoRAConfig, layers: dict) -> LoRA:
    """Attaches adapters holding the given arrays ``{target: {'a', 'b'}}`` (placed as
    given) and sets ``model.lora``."""
    want = lora_shapes(model.config, cfg)
    if set(layers) != set(want):
        raise LoRAError(f"adapters for {sorted(layers)}, but lora.targets are {sorted(want)}")
    for t, ab in want.items():
        for k, shape in ab.items():
            if tuple(layers[t][k].shape) != shape:
                raise LoRAError(f"lora.layers.{t}.{k}: shape {tuple(layers[t][k].shape)}, "
                                f"expected {shape}")
    model.lora = nnx.data(LoRA(cfg, layers))
    return model.lora


def _attached(model: Decoder) -> dict:
    tree = model.lora_params()
    if tree is None:
        raise LoRAError("the model has no LoRA attached (model.lora is None)")
    return tree


def set_lora_tree(model: Decoder, tree: dict) -> None:
    """Writes arrays into the attached adapters (e.g. after training or a restore)."""
    for t, ab in tree["layers"].items():
        for k in ("a", "b"):
            var = model.lora.layers[t][k]
            if tuple(var.get_value().shape) != tuple(ab[k].shape):
                raise LoRAError(f"lora.layers.{t}.{k}: shape {tuple(ab[k].shape)} does not "
                                f"match the attached adapter {tuple(var.get_value().shape)}")
            var.set_value(ab[k])


# ------------------------------------------------------------------------ merge
@functools.partial(jax.jit, static_argnames=("scale", "sign"))
def _apply_delta(w, a, b, *, scale: float, sign: float):
    """w + sign * scale * a @ b, one layer at a time (lax.map), so only one layer's
    float32 delta exists at once (a 7B MLP weight would need 7.5 GB for all layers)."""
    def one(xs):
        wi, ai, bi = xs
        d = (ai.astype(jnp.float32) @ bi.astype(jnp.float32)) * (sign * scale)
        return (wi.astype(jnp.float32) + d).astype(wi.dtype)
    return jax.lax.map(one, (w, a, b))


def merge(model: Decoder) -> LoRA:
    """Adds scale * A @ B into the base weights (computed in float32, cast to the base
    dtype) and detaches the adapters, so forward does not apply them twice. Returns the
    detached module for ``unmerge``."""
    lora = model.lora
    if lora is None:
        raise LoRAError("merge: the model has no LoRA attached")
    tree = _attached(model)
    for t in tree["layers"]:
        var = getattr(model.layers, t)
        w = var.get_value()
        if hasattr(w, "dequantize"):
            raise LoRAError(f"merge: layers.{t} is quantised; merge into a dense base instead")
        ab = tree["layers"][t]
        var.set_value(_apply_delta(w, ab["a"], ab["b"], scale=lora.scale, sign=1.0))
    model.lora = None
    return lora


def unmerge(model: Decoder, lora: LoRA) -> None:
    """Subtracts the adapters again and re-attaches them. Exact in float32 up to
    rounding; with a bf16 base the round trip is not bit-exact (keep a copy if needed)."""
    model.lora = nnx.data(lora)
    tree = model.lora_params()
    for t in tree["layers"]:
        var = getattr(model.layers, t)
        w = var.get_value()
        ab = tree["layers"][t]
        var.set_value(_apply_delta(w, ab["a"], ab["b"], scale=lora.scale, sign=-1.0))


# ------------------------------------------------------------------------ metadata
def metadata(model_cfg: ModelConfig, cfg: LoRAConfig, base_model_path: str) -> dict:
    """What a checkpoint must record to be reloaded onto the right base."""
    return {"rank": cfg.rank, "alpha": cfg.alpha, "rslora": cfg.rslora,
            "dropout": cfg.dropout, "targets": list(cfg.targets), "scale": cfg.scale,
            "param_dtype": cfg.param_dtype, "base_model_path": base_model_path,
            "base_config_hash": model_cfg.hash(),
            "base_architecture": model_cfg.architecture,
            "num_layers": model_cfg.num_layers}


def check_metadata(meta: dict, model_cfg: ModelConfig, where: str) -> None:
    if meta.get("base_config_hash") not in (None, model_cfg.hash()):
        raise LoRAError(
            f"{where}: adapters were trained on a base with config hash "
            f"{meta['base_config_hash']} ({meta.get('base_model_path')}), but the model "
            f"given has hash {model_cfg.hash()}")


# ------------------------------------------------------------------------ PEFT export
def peft_key(i: int, target: str, ab: str) -> str:
    return PEFT_PREFIX.format(i=i, block=_BLOCK[target], target=target, ab=ab)


def peft_state_dict(tree: dict) -> dict[str, np.ndarray]:
    """Our stacked tree -> PEFT's per-layer tensors (float32, torch layout)."""
    out = {}
    for t, ab in tree["layers"].items():
        a = np.asarray(sharding.to_host(ab["a"]), np.float32)   # [L, in, r]
        b = np.asarray(sharding.to_host(ab["b"]), np.float32)   # [L, r, out]
        for i in range(a.shape[0]):
            out[peft_key(i, t, "A")] = np.ascontiguousarray(a[i].T)   # [r, in]
            out[peft_key(i, t, "B")] = np.ascontiguousarray(b[i].T)   # [out, r]
    return out


def peft_adapter_config(cfg: LoRAConfig, base_model_path: str) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank,
        "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": sorted(cfg.targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_path, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }


def save_peft_adapter(model: Decoder, out_dir: str, base_model_path: str = "",
                      cfg: LoRAConfig | None = None) -> None:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format) and
    our metadata; every file lands atomically, the config last."""
    from safetensors.numpy import save_file

    cfg = cfg or model.lora.config
    tensors = peft_state_dict(_attached(model))
    if jax.process_index() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    meta = metadata(model.config, cfg, base_model_path)
    with atomic.atomic_path(os.path.join(out_dir, ADAPTER_WEIGHTS)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    atomic.write_json(os.path.join(out_dir, METADATA_FILE), meta, sort_keys=True)
    atomic.write_json(os.path.join(out_dir, ADAPTER_CONFIG),
                      peft_adapter_config(cfg, base_model_path), sort_keys=True)


def save_merged(model: Decoder, out_dir: str, dtype=None) -> None:
    """Merges the adapters into the base (in place) and saves an HF checkpoint."""
    if model.lora is not None:
        merge(model)
    hf_io.save_pretrained(model, out_dir, dtype=dtype)


# ------------------------------------------------------------------------ PEFT import
_UNSUPPORTED = {"use_dora": (False, None), "bias": ("none",), "fan_in_fan_out": (False, None),
                "layers_to_transform": (None, []), "modules_to_save": (None, []),
                "rank_pattern": ({}, None), "alpha_pattern": ({}, None)}
_KEY_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
                     r"(\w+)\.lora_([AB])(?:\.default)?\.weight$")


def read_peft_config(adapter_dir: str) -> LoRAConfig:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise MissingPathError(f"{path}: no PEFT adapter config")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if d.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{path}: peft_type={d.get('peft_type')!r}; only LORA is supported")
    for k, ok in _UNSUPPORTED.items():
        if d.get(k, ok[0]) not in ok:
            raise LoRAError(f"{path}: {k}={d[k]!r} is not supported (allowed: {list(ok)})")
    targets = d.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear":
            targets = list(LINEAR_NAMES)
        else:
            raise LoRAError(f"{path}: target_modules={targets!r} (a regex) is not supported; "
                            f"give a list of module names")
    return LoRAConfig(rank=int(d["r"]), alpha=float(d.get("lora_alpha", 8)),
                      dropout=float(d.get("lora_dropout", 0.0)),
                      targets=tuple(t for t in LINEAR_NAMES if t in set(targets or ())),
                      rslora=bool(d.get("use_rslora", False)))


def load_peft_adapter(model: Decoder, adapter_dir: str, mesh=None) -> LoRA:
    """Attaches a PEFT LoRA adapter directory to ``model`` (weights kept float32)."""
    from safetensors.numpy import load_file

    cfg = read_peft_config(adapter_dir)
    wpath = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(wpath):
        raise MissingPathError(
            f"{wpath}: missing (pickled adapter_model.bin files are refused; convert to "
            f"safetensors)")
    meta_path = os.path.join(adapter_dir, METADATA_FILE)
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            check_metadata(json.load(f), model.config, meta_path)
    tensors = load_file(wpath)
    mc = model.config
    n = mc.num_layers
    stacked = {t: {"a": [None] * n, "b": [None] * n} for t in cfg.targets}
    for key, arr in tensors.items():
        m = _KEY_RE.match(key)
        if not m:
            raise LoRAError(f"{wpath}: unexpected tensor {key!r}")
        i, block, t, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if t not in stacked or _BLOCK.get(t) != block or i >= n:
            raise LoRAError(f"{wpath}: tensor {key!r} is not a target of adapter_config.json "
                            f"(targets {list(cfg.targets)}, {n} layers)")
        d_in, d_out = linear_shape(mc, t)
        want = (cfg.rank, d_in) if ab == "A" else (d_out, cfg.rank)
        if tuple(arr.shape) != want:
            raise LoRAError(f"{wpath}: tensor {key!r} has shape {tuple(arr.shape)}, expected "
                            f"{want} (r={cfg.rank}, model {mc.architecture})")
        stacked[t]["a" if ab == "A" else "b"][i] = np.asarray(arr, np.float32).T
    for t, ab in stacked.items():
        for k, layers in ab.items():
            missing = [i for i, x in enumerate(layers) if x is None]
            if missing:
                raise LoRAError(f"{wpath}: no lora_{k.upper()} for {t} in layers {missing}")
    layers = {t: {k: np.stack(v).astype(cfg.param_dtype) for k, v in ab.items()}
              for t, ab in stacked.items()}
    if mesh is not None:
        shard = lora_shardings(mc, cfg, mesh)["layers"]
        layers = jax.tree.map(lambda x, s: jax.device_put(x, s), layers, shard)
    else:
        layers = jax.tree.map(jnp.asarray, layers)
    return attach_arrays(model, cfg, layers)


__all__ = ["LoRAConfig", "LoRA", "LoRAError", "attach", "attach_arrays", "set_lora_tree",
           "lora_shapes", "lora_shardings", "abstract_lora", "init_lora_arrays", "merge", "unmerge", "metadata",
           "check_metadata", "save_peft_adapter", "load_peft_adapter", "read_peft_config",
           "save_merged", "peft_state_dict", "peft_key"]
