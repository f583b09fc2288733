"""Folding: WN layers' ``(kernel, scale)`` into plain kernels, and how each layer's axis is read.

What a WN layer and a wrapper are in a parameter tree is :mod:`wn_jax._structure`'s rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from wn_jax import _axes
from wn_jax import _kernel
from wn_jax import _stacking
from wn_jax import _structure
from wn_jax import _tree
from wn_jax._errors import labelled

# fold's default: each layer's axis from its scale's shape, where only one choice fits.
INFER = 'infer'


AxisSpec = _axes.Axis | str | Mapping[str, _axes.Axis] | Callable[[str], _axes.Axis]


def _stacked(path: str, kernel_shape, scale_shape, from_model: bool = False) -> ValueError:
  # A scale with more axes than the layer keeps: a layer stacked by a transform, whose kept
  # axes include the layer axes. layer_axes reads those where the stacking is along the
  # first or the last axes; the model's own axes (nnx.fold) reach here only otherwise.
  fix = (
    'a layer stacked along a middle axis (nnx.vmap(out_axes=1)), which wn_jax does not read: '
    'stack it along the first or the last axis (out_axes 0 or -1)'
    if from_model
    else 'a layer built keeping several axes, or a stacked layer (nn.scan, nn.vmap, '
    'nnx.vmap) whose kept axes include the layer axes; its shapes alone do not say which '
    '(a middle-axis stack fits some kept axes it does not keep). Pass axis=layer_axes(model, '
    f"...), which reads them from the model, or a mapping ({{'{path}': (0, -1)}} for a layer "
    'stacked along axis 0 that keeps axis -1)'
  )
  return ValueError(
    f'{_stacking.layer_name(path)}: its scale of shape {tuple(scale_shape)} has several axes, '
    f'for a kernel of shape {tuple(kernel_shape)}: it looks like {fix}.'
  )


def check_in_order(path: str, kernel_shape: tuple, scale_shape: tuple) -> None:
  """Refuses a WN layer whose scale is its kernel along some axes out of order: one stacked
  along a middle axis, which no kept axes describe (read as a WN layer, never skipped)."""
  if not _axes.fits_kept_axes(tuple(scale_shape), tuple(kernel_shape)):
    raise ValueError(
      f'{_stacking.layer_name(path)}: its scale of shape {tuple(scale_shape)} is its kernel '
      f'of shape {tuple(kernel_shape)} along some axes out of order: a layer stacked along a '
      f"middle axis (variable_axes={{'params': 1}}, out_axes=1), which no kept axes "
      f'describe. Stack it along the first or the last axis (0 or -1), which layer_axes reads.'
    )


def inferred(path: str, kernel_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> Any:
  """The layer's kept axis from its scale's shape, where only one choice fits, or a
  ``ValueError`` naming the layer at ``path`` (its callers refuse a scale out of order first,
  :func:`check_in_order`)."""
  fits = _fitting_axes(kernel_shape, scale_shape)
  if len(fits) == 1 and _stacking.only_reading(
    tuple(kernel_shape), tuple(scale_shape), _axes.kept_axes(len(kernel_shape), fits[0])
  ):
    return fits[0]
  if fits and len(scale_shape) > 1:  # a layer built keeping several axes, or a stacked one
    raise _stacked(path, kernel_shape, scale_shape)
  if not fits:
    raise ValueError(
      f'{_stacking.layer_name(path)}: its scale of shape {scale_shape} fits no choice of kept '
      f'axes of its kernel of shape {kernel_shape}. Check the parameters (a stacked or '
      f'scanned layer is not a WN layer fold can read).'
    )
  raise ValueError(
    f'{_stacking.layer_name(path)}: its scale of shape {scale_shape} fits several kept axes '
    f'of its kernel of shape {kernel_shape} ({fits}), so the parameters alone do not say '
    f'which one the layer was built with. Pass axis=-1 if every layer kept the default '
    f"(the output features), or each layer's own: axis=layer_axes(model, x), or a "
    f"mapping {{'{path}': ...}}.{_variables_hint(path)}"
  )


def _variables_hint(path: str) -> str:
  """Where ``path`` starts with ``params/``: the fix of passing ``variables['params']``."""
  if not path.startswith('params/'):
    return ''
  return " The path starts with 'params/': pass variables['params'], not the variables."


def axis_of(axis: AxisSpec) -> Callable[[str], _axes.Axis]:
  """``axis`` (fold's argument) as a function from a layer's path to its axis (or
  :data:`INFER`)."""
  if isinstance(axis, str):
    if axis != INFER:
      raise ValueError(
        f"axis must be 'infer', an int, a tuple of ints, None, a mapping from "
        f'layer path to axis or a callable; got {axis!r}.'
      )
    return lambda path: INFER  # type: ignore[return-value]
  if isinstance(axis, Mapping):
    table = dict(axis)

    def lookup(path: str) -> _axes.Axis:
      if path not in table:
        hint = _variables_hint(path) if path.split('/', 1)[-1] in table else ''
        raise ValueError(
          f'{_stacking.layer_name(path)} has a kernel and a scale, but no axis in the mapping '
          f'(it names {sorted(table)}). Add it, or build the mapping with layer_axes(model, ...).'
          f'{hint}'
        )
      return table[path]

    return lookup
  if callable(axis):
    return axis
  return lambda path: axis


def _fitting_axes(kernel_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> list[Any]:
  """Every choice of kept kernel axes (NumPy-style negative ints) that gives ``scale_shape``."""
  n = len(kernel_shape)
  out: list[Any] = []
  for kept in itertools.combinations(range(n), len(scale_shape)):
    if tuple(kernel_shape[a] for a in kept) == tuple(scale_shape):
      neg = tuple(a - n for a in kept)
      out.append(neg[0] if len(neg) == 1 else (None if not neg else neg))
  return out


def _layer_kept(path: str, kernel: jax.Array, scale: jax.Array, a: Any, from_model: bool):
  """The kept axes of the WN layer at ``path`` with axis ``a`` (``INFER``: from the shapes),
  checked against its scale's shape."""
  check_in_order(path, kernel.shape, scale.shape)
  if isinstance(a, str):
    a = inferred(path, kernel.shape, scale.shape)
  with labelled(_stacking.layer_name(path)):
    kept = _axes.kept_axes(kernel.ndim, a)
  need = _axes.scale_shape(kernel.shape, kept)
  if scale.shape != need and scale.ndim > max(len(kept), 1):
    raise _stacked(path, kernel.shape, scale.shape, from_model)
  if scale.shape != need:
    raise ValueError(
      f'{_stacking.layer_name(path)}: its scale has shape {scale.shape}, but a kernel of '
      f'shape {kernel.shape} keeping axis {a!r} needs {need}; the layer was built with '
      f'another axis (the shapes fit axis in {_fitting_axes(kernel.shape, scale.shape)}). '
      f"Pass each layer's own axis: axis=layer_axes(model, ...), or a mapping "
      f"{{'{path}': ...}}."
    )
  return kept


def _wrapper_error(path: tuple[str, ...]) -> ValueError:
  return ValueError(
    f"'{'/'.join(path)}' is a WeightNorm wrapper's scale tree; fold "
    f"folds WN layers and WeightNormed leaves, not a wrapper (its layer's parameters hold "
    f'v, not w). Train or export that part with the pytree route (wn_jax.weight_norm + '
    f'wn_jax.materialize), or fold it by hand: each layer parameter v becomes '
    f'wn_jax.normalize(v, g, axis) with g from the scale tree, and the scale tree goes.'
  )


def fold(params: Any, axis: AxisSpec, *, from_model: bool = False) -> Any:
  """Every ``{'kernel', 'scale', ...}`` dict of ``params`` folded into ``{'kernel': w, ...}``,
  and every ``WeightNormed`` node into its weight.

  ``axis``: each layer's kept axis (:data:`AxisSpec`). ``from_model``: the axes come from
  the model (``nnx.fold``), not from the caller, so a mismatch is a stacked layer and the
  errors do not suggest a mapping. Plain messages: the public ``fold`` adds its name.
  """
  axis_at = axis_of(axis)
  shapes = {
    tuple(_tree.path_str(p).split('/')): jnp.shape(x)
    for p, x in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, _tree.WeightNormed)
    )[0]
    if not isinstance(x, _tree.WeightNormed)
  }

  def walk(tree: Any, path: tuple[str, ...]) -> Any:
    if isinstance(tree, _tree.WeightNormed):
      return tree.weight()
    if not hasattr(tree, 'items'):  # a list, tuple or other node: its children; a leaf
      children, node = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
      if jax.tree_util.treedef_is_leaf(node):
        return tree
      return jax.tree_util.tree_unflatten(
        node, [walk(x, (*path, _tree.path_str(k))) for k, x in children]
      )
    if hasattr(tree.get('scale'), 'items') and _structure.is_wrapper_scale(
      shapes, (*path, 'scale')
    ):
      raise _wrapper_error((*path, 'scale'))
    if 'kernel' in tree and 'scale' in tree and hasattr(tree['scale'], 'shape'):
      where = '/'.join(path)
      kernel, scale = jnp.asarray(tree['kernel']), jnp.asarray(tree['scale'])
      kept = _layer_kept(where, kernel, scale, axis_at(where), from_model)
      rest = {k: walk(v, (*path, str(k))) for k, v in tree.items() if k not in ('kernel', 'scale')}
      with labelled(_stacking.layer_name(where)):
        dtype = _kernel.weight_dtype(kernel, scale, None)
        return {'kernel': _kernel.normalize(kernel, scale, kept, dtype), **rest}
    return {k: walk(v, (*path, str(k))) for k, v in tree.items()}

  return walk(params, ())
