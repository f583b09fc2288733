"""Whole-model tools of the linen front end: data init, each layer's axis, fold."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax

from wn_jax import _boxes
from wn_jax import _data_init
from wn_jax import _errors
from wn_jax import _fold
from wn_jax import _stacking
from wn_jax.linen import _search
from wn_jax.linen._layers import _WeightNormedKernel
from wn_jax.linen._wrapper import WeightNorm

_MODEL = 'the model, a flax.linen.Module'


def _require_model(model: Any, tool: str, fix: str) -> None:
  _errors.require(isinstance(model, nn.Module), f'wn_jax.linen.{tool}', _MODEL, model, fix)


def data_init(
  model: nn.Module,
  variables: Any,
  *args: Any,
  init_scale: float | Callable[[str], float] = 1.0,
  axis_name: str | None = None,
  method: Any = None,
  **kwargs: Any,
) -> Any:
  r"""The paper's data-dependent initialization (section 3) of every WN layer in ``model``.

  Runs ``model.apply(variables, *args, **kwargs)`` once on a batch. Each ``WNDense``,
  ``WNConv`` and ``WNConvTranspose``, in forward order, computes its pre-activation
  $t = (v / \lVert v \rVert) \cdot x$ without bias, takes the per-feature mean
  $\mu$ and standard deviation $\sigma$ over the batch (and spatial) axes,
  and sets

  $$
  g = s / \sigma, \qquad b = -\mu \, s / \sigma
  $$

  with ``s = init_scale``, so its output on this batch has mean 0 and standard deviation
  ``s`` per feature; it passes that initialized output on, so each later layer sees the
  earlier layers after their initialization. A layer used twice (shared weights) is
  initialized on its first use only: the use that runs first (in a ``cond``, the branch
  taken; in a loop or a scan that carries it, the first step), decided when the computation
  runs (each WN layer's scale is -inf until a use sets it; one no use reached keeps its own).
  A feature constant on the batch (its standard
  deviation no more than the rounding of its mean, 128 units in the last place) keeps
  $\sigma = 1$ (finite, never NaN); one that varies, at any scale, is standardized. Statistics are
  taken in float32 (or wider) whatever the parameter dtype; a ``g`` or ``b`` that does not
  fit the layer's parameter or compute dtype (float16 on a batch that varies too little)
  is refused with a ``ValueError`` naming the layer, never stored as ``inf`` (under ``jit``
  it is raised when the computation runs). A layer whose parameters ``nn.scan`` broadcasts
  to every step is refused, naming it (initialize it outside the scan); one shared across
  ``nn.vmap``'s mapped axis needs the same ``axis_name`` passed to ``nn.vmap`` and here, or
  is refused with that fix. So is a layer first used where its write would be lost: in a
  transform's body that reaches it through a closure, or that hands it its parameters
  read-only (``nn.while_loop`` without ``carry_variables='params'``: checked when it runs;
  the data-init guide lists the cases). Plain layers,
  ``WeightNorm``-wrapped layers and ``MeanOnlyBatchNorm`` are left as they are; other
  collections (``batch_stats``) may change during the pass (batch norm in training
  mode) but are returned unchanged.

  Args:
    model: the linen model.
    variables: its variables (``{'params': ..., ...}``), e.g. from ``model.init``.
    *args: the batch, as ``model.apply`` takes it.
    init_scale: the target standard deviation (a positive finite Python or NumPy number),
      or a callable from a layer's path (``'Dense_0'``, ``'block/WNConv_1'``) to it.
    axis_name: inside ``shard_map`` / ``pmap``, the mapped batch axis, so the
      statistics are the global batch's. Under ``jax.jit`` with a sharded batch no name
      is needed.
    method: the method of ``model`` to run (default ``__call__``).
    **kwargs: passed to ``model.apply`` (e.g. ``train=True``).

  Returns:
    New variables with the WN layers' ``scale`` and ``bias`` set; nothing is mutated.

  Examples:
    >>> import jax, jax.numpy as jnp, wn_jax
    >>> model = wn_jax.linen.WNDense(3)
    >>> x = jax.random.normal(jax.random.key(0), (256, 5))
    >>> variables = wn_jax.linen.data_init(model, model.init(jax.random.key(1), x), x)
    >>> y = model.apply(variables, x)
    >>> bool(jnp.allclose(y.mean(0), 0.0, atol=1e-5)), bool(jnp.allclose(y.std(0), 1.0, atol=1e-4))
    (True, True)
  """
  fix = 'Call data_init(model, variables, *batch), variables from model.init.'
  _require_model(model, 'data_init', fix)
  expected = "the model's variables, a dict with 'params'"
  ok = isinstance(variables, Mapping) and 'params' in variables
  _errors.require(ok, 'wn_jax.linen.data_init', expected, variables, fix)
  paths = _search.layer_paths(model, variables, args, method, kwargs)
  params = _map_scales(variables['params'], paths, lambda s, _: _data_init.fresh(s))
  with _data_init.mode(init_scale, axis_name) as m:
    m.home = flax.core.tracers.current_trace()  # the trace the apply runs under
    # Every collection mutable, so a model with batch norm in training mode runs; only the
    # new params are kept.
    _, updates = model.apply(
      _search.marked({**variables, 'params': params}),
      *args,
      mutable=_search.every(),
      method=method,
      **kwargs,
    )
  before = variables['params']
  return {**variables, 'params': _map_scales(updates['params'], paths, _data_init.settle, before)}


def _map_scales(params: Any, paths: set, f: Callable, other: Any = None) -> Any:
  """``params`` with the scale of each layer at ``paths`` replaced by ``f(scale, the same
  scale in other)`` (boxed as it was)."""
  params = flax.core.unfreeze(params)
  for path in paths:
    node, there = params, other
    for key in path:
      node, there = node.get(key, {}), None if there is None else there.get(key, {})
    if 'scale' in node:
      old = node['scale']
      value = f(nn.unbox(old), None if there is None else nn.unbox(there['scale']))
      node['scale'] = _boxes.reboxed(old, value)
  return params


def layer_axes(
  model: nn.Module,
  *args: Any,
  method: Any = None,
  stacked: Mapping[str, Any] | None = None,
  **kwargs: Any,
) -> dict[str, Any]:
  """The kept ``axis`` of every WN layer and wrapper of ``model``, by path: what :func:`fold`,
  :func:`wn_jax.optim.project_directions` and :func:`wn_jax.optim.direction_stats` need to know.

  Traces ``model.init`` abstractly (``jax.eval_shape``: nothing is computed or allocated)
  on ``args`` (arrays or ``jax.ShapeDtypeStruct``; other arguments, a flag, stay Python
  values) and records the ``axis`` attribute of
  each ``WNDense``, ``WNConv``, ``WNConvTranspose`` and ``WeightNorm`` wrapper it calls,
  keyed by its path in the params tree (``'block/WNDense_0'``; ``''`` for the model itself).
  A layer stacked by ``nn.scan`` / ``nn.vmap`` keeps the layer axes too: ``(0, -1)`` for one
  that keeps ``-1`` stacked along the first axis (``variable_axes={'params': 0}``),
  ``(-2, -1)`` along the last. The stacking is read from the layer's shapes, as built and as
  stored; a stack they do not tell apart (sizes equal to the stack's length) is refused,
  named, until given in ``stacked``, and a middle axis is refused (no axes describe it).

  Args:
    model: the linen model.
    *args: example inputs, as ``model.init`` takes them.
    method: the method of ``model`` to run (default ``__call__``).
    stacked: ``{path: axes}`` for stacked layers whose axes the shapes do not tell.
    **kwargs: passed to ``model.init`` (e.g. ``train=False``).

  Returns:
    A dict from layer path to axis, for ``fold(params, axis=...)``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, wn_jax
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return wn_jax.linen.WNDense(4, axis=0, name='out')(wn_jax.linen.WNDense(4)(x))
    >>> wn_jax.linen.layer_axes(Net(), jnp.ones((2, 4)))
    {'WNDense_0': -1, 'out': 0}
  """
  _require_model(model, 'layer_axes', 'Call layer_axes(model, *example_inputs).')
  expected = "example inputs, as model.init takes them, not the variables ('params')"
  for x in args:  # data_init's (model, variables, x) carried over
    is_variables = isinstance(x, Mapping) and isinstance(x.get('params'), Mapping)
    _errors.require(
      not is_variables, 'wn_jax.linen.layer_axes', expected, x, 'Call layer_axes(model, x).'
    )
  axes: dict[str, Any] = {}
  steps: dict[str, Any] = {}

  def record(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    module = context.module
    # A wrapper's every use maps its layer's variables in _mapped; nn.vmap's lifted class
    # is met once more, at its parent's path (it recorded the model itself, '').
    if (isinstance(module, WeightNorm) and context.method_name == '_mapped') or (
      isinstance(module, _WeightNormedKernel) and context.method_name == '__call__'
    ):
      path = '/'.join(module.scope.path)
      axes[path] = module.axis  # type: ignore[attr-defined]
      steps.setdefault(path, _one_layer(module))  # the layer's own call comes first: one
      # lifted by nn.vmap itself (nn.vmap(WNConv)) is called again, stacked, around it
    return out

  def search(inline: bool) -> Any:
    axes.clear()
    steps.clear()
    with nn.intercept_methods(record), _search.inlined(inline):
      return _search.eval_abstractly(
        # init's own filter (all but intermediates), said anew: see _search.every
        lambda *a: model.init(
          jax.random.key(0), *a, method=method, mutable=_search.every('intermediates'), **kwargs
        ),
        *args,
      )

  params = nn.meta.unbox(search(False).get('params', {}))
  if _search.reused(params, {tuple(p.split('/')) if p else () for p in axes}):
    params = nn.meta.unbox(search(True).get('params', {}))
  layers = {path: (axes[path], _stored(params, path, *steps[path])) for path in axes}
  with _errors.labelled('wn_jax.linen.layer_axes'):
    return _stacking.read_axes(layers, stacked, _GIVE_STACKED)


_GIVE_STACKED = (
  "Give the axes of the stacking you built: layer_axes(model, x, stacked={{'{path}': axes}})."
)


def _one_layer(module: nn.Module) -> tuple[tuple[str, ...] | None, dict]:
  """What one layer (inside a transform that stacks it) normalizes: the path of the layer
  that holds the weights (``None``: unknown) and ``{path in it: (weight, scale) shapes}``."""
  params = nn.meta.unbox(module.variables.get('params', {}))
  if isinstance(module, _WeightNormedKernel):
    return module.path, {('kernel',): (params['kernel'].shape, params['scale'].shape)}
  layer = module.layer  # type: ignore[attr-defined]
  bound = layer.scope is not None
  weights = nn.meta.unbox(layer.variables.get('params', {})) if bound else {}
  out = {}
  for path, g in jax.tree_util.tree_leaves_with_path(params.get('scale', {})):
    keys = tuple(str(k.key) for k in path)
    out[keys] = (_get(weights, keys), g.shape)
  return (layer.path if bound else None), out


def _get(tree: Any, keys: tuple[str, ...]) -> tuple[int, ...] | None:
  for key in keys:
    tree = tree.get(key) if hasattr(tree, 'get') else None
  return None if tree is None else tree.shape


def _stored(params: Any, path: str, layer: Any, one: dict) -> list[_stacking.Pair]:
  """The :class:`wn_jax._stacking.Pair` of each weight of the layer at ``path`` (``layer``, ``one``:
  from :func:`_one_layer`), its shapes as stored in ``params``."""
  scale = params
  for key in (*filter(None, path.split('/')), 'scale'):
    scale = scale.get(key, {})
  pairs = []
  for keys, (step_kernel, step_scale) in one.items():
    g = scale.shape if hasattr(scale, 'shape') else _get(scale, keys)  # a WN layer's; a tree
    kernel = None if layer is None else _get(params, (*layer, *keys))
    if g is not None:
      pairs.append(_stacking.Pair(kernel, g, step_kernel, step_scale))
  return pairs


@_errors.labelled('wn_jax.linen.fold')
def fold(params: Any, axis: _fold.AxisSpec = _fold.INFER) -> Any:
  r"""Folds weight normalization away: WN layer parameters -> plain layer parameters.

  Every dict that holds a ``kernel`` and a ``scale`` array (a ``WNDense``, ``WNConv`` or
  ``WNConvTranspose``) gets $w = g \, v / \lVert v \rVert$ as its ``kernel`` and loses
  ``scale``; ``WeightNormed`` leaves are materialized; everything else is kept. The result
  loads into the plain Flax layers (``nn.Dense``, ``nn.Conv``, ``nn.ConvTranspose``) with the
  same names, for deployment: inference then costs exactly what the plain model costs. (Name
  the layers, or rename the keys: Flax's automatic names differ, ``WNDense_0`` against
  ``Dense_0``.)
  NNX: fold ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``, or use
  :func:`wn_jax.nnx.fold`, which reads each layer's axis from the model.

  The parameters do not record the axis a layer was built with, and a scale's shape does
  not always tell: a square ``(n, n)`` kernel with a scale of shape ``(n,)`` fits both
  ``axis=-1`` and ``axis=0``. So by default (``axis='infer'``) ``fold`` reads each layer's
  axis from its scale's shape where only one choice fits, and refuses, naming the layer,
  where several do; it is never silently wrong. Pass ``axis=-1`` when every layer kept
  the default (the output features), or each layer's own: ``axis=layer_axes(model, x)``
  reads them from the model; a mapping or a callable also works. A layer whose scale does
  not fit the axis it is given is refused, named. A ``WeightNorm`` wrapper's parameters are
  refused, naming the wrapper (its layer's parameters hold ``v``): export that part with
  the pytree route (:func:`wn_jax.weight_norm` + :func:`wn_jax.materialize`), or fold it
  by hand with :func:`wn_jax.normalize`. A plain submodule named ``scale`` (AdaLN's) is
  folded like any other.

  Args:
    params: a linen ``params`` tree (boxed or not), or an NNX pure dict.
    axis: ``'infer'`` (default: from each scale's shape, refused where ambiguous); the
      kept axis of every WN layer: an int, a tuple of ints or ``None`` for all;
      a mapping from layer path (``'block/WNDense_0'``, ``/``-joined keys of ``params``)
      to axis, which must name every WN layer (:func:`layer_axes` builds it); or a
      callable from layer path to axis.

  Returns:
    The folded params; ``params`` is not modified.

  Raises:
    ValueError: a layer's axis cannot be inferred, a layer's scale does not fit its axis,
      a mapping misses a layer, or ``params`` hold a ``WeightNorm`` wrapper's; the message
      names the layer's path.
    TypeError: for a model (linen or NNX) in place of its parameters.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, wn_jax
    >>> x = jnp.ones((2, 3))
    >>> variables = wn_jax.linen.WNDense(4, name='fc').init(jax.random.key(0), x)
    >>> plain = wn_jax.linen.fold(variables['params'])
    >>> sorted(plain)
    ['bias', 'kernel']
    >>> y = nn.Dense(4).apply({'params': plain}, x)
    >>> bool(jnp.allclose(y, wn_jax.linen.WNDense(4).apply(variables, x)))
    True
    >>> square = wn_jax.linen.WNDense(3, axis=0)
    >>> v = square.init(jax.random.key(0), x)
    >>> wn_jax.linen.fold(v['params'])
    Traceback (most recent call last):
    ValueError: wn_jax.linen.fold: the root layer (the model itself): its scale of shape (3,) fits ...
    >>> plain = wn_jax.linen.fold(v['params'], wn_jax.linen.layer_axes(square, x))
    >>> bool(jnp.allclose(nn.Dense(3).apply({'params': plain}, x), square.apply(v, x)))
    True
  """
  fix = (
    "Pass variables['params'] (linen) or nnx.to_pure_dict(state), or call "
    'wn_jax.nnx.fold(model) for an NNX model.'
  )
  wrong = isinstance(params, (nn.Module, flax.nnx.Module, flax.nnx.State))
  _errors.require(not wrong, 'wn_jax.linen.fold', 'the parameters, a dict', params, fix)
  _boxes.refuse_module(params, 'wn_jax.linen.fold')
  return _fold.fold(nn.unbox(params), axis)
