"""What the linen and NNX layers share: the dtype ``w`` is formed in, and the scale's metadata."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from wn_jax import _core


def check_real(where: str, name: str, x: Any) -> None:
  """A ``ValueError`` naming the layer unless ``x`` is a real floating array."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f'{where}: the {name} must be a real floating array (float16, bfloat16, float32 or '
      f'float64) to be weight-normalized; got dtype {dtype}. Use a real param_dtype, or '
      f'leave this parameter out of the weight normalization.'
    )


def weight_dtype(where: str, v: Any, g: Any, layer_dtype: Any, inputs: Any = ()) -> jnp.dtype:
  """The dtype ``w`` is formed in: the widest of ``v``'s, ``g``'s and the layer's compute dtype.

  The compute dtype is ``layer_dtype`` (a Flax layer's ``dtype``) when it is set; with
  ``None`` a Flax layer promotes its parameters with its inputs, so the floating array
  leaves of ``inputs`` count instead. Forming ``w`` in the wider dtype rounds it at most
  once, to the dtype the layer computes in (``bfloat16`` parameters in a ``float32`` layer
  give a ``float32`` weight, not a ``bfloat16`` one).
  """
  check_real(where, 'kernel', v)
  check_real(where, 'scale', g)
  dtypes = [jnp.result_type(v), jnp.result_type(g)]
  if layer_dtype is not None:
    dtypes.append(jnp.dtype(layer_dtype))
  else:
    dtypes += [
      x.dtype
      for x in jax.tree_util.tree_leaves(inputs)
      if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)
    ]
  dtypes = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
  return _core.result_dtype(*dtypes)


def normalize(
  where: str, v: Any, g: Any, kept: _core.Axis, dtype: Any, eps: float = 0.0
) -> jax.Array:
  """``_core.normalize`` with ``v`` and ``g`` cast to ``dtype`` first (reduced in float32)."""
  try:
    return _core.normalize(_core.as_array(v, dtype), _core.as_array(g, dtype), kept, eps=eps)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None


def scales_output(
  kernel_ndim: int, kept: tuple[int, ...], inputs: Any, compute_dtype: Any, linear_dot: bool
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

  Never with a custom ``dot_general`` (``linear_dot`` False): it may not be linear in the
  kernel (a quantized matmul), and it must see ``w``. Never with float16 compute:
  ``x @ v`` there follows the scale of ``||v||``, not of ``||w||``, and float16's narrow
  range would overflow or underflow it where ``x @ w`` is fine.
  """
  shape = jnp.shape(inputs)
  if kernel_ndim != 2 or kept != (1,) or not shape or not linear_dot:
    return False
  if jnp.dtype(compute_dtype) == jnp.dtype(jnp.float16):
    return False
  if any(jax.export.is_symbolic_dim(d) for d in shape):
    return False
  return math.prod(shape[:-1]) < shape[-1]


def scaled_output(
  where: str, y: jax.Array, v: Any, g: Any, kept: tuple[int, ...], dtype: Any, bias: Any
) -> jax.Array:
  """``y * (g / ||v||) + bias`` for ``y = x @ v``, formed in the wider of ``y``'s dtype and the
  factor's (float32), rounded once to ``y``'s dtype."""
  v, g = _core.as_array(v, dtype), _core.as_array(g, dtype)
  try:
    return _scaled_output(y, v, g, None if bias is None else _core.as_array(bias), kept)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None


@functools.partial(jax.jit, static_argnums=(4,))
def _scaled_output(y, v, g, bias, kept):
  # One jitted call: eagerly, one dispatch instead of one per operation.
  s = _core.factor(v, g, kept)
  acc = _core.result_dtype(y.dtype, s.dtype)
  out = y.astype(acc) * s
  if bias is not None:
    out = out + bias.astype(acc)
  return out.astype(y.dtype)


def kept_names(names: Sequence[Any] | None, kept: tuple[int, ...]) -> tuple[Any, ...] | None:
  """The partition names of a scale: those of its kernel's kept axes (``None``: unpartitioned).

  ``names`` may be shorter than the kernel's rank: as in Flax, the missing trailing axes are
  unsharded (``None``).
  """
  if names is None:
    return None
  return tuple(names[a] if a < len(names) else None for a in kept)
