"""The range-safe norm: ``||v||`` per slice without overflow or underflow, finite derivatives at 0.

lineax's ``two_norm`` in spirit: a ``custom_jvp`` whose tangent is 0, not NaN, on an all-zero
slice. Every norm in wn_jax (``normalize``, ``factor``, ``norm``, ``decompose``) is this one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wn_jax._axes import reduced

# Per reduction dtype: (lo, k). The plain sum of squares is exact to rounding when it lies
# in [lo, inf); below (all entries under about sqrt(lo)) the slice is summed scaled up by k,
# above (overflow) scaled down by 1 / k. Powers of two: scaling is exact, so each slice gets
# the plain sum's result wherever the plain sum is in range, and a correct one elsewhere.
_RANGE = {
  jnp.dtype(jnp.float32): (2.0**-100, 2.0**80),
  jnp.dtype(jnp.float64): (2.0**-1000, 2.0**600),
}


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def norm_keepdims(v: jax.Array, kept: tuple[int, ...]) -> jax.Array:
  r"""``||v||`` over every axis but ``kept``, keepdims, without overflow or underflow.

  ``v`` is already in the reduction dtype. The plain sum of squares gives each slice's
  norm where it is in range (the common case, bit for bit the plain norm); a slice out of
  range takes a sum of squares of ``v`` scaled by a power of two that is in range
  (``_RANGE``). For float32: correct for normal entries (from about 1.2e-38; subnormal
  entries may be flushed to 0, as on CPU) up to a norm of 3.4e38, float32's largest.
  ``normalize`` covers less: its factor $g / \lVert v \rVert$ must be a normal float32
  too (with $g = 1$, $\lVert v \rVert$ below about 8e37; measured on CPU: a norm of 2e37
  gives the right $w$, 2e38 gives 0). Its derivative is
  $\langle v, \dot v \rangle / \lVert v \rVert$, and 0 on an all-zero slice (so
  derivatives of every order stay finite there).

  How the scaled sums run depends on the backend, with the same result: on a GPU or TPU
  all three sums are computed (XLA fuses sibling reductions of one operand into one
  kernel that reads ``v`` once); XLA on a CPU runs each sum as its own pass over ``v``,
  so there the scaled sums run under a ``lax.cond``, only when some slice is out of range.
  """
  red = reduced(v.ndim, kept)
  lo = _RANGE[jnp.dtype(v.dtype)][0]
  ss = jnp.sum(v * v, axis=red, keepdims=True)

  def on_cpu(v, ss):
    # One min over the slices: an overflowed (inf) or NaN slice counts as -1, below lo.
    # So a NaN slice takes the ranged branch and stays NaN.
    out = ~(jnp.min(jnp.where(ss < jnp.inf, ss, -1.0)) >= lo)
    return jax.lax.cond(out, lambda v, ss: _ranged(v, ss, red), lambda v, ss: jnp.sqrt(ss), v, ss)

  if not ss.size:  # no slices (a kept axis of size 0): nothing to check
    return jnp.sqrt(ss)
  return jax.lax.platform_dependent(v, ss, cpu=on_cpu, default=lambda v, ss: _ranged(v, ss, red))


def _ranged(v: jax.Array, ss: jax.Array, red: tuple[int, ...]) -> jax.Array:
  """Each slice's norm from ``ss``, its plain sum of squares, or from a scaled one where
  ``ss`` is out of range: of ``v * k`` below ``lo``, of ``v / k`` on overflow."""
  lo, k = _RANGE[jnp.dtype(v.dtype)]
  # The scales reach XLA through an optimization barrier: with a one-element v, XLA's
  # simplifier folded (v k) * (v k) into (v v) * k^2 otherwise, and k^2 overflows (NaN).
  up, down = jax.lax.optimization_barrier((jnp.asarray(k, v.dtype), jnp.asarray(1.0 / k, v.dtype)))
  # Two more plain sums, not one variadic lax.reduce: on a CPU XLA ran the variadic one
  # 7x slower at 1024^2 (4.5 ms vs 0.65 ms, measured).
  ss_up, ss_down = (jnp.sum(x * x, axis=red, keepdims=True) for x in (v * up, v * down))
  # Comparisons are False for NaN: a NaN slice takes the last branch and stays NaN. Only
  # an infinite entry overflows the scaled-down sum: its slice's norm is NaN (not inf), so
  # the whole slice of w is NaN, as with a NaN entry.
  big = jnp.where(ss_down < jnp.inf, jnp.sqrt(ss_down) * k, jnp.nan)
  return jnp.where(ss < lo, jnp.sqrt(ss_up) * (1.0 / k), jnp.where(ss < jnp.inf, jnp.sqrt(ss), big))


@norm_keepdims.defjvp
def _norm_keepdims_jvp(kept, primals, tangents):
  (v,), (dv,) = primals, tangents
  n = norm_keepdims(v, kept)
  inv_n = 1.0 / jnp.where(n > 0, n, 1.0)
  return n, _norm_tangent(v, inv_n, dv, reduced(v.ndim, kept))


def projection(v, inv_n, dv, red):
  """``<u, dv>`` per slice, keepdims, with ``u = v * inv_n`` formed inside the pass (0 on an
  all-zero slice: ``v = 0``): the norm's tangent, and the projection term of the tangent
  rules of ``normalize`` and the factor (:mod:`wn_jax._core`)."""
  return jnp.sum((v * inv_n) * dv, axis=red, keepdims=True)


# Under jax.linearize / grad the tangent keeps only its inputs as residuals and recomputes
# u = v / n inside the backward's fused pass (as the tangent rules of wn_jax._core do).
_norm_tangent = jax.checkpoint(projection, prevent_cse=False, static_argnums=(3,))
