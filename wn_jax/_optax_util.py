"""What wn_jax's optax transformations share: how they read their arguments.

Parameters and updates arrive with ``nnx.Variable`` wrappers (``nnx.Optimizer``) and
``optax.masked``'s ``MaskedNode``; ``WeightNormed`` and ``MaskedNode`` nodes are read whole.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from wn_jax import _boxes
from wn_jax import _tree


def is_node(x: Any) -> bool:
  """``WeightNormed`` and ``MaskedNode`` nodes are read whole, as leaves."""
  return isinstance(x, (_tree.WeightNormed, optax.MaskedNode))


def is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def unwrap(tree: Any) -> Any:
  """``tree`` with every ``nnx.Variable`` replaced by its value (``Param(w)`` -> ``w``), and
  every linen box (``nn.Partitioned``, from ``nn.with_partitioning``) by the array it holds.

  The state holds bare arrays, never a variable around a ``WeightNormed`` node: ``nnx.Optimizer``
  wraps the state's variables whole, and writing an update back into such a wrapper turns the
  node into a dict (its static ``axis`` lost); a box's partition names would fit ``v`` but not
  ``g`` (Flax's sharding helpers would give ``g`` the kernel's).
  """
  kinds = _boxes.kinds()
  if not kinds:
    return tree
  return jax.tree_util.tree_map(_boxes.unboxed, tree, is_leaf=lambda x: isinstance(x, kinds))


def in_structure(structure: Any, tree: Any) -> Any:
  """The leaves of ``tree`` (``MaskedNode`` ones too) in ``structure``: updates come back in
  the structure of the incoming updates, variables and all (``optax.masked``'s nodes too)."""
  return jax.tree_util.tree_unflatten(structure, jax.tree_util.tree_leaves(tree, is_leaf=is_masked))


def check_update_args(
  caller: str, state: Any, params: Any, state_type: type, params_are: str
) -> None:
  """``update`` needs ``params`` (``params_are`` says what they hold) and the state ``init`` made."""
  if params is None:
    raise ValueError(
      f'{caller}: update needs params ({params_are}); call tx.update(grads, state, params), as '
      f'optax.chain does when given params.'
    )
  if not isinstance(state, state_type):
    raise ValueError(
      f'{caller}: update got a state of type {type(state).__name__}, not the '
      f'{state_type.__name__} that tx.init returns: a checkpoint restored without a target '
      f'(orbax `restore(path)` gives plain dicts, which lose the state types and the static '
      f'axis of WeightNormed nodes). Restore with a target: `ckptr.restore(path, '
      f'jax.eval_shape(tx.init, params))` (tx.init(params) as the abstract target).'
    )
