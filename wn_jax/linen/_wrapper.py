"""``WeightNorm``: weight-normalizes the parameters of any linen module."""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core.scope import Variable
from flax.linen.transforms import get_module_scopes

from wn_jax import _axes
from wn_jax import _boxes
from wn_jax import _core
from wn_jax import _errors
from wn_jax import _kernel
from wn_jax import _tree
from wn_jax import _wrapping
from wn_jax.linen._layers import Initializer
from wn_jax.linen._layers import _WeightNormedKernel

_KERNELS = r'(^|/)kernel$'


class WeightNorm(nn.Module):
  r"""Weight-normalizes the parameters of any linen module.

  Each selected parameter ``v`` of ``layer`` is used as ``w = g * v / ||v||``. The
  layer's own parameters keep their names and hold ``v``; the magnitudes live in this
  module's ``scale`` parameter, a dict that mirrors the layer's parameter tree (e.g.
  ``scale['query']['kernel']`` for an attention layer). Unlike
  ``flax.linen.WeightNorm``: ``g`` starts at ``||v||`` (the wrapped layer computes
  the same function at init), biases are left alone by default, and all-zero slices
  are safe.

  The wrapper stands for the layer: calling it, or any method of the layer through it
  (``wrapper.attend(q)`` for an ``nn.Embed``, ``method='attend'`` in ``apply``), runs that
  method with every selected parameter replaced by its ``w``. Attributes that need no
  parameters are the layer's own (``num_feature_axes``, ``initialize_carry``: so
  ``nn.RNN(WeightNorm(nn.LSTMCell(8)))`` works); an attribute that holds parameters or
  submodules (which hold or compute with ``v``) is refused. ``.layer`` is the wrapped
  layer itself: its methods compute with ``v``, not ``w``.

  A layer built inline by a parent (``WeightNorm(nn.Dense(3))`` inside the parent's
  ``@nn.compact``) keeps its parameters beside the wrapper, under the parent, as the
  parent named it; when it spans several such modules (an inline ``nn.Sequential`` of
  inline layers), ``scale`` mirrors each by its name (``scale['Dense_0']['kernel']``).
  Built unbound (``WeightNorm(nn.Dense(3, parent=None))``), the layer is the wrapper's own:
  its parameters sit under the wrapper (``layer``), so the tools that find directions by
  structure (:func:`wn_jax.optim.project_directions`, :func:`wn_jax.optim.direction_stats`)
  always know which layer a ``scale`` tree belongs to; beside it, two layers that fit the
  same ``scale`` tree are refused there. A layer whose params lie elsewhere (a module
  another scope owns, handed to the wrapper's parent) is refused at ``init``.

  Attributes:
    layer: the module to wrap (a ``flax.linen.Module``).
    axis: the kept axis or axes of every selected parameter (default ``-1``, the output
      features of Flax kernels).
    where: which parameters: a regular expression searched in the ``/``-joined path
      inside ``layer``'s params (default: every ``kernel``), or a callable
      ``(path, leaf) -> bool``, ``path`` a JAX key path (compare ``path[-1].key``).
    scale_init: ``None`` (``g = ||v||``) or a Flax initializer.
    epsilon: a lower bound on each ``||v||`` (default ``0``: none), as
      :func:`wn_jax.normalize`'s ``eps``. Flax's ``1e-12`` is not needed against zero
      slices here (they give ``w = 0`` and finite gradients).
    param_dtype: the dtype of ``scale`` (default ``None``: that of the parameter it
      scales). ``jnp.float32`` keeps a float32 magnitude for a float16 kernel; ``w`` is
      then float32 (the wider dtype, below), so a layer with ``dtype=None`` computes and
      returns float32: give the layer ``dtype=jnp.float16`` to keep float16 activations.

  Flax's ``use_scale=False`` ($w = v / \lVert v \rVert$, no trained length) is not an
  option: it is ``scale_init=nn.initializers.ones`` with ``scale`` left out of the
  optimizer (``optax.masked``). Nor is a ``dtype`` of the wrapper's own: each ``w`` is
  formed in the layer's compute dtype, as follows.

  Raises:
    TypeError: if ``layer`` is not a ``flax.linen.Module``.
    ValueError: at ``init``, naming the layer, if it has no parameters, or if ``where``
      selects a parameter of a module that is weight-normalized already (a ``WN*`` layer,
      another ``WeightNorm``).

  Each ``scale`` leaf is partitioned like its kernel's kept axes when the kernel is boxed
  (``nn.with_partitioning``, ``nn.with_logical_partitioning``); the layer's own parameters
  keep their boxes. Each ``w`` is formed in the wider of its parameters' dtype and the
  layer's compute dtype, which the wrapper reads from the layer's ``dtype`` attribute when
  it has one that is not ``None``; otherwise (``dtype=None``, or a module without one) it
  takes the promotion with the call's floating inputs, as a Flax layer with ``dtype=None``
  does. A module whose submodules compute in different dtypes gets that one dtype for all.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, wn_jax
    >>> model = wn_jax.linen.WeightNorm(nn.Dense(3))
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
    >>> jax.tree_util.tree_map(jnp.shape, variables['params'])
    {'layer': {'bias': (3,), 'kernel': (2, 3)}, 'scale': {'kernel': (3,)}}
  """

  layer: nn.Module
  axis: _core.Axis = -1
  where: _tree.Where = _KERNELS
  scale_init: Initializer | None = None
  epsilon: float = 0.0
  param_dtype: Any = None

  def __post_init__(self) -> None:
    if not isinstance(self.layer, nn.Module):
      raise _wrapping.not_a_layer(
        'wn_jax.linen.WeightNorm', 'flax.linen.Module', 'nn.Dense(3)', self.layer
      )
    if not _core.is_eps(self.epsilon):
      raise ValueError(
        f'wn_jax.linen.WeightNorm: epsilon must be a finite non-negative number; '
        f'got {self.epsilon!r}.'
      )
    super().__post_init__()

  def __call__(self, *args, **kwargs):
    return self._mapped('__call__', args, kwargs)

  def __getattr__(self, name: str) -> Any:
    try:
      return super().__getattr__(name)
    except AttributeError:
      layer = self.__dict__.get('layer')
      if name.startswith('_') or not isinstance(layer, nn.Module):
        raise
    # A field's default function (kernel_init) sits on the class too: a field is no method.
    method = inspect.getattr_static(type(layer), name, None)
    field = name in {f.name for f in dataclasses.fields(layer)}
    if inspect.isfunction(method) and not hasattr(method, 'nowrap') and not field:
      return types.MethodType(_forwarding(name), self)
    value = getattr(layer, name)
    if any(isinstance(x, (nn.Module, jax.Array)) for x in jax.tree_util.tree_leaves(value)):
      raise AttributeError(
        f"{self._label()}: '{name}' of the wrapped {type(layer).__name__} holds parameters "
        f'or submodules, which hold or compute with the direction v, not the weight w. Call '
        f"the layer's methods through the wrapper, or reach the raw one as .layer.{name}."
      )
    return value

  @nn.nowrap
  def _label(self) -> str:
    path = '/'.join(self.scope.path) if self.scope is not None else ''
    return f"WeightNorm({type(self.layer).__name__}) at '/{path}'"

  @nn.compact
  def _mapped(self, method: str, args: tuple, kwargs: dict) -> Any:
    """``layer.<method>(*args, **kwargs)`` with each selected parameter replaced by its ``w``."""
    m = _Mapping(self, method, args, kwargs)
    return nn.map_variables(
      m.run, 'params', trans_in_fn=m.trans_in, trans_out_fn=m.trans_out, init=m.initializing
    )(self.layer)


class _Mapping:
  """One call of a ``WeightNorm``: the ``nn.map_variables`` callbacks and what they share.

  Flax maps each scope the layer's variables live in (one, unless the parent built the
  layer's submodules inline) in turn, in the order of ``keys``.
  """

  def __init__(self, wrapper: WeightNorm, method: str, args: tuple, kwargs: dict):
    self.wrapper, self.method, self.args, self.kwargs = wrapper, method, args, kwargs
    self.label = wrapper._label()
    self.initializing = wrapper.is_initializing()
    self.common, self.keys = _scope_keys(wrapper.layer)
    self.created: list = []  # at init, each scope's params as the layer created them
    self.stored: list = []  # each scope's params as stored: v, with its metadata boxes
    self.restored: list = []
    self.scale: list = []  # read once per call
    self.owners: dict[tuple[str, ...], str] = {}  # weight-normalized modules met inside, at init

  def weight(self, x: _tree.WeightNormed) -> jax.Array:
    layer_dtype = getattr(self.wrapper.layer, 'dtype', None)
    return _kernel.weight(x, layer_dtype, (self.args, self.kwargs), self.wrapper.epsilon)

  def init(self, key: jax.Array) -> Any:
    """The scale tree at init: ``g = ||v||`` (or ``scale_init``), boxed like each kernel."""
    w = self.wrapper
    _check_place(self.common, tuple(w.scope.path))  # type: ignore[union-attr]
    boxed = _nested(self.keys, self.created)
    params = nn.unbox(boxed)
    _wrapping.check_wrappable(params, w.where, self.owners)
    wn = _tree.decomposed(params, w.axis, w.where, _tree.WRAPPER_FIX)
    keys = iter(jax.random.split(key, 1 + len(jax.tree_util.tree_leaves(wn))))

    def g(x: _tree.WeightNormed) -> jax.Array:
      return _wrapping.initial_scale(x, w.scale_init, w.param_dtype, lambda: next(keys))

    def box(path, g):  # each scale partitioned like its kernel's kept axes
      kernel = boxed
      for k in path:
        kernel = kernel[k.key]
      kept = _axes.kept_axes(jnp.ndim(nn.unbox(kernel)), w.axis)
      return _boxes.scale_box(kernel, g, kept)

    return jax.tree_util.tree_map_with_path(box, _wrapping.map_selected(wn, g))

  def read_scale(self) -> Any:
    w = self.wrapper
    if not self.scale and w.has_variable('params', 'scale'):
      # Not Flax's param: it would re-check the shape by tracing init, which needs every
      # scope's parameters (each g is checked against its v where it is used).
      self.scale.append(nn.unbox(w.get_variable('params', 'scale')))
    elif not self.scale:
      self.scale.append(w.param('scale', self.init))
    return self.scale[0]

  def trans_in(self, variables: dict) -> dict:
    key = self.keys[len(self.stored)]
    params = variables.get('params', {})
    self.stored.append(params)
    with _errors.labelled(self.label):
      scale = self.read_scale()
      if not params:
        return variables
      directions = _tree.replace_selected(
        _nest(key, nn.unbox(params)),
        self.wrapper.where,
        lambda _, v: _tree.WeightNormed(v, None, self.wrapper.axis),
        required=False,
      )
      merged = _wrapping.map_selected(directions, self.weight, scale)  # named by leaf
    return {**variables, 'params': _unnest(key, merged)}

  def trans_out(self, variables: dict) -> dict:
    if not self.stored:  # Flax's first pass at init: the parameters as the layer created them
      self.created.append(variables.get('params', {}))
      return variables
    # Flax stores the view the layer saw; the layer's parameters are v, as created.
    params = self.stored[len(self.restored)]
    self.restored.append(params)
    return {**variables, 'params': params} if params else variables

  def note(self, next_fun, call_args, call_kwargs, context):
    """Records each weight-normalized module met inside the layer (init only)."""
    m = context.module
    if isinstance(m, (WeightNorm, _WeightNormedKernel)):
      path = tuple(m.scope.path)[len(self.common) :]
      self.owners.update(
        _wrapping.weight_normed_parts(path, type(m).__name__, isinstance(m, WeightNorm))
      )
    return next_fun(*call_args, **call_kwargs)

  def run(self, layer: nn.Module) -> Any:
    if not self.initializing:
      return getattr(layer, self.method)(*self.args, **self.kwargs)
    with nn.intercept_methods(self.note):
      return getattr(layer, self.method)(*self.args, **self.kwargs)


def _forwarding(name: str) -> Callable[..., Any]:
  """``WeightNorm``'s stand-in for the layer's method ``name``, to bind to the wrapper."""

  def forward(module: WeightNorm, *args: Any, **kwargs: Any) -> Any:
    return module._mapped(name, args, kwargs)

  forward.__name__ = forward.__qualname__ = name
  return forward


def _scope_keys(layer: nn.Module) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
  """The scopes ``nn.map_variables`` maps for ``layer``, in its order: their common path, and
  each one's path below it (``()`` for the usual single scope).

  Flax lifts the scope of the layer and of each module in its attributes that a parent
  bound elsewhere (an inline ``nn.Sequential``'s layers), then drops those inside another.
  """
  if layer.scope is not None and not _holds_modules(layer):
    # The one scope Flax's walk would find, without the setup it runs on the layer first (an
    # eval_shape: 15% of a wrapped nn.Dense's eager apply).
    return tuple(layer.scope.path), [()]
  paths: list[tuple[str, ...]] = []
  for scope in get_module_scopes(layer)[0]:
    if tuple(scope.path) not in paths:
      paths.append(tuple(scope.path))
  paths = [p for p in paths if not any(q != p and p[: len(q)] == q for q in paths)]
  common = paths[0]
  for p in paths[1:]:
    n = next((i for i, (a, b) in enumerate(zip(common, p)) if a != b), min(len(common), len(p)))
    common = common[:n]
  if len(paths) == 1:
    return common, [()]
  return common, [p[len(common) :] for p in paths]


def _holds_modules(layer: nn.Module) -> bool:
  """Whether a field of ``layer`` holds a module or a variable (whose scopes Flax lifts too)."""
  fields = [
    getattr(layer, f.name)
    for f in dataclasses.fields(layer)
    if f.name not in ('parent', 'name') and f.init
  ]
  return any(isinstance(x, (nn.Module, Variable)) for x in jax.tree_util.tree_leaves(fields))


def _check_place(layer: tuple[str, ...], wrapper: tuple[str, ...]) -> None:
  """A ``ValueError`` unless the layer's params (common path ``layer``) lie under the wrapper
  or beside it, under its parent: where the tools that find directions by structure
  (``project_directions``, ``direction_stats``) look for them."""
  parent = wrapper[:-1]
  if layer[: len(wrapper)] == wrapper or layer[:-1] == parent or layer == parent:
    return
  raise ValueError(
    f"the wrapped layer's params live at '{'/'.join(layer)}', neither under the wrapper nor "
    f'beside it, so its directions could not be told from the params. Build the layer '
    f'unbound, so that the wrapper adopts it (nn.Dense(4, parent=None)), or in the '
    f"wrapper's parent."
  )


def _nest(key: tuple[str, ...], tree: Any) -> Any:
  for k in reversed(key):
    tree = {k: tree}
  return tree


def _unnest(key: tuple[str, ...], tree: Any) -> Any:
  for k in key:
    tree = tree[k]
  return tree


def _nested(keys: list[tuple[str, ...]], trees: list[Any]) -> dict:
  """The trees merged into one dict, each under its key."""
  out: dict = {}
  for key, tree in zip(keys, trees):
    if not key:
      return dict(tree)
    node = out
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = tree
  return out
