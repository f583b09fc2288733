"""Flax's objects in a parameter tree: boxes around arrays (NNX variables, linen's
``nn.Partitioned``) and modules where their parameters belong. Read from the loaded modules, not
imported: until flax's are loaded, none can exist."""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp

from wn_jax import _axes
from wn_jax import _errors


def kinds() -> tuple[type, ...]:
  """Flax's boxes around an array: NNX variables and linen's (``nn.Partitioned``, from
  ``nn.with_partitioning``). Read from the loaded modules: until flax's are, none can exist."""
  nnx, meta = (sys.modules.get(name) for name in ('flax.nnx', 'flax.core.meta'))
  return (() if nnx is None else (nnx.Variable,)) + (() if meta is None else (meta.AxisMetadata,))


def unboxed(x: Any) -> Any:
  """The value a box holds (``Param(w)`` -> ``w``); anything else as it is."""
  nnx = sys.modules.get('flax.nnx')
  if nnx is not None and isinstance(x, nnx.Variable):
    return x.get_value()
  return x.unbox() if isinstance(x, kinds()) else x  # type: ignore[attr-defined]


def reboxed(box: Any, value: Any) -> Any:
  """``value`` in a box like ``box`` (its kind and metadata)."""
  nnx = sys.modules.get('flax.nnx')
  if nnx is not None and isinstance(box, nnx.Variable):
    return box.replace(value=value)
  return box.replace_boxed(value)


def scale_box(kernel_box: Any, g: Any, kept: tuple[int, ...]) -> Any:
  """``g`` boxed like the kernel, with the partition names of its kept axes: a partitioned
  kernel (``nn.Partitioned``, an NNX variable with ``out_sharding``) gives a partitioned scale;
  ``g`` itself for any other kernel."""
  nnx, linen = (sys.modules.get(name) for name in ('flax.nnx', 'flax.linen'))
  if nnx is not None and isinstance(kernel_box, nnx.Variable):
    names = _axes.kept_names(kernel_box.get_metadata().get('out_sharding'), kept)
    if names is None:
      return kernel_box.replace(value=g)
    return kernel_box.replace(value=g, out_sharding=names)
  if linen is not None and isinstance(kernel_box, linen.Partitioned):
    return kernel_box.replace(value=g, names=_axes.kept_names(kernel_box.names, kept))
  return g


def apart(tree: Any, node_type: Any) -> Any:
  """``tree`` with each box around a ``node_type`` node (a ``WeightNormed``) moved into it:
  ``v`` in the box, ``g`` in one like it naming the partitions of the kept axes (Flax's
  sharding helpers give all that a box holds the box's names, which fit ``v`` only). Other
  boxes (an NNX variable without ``out_sharding``: ``nnx.to_pure_dict`` strips it) stay
  around the node."""
  nnx, linen = (sys.modules.get(name) for name in ('flax.nnx', 'flax.linen'))

  def content(x: Any) -> Any:  # the node in a box with partition names, read as it is
    if nnx is not None and isinstance(x, nnx.Variable):
      return x.get_value() if x.get_metadata().get('out_sharding') is not None else None
    return x.value if linen is not None and isinstance(x, linen.Partitioned) else None

  def one(x: Any) -> Any:
    node = content(x)
    if not isinstance(node, node_type):
      return x
    kept = _axes.kept_axes(jnp.ndim(node.v), node.axis)
    return node_type(reboxed(x, node.v), scale_box(x, node.g, kept), node.axis)

  is_leaf = lambda x: isinstance(x, (node_type, *kinds()))  # a bare node: kept as it is
  return jax.tree_util.tree_map(one, tree, is_leaf=is_leaf)


def refuse_module(params: Any, label: str) -> None:
  """A ``TypeError`` for a Flax module where its parameters go, or inside them (an NNX
  module is a pytree too, and came back half converted; a linen one is a leaf, skipped)."""
  nnx, linen = (sys.modules.get(name) for name in ('flax.nnx', 'flax.linen'))
  kinds = tuple(m.Module for m in (nnx, linen) if m is not None)
  if not kinds:
    return
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, kinds))
  found = next((x for x in leaves if isinstance(x, kinds)), None)
  if found is None:
    return
  if nnx is not None and isinstance(found, nnx.Module):
    fix = 'Pass its parameters: nnx.state(model, nnx.Param).'
  else:
    fix = "Pass its parameters: model.init(key, x)['params']."
  _errors.require(False, label, 'the parameters (a pytree of arrays)', found, fix)
