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

from wn_jax.linen._batch_norm import MeanOnlyBatchNorm as MeanOnlyBatchNorm
from wn_jax.linen._layers import WNConv as WNConv
from wn_jax.linen._layers import WNConvTranspose as WNConvTranspose
from wn_jax.linen._layers import WNDense as WNDense
from wn_jax.linen._model import data_init as data_init
from wn_jax.linen._model import fold as fold
from wn_jax.linen._model import layer_axes as layer_axes
from wn_jax.linen._wrapper import WeightNorm as WeightNorm

__all__ = [
  'MeanOnlyBatchNorm',
  'WNConv',
  'WNConvTranspose',
  'WNDense',
  'WeightNorm',
  'data_init',
  'fold',
  'layer_axes',
]
