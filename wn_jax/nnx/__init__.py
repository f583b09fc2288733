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

from wn_jax.nnx._batch_norm import MeanOnlyBatchNorm as MeanOnlyBatchNorm
from wn_jax.nnx._layers import WNConv as WNConv
from wn_jax.nnx._layers import WNConvTranspose as WNConvTranspose
from wn_jax.nnx._layers import WNLinear as WNLinear
from wn_jax.nnx._model import data_init as data_init
from wn_jax.nnx._model import fold as fold
from wn_jax.nnx._model import layer_axes as layer_axes
from wn_jax.nnx._wrapper import WeightNorm as WeightNorm

__all__ = [
  'MeanOnlyBatchNorm',
  'WNConv',
  'WNConvTranspose',
  'WNLinear',
  'WeightNorm',
  'data_init',
  'fold',
  'layer_axes',
]
