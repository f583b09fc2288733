"""flax.serialization of wn_jax's optimizer state: the one place the optimizer touches flax.

Imported by ``wn_jax/__init__.py``, so the registration happens on ``import wn_jax``. (The
registration of ``WeightNormed`` in ``_tree.py`` may move here later.)
"""

from __future__ import annotations

from typing import Any

from flax import serialization

from wn_jax._optimizer import WeightNormState


def _state_to_dict(state: WeightNormState) -> dict[str, Any]:
  return {
    'directions': serialization.to_state_dict(state.directions),
    'inner_state': serialization.to_state_dict(state.inner_state),
    'norms': serialization.to_state_dict(state.norms),
  }


def _state_from_dict(target: WeightNormState, state: dict[str, Any]) -> WeightNormState:
  # A state saved before the norms were kept has no 'norms'; a target without norms wants
  # none. Either way the norms are left out, and the next update computes them.
  keep = 'norms' in state and target.norms is not None
  return WeightNormState(
    serialization.from_state_dict(target.directions, state['directions'], name='directions'),
    serialization.from_state_dict(target.inner_state, state['inner_state'], name='inner_state'),
    serialization.from_state_dict(target.norms, state['norms'], name='norms') if keep else None,
  )


serialization.register_serialization_state(WeightNormState, _state_to_dict, _state_from_dict)
