"""The forward pass of the WN layers, written once for linen and NNX.

A WN layer runs its Flax parent's own code (``Dense``/``Linear``, ``Conv``, ``ConvTranspose``)
with the kernel and the bias that code reads replaced. A :class:`Pass` says what they are
replaced with, and what becomes of the output:

| pass | kernel fed | bias fed | output |
|---|---|---|---|
| plain | ``w = g v / ||v||`` in the compute dtype | ``b`` | ``y`` |
| scaled (Dense, rows < input features) | ``v`` | none | ``y * (g / ||v||) + b`` |
| direction (data init, first use) | ``v / ||v||`` | zeros | ``y`` standardized: new ``g``, ``b`` |

linen pulls the kernel and bias through ``Module.param`` (its override asks the pass), NNX
pushes them into the parent's ``__call__``; each then writes back what a data init returns.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from wn_jax import _axes
from wn_jax import _core
from wn_jax import _data_init
from wn_jax._errors import labelled


def check_real(name: str, x: Any) -> None:
  """A ``ValueError`` unless ``x`` is a real floating array."""
  _check_real_dtype(name, _dtype(x))


def zero_masked_out(v: jax.Array, mask: Any) -> jax.Array:
  """A new kernel ``v`` with 0 where the layer's ``mask`` is 0 (a mask of another shape is
  left to Flax's own error). Then those entries count in no ``||v||``, and as their gradient
  is ``g / ||v||`` times the masked ``dL/dw`` minus a multiple of themselves, 0, they stay 0."""
  if mask is None or jnp.shape(mask) != jnp.shape(v):
    return v
  return jnp.where(jnp.asarray(mask) != 0, v, jnp.zeros((), v.dtype))


def _check_real_dtype(name: str, dtype: Any) -> None:
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f'the {name} must be a real floating array (float16, bfloat16, float32 or '
      f'float64) to be weight-normalized; got dtype {dtype}. Use a real param_dtype, or '
      f'leave this parameter out of the weight normalization.'
    )


def _dtype(x: Any) -> jnp.dtype:
  """``x``'s dtype as JAX canonicalizes it (NumPy float64 is float32 with x64 off), as
  Flax's layers do; a JAX array's own, without ``jnp.result_type``'s cost."""
  return x.dtype if isinstance(x, jax.Array) else jnp.result_type(x)


def weight_dtype(v: Any, g: Any, layer_dtype: Any, inputs: Any = ()) -> jnp.dtype:
  """The dtype ``w`` is formed in: the widest of ``v``'s, ``g``'s and the layer's compute dtype.

  The compute dtype is ``layer_dtype`` (a Flax layer's ``dtype``) when it is set; with
  ``None`` a Flax layer promotes its parameters with its inputs, so the floating array
  leaves of ``inputs`` count instead. Forming ``w`` in the wider dtype rounds it at most
  once, to the dtype the layer computes in (``bfloat16`` parameters in a ``float32`` layer
  give a ``float32`` weight, not a ``bfloat16`` one).
  """
  leaves = () if layer_dtype is not None else jax.tree_util.tree_leaves(inputs)
  dtypes = tuple(
    _dtype(x)
    for x in leaves
    if isinstance(x, jax.Array) or (hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating))
  )
  return _weight_dtype_of(_dtype(v), _dtype(g), layer_dtype, dtypes)


@functools.lru_cache(maxsize=256)  # an eager layer call asks once per call
def _weight_dtype_of(v: Any, g: Any, layer_dtype: Any, inputs: tuple) -> jnp.dtype:
  _check_real_dtype('kernel', v)
  _check_real_dtype('scale', g)
  dtypes = [v, g, *([jnp.dtype(layer_dtype)] if layer_dtype is not None else inputs)]
  return _core.result_dtype(*(d for d in dtypes if jnp.issubdtype(d, jnp.floating)))


def normalize(v: Any, g: Any, kept: _core.Axis, dtype: Any, eps: float = 0.0) -> jax.Array:
  """``_core.normalize`` with ``v`` and ``g`` cast to ``dtype`` first (reduced in float32)."""
  return _core.normalize(_axes.as_array(v, dtype), _axes.as_array(g, dtype), kept, eps=eps)


def weight(x: Any, layer_dtype: Any, inputs: Any, eps: float = 0.0) -> jax.Array:
  """A wrapper's ``w`` for the ``WeightNormed`` leaf ``x``, in the dtype its layer computes in."""
  dtype = weight_dtype(x.v, x.g, layer_dtype, inputs)
  return normalize(x.v, x.g, x.axis, dtype, eps)


def check_conv_rank(label: object, inputs: Any, kernel_size: int | tuple[int, ...]) -> None:
  """A ``ValueError`` naming the layer for a convolution's input without its spatial axes."""
  n = 1 if isinstance(kernel_size, int) else len(kernel_size)
  if jnp.ndim(inputs) < n + 1:
    raise ValueError(
      f'{label}: a {n}-D convolution needs inputs of shape (*batch, *spatial[{n}], '
      f'features), rank >= {n + 1}; got shape {jnp.shape(inputs)}. Add the missing axes.'
    )


def scales_output(
  kernel_ndim: int,
  kept: tuple[int, ...],
  inputs: Any,
  compute_dtype: Callable[[], Any],
  linear_dot: bool,
) -> bool:
  r"""Whether a Dense layer applies $g / \lVert v \rVert$ to its output instead of forming ``w``.

  For a kernel ``(in, out)`` keeping ``out``, ``x @ w + b == (x @ v) * s + b`` with
  ``s = g / ||v||`` per output feature (the paper's section 2.1). Forming ``w`` costs
  weight-sized passes (write ``w``; backward: a reduction for ``dL/dg`` and the scaling
  of ``dL/dw``); scaling the output moves them to activation-sized arrays (rows x out)
  and leaves one weight-sized pass in the backward (``dL/dv`` gains ``v`` times a
  per-slice factor). So the output is scaled when the rows (every input axis but the
  last) are fewer than the input features. The choice is static (shapes are known at
  trace time) and changes rounding only.

  A symbolic row count (``jax.export`` with a symbolic batch) is never compared with the
  input features (that comparison is inconclusive for symbolic dimensions): ``w`` is then
  formed, which is right at every batch size, and the exported function gives the
  layer's results to rounding.

  Never with a custom ``dot_general`` or an NNX ``preferred_element_type`` (``linear_dot``
  False): the first may not be linear in the kernel (a quantized matmul), and the second
  rounds ``x @ v`` to its dtype, so both must see ``w``. Never with float16 compute:
  ``x @ v`` there follows the scale of ``||v||``, not of ``||w||``, and float16's narrow
  range would overflow or underflow it where ``x @ w`` is fine. (``compute_dtype()`` gives
  that dtype: asked last, since it costs an eager call more than the rest.)
  """
  shape = jnp.shape(inputs)
  if kernel_ndim != 2 or kept != (1,) or not shape or not linear_dot:
    return False
  if any(jax.export.is_symbolic_dim(d) for d in shape):
    return False
  return math.prod(shape[:-1]) < shape[-1] and jnp.dtype(compute_dtype()) != jnp.float16


@jax.jit
def _scale(y, s, bias):
  # ``y * s + bias`` for ``y = x @ v`` and the factor ``s = g / ||v||``, formed in the wider
  # of ``y``'s dtype and the factor's (float32), rounded once to ``y``'s dtype. One jitted
  # call: eagerly, one dispatch instead of one per operation.
  acc = _core.result_dtype(y.dtype, s.dtype)
  out = y.astype(acc) * s
  if bias is not None:
    out = out + bias.astype(acc)
  return out.astype(y.dtype)


def _factor_and_scale(y, v, g, bias, kept):
  return _scale(y, _core.factor_of(v, g, kept), bias)


_factor_and_scale_jit = jax.jit(_factor_and_scale, static_argnums=(4,))


def _scaled_output(y, v, g, bias, kept):
  """``y * (g / ||v||) + bias``. Under a transform, one nested jit (traced once per
  configuration, however many layers share it); eagerly, the factor and the product are
  calls of their own, so a new batch shape recompiles the product, not the norm."""
  run = _factor_and_scale_jit if isinstance(y, jax.core.Tracer) else _factor_and_scale
  return run(y, v, g, bias, kept)


@dataclasses.dataclass
class Pass:
  """One call of a WN layer: what its own code reads as kernel and bias, and its output.

  Built by :func:`start`; the adapter feeds :meth:`kernel` and :meth:`bias` to the layer's
  code and hands its result to :meth:`output`. Errors carry ``label`` (the layer).
  """

  label: object  # the layer, for errors: "WNDense at '/Dense_0'" (a str, or _errors.later)
  axis: _core.Axis
  layer_dtype: Any  # the layer's ``dtype`` (None: the promotion with the inputs)
  inputs: Any
  scaled: bool = False  # a Dense scaling its output (``scales_output``)
  init: _data_init.Mode | None = None  # data init: every use of the layer in its pass
  first: bool = True  # data init: the layer's first traced use (runs the checks)
  path: str = ''  # data init: the layer's path, for a callable ``init_scale``
  out_axis: int = -1  # the kernel's output-feature axis (data init keeps it)
  # Set as the layer's code reads its parameters:
  v: Any = None
  g: Any = None
  kept: tuple[int, ...] = ()
  dtype: Any = None
  bias_value: Any = None

  def labelled(self) -> labelled:
    return labelled(self.label)

  def axes(self, v: Any) -> tuple[int, ...]:
    """The kept axes of the kernel ``v`` (a real floating array), checked for a data init."""
    with self.labelled():
      check_real('kernel', v)
      kept = _axes.kept_axes(jnp.ndim(v), self.axis)
      if self.init is not None:
        _data_init.check_output_axis(jnp.ndim(v), kept, self.out_axis)
    return kept

  def kernel(self, v: Any, g: Any, kept: tuple[int, ...]) -> jax.Array:
    """What the layer's code multiplies by, from the direction ``v``, the scale ``g`` and
    ``v``'s kept axes (from :meth:`axes`)."""
    need = _core.scale_shape(jnp.shape(v), kept)
    if jnp.shape(g) != need:
      raise ValueError(
        f'{self.label}: the loaded scale has shape {jnp.shape(g)}, but a kernel of shape '
        f'{jnp.shape(v)} with axis={self.axis!r} needs {need}. Check the loaded state or '
        f"checkpoint, or the layer's axis."
      )
    with self.labelled():
      self.dtype = weight_dtype(v, g, self.layer_dtype, self.inputs)
      self.v, self.g, self.kept = v, g, kept
      if self.scaled:
        return _axes.as_array(v, self.dtype)
      if self.init is not None:
        return normalize(v, jnp.ones_like(g), kept, self.dtype)
      return normalize(v, g, kept, self.dtype)

  def bias(self, b: Any) -> Any:
    """What the layer's code adds: ``b`` itself, none (scaled) or zeros (data init)."""
    self.bias_value = b
    if b is None or not (self.scaled or self.init is not None):
      return b
    return None if self.scaled else jnp.zeros_like(b)

  def output(self, y: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """``(output, g, b)``: ``g`` and ``b`` are new values after a data init, else ``None``."""
    b = self.bias_value
    with self.labelled():
      if self.scaled:
        v, g = _axes.as_array(self.v, self.dtype), _axes.as_array(self.g, self.dtype)
        b = None if b is None else _axes.as_array(b)
        return _scaled_output(y, v, g, b, self.kept), None, None
      if self.init is None:
        return y, None, None
      g, b, out = _data_init.initialize(y, self.init, self.path, self.label, (self.g, b))
      if _data_init.shared_across_vmap(self.v, g):
        if self.first:
          raise _data_init.shared_across_vmap_error()
        # A later use inside a vmap the layer is shared across: it keeps what the first set.
        g, b, out = _data_init.kept(y, (self.g, self.bias_value))
    return out, g, b


def start(
  label: object,
  axis: _core.Axis,
  inputs: Any,
  layer_dtype: Any,
  *,
  param_dtype: Any,
  dense: bool,
  linear_dot: bool,
  init: tuple[_data_init.Mode, bool] | None = None,
  path: str = '',
  out_axis: int = -1,
) -> Pass:
  """The pass of one call: data init if ``init`` (``claim``'s ``(mode, first)``) is given,
  else scaled where it pays."""
  scaled = False
  if isinstance(inputs, (list, tuple)):  # read as the layer's own code reads it
    inputs = jnp.asarray(inputs)
  if init is None and dense:
    with labelled(label):
      kept = _axes.kept_axes(2, axis)

    def compute() -> Any:
      return layer_dtype if layer_dtype is not None else jnp.result_type(inputs, param_dtype)

    scaled = scales_output(2, kept, inputs, compute, linear_dot)
  mode, first = init or (None, True)
  return Pass(label, axis, layer_dtype, inputs, scaled, mode, first, path, out_axis)
