r"""The paper's mean-only batch normalization, $y = x - \mu_B + b$, for linen and NNX."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from wn_jax import _core


def floating(x: Any) -> jax.Array:
  """``x`` as an array, an int or bool one promoted to JAX's default float (as
  ``flax.linen.BatchNorm`` promotes it): a mean subtracted in ints would be truncated."""
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.result_type(float))


def feature_axis(x: jax.Array, axis: int, label: str) -> int:
  """The feature axis ``axis`` of the input ``x`` as a non-negative int."""
  ndim = jnp.ndim(x)
  if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
    raise ValueError(
      f'{label}: axis must be one int, the feature axis of the input (-{ndim}..{ndim - 1} for '
      f'an input of shape {jnp.shape(x)}); got {axis!r}. Pass the axis that holds the features.'
    )
  return axis % ndim


def check_features(x: jax.Array, feature: int, axis: int, built: int, label: str, fix: str) -> None:
  """A ``ValueError`` for an input whose feature count is not the ``built`` one."""
  if x.shape[feature] != built:
    raise ValueError(
      f'{label}: the input has {x.shape[feature]} features along axis {axis} (shape {x.shape}), '
      f'but {fix.format(built=built, got=x.shape[feature])}, or pass the axis that holds the '
      f'features.'
    )


def batch_mean(
  x: jax.Array, feature: int, axis_name: str | None, axis_index_groups: Any = None
) -> jax.Array:
  """The per-feature mean of ``x`` over every other axis (and ``axis_name``), in float32+."""
  reduced = tuple(i for i in range(x.ndim) if i != feature)
  mean = jnp.mean(x.astype(_core.reduce_dtype(x.dtype)), axis=reduced)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name, axis_index_groups=axis_index_groups)
  return mean


def centered(x: jax.Array, mean: jax.Array, bias: Any, feature: int, dtype: Any) -> jax.Array:
  """``x - mean + bias`` along ``feature``, computed in float32 or wider, in ``dtype`` (``None``:
  ``x``'s, so bfloat16 activations stay bfloat16 beside a float32 bias; ``flax.linen.BatchNorm``
  promotes them with its parameters to float32)."""
  stat_dtype = _core.reduce_dtype(x.dtype)
  shape = [1] * x.ndim
  shape[feature] = x.shape[feature]
  y = x.astype(stat_dtype) - mean.astype(stat_dtype).reshape(shape)
  if bias is not None:
    y = y + bias.astype(stat_dtype).reshape(shape)
  return y.astype(dtype or x.dtype)
