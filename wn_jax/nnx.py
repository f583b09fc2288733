"""Flax NNX layers with weight normalization.

``WNLinear``, ``WNConv`` and ``WNConvTranspose`` are ``flax.nnx.Linear`` / ``Conv`` /
``ConvTranspose`` (same arguments, same code) whose ``kernel`` holds the direction ``v``
and a new ``scale`` the magnitude ``g``; all three of ``kernel``, ``scale``, ``bias``
are ``nnx.Param``, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains them. The
forward pass computes ``w = scale * kernel / ||kernel||`` and never writes it back.
``w`` is formed in the wider of the parameters' dtype and ``dtype`` (as in
:mod:`wn_jax.linen`). Layouts and the default kept ``axis=-1`` are those of the linen layers
(:mod:`wn_jax.linen`): Linear ``(in, out)``, Conv ``(*window, in // groups, out)``,
ConvTranspose ``(*window, in, out)``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from wn_jax import _axes
from wn_jax import _batch_norm
from wn_jax import _core
from wn_jax import _data_init
from wn_jax import _kernel
from wn_jax import _errors
from wn_jax import _fold
from wn_jax import _tree

Initializer = Callable[..., Any]

# While data_init runs, each WN layer's scale carries its index in the model as this metadata
# key: the metadata follows the layer into NNX transforms' copies of it, so a write that a
# transform discards is traced back to the model's layer.
_TAG = 'wn_jax_data_init'


class _KernelView:
  """The module as Flax's ``__call__`` sees it, with the kernel and bias replaced.

  A bias of ``None`` also reads ``use_bias`` as ``False``: the layer adds none.
  """

  def __init__(self, module: Any, kernel: jax.Array, bias: Any):
    self._module = module
    self.kernel = kernel
    self.bias = bias
    if bias is None:
      self.use_bias = False

  def __getattr__(self, name: str) -> Any:
    return getattr(self._module, name)


def _scale_param(kernel: nnx.Variable, g: jax.Array, kept: tuple[int, ...]) -> nnx.Param:
  """``g`` as an ``nnx.Param``, sharded like the kernel's kept axes."""
  names = _axes.kept_names(kernel.get_metadata().get('out_sharding'), kept)
  if names is None:
    return nnx.Param(g)
  return nnx.Param(g, out_sharding=names)


class _WeightNormedKernel:
  """Mixin: adds ``scale`` at construction and normalizes ``kernel`` in ``__call__``."""

  kernel: nnx.Param
  scale: nnx.Param
  bias: Any
  axis: _core.Axis
  dtype: Any
  param_dtype: Any

  _dense = False  # WNLinear: may scale its output instead of forming w (_kernel.scales_output)

  def _add_scale(self, axis: _core.Axis, scale_init: Initializer | None, rngs: nnx.Rngs) -> None:
    v = self.kernel[...]
    with _errors.labelled(self._where()):
      _kernel.check_real('kernel', v)
      kept = _axes.kept_axes(v.ndim, axis)
    self.axis = axis
    if scale_init is None:
      g = _core.decompose(v, kept)[1]
    else:
      g = scale_init(rngs.params(), _core.scale_shape(v.shape, kept), v.dtype)
    self.scale = _scale_param(self.kernel, g, kept)

  def _out_axis(self) -> int:
    return -1

  def _where(self) -> str:
    return f'{type(self).__name__}(kernel {tuple(self.kernel.shape)})'

  def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    mode = _data_init.claim(id(self))
    tag = None if mode is None else self.scale.get_metadata(_TAG, None)
    if mode is not None:  # the caller checks that the writes below landed
      mode.claimed.append((tag, self))
    kernel = self.kernel[...]
    p = _kernel.start(
      self._where(),
      self.axis,
      inputs,
      self.dtype,
      param_dtype=kernel.dtype,
      dense=self._dense,
      linear_dot=getattr(self, 'dot_general', None) is jax.lax.dot_general,
      init=mode,
      path='' if mode is None else mode.paths.get(tag, ''),
      out_axis=self._out_axis(),
    )
    view = _KernelView(
      self, p.kernel(kernel, self.scale[...]), p.bias(None if self.bias is None else self.bias[...])
    )
    out, g, b = p.output(super().__call__.__func__(view, inputs, *args, **kwargs))  # type: ignore[misc]
    if g is not None:
      self.scale[...] = g
    if b is not None:
      self.bias[...] = b
    return out


class WNLinear(_WeightNormedKernel, nnx.Linear):
  r"""``flax.nnx.Linear`` with a weight-normalized kernel: $w = g \, v / \lVert v \rVert$.

  Where the rows (every input axis but the last) are fewer than the input features and
  ``axis`` keeps the output features, the layer scales its output instead of forming ``w``:
  $y = (x v) \odot (g / \lVert v \rVert) + b$, the same function, cheaper there. A symbolic
  row count (`jax.export` with a symbolic batch) always forms $w$.

  Args:
    in_features: as ``nnx.Linear``.
    out_features: as ``nnx.Linear``.
    axis: the kept kernel axis or axes (default ``-1``: one ``g`` per output feature of
      the ``(in, out)`` kernel).
    scale_init: ``None`` (default: ``g = ||v||``, the layer computes what
      ``nnx.Linear`` with the same ``rngs`` computes) or a Flax initializer.
    rngs: the ``nnx.Rngs``.
    **kwargs: every other ``nnx.Linear`` argument (use_bias, dtype, param_dtype,
      precision, kernel_init, bias_init, ...).

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> from flax import nnx
    >>> layer = wn_jax.nnx.WNLinear(3, 4, rngs=nnx.Rngs(0))
    >>> plain = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer.scale.shape
    ((3, 4), (4,))
    >>> bool(jnp.allclose(layer(jnp.ones((2, 3))), plain(jnp.ones((2, 3)))))
    True
  """

  _dense = True

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    axis: _core.Axis = -1,
    scale_init: Initializer | None = None,
    rngs: nnx.Rngs,
    **kwargs: Any,
  ):
    super().__init__(in_features, out_features, rngs=rngs, **kwargs)
    self._add_scale(axis, scale_init, rngs)


class WNConv(_WeightNormedKernel, nnx.Conv):
  r"""``flax.nnx.Conv`` with a weight-normalized kernel ``(*window, in // groups, out)``.

  Args:
    in_features: as ``nnx.Conv``.
    out_features: as ``nnx.Conv``.
    kernel_size: as ``nnx.Conv``.
    axis: the kept kernel axis or axes (default ``-1``, the output features).
    scale_init: ``None`` (``g = ||v||``) or a Flax initializer.
    rngs: the ``nnx.Rngs``.
    **kwargs: every other ``nnx.Conv`` argument (strides, padding, input_dilation,
      kernel_dilation, feature_group_count, use_bias, mask, dtype, param_dtype, ...).

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> from flax import nnx
    >>> layer = wn_jax.nnx.WNConv(4, 8, (3,), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 16, 4))).shape, layer.scale.shape
    ((1, 16, 8), (8,))
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | tuple[int, ...],
    *,
    axis: _core.Axis = -1,
    scale_init: Initializer | None = None,
    rngs: nnx.Rngs,
    **kwargs: Any,
  ):
    groups = kwargs.get('feature_group_count', 1)
    if in_features % groups or out_features % groups:
      raise ValueError(
        f'WNConv: feature_group_count={groups} must divide in_features ({in_features}) '
        f'and out_features ({out_features}); choose a common divisor.'
      )
    super().__init__(in_features, out_features, kernel_size, rngs=rngs, **kwargs)
    self._add_scale(axis, scale_init, rngs)


class WNConvTranspose(_WeightNormedKernel, nnx.ConvTranspose):
  r"""``flax.nnx.ConvTranspose`` with a weight-normalized kernel.

  The kernel layout is ``(*window, in, out)``, or ``(*window, out, in)`` with
  ``transpose_kernel=True``; the default ``axis=-1`` keeps the last kernel axis (with
  ``transpose_kernel=True``, the input features, as PyTorch's ``weight_norm`` does).

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> from flax import nnx
    >>> layer = wn_jax.nnx.WNConvTranspose(3, 4, (4,), strides=(2,), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 8, 3))).shape
    (1, 16, 4)
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | tuple[int, ...],
    *,
    axis: _core.Axis = -1,
    scale_init: Initializer | None = None,
    rngs: nnx.Rngs,
    **kwargs: Any,
  ):
    super().__init__(in_features, out_features, kernel_size, rngs=rngs, **kwargs)
    self._add_scale(axis, scale_init, rngs)

  def _out_axis(self) -> int:
    return -2 if getattr(self, 'transpose_kernel', False) else -1


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


class WeightNorm(nnx.Module):
  r"""Weight-normalizes the ``nnx.Param`` s of any NNX module.

  Each selected parameter ``v`` of ``layer`` is used as ``w = g * v / ||v||``. ``layer``
  keeps ``v`` in its own parameters (never overwritten); ``g`` lives in ``self.scale``,
  a nested ``nnx.Dict`` of ``nnx.Param`` that mirrors the layer's parameter paths, with
  string keys (``model.scale['kernel']``, ``model.scale['layers']['0']['kernel']``), so
  ``nnx.Optimizer(..., wrt=nnx.Param)`` trains it. Non-parameter state that the layer
  updates in its forward pass (e.g. ``BatchStat``) is carried back to it.

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
      (default: every ``kernel``), or a callable ``(path, leaf) -> bool``.
    scale_init: ``None`` (``g = ||v||``: the wrapped layer's function is unchanged) or a
      Flax initializer (then ``rngs`` is needed).
    epsilon: a lower bound on each ``||v||`` (default ``0``: none), as
      :func:`wn_jax.normalize`'s ``eps``. Flax's ``1e-12`` is not needed against zero
      slices here (they give ``w = 0`` and finite gradients).
    param_dtype: the dtype of ``scale`` (default ``None``: that of the parameter it
      scales). ``jnp.float32`` keeps a float32 magnitude for a float16 kernel.
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
      raise _tree.not_a_layer(
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
        owners.update(_tree.weight_normed_parts(keys, type(m).__name__, isinstance(m, WeightNorm)))
    try:
      _tree.check_wrappable(pure, where, owners)
      wn = _tree.weight_norm(pure, axis, where=where)
    except ValueError as e:
      raise ValueError(f'{self._where()}: {e}') from None
    if scale_init is not None and rngs is None:
      raise ValueError(f'{self._where()}: a scale_init needs rngs=nnx.Rngs(...).')

    key = None if rngs is None else rngs.params
    scales = _tree.map_selected(wn, lambda x: _tree.initial_scale(x, scale_init, param_dtype, key))
    self.scale = _to_params(scales, nnx.state(layer, nnx.Param), axis, self._where())

  def _where(self) -> str:
    return f'wn_jax.nnx.WeightNorm({type(self.layer).__name__})'

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self._mapped('__call__', args, kwargs)

  def __getattr__(self, name: str) -> Any:
    layer = vars(self).get('layer')
    if name.startswith('_') or not isinstance(layer, nnx.Module):
      raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')
    if inspect.isfunction(inspect.getattr_static(type(layer), name, None)):

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
    with _errors.labelled('wn_jax.nnx.WeightNorm'):
      directions = _tree.replace_selected(
        nnx.to_pure_dict(params), self.where, lambda v: _tree.WeightNormed(v, None, self.axis)
      )
    g = nnx.to_pure_dict(nnx.state(self.scale, nnx.Param))
    where, layer_dtype = self._where(), getattr(self.layer, 'dtype', None)

    def weight(x: _tree.WeightNormed) -> jax.Array:
      with _errors.labelled(where):
        return _kernel.weight(x, layer_dtype, (args, kwargs), self.epsilon)

    weights = _tree.map_selected(directions, weight, g)
    nnx.replace_by_pure_dict(params, weights)
    layer = nnx.merge(graphdef, params, rest)
    out = getattr(layer, method)(*args, **kwargs)
    nnx.update(self.layer, nnx.state(layer, nnx.Not(nnx.Param)))
    return out


class MeanOnlyBatchNorm(nnx.Module):
  r"""The paper's mean-only batch normalization: $y = x - \mu_B + b$.

  The mean runs over every axis but ``axis`` (features); the running mean lives in an
  ``nnx.BatchStat`` and serves ``use_running_average=True`` (or after
  ``model.eval()``). No division by the variance.

  Args:
    num_features: size of the feature axis.
    axis: the feature axis (default ``-1``), as ``wn_jax.linen.MeanOnlyBatchNorm``'s.
    momentum: decay of the running mean.
    use_running_average: use the running mean instead of the batch's.
    use_bias: add a learned ``bias`` (``nnx.Param``).
    dtype: computation dtype (the mean is taken in float32 or wider).
    param_dtype: dtype of ``bias``.
    axis_name: a mapped axis to average the batch mean over.
    rngs: unused, for signature parity with ``nnx.BatchNorm``.

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> from flax import nnx
    >>> bn = wn_jax.nnx.MeanOnlyBatchNorm(2, rngs=nnx.Rngs(0))
    >>> bn(jnp.arange(6.0).reshape(3, 2))
    Array([[-2., -2.],
           [ 0.,  0.],
           [ 2.,  2.]], dtype=float32)
  """

  def __init__(
    self,
    num_features: int,
    *,
    axis: int = -1,
    momentum: float = 0.99,
    use_running_average: bool = False,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    axis_name: str | None = None,
    rngs: nnx.Rngs | None = None,
  ):
    del rngs
    self.axis = axis
    self.momentum = momentum
    self.use_running_average = use_running_average
    self.dtype = dtype
    self.axis_name = axis_name
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype)) if use_bias else None

  def __call__(self, x: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
    use_ra = self.use_running_average if use_running_average is None else use_running_average
    x = jnp.asarray(x)
    feature = _batch_norm.feature_axis(x, self.axis, 'wn_jax.nnx.MeanOnlyBatchNorm')
    if use_ra:
      mean = self.mean[...]
    else:
      mean = _batch_norm.batch_mean(x, feature, self.axis_name)
      self.mean[...] = (self.momentum * self.mean[...] + (1.0 - self.momentum) * mean).astype(
        self.mean.dtype
      )
    bias = None if self.bias is None else self.bias[...]
    return _batch_norm.centered(x, mean, bias, feature, self.dtype)

  def set_mode(self, use_running_average: bool | None = None, **kwargs: Any) -> dict:
    """Lets ``model.eval()`` / ``model.train()`` switch the running average."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
    return kwargs


def _path(path: tuple[Any, ...]) -> str:
  """A layer's path in its model, as :func:`layer_axes` and ``data_init`` name it."""
  return '/'.join(str(k) for k in path)


def _discarded(path: str, layer: _WeightNormedKernel) -> ValueError:
  return ValueError(
    f"wn_jax.nnx.data_init: layer '{path}' ({layer._where()}) initialized itself inside a "
    f'transform that discards its writes: a layer shared across the steps of nnx.scan '
    f'(in_axes=None, e.g. an RNN cell) would keep its scale and bias. The model is '
    f'left unchanged. Run data_init on the model with the shared layer applied in a Python '
    f'loop (the same layer objects), then use the transformed model.'
  )


@contextlib.contextmanager
def _tagged(layers: list[tuple[Any, _WeightNormedKernel]]) -> Iterator[None]:
  """Each layer's scale tagged with its index while the block runs (see ``_TAG``)."""
  for i, (_, layer) in enumerate(layers):
    layer.scale.set_metadata(_TAG, i)
  try:
    yield
  finally:
    for _, layer in layers:
      layer.scale.del_metadata(_TAG)


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
  ``model``, as :func:`layer_axes` names it: ``'layers/0'``). Wrap the call in ``nnx.jit`` to compile it.

  NNX discards a layer's writes inside ``nnx.scan`` where the layer is shared across the
  steps (``in_axes=None``, e.g. an RNN cell): such a layer is refused with a ``ValueError``
  naming it, never skipped; initialize the model with that layer applied in a Python loop
  instead. A layer shared across ``nnx.vmap``'s mapped axis needs the same ``axis_name``
  passed to ``nnx.vmap`` and here (or is refused with that fix). Layers stacked along a
  transform (``in_axes=0``) are each initialized. On any error the model is left as it was.

  Args:
    model: the NNX model; its WN layers' ``scale`` and ``bias`` are updated in place.
    *args: the batch.
    init_scale: the target standard deviation, or a callable from the layer's path
      (``'layers/0'``; ``''`` for the model itself) to it.
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
  layers = [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, _WeightNormedKernel)]
  state = [n for _, n in nnx.iter_graph(model) if isinstance(n, nnx.Variable)]
  saved = [v.get_raw_value() for v in state]
  scales = [layer.scale.get_raw_value() for _, layer in layers]
  try:
    with _data_init.mode(init_scale, axis_name) as mode, _tagged(layers):
      mode.paths.update({i: _path(p) for i, (p, _) in enumerate(layers)})
      out = model(*args, **kwargs)
    for i, _ in mode.claimed:  # a write that landed replaced the scale's array
      if i is not None and layers[i][1].scale.get_raw_value() is scales[i]:
        raise _discarded(_path(layers[i][0]), layers[i][1])
  except BaseException:
    for v, value in zip(state, saved):  # the model as it was, never half initialized
      v.set_raw_value(value)
    raise
  return out


def layer_axes(model: nnx.Module) -> dict[str, Any]:
  """The kept ``axis`` of every WN layer of ``model``, by path (``'layers/0'``; ``''`` for itself).

  The paths are those of ``nnx.to_pure_dict(nnx.state(model))``, ``/``-joined, so the
  result is the ``axis`` that :func:`wn_jax.linen.fold` takes for this model's state.

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
  return {
    _path(path): node.axis
    for path, node in nnx.iter_graph(model)
    if isinstance(node, _WeightNormedKernel)
  }


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
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return _fold.fold(params, layer_axes(model), from_model=True)
