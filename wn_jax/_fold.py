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
from wn_jax import _structure
from wn_jax import _tree
from wn_jax._errors import labelled

# fold's default: each layer's axis from its scale's shape, where only one choice fits.
INFER = 'infer'

AxisSpec = _axes.Axis | str | Mapping[str, _axes.Axis] | Callable[[str], _axes.Axis]

Pairs = list[tuple[tuple[int, ...] | None, tuple[int, ...]]]


def stacked_axis(axis: _axes.Axis, pairs: Pairs) -> _axes.Axis:
  """A layer's ``axis`` for its parameters as stored (what ``layer_axes`` reports).

  ``pairs``: the shape of each weight the layer normalizes (``None`` where unknown) and of
  its scale. A layer stacked by ``nn.scan``, ``nn.vmap`` or ``nnx.vmap`` along leading
  axes (``variable_axes={'params': 0}``, ``out_axes=0``) has ``m`` more axes on every scale
  than it keeps: the ``m`` leading layer axes are then kept too, and the layer's own
  non-negative axes move past them (negative ones count from the end, unchanged), so
  ``-1`` becomes ``(0, -1)``. Any other layer, or one stacked along another axis (the
  shapes do not fit), keeps ``axis`` itself (and fold names it stacked).

  >>> stacked_axis(-1, [((3, 8, 8), (3, 8))]), stacked_axis(0, [(None, (3, 8))])
  ((0, -1), (0, 1))
  >>> stacked_axis(-1, [((8, 3, 8), (8, 3))]), stacked_axis(-1, [((8, 8), (8,))])
  (-1, -1)
  """
  own = () if axis is None else tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  extra = {len(scale) - len(own) for _, scale in pairs}
  if len(extra) != 1 or (m := extra.pop()) <= 0:
    return axis
  stacked = (*range(m), *(a + m if a >= 0 else a for a in own))
  fits = all(
    w is None or _axes.scale_shape(w, _axes.kept_axes(len(w), stacked)) == scale
    for w, scale in pairs
  )
  return stacked if fits else axis


def _layer_name(path: str) -> str:
  return f"layer '{path}'" if path else 'the root layer (the model itself)'


def _stacked(path: str, kernel_shape, scale_shape, from_model: bool = False) -> ValueError:
  # A scale with more axes than the layer keeps: most likely a layer stacked along the
  # leading axes of every parameter (nn.scan, nn.vmap, nnx.vmap), whose kept axes include
  # the layer axes. layer_axes reads those where the stacking is along leading axes.
  fix = (
    # the axes come from the model (nnx.fold): only a layer stacked along another axis
    # (out_axes other than 0) gets here
    'stacked along an axis other than the leading one, whose kept axes layer_axes cannot '
    'read. Fold it with wn_jax.linen.fold(nnx.to_pure_dict(nnx.state(model, nnx.Param)), '
    f"{{'{path}': axes}}), axes its kept axes counted in the stacked kernel, the layer "
    'axis among them'
    if from_model
    else 'a stacked layer (nn.scan, nn.vmap, nnx.vmap), whose kept axes include the layer '
    'axis: pass axis=layer_axes(model, ...), which gives them for a layer stacked along its '
    f"leading axis, or a mapping ({{'{path}': (0, -1)}} for one stacked along axis 0 that "
    'keeps axis -1)'
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
    f"mapping {{'{path}': ...}}."
  )


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
        raise ValueError(
          f"layer '{path}' has a kernel and a scale, but no axis in the mapping "
          f'(it names {sorted(table)}). Add it, or build the mapping with layer_axes(model, ...).'
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
