"""The paper's mean-only batch normalization, as a linen module."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wn_jax import _batch_norm
from wn_jax import _core
from wn_jax.linen._layers import Initializer


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
    dtype: the output dtype (the mean is taken in float32 or wider); ``None``: the
      input's (float32 for an int input), so bfloat16 activations stay bfloat16
      (``BatchNorm`` promotes them with its float32 parameters).
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
    x = _batch_norm.floating(x)
    label = f"MeanOnlyBatchNorm at '/{'/'.join(self.scope.path)}'"  # type: ignore[union-attr]
    feature = _batch_norm.feature_axis(x, self.axis, label)
    stat_dtype = _core.reduce_dtype(x.dtype)
    ra_mean = self.variable(
      'batch_stats', 'mean', lambda: jnp.zeros((x.shape[feature],), stat_dtype)
    )
    fix = 'its variables were made for {built} features (by init). Initialize it on such inputs'
    _batch_norm.check_features(x, feature, self.axis, ra_mean.value.shape[0], label, fix)
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
