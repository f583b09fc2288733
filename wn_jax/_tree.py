"""The pytree level: ``WeightNormed`` leaves, ``weight_norm`` and ``materialize``."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from wn_jax import _axes
from wn_jax import _boxes
from wn_jax import _core
from wn_jax import _structure
from wn_jax._errors import labelled

PyTree = Any
Where = None | str | re.Pattern | Callable[[tuple, Any], bool]


@jax.tree_util.register_pytree_with_keys_class
class WeightNormed:
  r"""A weight stored as direction ``v`` and magnitude ``g``: $w = g \, v / \lVert v \rVert$.

  A registered pytree node: ``v`` and ``g`` are its array leaves (so optimizers train
  both), ``axis`` (the kept axis or axes, as in :func:`wn_jax.normalize`) is static
  data. ``g`` has the shape of ``v`` along ``axis``. Build one with
  :func:`wn_jax.weight_norm` (function-preserving: ``g = ||v||``) or directly.

  Attributes:
    v: the direction, e.g. a Dense kernel of layout ``(in, out)``.
    g: the magnitude, e.g. shape ``(out,)`` for ``axis=-1``.
    axis: the kept axis or axes (``None``: the whole tensor, scalar ``g``).

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> p = wn_jax.WeightNormed(jnp.array([[3.0], [4.0]]), jnp.array([1.0]))
    >>> wn_jax.materialize(p)
    Array([[0.6],
           [0.8]], dtype=float32)
  """

  __slots__ = ('v', 'g', 'axis')

  def __init__(self, v: Any, g: Any, axis: _axes.Axis = -1):
    self.v = v
    self.g = g
    self.axis = _static_axis(axis)

  def tree_flatten_with_keys(self):
    keys = jax.tree_util.GetAttrKey
    return ((keys('v'), self.v), (keys('g'), self.g)), self.axis

  @classmethod
  def tree_unflatten(cls, axis, children):
    return cls(*children, axis=axis)

  def __repr__(self) -> str:
    def show(x):
      if isinstance(x, _boxes.kinds()):  # a box (weight_norm of boxed parameters): its kind
        return f'{type(x).__name__}({show(_boxes.unboxed(x))})'
      is_array = hasattr(x, 'shape') and hasattr(x, 'dtype')  # a NumPy dtype has a shape
      return f'{x.dtype}{list(x.shape)}' if is_array else repr(x)

    return f'WeightNormed(v={show(self.v)}, g={show(self.g)}, axis={self.axis!r})'

  def weight(self) -> Any:
    """The weight ``g * v / ||v||`` this node stands for (in ``v``'s box where it has one)."""
    try:
      w = _core.normalize(_boxes.unboxed(self.v), _boxes.unboxed(self.g), self.axis)
    except ValueError as e:
      raise ValueError(
        f'{self!r}: {e} Rebuild it with wn_jax.weight_norm, or fix the node (its v, g, axis).'
      ) from None
    return _boxes.reboxed(self.v, w)


def _static_axis(axis: Any) -> Any:
  """``axis`` as hashable static data: NumPy integers as ints, a sequence as a tuple.

  Bad values are kept as they are, for :func:`wn_jax._axes.kept_axes` to refuse by name.

  >>> import numpy as np
  >>> _static_axis(np.int64(-1)), _static_axis([np.int32(0), 1]), _static_axis(None)
  (-1, (0, 1), None)
  """

  def one(a: Any) -> Any:
    try:
      return a if isinstance(a, bool) else operator.index(a)
    except TypeError:
      return a

  # A 0-d array (optax.inject_hyperparams makes every number one) is a scalar, not a sequence.
  scalar = isinstance(axis, (jax.Array, np.ndarray)) and axis.ndim == 0
  if axis is None or isinstance(axis, (bool, str)) or scalar or not hasattr(axis, '__iter__'):
    return one(axis)
  return tuple(one(a) for a in axis)


def _to_state_dict(node: WeightNormed) -> dict[str, Any]:
  return {
    'v': serialization.to_state_dict(node.v),
    'g': serialization.to_state_dict(node.g),
  }


def _from_state_dict(target: WeightNormed, state: dict[str, Any]) -> WeightNormed:
  inner = state.get('value') if set(state) == {'value'} else None
  if isinstance(target.v, _boxes.kinds()) and isinstance(inner, dict) and set(inner) == {'v', 'g'}:
    # Saved before weight_norm moved a linen box inside the node: {'value': {'v', 'g'}}.
    state = {k: {'value': inner[k]} for k in ('v', 'g')}
  if set(state) != {'v', 'g'}:
    raise ValueError(
      f'wn_jax.WeightNormed: a restored state needs exactly the keys v and g; got '
      f'{sorted(state)}. The checkpoint does not hold this WeightNormed node.'
    )
  return WeightNormed(
    serialization.from_state_dict(target.v, state['v'], name='v'),
    serialization.from_state_dict(target.g, state['g'], name='g'),
    target.axis,
  )


# flax.serialization (to_bytes/from_bytes, to_state_dict/from_state_dict): `v` and `g`
# by name; `axis` is static and comes from the target.
serialization.register_serialization_state(WeightNormed, _to_state_dict, _from_state_dict)


def _is_wn(x: Any) -> bool:
  return isinstance(x, WeightNormed)


def _is_lost_node(x: Any) -> bool:
  """A plain ``{'v', 'g'}`` dict of arrays whose ``g`` fits ``v``: a ``WeightNormed``
  restored without a target (orbax, msgpack), its static ``axis`` lost."""
  return (
    type(x) is dict
    and set(x) == {'v', 'g'}
    and all(hasattr(x[k], 'shape') for k in ('v', 'g'))
    and _axes.fits_kept_axes(tuple(x['g'].shape), tuple(x['v'].shape))
  )


def param_path(path: tuple) -> tuple:
  """A leaf's key path less the trailing ``value`` of the box holding it (an ``nnx.Variable``,
  a ``Partitioned``): ``kernel/value`` -> ``kernel``, what ``where`` is matched against."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    return path[:-1]
  return path


def path_str(path: tuple) -> str:
  """A key path as a ``/``-joined string, e.g. ``'params/Dense_0/kernel'``."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return '/'.join(parts)


def _is_floating_matrix(leaf: Any) -> bool:
  return (
    isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))
    and jnp.issubdtype(leaf.dtype, jnp.floating)
    and leaf.ndim >= 2
  )


def path_keys(path: tuple) -> tuple[str, ...]:
  """A leaf's parameter path (:func:`param_path`) as a tuple of key strings."""
  return tuple(path_str(param_path(path)).split('/'))


def selector(where: Where, params: PyTree) -> Callable[[tuple, Any], bool]:
  """Turns ``where`` into a predicate ``(path, leaf) -> bool`` over the leaves of ``params``.

  ``None``: every floating array leaf with ``ndim >= 2`` but a ``bias`` and what a layer of
  ``params`` weight-normalizes already (:func:`wn_jax._structure.layer_normalized`). A
  string (or a compiled ``re.Pattern``): a regular expression searched (``re.search``) in
  the ``/``-joined key path. A callable: used as it is.
  """
  if where is None:
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_wn)[0]
    shapes = {
      path_keys(p): tuple(x.shape) for p, x in leaves if hasattr(x, 'shape') and not _is_wn(x)
    }
    fix = "pass where= naming the weights to weight-normalize (e.g. where=r'^Dense_1/kernel$')"
    taken = _structure.layer_normalized(shapes, fix)

    def plain_matrix(path: tuple, leaf: Any) -> bool:
      keys = path_keys(path)
      return _is_floating_matrix(leaf) and keys[-1] != 'bias' and keys not in taken

    return plain_matrix
  if isinstance(where, (str, re.Pattern)):
    try:
      pattern = re.compile(where)
    except re.error as e:
      raise ValueError(f'where={where!r} is not a valid regular expression: {e}.') from None
    return lambda path, leaf: hasattr(leaf, 'shape') and pattern.search(path_str(path)) is not None
  if callable(where):
    return where
  raise ValueError(
    f'where must be None, a regular expression string or a callable '
    f'(path, leaf) -> bool; got {type(where).__name__}.'
  )


@labelled('wn_jax.weight_norm')
def weight_norm(params: PyTree, axis: _axes.LeafAxis = -1, *, where: Where = None) -> PyTree:
  r"""Replaces the selected leaves of ``params`` by :class:`WeightNormed` nodes.

  Each selected weight ``w`` becomes ``WeightNormed(v=w, g=||w||, axis)``, so
  :func:`materialize` gives back ``w`` and the function the parameters compute is
  unchanged. Works on any pytree: Flax linen params, an NNX ``State``, an Equinox
  module, plain dicts and lists. Leaves that already are ``WeightNormed`` are kept. A linen
  weight boxed with partition names (``nn.with_partitioning``'s ``nn.Partitioned``) gives
  ``WeightNormed(v=box(v), g=box(g))``, ``g``'s box naming the partitions of the kept axes, so
  Flax's sharding helpers shard both; an NNX variable holds the node whole (NNX's state tools
  read variables as leaves). An abstract leaf (``jax.ShapeDtypeStruct``) gives an abstract
  node, a restore target: ``g`` sharded over the leaf's mesh like its kept axes, or on the
  leaf's one device.

  Args:
    params: a pytree of arrays.
    axis: the kept axis or axes of every selected leaf (default ``-1``: the output
      features of Flax ``Dense`` ``(in, out)`` and ``Conv`` ``(*window, in, out)``
      kernels), or ``None`` for one scalar ``g`` per tensor; or each leaf's own: a mapping
      from the ``/``-joined path of every selected leaf to its axis, or a callable
      ``path -> axis`` on that path. A layer stacked by ``nn.scan`` / ``nnx.vmap`` along its
      first axis keeps that axis too: ``axis=(0, -1)`` (with ``-1``, one ``g`` spans every
      layer); beside unstacked layers, give each its own (``{'layers/kernel': (0, -1),
      'head/kernel': -1}``). One axis that keeps every axis of some selected matrices but
      not of others is refused (each entry of those its own slice, no direction left).
    where: which leaves: ``None`` (every floating leaf with ``ndim >= 2`` but a ``bias``
      (a stacked layer's is a matrix) and what a WN layer or a ``WeightNorm`` wrapper of
      ``params`` normalizes already: its kernel and scale, read by structure, as
      :func:`wn_jax.optim.decay_mask` reads them: any ``kernel`` beside a ``scale`` shaped
      like it along kept axes; name them to take them), a regular
      expression searched in the ``/``-joined key path (e.g. ``'kernel'``), or a callable
      ``(path, leaf) -> bool``, ``path`` a JAX key path (``(DictKey(key='kernel'),)``, as
      ``jax.tree_util.tree_map_with_path`` gives it: compare ``path[-1].key``).

  Returns:
    ``params`` with the selected leaves replaced; ``params`` itself is not modified.

  Raises:
    ValueError: if ``where`` selects nothing, or a selected leaf is not floating, does not
      have ``axis`` or has no axis in a mapping, or if one axis keeps every axis of some
      matrices only.

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> params = {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}
    >>> wn = wn_jax.weight_norm(params)
    >>> wn['kernel']
    WeightNormed(v=float32[3, 2], g=float32[2], axis=-1)
    >>> bool(jnp.allclose(wn_jax.materialize(wn)['kernel'], params['kernel']))
    True
  """
  _boxes.refuse_module(params, 'wn_jax.weight_norm')
  return _boxes.apart(decomposed(params, axis, where), WeightNormed)


# decomposed's fix for a wrapper, whose axis is one for all its parameters.
WRAPPER_FIX = (
  'Narrow where= to the parameters this axis fits, or wrap the others in a WeightNorm of their own.'
)


def decomposed(
  params: PyTree,
  axis: _axes.LeafAxis,
  where: Where,
  fix: str = "Pass each leaf its own axis: a mapping {{'{path}': -1, ...}} from every selected "
  "leaf's path, or a callable path -> axis.",
) -> PyTree:
  """:func:`weight_norm` without its label: for the wrappers and the optimizer, whose errors
  name themselves (``fix``: what to do for one axis that keeps every axis of some matrices)."""
  named = set(axis) if isinstance(axis, Mapping) else None  # a mapping's paths
  axis_at = _axes.axis_at(axis)
  whole: dict[str, bool] = {}  # each matrix's path: whether its axis keeps all its axes

  def one(path: str, leaf: Any) -> WeightNormed:
    a = axis_at(path)
    if jnp.ndim(leaf) >= 2:
      whole[path] = len(_axes.kept_axes(jnp.ndim(leaf), a)) == jnp.ndim(leaf)
    if isinstance(leaf, jax.ShapeDtypeStruct):  # an abstract restore target
      return WeightNormed(leaf, _axes.abstract_scale(leaf, _axes.kept_axes(leaf.ndim, a)), a)
    return WeightNormed(*_core.decompose(leaf, a), a)

  out = replace_selected(params, where, one)
  selected = _node_paths(out)
  extra = [] if named is None else sorted(named - selected)
  if extra:
    raise ValueError(
      f'axis names {extra}, which where= did not select (or no such leaf): the selected '
      f'leaves are {sorted(selected)[:6]}. Fix the paths, or select them with where=.'
    )
  if named is None and len(set(whole.values())) > 1:  # one rule: the stack's axes elsewhere
    path = next(p for p, every in whole.items() if every)
    raise ValueError(
      f'leaf {path!r}: axis {axis!r} keeps every axis of this weight, but not of others (a '
      f"stack's axes reaching an unstacked layer?): each entry would be its own slice, "
      f'w = g * sign(v), with no direction left. {fix.format(path=path)}'
    )
  return out


def _node_paths(tree: PyTree) -> set[str]:
  """The ``/``-joined paths of ``tree``'s ``WeightNormed`` nodes."""
  nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_wn)[0]
  return {path_str(param_path(p)) for p, x in nodes if _is_wn(x)}


def replace_selected(
  params: PyTree,
  where: Where,
  fn: Callable[[str, Any], Any],
  *,
  required: bool = True,
) -> PyTree:
  """``params`` with every leaf ``where`` selects replaced by ``fn(path, leaf)``, ``path``
  the leaf's ``/``-joined parameter path (:func:`param_path`).

  ``WeightNormed`` leaves are kept and count as selected; selecting nothing is an error
  unless ``required`` is False.
  """
  select = selector(where, params)
  count = 0

  def convert(path, leaf):
    nonlocal count
    if _is_wn(leaf):  # already weight-normed: kept, and counts as selected
      count += 1
      return leaf
    if not select(param_path(path), leaf):
      return leaf
    count += 1
    name = path_str(param_path(path))
    try:
      return fn(name, leaf)
    except ValueError as e:
      raise ValueError(f'leaf {name!r}: {e}') from None

  out = jax.tree_util.tree_map_with_path(convert, params, is_leaf=_is_wn)
  if count == 0 and required:
    raise ValueError(
      f'where={where!r} selected no leaf of the parameters (they are '
      f'{_some_paths(params)}). {_where_hint(where, params)}'
    )
  return out


def _where_hint(where: Where, params: PyTree) -> str:
  """How ``where`` selects, for the error of a ``where`` that selected nothing."""
  nodes = jax.tree_util.tree_flatten_with_path(params)[0]
  if callable(where) and nodes:
    return (
      f'A callable gets (path, leaf) with path a JAX key path, such as '
      f'{param_path(nodes[0][0])!r}: '
      f'compare path[-1].key, or pass a regular expression searched in the /-joined path.'
    )
  names = [path_keys(p)[-1] for p, x in nodes if _is_floating_matrix(x)]
  name = next((n for n in names if n != 'bias'), 'kernel')
  return (
    f'Pass a regular expression searched in the /-joined key path (e.g. where={name!r}) or '
    'a callable (path, leaf) -> bool; where=None selects every floating leaf with ndim >= 2 '
    "but a bias and a WN layer's or wrapper's own parameters."
  )


def _some_paths(params: PyTree, limit: int = 6) -> str:
  paths = [path_str(param_path(p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  more = f', ... ({len(paths)} in all)' if len(paths) > limit else ''
  return ', '.join(repr(p) for p in paths[:limit]) + more if paths else 'none'


def materialize(params: PyTree) -> PyTree:
  r"""Replaces every :class:`WeightNormed` node by its weight $g \, v / \lVert v \rVert$.

  All other leaves are returned untouched. Use it inside the loss, so gradients flow
  to ``v`` and ``g``: ``model.apply({'params': materialize(wn_params)}, x)``.

  Args:
    params: a pytree that may hold ``WeightNormed`` nodes.

  Returns:
    The same tree with plain weights in their place.

  Raises:
    ValueError: naming the key path, for a node whose ``g`` does not fit its ``v``, and
      for a plain dict ``{'v': ..., 'g': ...}`` whose ``g`` could be ``v``'s magnitude:
      a ``WeightNormed`` restored without a target (orbax ``restore(path)``), whose
      static ``axis`` is lost. Restore with a target that holds ``WeightNormed`` nodes.

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> p = wn_jax.weight_norm({'w': jnp.array([[3.0, 0.0], [4.0, 2.0]])})
    >>> wn_jax.materialize(p)['w']
    Array([[3., 0.],
           [4., 2.]], dtype=float32)
  """
  _boxes.refuse_module(params, 'wn_jax.materialize')
  return weights(params, check_lost=True)


def weights(params: PyTree, *, check_lost: bool = False) -> PyTree:
  """:func:`materialize`; the ``{'v', 'g'}`` dict check only with ``check_lost``. The
  optimizer forms its own trees (its nodes intact) around the user's other parameters, which
  may hold a module's own ``v`` and ``g``."""

  def one(path, x):
    if check_lost and _is_lost_node(x):
      raise ValueError(
        f'wn_jax.materialize: {path_str(path)!r} is a plain dict with keys v '
        f'{list(x["v"].shape)} and g {list(x["g"].shape)}: a WeightNormed node restored '
        f'without a target (orbax `restore(path)` and `flax.serialization.msgpack_restore` '
        f'give dicts and lose the static axis). Restore with a target holding WeightNormed '
        f'nodes (`ckptr.restore(path, abstract_params)`, `flax.serialization.from_bytes('
        f'params, data)`), or rebuild the node: wn_jax.WeightNormed(d["v"], d["g"], axis).'
      )
    if not _is_wn(x):
      return x
    try:
      return x.weight()
    except ValueError as e:
      raise ValueError(f'wn_jax.materialize: node {path_str(path)!r}: {e}') from None

  return jax.tree_util.tree_map_with_path(
    one, params, is_leaf=lambda x: _is_wn(x) or (check_lost and _is_lost_node(x))
  )
