"""Small shared test helpers: tolerances per dtype and tree comparison."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

# Relative tolerance (to the largest entry) for a dtype's rounding, after a few ops.
RTOL = {
  jnp.dtype(jnp.float64): 1e-12,
  jnp.dtype(jnp.float32): 2e-6,
  jnp.dtype(jnp.float16): 4e-3,
  jnp.dtype(jnp.bfloat16): 3e-2,
}


def assert_close(
  actual, expected, dtype=jnp.float32, factor: float = 1.0, floor: float = 1.0
) -> None:
  """``actual`` equals ``expected`` to ``dtype``'s rounding, relative to max(max |expected|, floor)."""
  actual = np.asarray(
    jnp.asarray(actual).astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32),
    np.float64,
  )
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(float(np.max(np.abs(expected), initial=0.0)), floor)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=factor * RTOL[jnp.dtype(dtype)] * scale)


def assert_trees_close(a, b, rtol: float = 1e-6, atol: float = 1e-6) -> None:
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb, (ta, tb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
    )


def assert_trees_equal(a, b) -> None:
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb, (ta, tb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@st.composite
def shape_and_axis(draw, max_rank: int, max_size: int):
  """A shape (rank 1..max_rank, sizes 1..max_size) and an axis: int, negative int, tuple, None."""
  shape = tuple(draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_rank)))
  kind = draw(st.sampled_from(['int', 'neg', 'tuple', 'none']))
  if kind == 'none':
    return shape, None
  if kind == 'tuple':
    axes = draw(
      st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape), unique=True)
    )
    return shape, tuple(axes)
  a = draw(st.integers(0, len(shape) - 1))
  return shape, (a - len(shape) if kind == 'neg' else a)
