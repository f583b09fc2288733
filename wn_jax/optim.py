"""Weight normalization as an optax gradient transformation.

The model keeps plain weights ``w``; the optimizer trains them in weight-normalized
coordinates. There are three ways to train with weight normalization in wn_jax:

1. WN layers (:mod:`wn_jax.linen`, :mod:`wn_jax.nnx`): ``kernel`` and ``scale`` are
   ordinary parameters; any optax optimizer trains them.
2. :func:`wn_jax.weight_norm` + :func:`wn_jax.materialize` on any parameter pytree:
   ``loss(materialize(wn_params))``; any optax optimizer trains ``v`` and ``g``.
3. :func:`weight_norm` here, on an untouched model: ``tx = weight_norm(optax.adam(lr))``.

All three follow the same trajectory for the same inner optimizer (tested).
"""

from wn_jax._directions import decay_mask
from wn_jax._directions import direction_stats
from wn_jax._optimizer import WeightNormState
from wn_jax._optimizer import schedule_free_eval_params
from wn_jax._optimizer import weight_norm
from wn_jax._projection import ProjectDirectionsState
from wn_jax._projection import project_directions

__all__ = [
  'ProjectDirectionsState',
  'WeightNormState',
  'decay_mask',
  'direction_stats',
  'project_directions',
  'schedule_free_eval_params',
  'weight_norm',
]
