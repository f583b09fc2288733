"""Whole-model tools of the NNX front end: data init, each layer's path and axis, fold."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from wn_jax import _data_init
from wn_jax import _errors
from wn_jax import _fold
from wn_jax import _stacking
from wn_jax import _tree
from wn_jax.nnx._layers import _TAG
from wn_jax.nnx._layers import DISCARDED
from wn_jax.nnx._layers import _WeightNormedKernel
from wn_jax.nnx._layers import mark
from wn_jax.nnx._wrapper import WeightNorm


def _path(path: tuple[Any, ...]) -> str:
  """A layer's path in its model, as :func:`layer_axes` and ``data_init`` name it."""
  return '/'.join(str(k) for k in path)


def _require_model(model: Any, tool: str, fix: str) -> None:
  """A ``TypeError`` unless ``model`` is an NNX module: a state or a pure dict in its place
  holds no layer (``fold`` and ``layer_axes`` would return ``{}``)."""
  _errors.require(
    isinstance(model, nnx.Module), f'wn_jax.nnx.{tool}', 'the model, a flax.nnx.Module', model, fix
  )


def data_init(
  model: nnx.Module,
  *args: Any,
  init_scale: float | Callable[[str], float] = 1.0,
  axis_name: str | None = None,
  **kwargs: Any,
) -> Any:
  r"""The paper's data-dependent initialization of every NNX WN layer, in place.

  Calls ``model(*args, **kwargs)`` once; each ``WNLinear`` / ``WNConv`` /
  ``WNConvTranspose`` on its first use sets ``g = s / sigma`` and ``b = -mu s / sigma``
  from its bias-free pre-activation's per-feature mean ``mu`` and standard deviation
  ``sigma`` on this batch, and passes the initialized output on (see
  :func:`wn_jax.linen.data_init` for the rules: shared layers, constant features,
  float32 statistics, ``init_scale`` per layer as a callable of the layer's path in
  ``model``, as :func:`layer_axes` names it: ``'layers/0'``). Wrap the call in ``nnx.jit`` to compile it
  (``static_argnames='init_scale'``).

  NNX discards a layer's writes inside ``nnx.scan`` where the layer is shared across the
  steps (``in_axes=None``, e.g. an RNN cell): such a layer is refused with a ``ValueError``
  naming it, never skipped; initialize the model with that layer applied in a Python loop
  instead. A layer carried through the steps (``nnx.Carry``, as ``nnx.RNN`` carries its
  cell) is initialized at the first step. A layer shared
  across ``nnx.vmap``'s mapped axis needs the same ``axis_name``
  passed to ``nnx.vmap`` and here (or is refused with that fix). Layers stacked along a
  transform (``in_axes=0``) are each initialized. On any error the model is left as it was.

  Args:
    model: the NNX model; its WN layers' ``scale`` and ``bias`` are updated in place, and
      every other variable (running statistics, RNG counts) is left as it was.
    *args: the batch.
    init_scale: the target standard deviation (a positive finite Python or NumPy number),
      or a callable from the layer's path (``'layers/0'``; ``''`` for the model itself) to it.
    axis_name: inside ``shard_map`` / ``pmap``, the mapped batch axis.
    **kwargs: passed to the model.

  Returns:
    The model's output on the batch, after initialization.

  Examples:
    >>> import jax, jax.numpy as jnp, wn_jax
    >>> from flax import nnx
    >>> layer = wn_jax.nnx.WNLinear(5, 3, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (256, 5))
    >>> _ = wn_jax.nnx.data_init(layer, x)
    >>> bool(jnp.allclose(layer(x).std(0), 1.0, atol=1e-4))
    True
  """
  _require_model(model, 'data_init', 'It calls the model and updates its layers in place.')
  layers = [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, _WeightNormedKernel)]
  state = [n for _, n in nnx.iter_graph(model) if isinstance(n, nnx.Variable)]
  saved = [v.get_raw_value() for v in state]
  try:
    with _data_init.mode(init_scale, axis_name) as mode, _marked(layers, mode):
      mode.paths.update({i: _path(p) for i, (p, _) in enumerate(layers)})
      out = model(*args, **kwargs)
      _settle(mode)
  except BaseException:
    _restore(state, saved)  # the model as it was, never half initialized
    raise
  # Only the WN layers' scale and bias change, as in linen: the running statistics of the
  # batch norms the call ran in training mode (and RNG counts) go back to what they were.
  initialized = {id(v) for _, layer in layers for v in (layer.scale, layer.bias) if v is not None}
  _restore(state, saved, but=initialized)
  return out


@contextlib.contextmanager
def _marked(layers: list[tuple[Any, _WeightNormedKernel]], mode: _data_init.Mode) -> Iterator[None]:
  """Each layer's scale fresh (-inf) and tagged with its index while the block runs (see
  ``_TAG``); the layers the pass adopts (outside the model's graph) are put back on an error."""
  for i, (_, layer) in enumerate(layers):
    mark(layer, i, mode)
  try:
    yield
  except BaseException:
    for tag, (layer, before, _, bias) in mode.marked.items():
      if isinstance(tag, int):  # the model's own: data_init puts its state back
        continue
      layer.scale.set_raw_value(before)
      if bias is not None:
        layer.bias.set_raw_value(bias)
    raise
  finally:
    for layer, *_ in mode.marked.values():
      layer.scale.del_metadata(_TAG)


def _settle(mode: _data_init.Mode) -> None:
  """A ``ValueError`` if a use's writes were discarded; each scale no use set put back."""
  for tag, _ in mode.claimed:
    layer, _, marked, _ = mode.marked[tag]
    if layer.scale.get_raw_value() is marked:  # a write that landed replaced it
      where = f"layer '{mode.paths[tag]}'" if tag in mode.paths else 'a layer'
      raise ValueError(f'wn_jax.nnx.data_init: {where} ({layer._where()}) {DISCARDED}')
  for layer, before, marked, _ in mode.marked.values():  # where no use ran: as it was
    now = layer.scale.get_raw_value()
    layer.scale.set_raw_value(before if now is marked else _data_init.settle(now, before))


def _restore(variables: list[Any], values: list[Any], but: Collection[int] = ()) -> None:
  """Sets each of ``variables`` back to its saved value, except those whose id is in ``but``."""
  for v, value in zip(variables, values):
    if id(v) not in but:
      v.set_raw_value(value)


def layer_axes(model: nnx.Module, *, stacked: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The kept ``axis`` of every WN layer and ``WeightNorm`` wrapper of ``model``, by path
  (``'layers/0'``; ``''`` for itself).

  The paths are those of ``nnx.to_pure_dict(nnx.state(model))``, ``/``-joined, so the
  result is the ``axis`` that :func:`wn_jax.linen.fold`,
  :func:`wn_jax.optim.project_directions` and :func:`wn_jax.optim.direction_stats` take
  for this model's state.
  A layer stacked by ``nnx.vmap`` / ``nnx.scan`` keeps the layer axes too: ``(0, -1)`` for one
  that keeps ``-1`` stacked along the first axis (``out_axes=0``), ``(-2, -1)`` along the
  last. The stacking is read from the layer's shapes, as built and as stored; a stack they do
  not tell apart (sizes equal to the stack's length) is refused, named, until given in
  ``stacked`` (``{path: axes}``), and a middle axis is refused (no axes describe it).

  Examples:
    >>> import wn_jax
    >>> from flax import nnx
    >>> model = nnx.Sequential(
    ...   wn_jax.nnx.WNLinear(3, 3, axis=0, rngs=nnx.Rngs(0)),
    ...   wn_jax.nnx.WNLinear(3, 2, rngs=nnx.Rngs(0)),
    ... )
    >>> wn_jax.nnx.layer_axes(model)
    {'layers/0': 0, 'layers/1': -1}
  """
  _require_model(model, 'layer_axes', 'Each axis is an attribute of a layer, not in its state.')
  layers = {
    _path(path): (node.axis, _shapes(node))
    for path, node in nnx.iter_graph(model)
    if isinstance(node, (_WeightNormedKernel, WeightNorm))
  }
  with _errors.labelled('wn_jax.nnx.layer_axes'):
    return _stacking.read_axes(layers, stacked, _GIVE_STACKED)


_GIVE_STACKED = (
  "Give the axes of the stacking you built: layer_axes(model, stacked={{'{path}': axes}}); "
  'for nnx.fold, fold with wn_jax.linen.fold(nnx.to_pure_dict(nnx.state(model, nnx.Param)), '
  'that layer_axes).'
)


def _shapes(node: _WeightNormedKernel | WeightNorm) -> list[_stacking.Pair]:
  """Each weight ``node`` normalizes and its scale, as stored and as built
  (:func:`wn_jax._stacking.stacked_axis`)."""
  if isinstance(node, _WeightNormedKernel):
    return [_stacking.Pair(node.kernel.shape, node.scale.shape, *node._step_shapes[0][1:])]
  flat = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(node.layer))))
  flat = {_tree.path_keys(path): x.shape for path, x in flat.items()}
  scales = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(node.scale)))
  steps = {keys: rest for keys, *rest in node._step_shapes}
  return [
    _stacking.Pair(flat.get(keys), g.shape, *steps.get(keys, (None, None)))
    for keys, g in ((_tree.path_keys(path), g) for path, g in scales)
  ]


@_errors.labelled('wn_jax.nnx.fold')
def fold(model: nnx.Module) -> dict[str, Any]:
  r"""The model's parameters with weight normalization folded away, as a pure dict.

  Each WN layer's ``kernel`` becomes $w = g \, v / \lVert v \rVert$ with the layer's own
  ``axis`` (read from the model, so it is never ambiguous) and its ``scale`` is dropped;
  the result loads into the same model built with plain ``nnx.Linear`` / ``nnx.Conv`` /
  ``nnx.ConvTranspose`` layers through ``nnx.replace_by_pure_dict``. Same as
  ``wn_jax.linen.fold(nnx.to_pure_dict(nnx.state(model, nnx.Param)), layer_axes(model))``.

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> from flax import nnx
    >>> layer = wn_jax.nnx.WNLinear(3, 3, axis=0, rngs=nnx.Rngs(0))
    >>> plain = nnx.Linear(3, 3, rngs=nnx.Rngs(1))
    >>> state = nnx.state(plain, nnx.Param)
    >>> nnx.replace_by_pure_dict(state, wn_jax.nnx.fold(layer))
    >>> nnx.update(plain, state)
    >>> bool(jnp.allclose(plain(jnp.ones((1, 3))), layer(jnp.ones((1, 3)))))
    True
  """
  _require_model(
    model,
    'fold',
    "It reads each layer's axis from the model. For a state: wn_jax.linen.fold("
    'nnx.to_pure_dict(state), wn_jax.nnx.layer_axes(model)).',
  )
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return _fold.fold(params, layer_axes(model), from_model=True)
