"""The NNX WN layers: Flax's Linear, Conv and ConvTranspose, each reading the one forward pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
from flax import nnx

from wn_jax import _axes
from wn_jax import _core
from wn_jax import _data_init
from wn_jax import _errors
from wn_jax import _kernel

Initializer = Callable[..., Any]

# While data_init runs, each WN layer's scale carries its index in the model (and the call's
# number, _data_init.Mode.call) as this metadata key: the metadata follows the layer into NNX
# transforms' copies of it, so a write that a transform discards is traced back to the model's
# layer.
_TAG = 'wn_jax_data_init'


class _KernelView:
  """The module as Flax's ``__call__`` sees it, with the kernel and bias replaced.

  A bias of ``None`` also reads ``use_bias`` as ``False``: the layer adds none.
  """

  def __init__(self, module: Any, kernel: jax.Array, bias: Any):
    self._module = module
    self.kernel = _Read(kernel)
    self.bias = None if bias is None else _Read(bias)
    if bias is None:
      self.use_bias = False

  def __getattr__(self, name: str) -> Any:
    return getattr(self._module, name)


class _Read:
  """An array that Flax's ``__call__`` reads as it reads a variable: ``x[...]`` (or
  ``x.value``). The array itself would go through ``jnp`` indexing, which cost an eager call
  of a layer 0.05 ms per read: a quarter of an ``nnx.Linear`` call."""

  __slots__ = ('value',)

  def __init__(self, value: jax.Array):
    self.value = value

  def __getitem__(self, index: Any) -> jax.Array:
    return self.value if index is Ellipsis else self.value[index]


def _scale_param(kernel: nnx.Variable, g: jax.Array, kept: tuple[int, ...]) -> nnx.Param:
  """``g`` as an ``nnx.Param``, sharded like the kernel's kept axes (on the kernel's ``mesh``
  where its partitioning names one, as Flax places the kernel outside a mesh context)."""
  metadata = kernel.get_metadata()
  names = _axes.kept_names(metadata.get('out_sharding'), kept)
  if names is None:
    return nnx.Param(g)
  return nnx.Param(g, out_sharding=names, mesh=metadata.get('mesh'))


class _WeightNormedKernel:
  """Mixin: adds ``scale`` at construction and normalizes ``kernel`` in ``__call__``."""

  kernel: nnx.Param
  scale: nnx.Param
  # (path, kernel shape, scale shape) as built: one layer's, where a transform stacks it
  _step_shapes: tuple
  bias: Any
  axis: _core.Axis
  dtype: Any
  param_dtype: Any

  _dense = False  # WNLinear: may scale its output instead of forming w (_kernel.scales_output)

  def _add_scale(self, axis: _core.Axis, scale_init: Initializer | None, rngs: nnx.Rngs) -> None:
    v = self.kernel[...]
    with _errors.labelled(self._where()):
      _kernel.check_real('kernel', v)
      _axes.check_scale_init(scale_init)
      kept = _axes.kept_axes(v.ndim, axis)
    if getattr(self, 'mask', None) is not None:  # as in linen: see _kernel.zero_masked_out
      v = _kernel.zero_masked_out(v, self.mask)  # type: ignore[attr-defined]
      self.kernel[...] = v
    self.axis = axis
    if scale_init is None:
      g = _core.decompose(v, kept)[1]
    else:
      g = scale_init(rngs.params(), _core.scale_shape(v.shape, kept), v.dtype)
    self.scale = _scale_param(self.kernel, g, kept)
    self._step_shapes = ((('kernel',), tuple(v.shape), tuple(g.shape)),)

  def _linear_dot(self) -> bool:
    """JAX's own ``dot_general`` and no ``preferred_element_type`` (the dot's result dtype:
    ``x @ v`` would be rounded there at ``||v||``'s scale, float16 overflowing, and Flax adds
    the bias after it): the output may be scaled (:func:`wn_jax._kernel.scales_output`)."""
    plain = getattr(self, 'dot_general', None) is jax.lax.dot_general
    return plain and getattr(self, 'preferred_element_type', None) is None

  def _out_axis(self) -> int:
    return -1

  def _where(self) -> str:
    return f'{type(self).__name__}(kernel {tuple(self.kernel.shape)})'

  def _at(self, tag: Any) -> str:
    """The layer and, in a data init, its path in the model."""
    path = _data_init.path(tag)
    return self._where() if path is None else f"{self._where()} at '{path}'"

  def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    marking = self.scale.get_metadata(_TAG, None) if _data_init.running() else None
    tag = None if marking is None else marking[0]
    # Keyed by the tag data_init put on the scale: it follows the layer into the copies NNX
    # transforms (nnx.remat, nnx.jit) run, so only the first traced use runs the checks.
    claimed = _data_init.claim(id(self) if tag is None else (_TAG, tag))
    mode, first = claimed or (None, True)
    if mode is not None and tag is None:  # outside the model's graph: adopted, marked fresh
      tag = mark(self, ('outside', len(mode.marked)), mode)
      claimed = _data_init.claim((_TAG, tag))
    if mode is not None and first:  # the caller checks that the writes below landed
      mode.claimed.append((tag, self))
    elif mode is not None and self.scale.get_raw_value() is mode.marked[tag][2]:
      raise ValueError(f'{self._at(tag)}: {DISCARDED}')  # no earlier use's write landed
    kernel = self.kernel[...]
    p = _kernel.start(
      _errors.later(self._where),
      self.axis,
      inputs,
      self.dtype,
      param_dtype=kernel.dtype,
      dense=self._dense,
      linear_dot=self._linear_dot(),
      init=claimed,
      path='' if mode is None else mode.paths.get(tag, ''),
      out_axis=self._out_axis(),
    )
    view = _KernelView(
      self,
      p.kernel(kernel, self.scale[...], p.axes(kernel)),
      p.bias(None if self.bias is None else self.bias[...]),
    )
    out, g, b = p.output(super().__call__.__func__(view, inputs, *args, **kwargs))  # type: ignore[misc]
    try:
      if g is not None:
        self.scale[...] = g
      if b is not None:
        self.bias[...] = b
    except flax.errors.TraceContextError:
      if not first:  # a later use, inside a closure: it keeps what the first one set
        return out
      raise ValueError(
        f"{self._at(tag)}: data_init cannot set this layer's scale and bias: its first use is "
        f'in a function that a JAX transform traces (jax.lax.scan, jax.lax.map, a closure in '
        f"nnx.scan's body) and that holds the layer from outside, so NNX refuses the writes. "
        f'Pass the layer to the NNX transform as an argument (nnx.scan(f, in_axes=...)(layer, '
        f'...)), or use it once before the loop.'
      ) from None
    return out


def mark(layer: _WeightNormedKernel, tag: Any, mode: _data_init.Mode) -> Any:
  """``layer``'s scale fresh (-inf) and tagged ``tag`` for a data init (``mode``), with what
  to put back; a ``ValueError`` where it cannot be written (inside a transform)."""
  before = layer.scale.get_raw_value()
  try:
    layer.scale.set_raw_value(_data_init.fresh(before))
  except flax.errors.TraceContextError:
    raise ValueError(
      f'{layer._where()}: data_init met this layer first inside a transform, and it is not in '
      f"the model's graph (a closure holds it, or an argument): it cannot be marked for "
      f'initialization there. Make it an attribute of the model, or use it once outside any '
      f'transform first.'
    ) from None
  layer.scale.set_metadata(_TAG, (tag, mode.call))
  bias = None if layer.bias is None else layer.bias.get_raw_value()
  mode.marked[tag] = (layer, before, layer.scale.get_raw_value(), bias)
  return tag


DISCARDED = (
  'initialized itself inside a transform that discards its writes (a layer shared across the '
  'steps of nnx.scan, in_axes=None, e.g. an RNN cell; a JAX transform over nnx.split / merge '
  'that does not write the state back): it would keep its scale and bias. The model is left '
  'unchanged. Run data_init on the model with the layer applied in a Python loop (the same '
  'layer objects), then use the transformed model.'
)


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


class _WeightNormedConv(_WeightNormedKernel):
  """The constructor WNConv and WNConvTranspose share: Flax's, then ``scale``."""

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
        f'{type(self).__name__}: feature_group_count={groups} must divide in_features ({in_features}) '
        f'and out_features ({out_features}); choose a common divisor.'
      )
    super().__init__(in_features, out_features, kernel_size, rngs=rngs, **kwargs)  # type: ignore[call-arg]
    self._add_scale(axis, scale_init, rngs)

  def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    _kernel.check_conv_rank(_errors.later(self._where), inputs, self.kernel_size)  # type: ignore[attr-defined]
    return super().__call__(inputs, *args, **kwargs)


class WNConv(_WeightNormedConv, nnx.Conv):
  r"""``flax.nnx.Conv`` with a weight-normalized kernel ``(*window, in // groups, out)``.

  Args:
    in_features: as ``nnx.Conv``.
    out_features: as ``nnx.Conv``.
    kernel_size: as ``nnx.Conv``.
    axis: the kept kernel axis or axes (default ``-1``, the output features).
    scale_init: ``None`` (``g = ||v||``) or a Flax initializer.
    rngs: the ``nnx.Rngs``.
    **kwargs: every other ``nnx.Conv`` argument (strides, padding, input_dilation,
      kernel_dilation, feature_group_count, use_bias, mask, dtype, param_dtype, ...). A
      ``mask`` applies to the normalized weight, as to the plain layer's kernel; the
      kernel's entries it zeroes start at 0, so they count in no norm and stay 0 in
      training (``||w|| = g``).

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> from flax import nnx
    >>> layer = wn_jax.nnx.WNConv(4, 8, (3,), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 16, 4))).shape, layer.scale.shape
    ((1, 16, 8), (8,))
  """


class WNConvTranspose(_WeightNormedConv, nnx.ConvTranspose):
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

  def _out_axis(self) -> int:
    return -2 if getattr(self, 'transpose_kernel', False) else -1
