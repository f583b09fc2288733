"""What the linen and NNX ``WeightNorm`` wrappers share: their errors, the initial ``g``, the
check that they do not normalize a weight-normalized module again, and the walk over the scale
tree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from wn_jax import _axes
from wn_jax import _core
from wn_jax import _errors
from wn_jax._tree import PyTree
from wn_jax._tree import WeightNormed
from wn_jax._tree import Where
from wn_jax._tree import path_str
from wn_jax._tree import selector


def not_a_layer(label: str, expected: str, example: str, layer: Any) -> TypeError:
  """The ``WeightNorm`` wrappers' error for something that is not a layer."""
  return TypeError(
    f'{label}: expected a layer, a {expected} instance (e.g. {example}); got '
    f'{_errors.type_name(layer)}. Wrap the layer that '
    f'holds the parameters; for arrays or a parameter tree use wn_jax.weight_norm.'
  )


def initial_scale(
  node: WeightNormed,
  scale_init: Callable[..., Any] | None,
  param_dtype: Any,
  key: Callable[[], Any] | None,
) -> jax.Array:
  """A ``WeightNorm`` wrapper's initial ``g`` for ``node`` (from :func:`weight_norm`).

  ``||v||`` (the layer's function unchanged), or ``scale_init(key(), shape, dtype)``; in
  ``param_dtype``, or with ``None`` in ``v``'s dtype. The norm is taken of ``v`` in
  ``param_dtype``, so a float32 ``g`` of a float16 kernel is not rounded to float16.
  """
  _axes.check_scale_init(scale_init)
  if param_dtype is not None and not jnp.issubdtype(param_dtype, jnp.floating):
    raise ValueError(
      f'param_dtype must be None (the dtype of each parameter) or a real floating dtype '
      f'(e.g. jnp.float32); got {jnp.dtype(param_dtype).name}.'
    )
  dtype = node.g.dtype if param_dtype is None else jnp.dtype(param_dtype)
  if scale_init is not None:
    return scale_init(None if key is None else key(), node.g.shape, dtype)
  if param_dtype is None:
    return node.g
  return _core.decompose(jnp.asarray(node.v, dtype), node.axis)[1]


def weight_normed_parts(path: tuple[str, ...], name: str, wrapper: bool) -> dict:
  """:func:`check_wrappable`'s ``owners`` entries for a weight-normalized module at ``path``.

  A ``WeightNorm`` wrapper owns every parameter under it (its layer's and its scale); a
  ``WN*`` layer its ``kernel`` and ``scale``, not its ``bias``.
  """
  at = f"at '{'/'.join(path)}'" if path else '(the wrapped layer itself)'
  parts = [path] if wrapper else [(*path, 'kernel'), (*path, 'scale')]
  return {p: f'{name} {at}' for p in parts}


def check_wrappable(params: PyTree, where: Where, owners: dict[tuple[str, ...], str]) -> None:
  """Refuses a ``WeightNorm`` wrapper with nothing to normalize, or one that normalizes twice.

  Args:
    params: the wrapped layer's parameters, a nested dict of arrays.
    where: the wrapper's selection.
    owners: the parameter paths (inside ``params``; a path owns what lies under it) that a
      weight-normalized module inside the layer normalizes already, to that module
      (:func:`weight_normed_parts`).
  """
  if not jax.tree_util.tree_leaves(params):
    raise ValueError(
      'the layer has no parameters, so there is nothing to weight-normalize. '
      'Wrap the layers that have parameters (pooling and activations need no weight '
      'norm), or leave this one unwrapped.'
    )
  select = selector(where, params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(path_str(path).split('/'))
    owner = next((o for o in owners if keys[: len(o)] == o), None)
    if owner is not None and select(path, leaf):
      raise ValueError(
        f'{owners[owner]} is weight-normalized already, and where={where!r} selects its '
        f"parameter '{'/'.join(keys)}': a second WeightNorm would stack another scale on "
        f'the same weight (a dead parameter; PyTorch refuses this too). Wrap the plain '
        f'layer (e.g. nn.Dense for WNDense, the inner layer of a WeightNorm), or leave the '
        f'weight-normalized one out with where=.'
      )


def map_selected(tree: Any, fn: Callable, scale: Any = None, path: tuple = ()) -> Any:
  """Over nested dicts of ``WeightNormed`` nodes.

  Without ``scale``: a nested dict of ``fn(node)`` for the nodes alone (the ``scale``
  parameter). With ``scale``: the full tree, each node given its ``g`` from ``scale``
  and replaced by ``fn(node)`` (the weights the layer computes with). A ``ValueError`` from
  ``fn`` names the leaf, and a node that ``scale`` has no ``g`` for is refused by name.
  """
  out = {}
  for k, x in tree.items():
    at = (*path, k)
    if isinstance(x, WeightNormed):
      with _errors.labelled(_errors.later(lambda: f'leaf {path_str(at)!r}')):  # noqa: B023
        out[k] = fn(x if scale is None else WeightNormed(x.v, _magnitude(scale, k, at), x.axis))
    elif hasattr(x, 'items'):
      sub = map_selected(x, fn, None if scale is None else _get(scale, k, {}), at)
      if sub or scale is not None:
        out[k] = sub
    elif scale is not None:
      out[k] = x
  return out


def _magnitude(scale: Any, key: Any, at: tuple) -> Any:
  """The ``g`` at ``key`` of ``scale``: refused where the selection has a parameter that the
  scale tree (from a checkpoint, say) has no magnitude for."""
  try:
    return _get(scale, key)
  except (KeyError, TypeError):
    held = sorted(map(str, scale)) if hasattr(scale, 'keys') else type(scale).__name__
    under = f' under {path_str(at[:-1])!r}' if at[:-1] else ''
    raise ValueError(
      f'the scale tree has no magnitude g for this selected parameter (it holds {held}'
      f'{under}): the parameters come from a wrapper that selected others (another '
      f'where= or axis=), or their scale tree is misnamed. Build the wrapper as the parameters '
      f'were made, or initialize it again.'
    ) from None


def _get(tree: Any, key: Any, *default: Any) -> Any:
  """``tree[key]``, also where ``tree`` has string keys for integer ones (NNX lists)."""
  if key in tree:
    return tree[key]
  if str(key) in tree or not default:
    return tree[str(key)]
  return default[0]
