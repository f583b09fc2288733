"""``WeightNorm``: weight-normalizes the parameters of any NNX module."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from collections.abc import MutableMapping
from collections.abc import MutableSequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.nnx import traversals

from wn_jax import _axes
from wn_jax import _core
from wn_jax import _errors
from wn_jax import _kernel
from wn_jax import _tree
from wn_jax import _wrapping
from wn_jax._tree import WeightNormed
from wn_jax.nnx._layers import Initializer
from wn_jax.nnx._layers import _scale_param
from wn_jax.nnx._layers import _WeightNormedKernel


def _child(state: Any, key: Any) -> Any:
  """``state[key]``, where a list index may come as a string or an int."""
  for k in (key, str(key), int(key) if str(key).isdigit() else key):
    if k in state:
      return state[k]
  return state[key]


def _to_params(tree: Any, kernels: Any, axis: _core.Axis, where: str) -> Any:
  """The scale tree as ``nnx.Param`` s, each sharded like its kernel (``kernels``: the state)."""
  if isinstance(tree, dict):
    return nnx.Dict(
      {str(k): _to_params(v, _child(kernels, k), axis, where) for k, v in tree.items()}
    )
  with _errors.labelled(where):
    kept = _axes.kept_axes(kernels.ndim, axis)
  return _scale_param(kernels, tree, kept)


def _one_layer_shapes(wn: Any) -> tuple:
  """``(path, v shape, g shape)`` of each ``WeightNormed`` node of ``wn``, as one layer has
  them (``layer_axes`` reads a stacked wrapper's axes from them)."""
  nodes = jax.tree_util.tree_leaves_with_path(wn, is_leaf=lambda x: isinstance(x, WeightNormed))
  return tuple(
    (_tree.path_keys(path), tuple(x.v.shape), tuple(x.g.shape))
    for path, x in nodes
    if isinstance(x, WeightNormed)
  )


class WeightNorm(nnx.Module):
  r"""Weight-normalizes the ``nnx.Param`` s of any NNX module.

  Each selected parameter ``v`` of ``layer`` is used as ``w = g * v / ||v||``. ``layer``
  keeps ``v`` in its own parameters (never overwritten); ``g`` lives in ``self.scale``,
  a nested ``nnx.Dict`` of ``nnx.Param`` that mirrors the layer's parameter paths, with
  string keys (``model.scale['kernel']``, ``model.scale['layers']['0']['kernel']``), so
  ``nnx.Optimizer(..., wrt=nnx.Param)`` trains it. Non-parameter state that the layer
  updates in its forward pass (e.g. ``BatchStat``) is carried back to it, and so are the
  plain attributes (numbers, strings, shapes; not arrays, submodules or callables) its
  methods set or delete, as ``nnx.jit`` does.

  The wrapper stands for the layer: calling it, or any method of the layer through it
  (``wrapper.attend(q)`` for an ``nnx.Embed``), runs that method with every selected
  parameter replaced by its ``w``. The layer's other attributes are forwarded as they are
  (``num_feature_axes``: so ``nnx.RNN(WeightNorm(nnx.LSTMCell(...)))`` works), except one
  that holds parameters or submodules (which hold or compute with ``v``): it is refused.
  ``.layer`` is the wrapped layer itself: its methods compute with ``v``, not ``w``.

  Args:
    layer: the NNX module to wrap (a ``flax.nnx.Module``).
    axis: the kept axis or axes of every selected parameter (default ``-1``).
    where: which parameters: a regular expression searched in the ``/``-joined path
      (default: every ``kernel``), or a callable ``(path, leaf) -> bool``, ``path`` a JAX
      key path (compare ``path[-1].key``).
    scale_init: ``None`` (``g = ||v||``: the wrapped layer's function is unchanged) or a
      Flax initializer (then ``rngs`` is needed).
    epsilon: a lower bound on each ``||v||`` (default ``0``: none), as
      :func:`wn_jax.normalize`'s ``eps``. Flax's ``1e-12`` is not needed against zero
      slices here (they give ``w = 0`` and finite gradients).
    param_dtype: the dtype of ``scale`` (default ``None``: that of the parameter it
      scales). ``jnp.float32`` keeps a float32 magnitude for a float16 kernel; ``w`` is
      then float32 (the wider dtype, below), so a layer with ``dtype=None`` computes and
      returns float32: give the layer ``dtype=jnp.float16`` to keep float16 activations.
    rngs: for ``scale_init``.

  Flax's ``use_scale=False`` ($w = v / \lVert v \rVert$, no trained length) is not an
  option: it is ``scale_init=nnx.initializers.ones`` with ``scale`` left out of the
  optimizer (``nnx.Optimizer(..., wrt=...)``). Nor is a ``dtype`` of the wrapper's own: each
  ``w`` is formed in the layer's compute dtype, as follows.

  Raises:
    TypeError: if ``layer`` is not a ``flax.nnx.Module``.
    ValueError: naming the layer, if it has no parameters, or if ``where`` selects a
      parameter of a module that is weight-normalized already (a ``WN*`` layer, another
      ``WeightNorm``).

  Each ``scale`` is sharded like its kernel's kept axes (the kernel's ``out_sharding``
  metadata, from ``nnx.with_partitioning``). Each ``w`` is formed in the wider of its
  parameters' dtype and the layer's ``dtype`` attribute when it has one that is not
  ``None``; otherwise in the promotion with the call's floating inputs.

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> from flax import nnx
    >>> model = wn_jax.nnx.WeightNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> model.scale['kernel'].shape
    (3,)
    >>> bool(jnp.allclose(model(jnp.ones((1, 2))), model.layer(jnp.ones((1, 2)))))
    True
  """

  def __init__(
    self,
    layer: nnx.Module,
    *,
    axis: _core.Axis = -1,
    where: _tree.Where = r'(^|/)kernel$',
    scale_init: Initializer | None = None,
    epsilon: float = 0.0,
    param_dtype: Any = None,
    rngs: nnx.Rngs | None = None,
  ):
    if not isinstance(layer, nnx.Module):
      raise _wrapping.not_a_layer(
        'wn_jax.nnx.WeightNorm', 'flax.nnx.Module', 'nnx.Linear(2, 3, rngs=nnx.Rngs(0))', layer
      )
    if not _core.is_eps(epsilon):
      raise ValueError(
        f'wn_jax.nnx.WeightNorm: epsilon must be a finite non-negative number; got {epsilon!r}.'
      )
    self.layer = layer
    self.axis = axis
    self.where = where
    self.epsilon = epsilon
    pure = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    owners: dict[tuple[str, ...], str] = {}
    for path, m in nnx.iter_modules(layer):
      if isinstance(m, (WeightNorm, _WeightNormedKernel)):
        keys = tuple(str(k) for k in path)
        owners.update(
          _wrapping.weight_normed_parts(keys, type(m).__name__, isinstance(m, WeightNorm))
        )
    try:
      _wrapping.check_wrappable(pure, where, owners)
      wn = _tree.decomposed(pure, axis, where, _tree.WRAPPER_FIX)
    except ValueError as e:
      raise ValueError(f'{self._where()}: {e}') from None
    if callable(scale_init) and rngs is None:
      raise ValueError(f'{self._where()}: a scale_init needs rngs=nnx.Rngs(...).')

    key = None if rngs is None else rngs.params
    with _errors.labelled(self._where()):
      scales = _wrapping.map_selected(
        wn, lambda x: _wrapping.initial_scale(x, scale_init, param_dtype, key)
      )
    self.scale = _to_params(scales, nnx.state(layer, nnx.Param), axis, self._where())
    self._step_shapes = _one_layer_shapes(wn)  # one layer's, where a transform stacks it

  def _where(self) -> str:
    return f'wn_jax.nnx.WeightNorm({type(self.layer).__name__})'

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self._mapped('__call__', args, kwargs)

  def __getattr__(self, name: str) -> Any:
    layer = vars(self).get('layer')
    if name.startswith('_') or not isinstance(layer, nnx.Module):
      raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')
    method = inspect.getattr_static(type(layer), name, None)
    if inspect.isfunction(method) and name not in vars(layer):  # an attribute's function: no method

      def forward(*args: Any, **kwargs: Any) -> Any:
        return self._mapped(name, args, kwargs)

      forward.__name__ = forward.__qualname__ = name
      return forward
    value = getattr(layer, name)
    if any(
      isinstance(x, (nnx.Module, nnx.Variable, jax.Array))
      for x in jax.tree_util.tree_leaves(value, is_leaf=lambda x: isinstance(x, nnx.Variable))
    ):
      raise AttributeError(
        f"{self._where()}: '{name}' of the wrapped layer holds parameters or submodules, "
        f'which hold or compute with the direction v, not the weight w. Call the '
        f"layer's methods through the wrapper, or reach the raw one as .layer.{name}."
      )
    return value

  def _mapped(self, method: str, args: tuple, kwargs: dict) -> Any:
    """``layer.<method>(*args, **kwargs)`` with each selected parameter replaced by its ``w``."""
    graphdef, params, rest = nnx.split(self.layer, nnx.Param, ...)  # type: ignore[misc]
    flat = dict(nnx.to_flat_state(params))  # the layer's own Param objects
    with _errors.labelled('wn_jax.nnx.WeightNorm'):
      directions = _tree.replace_selected(
        traversals.unflatten_mapping({path: x.get_value() for path, x in flat.items()}),
        self.where,
        lambda _, v: _tree.WeightNormed(v, None, self.axis),
      )
    where, layer_dtype = self._where(), getattr(self.layer, 'dtype', None)

    def weight(x: _tree.WeightNormed) -> jax.Array:
      return _kernel.weight(x, layer_dtype, (args, kwargs), self.epsilon)

    with _errors.labelled(where):  # and each error by its leaf
      weights = traversals.flatten_mapping(
        _wrapping.map_selected(directions, weight, _values(self.scale))
      )
    # Every parameter a new Param (w where selected): the method runs on a copy.
    copy = {path: x.replace(weights[path]) for path, x in flat.items()}
    layer = nnx.merge(graphdef, nnx.from_flat_state(copy), rest)
    out = getattr(layer, method)(*args, **kwargs)
    if not _left_nothing(self.layer, layer, set()):
      _carry_back(self.layer, layer, self._where(), method)
    _carry_static(self.layer, layer)
    return out


def _values(scale: Any) -> dict:
  """The arrays of a ``scale`` tree (``nnx.Param`` s in ``nnx.Dict`` s, or in dicts a user put
  there), as nested dicts. Other entries (``nnx.capture`` puts its own on every module) are
  left out."""
  return {
    k: v.get_value() if isinstance(v, nnx.Param) else _values(v)
    for k, v in scale.items()
    if isinstance(v, (nnx.Param, Mapping))
  }


def _left_nothing(target: Any, source: Any, seen: set[int]) -> bool:
  """Whether a call on ``source`` (a copy of ``target``) left nothing for :func:`_carry_back`:
  no variable but parameters, no array or object it replaced, and no node (a module, an
  ``nnx.Rngs``, a container) that ``target`` lacks. A walk of the nodes' attributes: the
  state's walk and update that :func:`_carry_back` does took 18% of a wrapped
  ``nnx.Linear``'s eager call. Plain values (numbers, strings) are :func:`_carry_static`'s.
  """
  if id(source) in seen:
    return True
  seen.add(id(source))
  # A node: a module, an nnx.Rngs, an nnx.List or nnx.Dict; else a mapping, a list or a tuple.
  if not isinstance(source, (nnx.Pytree, Mapping)) and len(source) != len(target):
    return False
  for _, old, value in _children(target, source, nnx.Pytree):
    if value is old or value is None or isinstance(value, _PLAIN):
      continue
    if isinstance(value, nnx.Variable):
      if not isinstance(value, nnx.Param):
        return False
    elif not isinstance(value, (nnx.Pytree, Mapping, list, tuple)):
      return False  # an array or an object the call put there: the full walk
    elif type(old) is not type(value) or not _left_nothing(old, value, seen):
      return False
  return True


def _carry_back(target: nnx.Module, source: nnx.Module, where: str, method: str) -> None:
  """``source``'s state other than parameters into ``target`` (``source``: the copy of
  ``target`` a method ran on), with the variables the call created where ``target`` has
  none (a cache ``init_cache`` puts where the layer held ``None``), which ``nnx.update``
  refuses. Anything else the call created is refused: it may hold the copy's ``w``."""
  try:
    nnx.update(target, nnx.state(source, nnx.Not(nnx.Param)))
  except (ValueError, AttributeError, IndexError, KeyError, TypeError):  # a new structure
    for path, node in nnx.iter_graph(source):
      parent = functools.reduce(_member, path[:-1], target)
      if not path or parent is None:
        continue  # the layer itself, or inside a new node (refused below)
      old = _member(parent, path[-1])
      if isinstance(old, nnx.Variable) and not isinstance(old, nnx.Param):
        old.set_raw_value(node.get_raw_value())
      elif old is None and isinstance(node, nnx.Variable) and not isinstance(node, nnx.Param):
        _put(parent, path[-1], node)
      elif (
        old is None and isinstance(node, (nnx.Module, list, tuple, dict)) and not _is_plain(node)
      ):
        raise ValueError(
          f'{where}: .{method}() created {"/".join(map(str, path))!r}, a '
          f'{type(node).__name__}, which the wrapper cannot carry back to the layer (the '
          f"method ran on a copy that computes with w). Create it in the layer's __init__."
        ) from None


def _carry_static(target: Any, source: Any, seen: set[int] | None = None) -> None:
  """The plain attributes (see ``_is_plain``: a counter, a mode, a shape) that a method set
  on ``source``'s modules, or deleted, onto ``target``'s, as ``nnx.jit`` carries them back.
  A walk of the modules alone: ``nnx.iter_graph`` visits every variable too, and cost the
  wrapper's eager call 13%."""
  seen = set() if seen is None else seen
  if id(source) in seen:
    return
  seen.add(id(source))
  if isinstance(source, nnx.Module):
    new, old_vars = vars(source), vars(target)
    for name in [n for n, v in old_vars.items() if n not in new and _is_plain(v)]:
      if not name.startswith(_INTERNAL):
        delattr(target, name)
  for name, old, value in _children(target, source, nnx.Module):
    if old is value:
      continue
    if _is_plain(value):
      if name is not None:
        setattr(target, name, value)
    elif type(old) is type(value):  # a module or a container: its own attributes
      _carry_static(old, value, seen)


def _children(target: Any, source: Any, nodes: type) -> Any:
  """``(name, target's child, source's child)`` for each child of ``source``: the attributes
  of a ``nodes`` instance (but NNX's own), a mapping's items or a sequence's entries (``name``
  ``None``; ``_MISSING`` where ``target`` lacks the child); none for anything else."""
  if isinstance(source, nodes):
    old_vars = vars(target)
    return (
      (name, old_vars.get(name, _MISSING), value)
      for name, value in vars(source).items()
      if not name.startswith(_INTERNAL)
    )
  if isinstance(source, Mapping):
    return ((None, target.get(k, _MISSING), v) for k, v in source.items())
  if isinstance(source, (list, tuple, MutableSequence)):
    return ((None, old, new) for old, new in zip(target, source))
  return ()


_MISSING = object()
_INTERNAL = ('_pytree__', '_object__')  # NNX's own bookkeeping, by Flax version
_PLAIN = (bool, int, float, complex, str, bytes, np.dtype, np.generic)


def _is_plain(value: Any) -> bool:
  """Whether ``value`` is plain data: numbers, strings, ``None`` and dtypes, alone or in
  lists, tuples and dicts. Not an array, a graph node or a callable: a method bound to the
  copy, or a closure over it, would compute with the copy's ``w``."""
  if nnx.graph.is_graph_node(value):
    return False
  leaves = jax.tree_util.tree_leaves(value, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return all(isinstance(x, _PLAIN) for x in leaves)


def _member(node: Any, key: Any) -> Any:
  """``node``'s child ``key`` in a graph path (``None`` where ``node`` lacks it or is
  ``None``): an item of a list or mapping, else an attribute."""
  if node is None:
    return None
  if isinstance(node, Mapping):
    return node.get(key)
  if isinstance(key, int):
    return node[key] if key < len(node) else None
  return getattr(node, key, None)


def _put(node: Any, key: Any, value: Any) -> None:
  if isinstance(node, MutableSequence) and key == len(node):
    node.append(value)
  elif isinstance(node, (MutableSequence, MutableMapping)):
    node[key] = value
  else:
    setattr(node, key, value)
