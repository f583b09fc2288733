"""wn_jax: weight normalization for JAX (Salimans & Kingma, 2016, arXiv:1602.07868)."""

from wn_jax import _serialization  # noqa: F401 (registers the optim state's flax.serialization)
from wn_jax import linen
from wn_jax import nnx
from wn_jax import optim
from wn_jax._axes import scale_shape
from wn_jax._core import decompose
from wn_jax._core import norm
from wn_jax._core import normalize
from wn_jax._tree import WeightNormed
from wn_jax._tree import materialize
from wn_jax._tree import weight_norm
from wn_jax.linen import WNConv
from wn_jax.linen import WNDense

__version__ = '0.1.0'

__all__ = (
  'WNConv',
  'WNDense',
  'WeightNormed',
  'decompose',
  'linen',
  'materialize',
  'nnx',
  'norm',
  'optim',
  'normalize',
  'scale_shape',
  'weight_norm',
)
