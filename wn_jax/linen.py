"""Flax linen layers with weight normalization.

Each ``WN*`` layer is the Flax layer of the same name with one change: its ``kernel``
parameter holds the direction ``v`` and a new ``scale`` parameter the magnitude ``g``,
and the layer computes with ``w = scale * kernel / ||kernel||`` (norm over every kernel
axis but ``axis``). Everything else, attributes, defaults, padding, masks, groups,
dtypes, is Flax's own code, so a plain checkpoint converts by adding ``scale``.

By default (``scale_init=None``) ``scale`` starts at ``||kernel||`` and takes no key, so
with the same key every other parameter (``kernel``, and ``bias`` with any ``bias_init``)
is the plain layer's, bit for bit, and at initialization a WN layer computes what the plain
layer computes. A ``scale_init`` draws a key after the kernel's: the bias then comes from
another key than the plain layer's.

Mixed precision: ``w`` is formed in the dtype the layer computes in, the wider of the
parameters' dtype and ``dtype`` (with ``dtype=None``, the promotion of the parameters with
the inputs, as Flax does); the norm is reduced in float32. ``param_dtype=bfloat16,
dtype=float32`` thus multiplies by a float32 ``w``, never one rounded to bfloat16.

Kernel layouts and the default kept ``axis=-1``:

| layer | Flax kernel layout | `axis=-1` keeps |
|---|---|---|
| WNDense | `(in, out)` | out |
| WNConv | `(*window, in // groups, out)` | out |
| WNConvTranspose | `(*window, in, out)` | out |
| ... transposed | `(*window, out, in)` (`transpose_kernel`) | in (as PyTorch) |
"""

from __future__ import annotations

import contextvars
import inspect
import types
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.transforms import get_module_scopes

from wn_jax import _axes
from wn_jax import _batch_norm
from wn_jax import _core
from wn_jax import _data_init
from wn_jax import _kernel
from wn_jax import _errors
from wn_jax import _fold
from wn_jax import _tree

Initializer = Callable[..., Any]


def _scale_box(kernel_box: Any, g: jax.Array, kept: tuple[int, ...]) -> Any:
  """``g`` boxed like the kernel: a partitioned kernel gives a partitioned scale."""
  if isinstance(kernel_box, nn.Partitioned):
    return kernel_box.replace(value=g, names=_axes.kept_names(kernel_box.names, kept))
  return g


# The pass of the WN layer whose parent's code runs now, and that layer: its ``param``
# override feeds the kernel and bias the pass gives (a context variable, not state on the
# frozen module).
_PASS: contextvars.ContextVar[tuple[Any, _kernel.Pass] | None] = contextvars.ContextVar(
  'wn_jax_linen_pass', default=None
)


class _WeightNormedKernel:
  """Mixin for Flax layers: turns their ``kernel`` parameter into ``(kernel, scale)``.

  Flax layers read their kernel through ``self.param('kernel', ...)``; this override
  hands them what the call's :class:`wn_jax._kernel.Pass` gives (``w``, or ``v`` where the
  output is scaled), so all of the layer's own code runs unchanged.
  """

  axis: _core.Axis
  scale_init: Initializer | None
  dtype: Any
  param_dtype: Any
  name: str | None

  def _where(self) -> str:
    path = '/'.join(self.scope.path) if self.scope is not None else ''  # type: ignore[attr-defined]
    return f"{type(self).__name__} at '/{path}'"

  def _check_conv_input(self, inputs: jax.Array) -> None:
    """Input rank and group checks of Conv / ConvTranspose, with the layer's name."""
    ks = self.kernel_size  # type: ignore[attr-defined]
    n = 1 if isinstance(ks, int) else len(ks)
    if jnp.ndim(inputs) < n + 1:
      raise ValueError(
        f'{self._where()}: a {n}-D convolution needs inputs of shape (*batch, *spatial[{n}], '
        f'features), rank >= {n + 1}; got shape {jnp.shape(inputs)}. Add the missing axes.'
      )
    groups = getattr(self, 'feature_group_count', 1)
    channels = jnp.shape(inputs)[-1]
    if channels % groups or self.features % groups:  # type: ignore[attr-defined]
      raise ValueError(
        f'{self._where()}: feature_group_count={groups} must divide the input features '
        f'({channels}) and the output features ({self.features}); '  # type: ignore[attr-defined]
        f'choose a common divisor.'
      )

  @nn.nowrap
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):  # type: ignore[override]
    value = super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)  # type: ignore[misc]
    active = _PASS.get()
    if active is None or active[0] is not self or name not in ('kernel', 'bias'):
      return value
    p = active[1]
    if name == 'bias':
      return p.bias(value)
    return p.kernel(value, self._scale(value, p.axes(value)))

  def _scale(self, value: jax.Array, kept: tuple[int, ...]) -> jax.Array:
    """The layer's ``scale``: read, or created (at ``||kernel||`` by default, with no key)."""
    shape = _core.scale_shape(value.shape, kept)

    def init_scale(key, shape, dtype):
      if self.scale_init is None:
        g = _core.decompose(value, kept)[1].astype(dtype)
      else:
        g = self.scale_init(key, shape, dtype)
      return _scale_box(self.get_variable('params', 'kernel'), g, kept)  # type: ignore[attr-defined]

    if self.has_variable('params', 'scale'):  # type: ignore[attr-defined]
      # Read, not through param: Flax's param would check its shape (the pass does) by
      # tracing init_scale (jax.eval_shape), a third of an eager call's cost.
      return nn.unbox(self.get_variable('params', 'scale'))  # type: ignore[attr-defined]
    if self.scale_init is None and self.is_mutable_collection('params'):  # type: ignore[attr-defined]
      # g = ||v|| takes no key: created as a variable, not a param (which draws one), the
      # parameters after it (the bias) get the plain layer's keys. (Without mutable params,
      # param raises Flax's usual missing-parameter error.)
      scale = self.variable('params', 'scale', init_scale, None, shape, self.param_dtype)  # type: ignore[attr-defined]
      return scale.value
    return super().param('scale', init_scale, shape, self.param_dtype)  # type: ignore[misc]

  def _forward(self, call: Callable[[jax.Array], jax.Array], inputs: jax.Array) -> jax.Array:
    """``call(inputs)``, the parent's code, run with the pass of this call (``_kernel``)."""
    p = self._start(inputs)
    token = _PASS.set((self, p))
    try:
      y = call(inputs)
    finally:
      _PASS.reset(token)
    out, g, b = p.output(y)
    if g is not None:
      self._put_boxed('scale', g)
    if b is not None:
      self._put_boxed('bias', b)
    return out

  def _start(self, inputs: jax.Array) -> _kernel.Pass:
    dense = isinstance(self, nn.Dense)
    return _kernel.start(
      self._where(),
      self.axis,
      inputs,
      self.dtype,
      param_dtype=self.param_dtype,
      dense=dense,
      linear_dot=dense and self.dot_general is None and self.dot_general_cls is None,  # type: ignore[attr-defined]
      init=self._claim(inputs),
      path='/'.join(self.scope.path),  # type: ignore[attr-defined]
      out_axis=self._out_axis(),
    )

  def _claim(self, inputs: jax.Array) -> _data_init.Mode | None:
    """The data init's mode if it runs and this is the layer's first use, else ``None``."""
    if self.is_initializing() or not self.is_mutable_collection('params'):  # type: ignore[attr-defined]
      return None
    kernel = nn.unbox(self.get_variable('params', 'kernel'))  # type: ignore[attr-defined]
    if _data_init.is_partial_eval(kernel):
      # Flax's scan first traces its body in a partial-evaluation pass (for its loop
      # invariants) whose results it discards: not a use. The loop's own trace then
      # initializes each stacked layer from its own statistics.
      return None
    mode = _data_init.claim(self.scope.path)  # type: ignore[attr-defined]
    if mode is not None:
      try:
        _data_init.check_not_broadcast(kernel, inputs)
      except ValueError as e:
        raise ValueError(f'{self._where()}: {e}') from None
    return mode

  def _out_axis(self) -> int:
    return -1

  def _put_boxed(self, name: str, value: jax.Array) -> None:
    old = self.get_variable('params', name)  # type: ignore[attr-defined]
    if isinstance(old, nn.meta.AxisMetadata):
      value = old.replace_boxed(value)  # type: ignore[assignment]
    self.put_variable('params', name, value)  # type: ignore[attr-defined]


class WNDense(_WeightNormedKernel, nn.Dense):
  r"""``flax.linen.Dense`` with a weight-normalized kernel.

  $$
  y = x \, w + b, \qquad w_{:,j} = g_j \, v_{:,j} / \lVert v_{:,j} \rVert
  $$

  Where the rows (every input axis but the last) are fewer than the input features and
  ``axis`` keeps the output features, the layer scales its output instead of forming ``w``:
  $y = (x v) \odot (g / \lVert v \rVert) + b$, the same function, cheaper there. A symbolic
  row count (`jax.export` with a symbolic batch) always forms $w$.

  Parameters: `kernel` holds v, of layout `(in, out)`; `scale` holds g, of shape `(out,)`
  for the default `axis=-1`; and `bias`. Every attribute of `flax.linen.Dense` (features,
  use_bias, dtype, param_dtype, precision, kernel_init, bias_init, dot_general) works as
  there; two are added.

  Attributes:
    axis: the kept kernel axis or axes (default ``-1``, the output features).
    scale_init: ``None`` (default) starts ``scale`` at ``||kernel||``, so the layer
      computes what ``nn.Dense`` computes at init; or any Flax initializer.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, wn_jax
    >>> x = jnp.ones((2, 3))
    >>> layer = wn_jax.linen.WNDense(4)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables['params'])
    {'bias': (4,), 'kernel': (3, 4), 'scale': (4,)}
    >>> plain = nn.Dense(4).init(jax.random.key(0), x)
    >>> bool(jnp.allclose(layer.apply(variables, x), nn.Dense(4).apply(plain, x)))
    True
  """

  axis: _core.Axis = -1
  scale_init: Initializer | None = None

  def __call__(self, inputs: jax.Array) -> jax.Array:  # type: ignore[override]
    return self._forward(super().__call__, inputs)


class WNConv(_WeightNormedKernel, nn.Conv):
  r"""``flax.linen.Conv`` (1-D, 2-D, 3-D by ``kernel_size``) with a weight-normalized kernel.

  $$
  w_{\dots,j} = g_j \, v_{\dots,j} / \lVert v_{\dots,j} \rVert
  $$

  Parameters: `kernel` holds v, of layout `(*window, in // feature_group_count, out)`;
  `scale` holds g, of shape `(out,)` for `axis=-1`; and `bias`. A `mask` applies to the
  normalized weight, as to the plain layer's kernel. Every attribute of `flax.linen.Conv`
  (features, kernel_size, strides, padding including 'SAME', 'VALID', 'CIRCULAR',
  'CAUSAL' and explicit pairs, input_dilation, kernel_dilation, feature_group_count,
  use_bias, mask, dtype, param_dtype, precision, kernel_init, bias_init) works as there.

  Attributes:
    axis: the kept kernel axis or axes (default ``-1``, the output features).
    scale_init: ``None`` (default: ``g = ||v||``) or any Flax initializer.

  Examples:
    >>> import jax, jax.numpy as jnp, wn_jax
    >>> layer = wn_jax.linen.WNConv(8, kernel_size=(3,))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 16, 4)))
    >>> variables['params']['kernel'].shape, variables['params']['scale'].shape
    ((3, 4, 8), (8,))
  """

  axis: _core.Axis = -1
  scale_init: Initializer | None = None

  def __call__(self, inputs: jax.Array) -> jax.Array:  # type: ignore[override]
    self._check_conv_input(inputs)
    return self._forward(super().__call__, inputs)


class WNConvTranspose(_WeightNormedKernel, nn.ConvTranspose):
  r"""``flax.linen.ConvTranspose`` with a weight-normalized kernel.

  Parameters: `kernel` holds v, `scale` holds g, and `bias`. The kernel layout is
  `(*window, in, out)`, or `(*window, out, in)` with `transpose_kernel=True` (PyTorch's
  layout, transposed). The default `axis=-1` keeps the last kernel axis: the output
  features, or with `transpose_kernel=True` the input features, which is what PyTorch's
  `weight_norm(nn.ConvTranspose*d)` keeps (its default `dim=0`). Every attribute of
  `flax.linen.ConvTranspose` works as there.

  Attributes:
    axis: the kept kernel axis or axes (default ``-1``).
    scale_init: ``None`` (default: ``g = ||v||``) or any Flax initializer.

  Examples:
    >>> import jax, jax.numpy as jnp, wn_jax
    >>> layer = wn_jax.linen.WNConvTranspose(4, kernel_size=(4,), strides=(2,))
    >>> y, variables = layer.init_with_output(jax.random.key(0), jnp.ones((1, 8, 3)))
    >>> y.shape, variables['params']['scale'].shape
    ((1, 16, 4), (4,))
  """

  axis: _core.Axis = -1
  scale_init: Initializer | None = None

  def __call__(self, inputs: jax.Array) -> jax.Array:  # type: ignore[override]
    self._check_conv_input(inputs)
    return self._forward(super().__call__, inputs)

  def _out_axis(self) -> int:
    return -2 if self.transpose_kernel else -1


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

  Attributes:
    layer: the module to wrap (a ``flax.linen.Module``).
    axis: the kept axis or axes of every selected parameter (default ``-1``, the output
      features of Flax kernels).
    where: which parameters: a regular expression searched in the ``/``-joined path
      inside ``layer``'s params (default: every ``kernel``), or a callable
      ``(path, leaf) -> bool``.
    scale_init: ``None`` (``g = ||v||``) or a Flax initializer.
    epsilon: a lower bound on each ``||v||`` (default ``0``: none), as
      :func:`wn_jax.normalize`'s ``eps``. Flax's ``1e-12`` is not needed against zero
      slices here (they give ``w = 0`` and finite gradients).
    param_dtype: the dtype of ``scale`` (default ``None``: that of the parameter it
      scales). ``jnp.float32`` keeps a float32 magnitude for a float16 kernel.

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
      raise _tree.not_a_layer(
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
    method = inspect.getattr_static(type(layer), name, None)
    if inspect.isfunction(method) and not hasattr(method, 'nowrap'):
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
    with _errors.labelled(self.label):
      return _kernel.weight(x, layer_dtype, (self.args, self.kwargs), self.wrapper.epsilon)

  def init(self, key: jax.Array) -> Any:
    """The scale tree at init: ``g = ||v||`` (or ``scale_init``), boxed like each kernel."""
    w = self.wrapper
    boxed = _nested(self.keys, self.created)
    params = nn.unbox(boxed)
    _tree.check_wrappable(params, w.where, self.owners)
    wn = _tree.weight_norm(params, w.axis, where=w.where)
    keys = iter(jax.random.split(key, 1 + len(jax.tree_util.tree_leaves(wn))))

    def g(x: _tree.WeightNormed) -> jax.Array:
      return _tree.initial_scale(x, w.scale_init, w.param_dtype, lambda: next(keys))

    def box(path, g):  # each scale partitioned like its kernel's kept axes
      kernel = boxed
      for k in path:
        kernel = kernel[k.key]
      kept = _axes.kept_axes(jnp.ndim(nn.unbox(kernel)), w.axis)
      return _scale_box(kernel, g, kept)

    return jax.tree_util.tree_map_with_path(box, _tree.map_selected(wn, g))

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
        lambda v: _tree.WeightNormed(v, None, self.wrapper.axis),
        required=False,
      )
    merged = _tree.map_selected(directions, self.weight, scale)
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
        _tree.weight_normed_parts(path, type(m).__name__, isinstance(m, WeightNorm))
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


class MeanOnlyBatchNorm(nn.Module):
  r"""The paper's mean-only batch normalization: $y = x - \mu_B + b$.

  Subtracts the per-feature batch mean (over every axis but ``axis``) and adds a
  learned bias; no division by the variance, so with weight normalization the
  activations keep their scale while the noise of the batch statistics stays small.
  A running mean in the ``batch_stats`` collection serves ``use_running_average=True``.

  Attributes:
    use_running_average: use the running mean instead of the batch's (may also be
      passed to ``__call__``).
    axis: the feature axis (default ``-1``).
    momentum: decay of the running mean.
    use_bias: add a learned ``bias``.
    bias_init: initializer of the bias.
    dtype: computation dtype (the mean is always computed in float32 or wider).
    param_dtype: dtype of ``bias``.
    axis_name: a mapped axis name (``pmap``, ``shard_map``) to average the batch mean
      over, like ``flax.linen.BatchNorm``'s.
    axis_index_groups: groups of devices for ``axis_name``.

  Examples:
    >>> import jax, jax.numpy as jnp, wn_jax
    >>> bn = wn_jax.linen.MeanOnlyBatchNorm(use_running_average=False)
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> y, state = bn.init_with_output(jax.random.key(0), x)
    >>> y
    Array([[-2., -2.],
           [ 0.,  0.],
           [ 2.,  2.]], dtype=float32)
  """

  use_running_average: bool | None = None
  axis: int = -1
  momentum: float = 0.99
  use_bias: bool = True
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: str | None = None
  axis_index_groups: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_ra = nn.merge_param('use_running_average', self.use_running_average, use_running_average)
    x = jnp.asarray(x)
    feature = _batch_norm.feature_axis(x, self.axis, f'MeanOnlyBatchNorm {self.name!r}')
    stat_dtype = _core.reduce_dtype(x.dtype)
    ra_mean = self.variable(
      'batch_stats', 'mean', lambda: jnp.zeros((x.shape[feature],), stat_dtype)
    )
    if use_ra:
      mean = ra_mean.value
    else:
      # Flax's BatchNorm takes no cross-device mean at init either.
      axis_name = None if self.is_initializing() else self.axis_name
      mean = _batch_norm.batch_mean(x, feature, axis_name, self.axis_index_groups)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
    bias = None
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (x.shape[feature],), self.param_dtype)
    return _batch_norm.centered(x, mean, bias, feature, self.dtype)


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
  initialized on its first use only. A feature with standard deviation below 1e-6
  (constant on the batch) keeps $\sigma = 1$ (finite, never NaN). Statistics are
  taken in float32 (or wider) whatever the parameter dtype; a ``g`` or ``b`` that does not
  fit the layer's parameter or compute dtype (float16 on a batch that varies too little)
  is refused with a ``ValueError`` naming the layer, never stored as ``inf`` (under ``jit``
  it is raised when the computation runs). A layer whose parameters ``nn.scan`` broadcasts
  to every step is refused, naming it (initialize it outside the scan); one shared across
  ``nn.vmap``'s mapped axis needs the same ``axis_name`` passed to ``nn.vmap`` and here, or
  is refused with that fix. Plain layers,
  ``WeightNorm``-wrapped layers and ``MeanOnlyBatchNorm`` are left as they are; other
  collections (``batch_stats``) may change during the pass (batch norm in training
  mode) but are returned unchanged.

  Args:
    model: the linen model.
    variables: its variables (``{'params': ..., ...}``), e.g. from ``model.init``.
    *args: the batch, as ``model.apply`` takes it.
    init_scale: the target standard deviation, or a callable from a layer's path
      (``'Dense_0'``, ``'block/WNConv_1'``) to it.
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
  with _data_init.mode(init_scale, axis_name):
    # Every collection mutable, so a model with batch norm in training mode runs; only the
    # new params are kept.
    _, updates = model.apply(variables, *args, mutable=True, method=method, **kwargs)
  return {**variables, 'params': updates['params']}


def layer_axes(model: nn.Module, *args: Any, method: Any = None, **kwargs: Any) -> dict[str, Any]:
  """The kept ``axis`` of every WN layer of ``model``, by path: what :func:`fold` needs to know.

  Traces ``model.init`` abstractly (``jax.eval_shape``: nothing is computed or allocated)
  on ``args`` (arrays or ``jax.ShapeDtypeStruct``) and records the ``axis`` attribute of
  each ``WNDense``, ``WNConv`` and ``WNConvTranspose`` it calls, keyed by the layer's path
  in the params tree (``'block/WNDense_0'``; ``''`` for the model itself).

  Args:
    model: the linen model.
    *args: example inputs, as ``model.init`` takes them.
    method: the method of ``model`` to run (default ``__call__``).
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
  axes: dict[str, Any] = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if isinstance(module, _WeightNormedKernel) and context.method_name == '__call__':
      axes['/'.join(module.scope.path)] = module.axis  # type: ignore[attr-defined]
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, method=method, **kwargs), *args)
  return dict(sorted(axes.items()))


@_errors.labelled('wn_jax.linen.fold')
def fold(params: Any, axis: _fold.AxisSpec = _fold.INFER) -> Any:
  r"""Folds weight normalization away: WN layer parameters -> plain layer parameters.

  Every dict that holds a ``kernel`` and a ``scale`` array (a ``WNDense``, ``WNConv`` or
  ``WNConvTranspose``) gets $w = g \, v / \lVert v \rVert$ as its ``kernel`` and loses
  ``scale``; ``WeightNormed`` leaves are materialized; everything else is kept. The result
  loads into the plain Flax layers (``nn.Dense``, ``nn.Conv``, ``nn.ConvTranspose``) with the
  same names, for deployment: inference then costs exactly what the plain model costs.
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
    ValueError: wn_jax.linen.fold: layer '': its scale of shape (3,) fits several kept axes ...
    >>> plain = wn_jax.linen.fold(v['params'], wn_jax.linen.layer_axes(square, x))
    >>> bool(jnp.allclose(nn.Dense(3).apply({'params': plain}, x), square.apply(v, x)))
    True
  """
  return _fold.fold(nn.unbox(params), axis)
