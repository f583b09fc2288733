"""What the linen and NNX front ends share besides the forward pass: scale metadata, fold."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from wn_jax import _core
from wn_jax import _kernel
from wn_jax import _tree


def kept_names(names: Sequence[Any] | None, kept: tuple[int, ...]) -> tuple[Any, ...] | None:
  """The partition names of a scale: those of its kernel's kept axes (``None``: unpartitioned).

  ``names`` may be shorter than the kernel's rank: as in Flax, the missing trailing axes are
  unsharded (``None``).
  """
  if names is None:
    return None
  return tuple(names[a] if a < len(names) else None for a in kept)


# fold's default: each layer's axis from its scale's shape, where only one choice fits.
INFER = 'infer'

AxisSpec = _core.Axis | str | Mapping[str, _core.Axis] | Callable[[str], _core.Axis]


def _layer_name(path: str) -> str:
  return f"layer '{path}'" if path else 'the root layer (the model itself)'


def _stacked(caller: str, path: str, kernel_shape, scale_shape) -> ValueError:
  # A scale with more axes than the layer keeps: most likely one leading layer axis on
  # every parameter (nn.scan, nn.vmap, nnx.vmap), which no axis choice undoes.
  several = (
    ''  # nnx.fold reads each layer's own axis: only a stacked layer gets here
    if caller == 'wn_jax.nnx.fold'
    else f"; a single layer built with several kept axes takes them in a mapping {{'{path}': ...}}"
  )
  return ValueError(
    f'{caller}: {_layer_name(path)}: its scale of shape {tuple(scale_shape)} has more axes '
    f'than one layer keeping the default axis has, for a kernel of shape '
    f'{tuple(kernel_shape)}: it looks like a stacked layer (nn.scan, nn.vmap, nnx.vmap), which '
    f'fold does not support. Unstack it first and fold each layer (e.g. '
    f'jax.tree.map(lambda a: a[i], params) for layer i){several}.'
  )


def _inferred(path: str, kernel_shape: tuple[int, ...], scale_shape: tuple[int, ...], caller: str):
  fits = _fitting_axes(kernel_shape, scale_shape)
  if len(fits) == 1:
    return fits[0]
  if fits and len(scale_shape) > 1:
    raise _stacked(caller, path, kernel_shape, scale_shape)
  if not fits:
    raise ValueError(
      f"{caller}: layer '{path}': its scale of shape {scale_shape} fits no choice of kept "
      f'axes of its kernel of shape {kernel_shape}. Check the parameters (a stacked or '
      f'scanned layer is not a WN layer fold can read).'
    )
  raise ValueError(
    f"{caller}: layer '{path}': its scale of shape {scale_shape} fits several kept axes "
    f'of its kernel of shape {kernel_shape} ({fits}), so the parameters alone do not say '
    f'which one the layer was built with. Pass axis=-1 if every layer kept the default '
    f"(the output features), or each layer's own: axis=layer_axes(model, x), or a "
    f"mapping {{'{path}': ...}}."
  )


def _axis_of(axis: AxisSpec, caller: str) -> Callable[[str], _core.Axis]:
  if isinstance(axis, str):
    if axis != INFER:
      raise ValueError(
        f"{caller}: axis must be 'infer', an int, a tuple of ints, None, a mapping from "
        f'layer path to axis or a callable; got {axis!r}.'
      )
    return lambda path: INFER  # type: ignore[return-value]
  if isinstance(axis, Mapping):
    table = dict(axis)

    def lookup(path: str) -> _core.Axis:
      if path not in table:
        raise ValueError(
          f"{caller}: layer '{path}' has a kernel and a scale, but no axis in the mapping "
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


def fold(params: Any, axis: AxisSpec, caller: str) -> Any:
  """Every ``{'kernel', 'scale', ...}`` dict of ``params`` folded into ``{'kernel': w, ...}``."""
  axis_of = _axis_of(axis, caller)
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
    if hasattr(tree.get('scale'), 'items') and _tree.is_wrapper_scale(shapes, (*path, 'scale')):
      raise ValueError(
        f"{caller}: '{'/'.join((*path, 'scale'))}' is a WeightNorm wrapper's scale tree; fold "
        f"folds WN layers and WeightNormed leaves, not a wrapper (its layer's parameters hold "
        f'v, not w). Train or export that part with the pytree route (wn_jax.weight_norm + '
        f'wn_jax.materialize), or fold it by hand: each layer parameter v becomes '
        f'wn_jax.normalize(v, g, axis) with g from the scale tree, and the scale tree goes.'
      )
    if 'kernel' in tree and 'scale' in tree and hasattr(tree['scale'], 'shape'):
      where = '/'.join(path)
      kernel, scale = jnp.asarray(tree['kernel']), jnp.asarray(tree['scale'])
      a = axis_of(where)
      if isinstance(a, str):
        a = _inferred(where, kernel.shape, scale.shape, caller)
      kept = _core.kept_axes(kernel.ndim, a, f"{caller}: layer '{where}'")
      need = _core.scale_shape(kernel.shape, kept)
      if scale.shape != need and scale.ndim > max(len(kept), 1):
        raise _stacked(caller, where, kernel.shape, scale.shape)
      if scale.shape != need:
        raise ValueError(
          f"{caller}: layer '{where}': its scale has shape {scale.shape}, but a kernel of "
          f'shape {kernel.shape} keeping axis {a!r} needs {need}; the layer was built with '
          f'another axis (the shapes fit axis in {_fitting_axes(kernel.shape, scale.shape)}). '
          f"Pass each layer's own axis: axis=layer_axes(model, ...), or a mapping "
          f"{{'{where}': ...}}."
        )
      rest = {k: walk(v, (*path, str(k))) for k, v in tree.items() if k not in ('kernel', 'scale')}
      with _kernel.labelled(f"{caller}: layer '{where}'"):
        dtype = _kernel.weight_dtype(kernel, scale, None)
        return {'kernel': _kernel.normalize(kernel, scale, kept, dtype), **rest}
    return {k: walk(v, (*path, str(k))) for k, v in tree.items()}

  return walk(params, ())
