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
  """``value`` in a box like ``box`` (its kind and metadata); ``value`` itself where ``box`` is
  no box."""
  nnx = sys.modules.get('flax.nnx')
  if nnx is not None and isinstance(box, nnx.Variable):
    return box.replace(value=value)
  return box.replace_boxed(value) if isinstance(box, kinds()) else value  # type: ignore[attr-defined]


def scale_box(kernel_box: Any, g: Any, kept: tuple[int, ...]) -> Any:
  """``g`` boxed like a linen kernel, with the partition names of its kept axes: a
  partitioned kernel (``nn.Partitioned``) gives a partitioned scale; ``g`` itself for any
  other kernel."""
  linen = sys.modules.get('flax.linen')
  if linen is not None and isinstance(kernel_box, linen.Partitioned):
    return kernel_box.replace(value=g, names=_axes.kept_names(kernel_box.names, kept))
  return g


def apart(tree: Any, node_type: Any) -> Any:
  """``tree`` with each linen box with partition names (``nn.Partitioned``) around a
  ``node_type`` node (a ``WeightNormed``) moved into it: ``v`` in the box, ``g`` in one naming
  the partitions of the kept axes (Flax's sharding helpers give all that a box holds the box's
  names, which fit ``v`` only). An NNX variable stays around the node: NNX's state tools
  (``nnx.filter_state``, ``nnx.to_pure_dict``) read variables as the state's leaves."""
  linen = sys.modules.get('flax.linen')
  if linen is None:
    return tree

  def one(x: Any) -> Any:
    if not (isinstance(x, linen.Partitioned) and isinstance(x.value, node_type)):
      return x
    node = x.value  # read as it is (unbox would apply a sharding constraint)
    kept = _axes.kept_axes(jnp.ndim(node.v), node.axis)
    return node_type(reboxed(x, node.v), scale_box(x, node.g, kept), node.axis)

  is_leaf = lambda x: isinstance(x, (node_type, linen.Partitioned))  # a bare node: kept
  return jax.tree_util.tree_map(one, tree, is_leaf=is_leaf)


def refuse_module(params: Any, label: str) -> None:
  """A ``TypeError`` for a Flax module where its parameters go, or inside them (an NNX
  module is a pytree too, and came back half converted; a linen one is a leaf, skipped)."""
  nnx, linen = (sys.modules.get(name) for name in ('flax.nnx', 'flax.linen'))
  modules = tuple(m.Module for m in (nnx, linen) if m is not None)
  if not modules:
    return
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, modules))
  found = next((x for x in leaves if isinstance(x, modules)), None)
  if found is None:
    return
  if nnx is not None and isinstance(found, nnx.Module):
    fix = 'Pass its parameters: nnx.state(model, nnx.Param).'
  else:
    fix = "Pass its parameters: model.init(key, x)['params']."
  _errors.require(False, label, 'the parameters (a pytree of arrays)', found, fix)
