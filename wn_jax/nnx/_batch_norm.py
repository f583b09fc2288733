"""The paper's mean-only batch normalization, as an NNX module."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from wn_jax import _batch_norm


class MeanOnlyBatchNorm(nnx.Module):
  r"""The paper's mean-only batch normalization: $y = x - \mu_B + b$.

  The mean runs over every axis but ``axis`` (features); the running mean lives in an
  ``nnx.BatchStat`` and serves ``use_running_average=True`` (or after
  ``model.eval()``). No division by the variance. The running mean is float32, as
  ``nnx.BatchNorm``'s (the layer is built before it sees an input: under ``jax_enable_x64``
  a float64 batch's mean is rounded to float32 when stored, where the linen layer, built on
  its first input, keeps float64).

  Args:
    num_features: size of the feature axis.
    axis: the feature axis (default ``-1``), as ``wn_jax.linen.MeanOnlyBatchNorm``'s.
    momentum: decay of the running mean.
    use_running_average: use the running mean instead of the batch's.
    use_bias: add a learned ``bias`` (``nnx.Param``).
    dtype: the output dtype (the mean is taken in float32 or wider); ``None``: the
      input's (float32 for an int input), so bfloat16 activations stay bfloat16
      (``BatchNorm`` promotes them with its float32 parameters).
    param_dtype: dtype of ``bias``.
    axis_name: a mapped axis to average the batch mean over.
    axis_index_groups: groups of devices for ``axis_name`` (``pmap``), as ``nnx.BatchNorm``'s.
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
    axis_index_groups: Any = None,
    rngs: nnx.Rngs | None = None,
  ):
    del rngs
    self.axis = axis
    self.momentum = momentum
    self.use_running_average = use_running_average
    self.dtype = dtype
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype)) if use_bias else None

  def __call__(self, x: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
    use_ra = self.use_running_average if use_running_average is None else use_running_average
    x = _batch_norm.floating(x)
    feature = _batch_norm.feature_axis(x, self.axis, 'wn_jax.nnx.MeanOnlyBatchNorm')
    fix = 'the layer was built with num_features={built}. Build it with num_features={got}'
    label = 'wn_jax.nnx.MeanOnlyBatchNorm'
    _batch_norm.check_features(x, feature, self.axis, self.mean.shape[0], label, fix)
    if use_ra:
      mean = self.mean[...]
    else:
      mean = _batch_norm.batch_mean(x, feature, self.axis_name, self.axis_index_groups)
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
