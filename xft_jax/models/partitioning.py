"""Parameter partitioning: the logical axes of every decoder parameter and the
NamedShardings they give on a mesh.

``PARAM_AXES`` names the logical axes of each leaf; ``sharding.LOGICAL_RULES`` maps them
onto the mesh. LoRA A shards like its base weight's input dim, B like its output dim.
Quantised weights (anything with ``shardings_for``) shard every child like the weight.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xft_jax.sharding import named_sharding

# Logical axes by leaf name; stacked layer leaves get a leading 'layers' axis.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "final_norm": ("norm",),
    "lm_head": ("embed", "vocab"),
    "input_norm": ("layers", "norm"),
    "post_attn_norm": ("layers", "norm"),
    "q_proj": ("layers", "embed", "heads"),
    "k_proj": ("layers", "embed", "kv_heads"),
    "v_proj": ("layers", "embed", "kv_heads"),
    "o_proj": ("layers", "heads", "embed"),
    "q_bias": ("layers", "heads"),
    "k_bias": ("layers", "kv_heads"),
    "v_bias": ("layers", "kv_heads"),
    "o_bias": ("layers", "embed"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
}


def path_keys(path) -> tuple[str, ...]:
    """A pytree / nnx state path as plain strings, e.g. ('layers', 'q_proj')."""
    return tuple(str(getattr(k, "key", k)) for k in path)


def params_tree(state) -> dict:
    """nnx.State -> nested dict of arrays (Param wrappers removed; LoRA excluded)."""
    pure = dict(nnx.to_pure_dict(state))
    pure.pop("lora", None)
    return pure


def leaf_axes(path: tuple) -> tuple[str, ...]:
    """Logical axes of a parameter from its state path, e.g. ('layers', 'q_proj')."""
    names = list(path_keys(path))
    if "lora" in names:
        target, part = names[-2], names[-1]
        base = PARAM_AXES[target]
        return (base[0], base[1], "lora_rank") if part == "a" else (base[0], "lora_rank", base[2])
    return PARAM_AXES[names[-1]]


def _leaf_axes(keys: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return leaf_axes(keys)
    except KeyError as e:
        raise KeyError(f"parameter {'.'.join(keys)}: no logical axes for it in "
                       f"partitioning.PARAM_AXES ({e}); add them so it is not left "
                       f"unsharded") from None


def _is_quantized(x) -> bool:
    return hasattr(x, "shardings_for")


def param_shardings(mesh: Mesh, params: dict, prefix: Sequence[str] = (), rules=None):
    """NamedShardings (same nesting) for a plain params dict such as ``model.params()``
    or, with ``prefix=('lora',)``, ``model.lora_params()``: jit in/out_shardings.
    Quantised weights get a NamedSharding per child."""
    def one(path, x):
        keys = tuple(prefix) + path_keys(path)
        if _is_quantized(x):
            return x.shardings_for(mesh, _leaf_axes(keys), rules)
        return named_sharding(mesh, _leaf_axes(keys), x.shape, rules)
    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_quantized)


def model_shardings(mesh: Mesh, model_or_state, rules=None):
    """Pure nested dict of NamedShardings for every variable of an NNX model (or State).

    Param and LoRAParam leaves follow ``leaf_axes``; any other variable is replicated.
    """
    state = (model_or_state if isinstance(model_or_state, nnx.State)
             else nnx.state(model_or_state))
    flat = []
    for path, var in nnx.to_flat_state(state):
        keys = path_keys(path)
        value = var.get_value() if hasattr(var, "get_value") else var
        if _is_quantized(value):
            sh = value.shardings_for(mesh, _leaf_axes(keys), rules)
        elif isinstance(var, (nnx.Param, nnx.LoRAParam)):
            sh = named_sharding(mesh, _leaf_axes(keys), np.shape(value), rules)
        else:
            sh = NamedSharding(mesh, P())
        flat.append((path, sh))
    return nnx.to_pure_dict(nnx.from_flat_state(flat)) if flat else {}


def shard_model(model, mesh: Mesh, rules=None):
    """Moves every variable of an NNX model onto ``mesh`` with its sharding (in place).

    For parameters created on the host; ``models.load_pretrained(path, mesh=mesh)``
    already places the base weights.
    """
    state = nnx.state(model)
    shardings = model_shardings(mesh, state, rules)
    placed = jax.tree.map(lambda x, s: jax.device_put(x, s),
                          nnx.to_pure_dict(state), shardings)
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    return model
