"""Reading a parameter tree by structure: where its directions ``v`` and magnitudes ``g`` are.

A direction is the ``kernel`` of a WN layer (beside a ``scale`` shaped like its kept axes),
each parameter of a layer that a ``WeightNorm`` wrapper's ``scale`` tree mirrors, or ``v`` of a
``WeightNormed`` node. Trees are read with ``WeightNormed`` and ``MaskedNode`` nodes whole and
paths as tuples of key strings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from wn_jax import _axes
from wn_jax import _boxes
from wn_jax import _core
from wn_jax import _errors
from wn_jax import _fold
from wn_jax import _stacking
from wn_jax import _structure
from wn_jax import _tree
from wn_jax._optax_util import is_masked
from wn_jax._optax_util import is_node
from wn_jax._optax_util import unwrap

Keys = tuple[str, ...]
Shape = tuple[int, ...]


def direction(x: Any) -> Any:
  """``v``: the node's, or the leaf itself (a WN layer's or a wrapped layer's kernel)."""
  return x.v if isinstance(x, _tree.WeightNormed) else x


def _shapes(nodes: list[tuple[tuple, Any]]) -> dict[Keys, Shape]:
  """The shape of each array leaf of ``tree_flatten_with_path(params, is_leaf=is_node)``."""
  return {_tree.path_keys(p): tuple(jnp.shape(x)) for p, x in nodes if not is_node(x)}


def direction_axes(
  params: Any, axis: _fold.AxisSpec, caller: str, *, nodes_only: bool = False
) -> list[Any]:
  """For each leaf of ``params`` flattened with ``WeightNormed`` nodes whole: the kept axes
  of its direction, or ``None`` where it holds none.

  A ``WeightNormed`` node's ``v`` (its own axis); a WN layer's ``kernel`` (beside a
  ``scale`` array shaped like its kept axes, :func:`decay_mask`'s rule); each parameter a
  ``WeightNorm`` wrapper's ``scale`` tree mirrors (:func:`wn_jax._structure.wrapped_layers`).
  The axis of the latter two is ``axis`` at the layer's (the wrapper's) path, as in fold.
  ``nodes_only``: the ``WeightNormed`` nodes alone.
  """
  _boxes.refuse_module(params, caller)
  if not nodes_only:
    _refuse_hidden_scales(params, caller)
  nodes = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]
  shapes = _shapes(nodes)
  with _errors.labelled(caller):
    axis_of = _fold.axis_of(axis)
    wrapped = {} if nodes_only else _structure.wrapped_parameters(shapes, 'use the pytree route')

  def kept(path: tuple, x: Any) -> Any:
    if isinstance(x, _tree.WeightNormed):
      with _errors.labelled(caller):
        return _axes.kept_axes(jnp.ndim(x.v), x.axis)
    if nodes_only:
      return None
    keys = _tree.path_keys(path) if not is_node(x) else ()
    owner = _owner(keys, shapes) or wrapped.get(keys)
    return None if owner is None else _layer_kept(*owner, shapes[keys], axis_of, caller)

  return [kept(path, x) for path, x in nodes]


def _refuse_hidden_scales(params: Any, caller: str) -> None:
  """A ``ValueError`` where ``optax.masked`` passes a WN layer's ``kernel`` with its ``scale``
  masked out: a WN layer is found by the two together, so its kernel would silently not count.
  (A ``WeightNorm`` wrapper's masked ``scale`` tree shows no shapes, and names alone would
  refuse plain modules: not checked.)"""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0]
  masked = {_tree.path_keys(p): is_masked(x) for p, x in leaves}
  hidden = [
    k[:-1]
    for k, m in masked.items()
    if k[-1:] == ('kernel',) and not m and masked.get((*k[:-1], 'scale'))
  ]
  if hidden:
    names = ', '.join(_stacking.layer_name('/'.join(k)) for k in hidden)
    raise ValueError(
      f"{caller}: optax.masked's mask selects the kernel of {names} but not the scale beside "
      f'it. A WN layer is found by its kernel and scale together, so that kernel would not '
      f'count. Put each scale in the mask too (its update passes unchanged), or leave the '
      f"kernel out. (A plain submodule named 'scale' beside a kernel, which a prefix mask "
      f'hides whole: spell the mask per leaf.)'
    )


def _owner(keys: Keys, shapes: dict[Keys, Shape]) -> tuple[Keys, Shape] | None:
  """A WN layer's ``kernel``: its layer's path and its ``scale``'s shape (else ``None``)."""
  scale = _structure.wn_layer_scale(shapes, keys)
  return None if scale is None else (keys[:-1], scale)


def _layer_kept(
  owner: Keys, g_shape: Shape, v_shape: Shape, axis_of: Callable[[str], Any], caller: str
) -> tuple[int, ...]:
  """The kept axes of the layer at ``owner``: ``axis`` there, checked against its scale."""
  where = '/'.join(owner)
  with _errors.labelled(caller):
    _fold.check_in_order(where, v_shape, g_shape)
    a = axis_of(where)
    if isinstance(a, str):
      a = _fold.inferred(where, v_shape, g_shape)
    with _errors.labelled(_stacking.layer_name(where)):
      kept = _axes.kept_axes(len(v_shape), a)
  if _axes.scale_shape(v_shape, kept) != g_shape:
    raise ValueError(
      f'{caller}: {_stacking.layer_name(where)}: its scale has shape {g_shape}, but a kernel '
      f'of shape {v_shape} keeping axis {a!r} needs {_axes.scale_shape(v_shape, kept)}. Pass '
      f"each layer's own axis: axis=layer_axes(model, ...), or a mapping {{'{where}': ...}}."
    )
  return kept


def decay_mask(params: Any) -> Any:
  """A mask for weight decay that never decays a magnitude ``g``.

  ``True`` for every leaf but the magnitudes, recognised by structure (a name alone
  decides nothing: an AdaLN's ``nn.Dense(name='scale')`` is decayed like any layer):

  - ``g`` of a :class:`wn_jax.WeightNormed`;
  - a WN layer's ``scale`` (linen or NNX): an array beside a ``kernel`` whose shape is
    the kernel's along some axes, e.g. ``(out,)`` for an ``(in, out)`` kernel, ``()`` for
    ``axis=None``, ``(out, layers)`` for one stacked along a middle axis;
  - a ``WeightNorm`` wrapper's ``scale`` tree (linen or NNX): a tree whose only
    neighbours are the wrapped ``layer`` (or none: a linen layer built by the parent
    keeps its parameters beside the wrapper), that mirrors the layer's parameters, each
    of its arrays at the path of a layer parameter and shaped like it along a strict
    subset of its axes (a wrapper keeping every axis is not recognised, and is decayed).

  A ``scale`` array without such a ``kernel`` (LayerNorm's), or whose shape does not
  fit it, is decayed as usual. Decaying ``g`` would shrink the weights' length, which
  weight decay on ``v`` leaves alone (``w`` does not depend on ``||v||``). Pass it as
  ``optax.adamw(lr, mask=wn_jax.optim.decay_mask)``.

  A hand-written module with a ``kernel`` and a ``scale`` shaped like its kept axes
  reads as a WN layer; give it another name to have it decayed.

  Args:
    params: parameters: a linen params dict, an NNX ``State``, or a tree with
      ``WeightNormed`` leaves.

  Returns:
    A pytree of bools with the structure of ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp, wn_jax
    >>> layer = wn_jax.linen.WNDense(2)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3)))['params']
    >>> wn_jax.optim.decay_mask(params)
    {'bias': True, 'kernel': True, 'scale': False}
    >>> wn_jax.optim.decay_mask({'scale': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}})
    {'scale': {'bias': True, 'kernel': True}}
  """
  _boxes.refuse_module(params, 'wn_jax.optim.decay_mask')
  shapes = _shapes(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0])

  wrapper_scale = functools.cache(lambda prefix: _structure.is_wrapper_scale(shapes, prefix))

  def is_magnitude(keys: Keys) -> bool:
    return any(
      k == 'scale'
      and (
        _structure.wn_layer_scale(shapes, keys[:i] + ('kernel',)) is not None
        if i == len(keys) - 1
        else wrapper_scale(keys[: i + 1])
      )
      for i, k in enumerate(keys)
    )

  def mask(path, leaf):
    if isinstance(leaf, _tree.WeightNormed):
      return _tree.WeightNormed(True, False, leaf.axis)
    return not is_magnitude(_tree.path_keys(path))

  return jax.tree_util.tree_map_with_path(mask, params, is_leaf=is_node)


def direction_stats(
  params: Any, updates: Any = None, *, axis: _fold.AxisSpec = _fold.INFER
) -> dict[str, jax.Array]:
  r"""Per-direction norms and effective step sizes, for a training loop to log.

  For each direction $v$ that :func:`wn_jax.optim.project_directions` finds (same rule, same
  ``axis``), averaged over its slices $j$ (one per ``g`` entry):

  - ``'<path>/norm'``: the mean of $\lVert v_j \rVert$;
  - ``'<path>/step'`` (with ``updates``): the mean of $\lVert \Delta v_j \rVert / \lVert
    v_j \rVert$, the effective step: how far the step turns the direction of $w$.

  Why it matters (Salimans & Kingma, section 2.2): with $w = g \, v / \lVert v \rVert$,
  $\nabla_v L = \frac{g}{\lVert v \rVert} (I - u u^\top) \nabla_w L$, $u = v / \lVert v
  \rVert$: orthogonal to $v$ and scaled by $g / \lVert v \rVert$. A gradient step then
  makes $\lVert v \rVert$ grow ($\lVert v + \Delta v \rVert^2 = \lVert v \rVert^2 +
  \lVert \Delta v \rVert^2$), and the effective step shrinks like $1 / \lVert v
  \rVert^2$ for SGD (like $1 / \lVert v \rVert$ for Adam, whose step size does not scale
  with the gradient): an implicit learning-rate decay.
  :func:`wn_jax.optim.project_directions` holds $\lVert v \rVert$ fixed, which keeps the
  effective step at the one the learning rate sets (Lyle et al., 2024; Hoffer et al., 2018).

  Args:
    params: the parameters (linen, NNX state or pure dict, or a tree with
      ``WeightNormed`` nodes, e.g. ``weight_norm``'s ``state.directions``).
    updates: the updates of the step (as the optimizer returns them), or ``None``.
    axis: the kept axis of WN layers and wrappers, as in
      :func:`wn_jax.optim.project_directions`.

  Returns:
    A flat dict of float32 scalars keyed ``'<path>/norm'`` and ``'<path>/step'``, the path
    ``/``-joined (``'Dense_0/kernel'``). Works under ``jit``.

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> params = wn_jax.weight_norm({'w': jnp.array([[3.0, 0.0], [4.0, 2.0]])})
    >>> updates = wn_jax.WeightNormed(jnp.array([[0.4, 0.0], [-0.3, 1.0]]), jnp.zeros(2))
    >>> stats = wn_jax.optim.direction_stats(params, {'w': updates})
    >>> round(float(stats['w/norm']), 6), round(float(stats['w/step']), 6)  # (5+2)/2, (.1+.5)/2
    (3.5, 0.3)
  """
  params = unwrap(params)
  kept = direction_axes(params, axis, 'wn_jax.optim.direction_stats')
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]
  if updates is None:
    update_nodes: list[Any] = [None] * len(flat)
  else:  # paired by position: updates must have the structure of params
    pairs = jax.tree_util.tree_flatten_with_path(unwrap(updates), is_leaf=is_node)[0]
    want, got = ({'/'.join(_tree.path_keys(p)) for p, _ in nodes} for nodes in (flat, pairs))
    if len(pairs) != len(flat) or want != got:
      raise ValueError(
        'wn_jax.optim.direction_stats: updates must have the structure of params (pass the '
        f'updates the optimizer returns for them); missing from updates: {sorted(want - got)}, '
        f'not in params: {sorted(got - want)}.'
      )
    update_nodes = [u for _, u in pairs]
  out = {}
  for (path, x), u, k in zip(flat, update_nodes, kept):
    if k is None:
      continue
    name = '/'.join(_tree.path_keys(path))
    n = _core.norm(direction(x), k)
    out[f'{name}/norm'] = jnp.mean(n)
    if u is not None:
      safe = jnp.where(n > 0, n, 1.0)
      out[f'{name}/step'] = jnp.mean(_core.norm(direction(u), k) / safe)
  return out
