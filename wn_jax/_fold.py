"""Folding: WN layers' ``(kernel, scale)`` into plain kernels, and how each layer's axis is read.

What a WN layer and a wrapper are in a parameter tree is :mod:`wn_jax._structure`'s rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from wn_jax import _axes
from wn_jax import _kernel
from wn_jax import _structure
from wn_jax import _tree
from wn_jax._errors import labelled

# fold's default: each layer's axis from its scale's shape, where only one choice fits.
INFER = 'infer'

Shape = tuple[int, ...]

AxisSpec = _axes.Axis | str | Mapping[str, _axes.Axis] | Callable[[str], _axes.Axis]


class Pair(NamedTuple):
  """One weight a layer normalizes and its scale: their shapes as stored and, where known,
  as one layer sees them (inside the transform that stacks it)."""

  kernel: Shape | None
  scale: Shape
  step_kernel: Shape | None = None
  step_scale: Shape | None = None


def stacked_axis(path: str, axis: _axes.Axis, pairs: list[Pair]) -> _axes.Axis:
  """The ``axis`` of the layer at ``path`` for its parameters as stored (what ``layer_axes``
  reports), or a ``ValueError`` where the shapes do not say it.

  A layer stacked by ``nn.scan``, ``nn.vmap`` or ``nnx.vmap`` has ``m`` more axes on every
  scale than it keeps, and keeps them too: along the first axes (``variable_axes`` /
  ``out_axes`` 0) ``-1`` becomes ``(0, -1)`` and ``0`` becomes ``(0, 1)``; along the last
  (``-1``) ``-1`` becomes ``(-2, -1)``. Which one is read from the shapes (one layer's where
  known). Refused: a stack the shapes fit both ways (every size of the layer is the stack's
  length), and one along a middle axis or along the first and last axes mixed (its scale
  is then not its kernel along any kept axes, which no axis can describe).

  >>> stacked_axis('a', -1, [Pair((3, 8, 8), (3, 8))]), stacked_axis('a', 0, [Pair((3, 6, 8), (3, 6))])
  ((0, -1), (0, 1))
  >>> stacked_axis('a', -1, [Pair((4, 4, 3), (4, 3), (4, 4), (4,))]), stacked_axis('a', -1, [Pair((8, 8), (8,))])
  ((-2, -1), -1)
  """
  own = () if axis is None else tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  extra = {len(p.scale) - (len(own) if p.step_scale is None else len(p.step_scale)) for p in pairs}
  if len(extra) != 1 or (m := extra.pop()) <= 0:
    return axis
  first = (*range(m), *(a + m if a >= 0 else a for a in own))
  last = (*(a if a >= 0 else a - m for a in own), *range(-m, 0))
  fits = [
    stacked
    for stacked, step in ((first, lambda s: s[m:]), (last, lambda s: s[:-m]))
    if all(_stacked_fits(p, own, stacked, step) for p in pairs)
  ]
  shapes = f'kernel {pairs[0].kernel}, scale {pairs[0].scale}' if pairs else ''
  if len(fits) == 2:
    raise ValueError(
      f'{_layer_name(path)} ({shapes}) is stacked along its first or its last axis, and its '
      f"shapes fit both: every size of the layer is the stack's length. Give its axes "
      f"in a mapping: {{'{path}': {first}}} if stacked along the first axis "
      f"(variable_axes={{'params': 0}}, out_axes=0), {{'{path}': {last}}} along the last."
    )
  if not fits:
    raise ValueError(
      f'{_layer_name(path)} ({shapes}) is stacked (its scale has {m} more axes than it '
      f'keeps) along a middle axis, or along first and last axes mixed: its scale is then '
      f'not its kernel along any kept axes, which no axis describes. Stack it along the '
      f"first axes (variable_axes={{'params': 0}}, out_axes=0) or the last (-1)."
    )
  return fits[0]


def _stacked_fits(p: Pair, own: tuple, stacked: tuple, step: Callable) -> bool:
  """Whether ``p`` reads as one layer keeping ``own``, stacked to keep ``stacked``
  (``step``: a stored shape -> one layer's)."""
  if p.step_scale is not None and step(p.scale) != p.step_scale:
    return False
  if p.kernel is None:
    return True
  kernel = step(p.kernel)
  fits = p.step_kernel is None or kernel == p.step_kernel
  return (
    fits
    and _axes.scale_shape(kernel, _axes.kept_axes(len(kernel), own)) == step(p.scale)
    and _axes.scale_shape(p.kernel, _axes.kept_axes(len(p.kernel), stacked)) == p.scale
  )


def _layer_name(path: str) -> str:
  return f"layer '{path}'" if path else 'the root layer (the model itself)'


def _stacked(path: str, kernel_shape, scale_shape, from_model: bool = False) -> ValueError:
  # A scale with more axes than the layer keeps: a layer stacked by a transform, whose kept
  # axes include the layer axes. layer_axes reads those where the stacking is along the
  # first or the last axes; the model's own axes (nnx.fold) reach here only otherwise.
  fix = (
    'a layer stacked along a middle axis (nnx.vmap(out_axes=1)), which wn_jax does not read: '
    'stack it along the first or the last axis (out_axes 0 or -1)'
    if from_model
    else 'a stacked layer (nn.scan, nn.vmap, nnx.vmap), whose kept axes include the layer '
    'axis: pass axis=layer_axes(model, ...), which gives them for a layer stacked along its '
    f"first or last axis, or a mapping ({{'{path}': (0, -1)}} for one stacked along axis 0 "
    'that keeps axis -1)'
  )
  return ValueError(
    f'{_layer_name(path)}: its scale of shape {tuple(scale_shape)} has more axes '
    f'than one layer keeping the default axis has, for a kernel of shape '
    f'{tuple(kernel_shape)}: it looks like {fix}.'
  )


def inferred(path: str, kernel_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> Any:
  """The layer's kept axis from its scale's shape, where only one choice fits, or a
  ``ValueError`` naming the layer at ``path``."""
  fits = _fitting_axes(kernel_shape, scale_shape)
  if len(fits) == 1:
    return fits[0]
  if fits and len(scale_shape) > 1:
    raise _stacked(path, kernel_shape, scale_shape)
  if not fits:
    raise ValueError(
      f"layer '{path}': its scale of shape {scale_shape} fits no choice of kept "
      f'axes of its kernel of shape {kernel_shape}. Check the parameters (a stacked or '
      f'scanned layer is not a WN layer fold can read).'
    )
  raise ValueError(
    f"layer '{path}': its scale of shape {scale_shape} fits several kept axes "
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
          f"layer '{path}' has a kernel and a scale, but no axis in the mapping "
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
  if isinstance(a, str):
    a = inferred(path, kernel.shape, scale.shape)
  with labelled(f"layer '{path}'"):
    kept = _axes.kept_axes(kernel.ndim, a)
  need = _axes.scale_shape(kernel.shape, kept)
  if scale.shape != need and scale.ndim > max(len(kept), 1):
    raise _stacked(path, kernel.shape, scale.shape, from_model)
  if scale.shape != need:
    raise ValueError(
      f"layer '{path}': its scale has shape {scale.shape}, but a kernel of "
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
    if not hasattr(tree, 'items'):
      return tree
    if hasattr(tree.get('scale'), 'items') and _structure.is_wrapper_scale(
      shapes, (*path, 'scale')
    ):
      raise _wrapper_error((*path, 'scale'))
    if 'kernel' in tree and 'scale' in tree and hasattr(tree['scale'], 'shape'):
      where = '/'.join(path)
      kernel, scale = jnp.asarray(tree['kernel']), jnp.asarray(tree['scale'])
      kept = _layer_kept(where, kernel, scale, axis_at(where), from_model)
      rest = {k: walk(v, (*path, str(k))) for k, v in tree.items() if k not in ('kernel', 'scale')}
      with labelled(f"layer '{where}'"):
        dtype = _kernel.weight_dtype(kernel, scale, None)
        return {'kernel': _kernel.normalize(kernel, scale, kept, dtype), **rest}
    return {k: walk(v, (*path, str(k))) for k, v in tree.items()}

  return walk(params, ())
