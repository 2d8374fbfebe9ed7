"""Placing a checkpoint's per-layer tensors into the decoder's stacked [L, ...] leaves.

Both loaders (safetensors in ``hf_io``, GGUF in ``gguf_io``) read one layer's tensor at a
time; these helpers give each layer its sharding, write it into donated stacked buffers
on device, and set the finished leaves in the abstract model's state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P


def layer_sharding(shard, ndim: int):
    """The sharding of one layer of a stacked leaf (the leading layer axis dropped)."""
    if isinstance(shard, NamedSharding):
        spec = tuple(shard.spec) + (None,) * (ndim - len(shard.spec))
        return NamedSharding(shard.mesh, P(*spec[1:]))
    return shard


def stacked_sharding(s):
    """The sharding of a stacked leaf whose layers are placed with ``s``."""
    if isinstance(s, NamedSharding):
        return NamedSharding(s.mesh, P(None, *s.spec))
    return s


def put_layer(stacked, layer, i: int, n: int):
    """``stacked`` (None before the first layer) with ``layer`` (a leaf or a pytree of
    leaves, e.g. a quantised weight) written at index ``i`` of ``n``."""
    if stacked is None:
        shards = jax.tree.map(lambda x: stacked_sharding(x.sharding), layer)
        leaves, tree = jax.tree.flatten(shards)
        return _stack_starter(n, tree, tuple(leaves))(layer, i)
    return _set_layer(stacked, layer, i)


@functools.lru_cache(maxsize=64)     # leaves of one shape share a compiled program
def _stack_starter(n: int, tree, shards: tuple):
    return jax.jit(functools.partial(_start_stack, n=n),
                   out_shardings=jax.tree.unflatten(tree, shards))


def _start_stack(layer, i, n: int):
    """The stacked [n, ...] buffers with layer ``i`` written, in one program (the zero-fill
    is fused into it instead of being a program and a dispatch of its own)."""
    return jax.tree.map(
        lambda x: jax.lax.dynamic_update_index_in_dim(jnp.zeros((n,) + x.shape, x.dtype),
                                                      x, i, 0), layer)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer, i):
    return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, i, 0),
                        stacked, layer)


def set_state_leaf(state, path, value) -> None:
    """Sets the leaf at ``path`` of an ``nnx.State`` (inside its Variable if it has one)."""
    node = state
    for k in path[:-1]:
        node = node[k]
    var = node[path[-1]]
    if isinstance(var, nnx.Variable):
        var.set_value(value)
    else:
        node[path[-1]] = value
