"""Small shared test helpers: tolerances per dtype, tree comparison, and the checks that the
linen and NNX layer tests share (mixed precision, the Dense layer's two paths)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import wn_jax
from tests import reference as ref

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


def rand(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


MP_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _f64(a):
  return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _normwise(y, expected):
  return float(np.linalg.norm(_f64(y) - expected) / np.linalg.norm(expected))


def assert_mixed_precision(y, x, kernel, scale, bias, plain_apply, param_dtype, dtype):
  """A WN layer's output against the float64 reference, and its error against the plain layer's.

  ``plain_apply(kernel)`` runs the plain Flax layer (same dtype, param_dtype, bias) with
  ``kernel``; it gets the exact w rounded to ``param_dtype``, and its error is measured
  against the float64 product of its own parameters: the rounding of the computation alone.
  """
  w = ref.normalize(_f64(kernel), _f64(scale), -1)
  err = _normwise(y, ref.dense(_f64(x), w, _f64(bias)))
  plain_kernel = jnp.asarray(w).astype(param_dtype)
  plain_err = _normwise(
    plain_apply(plain_kernel), ref.dense(_f64(x), _f64(plain_kernel), _f64(bias))
  )
  assert y.dtype == dtype
  assert err <= 2 * RTOL[jnp.dtype(dtype)], (err, plain_err)
  assert err <= 2 * plain_err, (err, plain_err)


def mp_input(dtype):
  return rand((32, 64)).astype(dtype)


def mp_scale(g):
  """g moved away from ||v|| (in float32), back in its own dtype."""
  return (g.astype(jnp.float32) * jnp.linspace(0.5, 2.0, g.shape[-1])).astype(g.dtype)


def dot_reads_the_kernel(fn, params, kernel) -> bool:
  """Whether the dot_general in ``fn(params)``'s jaxpr takes the kernel parameter itself."""
  flat, _ = jax.tree_util.tree_flatten(params)
  jaxpr = jax.make_jaxpr(fn)(params).jaxpr
  kernel_var = jaxpr.invars[next(i for i, x in enumerate(flat) if x is kernel)]
  dots = [e for e in jaxpr.eqns if e.primitive.name == 'dot_general']
  assert len(dots) == 1
  return dots[0].invars[1] is kernel_var


# Input shapes of a Dense layer with 48 input features, and whether it scales its output.
DENSE_PATHS = [
  ((5, 48), True),
  ((2, 3, 7, 48), True),
  ((48, 48), False),
  ((64, 48), False),
  ((7, 8, 48), False),
]


def check_dense_path(apply, params, x, scaled):
  """A WN Dense layer (48 -> 24 features) with ``params`` scales its output when the rows
  (every input axis but the last) are fewer than the input features, ``scaled``:
  y = (x @ v) * (g / ||v||) + b, and forms w (x @ w + b) elsewhere. The same function either
  way, forward and backward, against the float64 reference."""
  shape = x.shape
  assert dot_reads_the_kernel(lambda p: apply(p, x), params, params['kernel']) == scaled
  v, g = np.asarray(params['kernel'], np.float64), np.asarray(params['scale'], np.float64)
  b = np.asarray(params['bias'], np.float64)
  w = ref.normalize(v, g, -1)
  x64 = np.asarray(x, np.float64)
  for call in (apply, jax.jit(apply)):  # eagerly the factor is a call of its own
    assert_close(call(params, x), ref.dense(x64, w, b), factor=8)
  r = rand((*shape[:-1], 24), seed=3)
  gp = jax.grad(lambda p: jnp.sum(apply(p, x) * r))(params)
  r64 = np.asarray(r, np.float64)
  gw = x64.reshape(-1, 48).T @ r64.reshape(-1, 24)
  ev, eg = ref.grads(v, g, -1, gw)
  assert_close(gp['kernel'], ev, factor=16)
  assert_close(gp['scale'], eg, factor=16)
  assert_close(gp['bias'], r64.reshape(-1, 24).sum(0), factor=8)
  # Forward mode agrees with reverse mode on the scaled path too.
  t = jax.tree_util.tree_map(lambda a: rand(a.shape, seed=5), params)
  jvp = jax.jvp(lambda p: jnp.sum(apply(p, x) * r), (params,), (t,))[1]
  dot = sum(jnp.vdot(gp[k], t[k]) for k in params)
  assert_close(jvp, np.float64(dot), factor=64)


def fake_int8_dot(lhs, rhs, dn, precision=None, preferred_element_type=None, **kw):
  """A dot_general that is not linear in its kernel (per-tensor fake int8)."""
  s = jnp.max(jnp.abs(rhs)) / 127.0
  return jax.lax.dot_general(
    lhs,
    jnp.round(rhs / s) * s,
    dn,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


def check_dense_forms_w(int8_apply, float16_apply):
  """A custom dot_general must see w (it may not be linear in the kernel), and float16
  compute must not follow the scale of ||v||: both form w, whatever the rows.

  ``int8_apply(params, x)`` applies the WN Dense layer (16 -> 4 features) with
  ``dot_general=fake_int8_dot``, ``float16_apply(params, x)`` one with ``dtype=float16``.
  """
  k = jax.random.normal(jax.random.key(0), (16, 4)) * jnp.array([1.0, 10.0, 0.1, 3.0])
  params = {'kernel': k, 'scale': jnp.array([1.0, 2.0, 3.0, 4.0]), 'bias': jnp.zeros(4)}
  w = wn_jax.normalize(k, params['scale'])
  for rows in (1, 15, 16):
    x = rand((rows, 16))
    plain = nn.Dense(4, dot_general=fake_int8_dot).apply(
      {'params': {'kernel': w, 'bias': params['bias']}}, x
    )
    np.testing.assert_allclose(int8_apply(params, x), plain, rtol=1e-6, atol=1e-6)
  # float16 compute: the same w from a kernel 1e-6 times smaller gives the same output.
  x = rand((1, 16))
  apply = lambda p: float16_apply(p, x)
  small = dict(params, kernel=k * 1e-6)
  assert not dot_reads_the_kernel(apply, params, params['kernel'])
  np.testing.assert_allclose(
    np.asarray(apply(small), np.float32),
    np.asarray(apply(params), np.float32),
    rtol=2e-3,
    atol=2e-3,
  )
