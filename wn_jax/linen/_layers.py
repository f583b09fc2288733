"""The linen WN layers: Flax's Dense, Conv and ConvTranspose, each reading the one forward pass."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wn_jax import _axes
from wn_jax import _boxes
from wn_jax import _core
from wn_jax import _data_init
from wn_jax import _errors
from wn_jax import _kernel

Initializer = Callable[..., Any]


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
    _kernel.check_conv_rank(self._where(), inputs, self.kernel_size)  # type: ignore[attr-defined]
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
    if getattr(self, 'mask', None) is not None and self._creates_scale():
      value = _kernel.zero_masked_out(value, self.mask)  # type: ignore[attr-defined]
      self._put_boxed('kernel', value)
    kept = p.axes(value)
    return p.kernel(value, self._scale(value, kept), kept)

  def _creates_scale(self) -> bool:
    """Whether this call creates ``scale`` (``init``, or a plain checkpoint's ``apply`` with
    mutable params): the layer's parameters are set up now."""
    return not self.has_variable('params', 'scale') and self.is_mutable_collection('params')  # type: ignore[attr-defined]

  def _scale(self, value: jax.Array, kept: tuple[int, ...]) -> jax.Array:
    """The layer's ``scale``: read, or created (at ``||kernel||`` by default, with no key)."""
    shape = _core.scale_shape(value.shape, kept)

    def init_scale(key, shape, dtype):
      with _errors.labelled(self._where()):
        _axes.check_scale_init(self.scale_init)
      if self.scale_init is None:
        g = _core.decompose(value, kept)[1].astype(dtype)
      else:
        g = self.scale_init(key, shape, dtype)
      return _boxes.scale_box(self.get_variable('params', 'kernel'), g, kept)  # type: ignore[attr-defined]

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
    if g is not None and self._lands(p.init, (g, b)):
      self._put_boxed('scale', g)
      if b is not None:
        self._put_boxed('bias', b)
    return out

  def _lands(self, mode: Any, values: tuple[Any, ...]) -> bool:
    """Whether a data init's write of ``values`` (``g``, ``b``) to this layer lands, or
    ``False`` where an earlier use's surely did and this one's would be lost. Lost: a tracer
    of a trace other than the one the layer's root scope (the ``apply``, or the Flax
    transform that was passed the layer) runs under; a transform's body reached the layer
    through a closure, and Flax drops such a write (or it leaks). Sure: a write of the
    trace the ``apply`` runs under (one in a lifted body, a branch, may not run)."""
    key = tuple(self.scope.path)  # type: ignore[attr-defined]
    if not any(_data_init.foreign(x, self.scope.root.trace_level) for x in values):  # type: ignore[attr-defined]
      if not any(_data_init.foreign(x, mode.home) for x in values):
        mode.landed.add(key)
      return True
    if key in mode.landed:
      return False
    raise ValueError(
      f'{self._where()}: data_init runs this layer in the body of a transform that reaches '
      'it through a closure, not as its module, and Flax drops what such a call writes: this '
      'use would not set its scale. Pass the layer, or a module holding it, as the module '
      'argument of a Flax transform: nn.cond(pred, lambda m, x: m(x), ..., layer, x) '
      "(nn.while_loop also needs carry_variables='params'); for jax.checkpoint / jax.jit "
      'inside the model, their Flax forms over the module (nn.remat, nn.jit); or build it in '
      "setup and reach it through the body's module (m.layer). For shard_map or jax.lax.map "
      'inside the model, which have no Flax form: use the layer once outside them first, or '
      'run data_init on the model without them (under jit on the sharded batch).'
    )

  def _start(self, inputs: jax.Array) -> _kernel.Pass:
    dense = isinstance(self, nn.Dense)
    return _kernel.start(
      _errors.later(self._where),
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

  def _claim(self, inputs: jax.Array) -> tuple[_data_init.Mode, bool] | None:
    """``(mode, first)`` while a data init runs (see ``_data_init.claim``), else ``None``."""
    if self.is_initializing():  # type: ignore[attr-defined]
      return None
    if not self.is_mutable_collection('params'):  # type: ignore[attr-defined]
      if _data_init.running():
        # A Flax transform (nn.while_loop without carry_variables='params', its cond_fn,
        # nn.map_variables without mutable=True, a WeightNorm wrapper) or the user's own
        # apply of a frozen model hands the layer its parameters read-only: fine where an
        # earlier use set its scale, or data_init does not initialize it (not fresh).
        scale = nn.unbox(self.get_variable('params', 'scale'))  # type: ignore[attr-defined]
        _data_init.check_set(self._where, scale)
      return None
    kernel = nn.unbox(self.get_variable('params', 'kernel'))  # type: ignore[attr-defined]
    if _data_init.is_partial_eval(kernel):
      # Flax's scan first traces its body in a partial-evaluation pass (for its loop
      # invariants) whose results it discards: not a use. The loop's own trace then
      # initializes each stacked layer from its own statistics.
      return None
    claimed = _data_init.claim(self.scope.path)  # type: ignore[attr-defined]
    if claimed is None:
      return None
    if tuple(self.scope.path) in claimed[0].landed:  # type: ignore[attr-defined]
      # Set already: in a scan that broadcasts it, a plain call reads what was set.
      return None if _data_init.broadcast_in_scan(kernel, inputs) else claimed
    try:
      _data_init.check_not_broadcast(kernel, inputs)
    except ValueError as e:
      raise ValueError(f'{self._where()}: {e}') from None
    return claimed

  def _out_axis(self) -> int:
    # Here, in the mixin, not in WNConvTranspose: Flax wraps (and intercepts) a method
    # defined in a Module class.
    return -2 if getattr(self, 'transpose_kernel', False) else -1

  def _put_boxed(self, name: str, value: jax.Array) -> None:
    old = self.get_variable('params', name)  # type: ignore[attr-defined]
    self.put_variable('params', name, _boxes.reboxed(old, value))  # type: ignore[attr-defined]


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

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:  # type: ignore[override]
    # nn.Dense's own function, not its Flax-wrapped method: one call of the layer is one
    # call to interceptors and one captured output (this one; nn.Dense's, on the scaled
    # path, is x @ v). The conv layers' __call__ lives in a mixin, which Flax leaves as is.
    dense = nn.Dense.__call__.__wrapped__  # type: ignore[attr-defined]
    return self._forward(lambda x: dense(self, x), inputs)


class _WeightNormedConv(_WeightNormedKernel):
  """The call WNConv and WNConvTranspose share: input checks with the layer's name, then
  the forward pass."""

  def __call__(self, inputs: jax.Array) -> jax.Array:  # type: ignore[override]
    self._check_conv_input(inputs)
    return self._forward(super().__call__, inputs)  # type: ignore[misc]


class WNConv(_WeightNormedConv, nn.Conv):
  r"""``flax.linen.Conv`` (1-D, 2-D, 3-D by ``kernel_size``) with a weight-normalized kernel.

  $$
  w_{\dots,j} = g_j \, v_{\dots,j} / \lVert v_{\dots,j} \rVert
  $$

  Parameters: `kernel` holds v, of layout `(*window, in // feature_group_count, out)`;
  `scale` holds g, of shape `(out,)` for `axis=-1`; and `bias`. A `mask` applies to the
  normalized weight, as to the plain layer's kernel; the call that creates `scale` (`init`)
  sets the kernel's entries it zeroes to 0, so they count in no norm and stay 0 in training
  ($\lVert w \rVert = g$). Every attribute of `flax.linen.Conv` (features, kernel_size, strides, padding including 'SAME', 'VALID', 'CIRCULAR',
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


class WNConvTranspose(_WeightNormedConv, nn.ConvTranspose):
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
