"""The array core: the one place where ``w = g * v / ||v||`` is written."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from wn_jax._axes import Axis
from wn_jax._axes import floating_array
from wn_jax._axes import is_eps
from wn_jax._axes import kept_axes
from wn_jax._axes import reduce_dtype
from wn_jax._axes import reduced
from wn_jax._axes import result_dtype
from wn_jax._axes import scale_shape
from wn_jax._errors import labelled
from wn_jax._norm import norm_keepdims
from wn_jax._norm import projection


# Every public entry point checks its arguments in Python, then runs its array work as one
# jitted function of module scope with the kept axes (and eps) static. Eagerly, a second
# call with the same shapes, dtypes and axes is then a cache hit: the branches the norm
# hands to lax.platform_dependent / lax.cond are new closures on every trace, and outside
# jit each new trace would compile anew. Under an outer jit the call is a nested jit,
# traced and lowered once per configuration however many layers share it.
@functools.partial(jax.jit, static_argnums=(1,))
def _norm_jit(w: jax.Array, kept: tuple[int, ...]) -> jax.Array:
  n = norm_keepdims(w.astype(reduce_dtype(w.dtype)), kept)
  return n.reshape(scale_shape(w.shape, kept))


def _checked_weight(w: ArrayLike, axis: Axis) -> tuple[jax.Array, tuple[int, ...]]:
  """``(w, kept)``: ``w`` as a floating array and its kept axes, or a ``ValueError``."""
  w = floating_array(w, 'w')
  return w, kept_axes(w.ndim, axis)


@labelled('wn_jax.norm')
def norm(w: ArrayLike, axis: Axis = -1) -> jax.Array:
  """The Euclidean norm of ``w`` over every axis but the kept ``axis``.

  Reduced in float32 (float64 for float64 input) and returned in that dtype, with the
  shape ``scale_shape(w.shape, axis)``; safe from overflow and underflow. A slice that holds
  an infinite or NaN entry has norm NaN (not ``inf``, as ``jnp.linalg.norm`` gives for an
  infinite entry): :func:`normalize` then gives a NaN slice of ``w``, not a finite one.

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> wn_jax.norm(jnp.array([[3.0, 0.0], [4.0, 0.0]]), axis=-1)
    Array([5., 0.], dtype=float32)
  """
  w, kept = _checked_weight(w, axis)
  return _norm_jit(w, kept)


def _denominator(v: jax.Array, kept: tuple[int, ...], eps: float) -> tuple[jax.Array, jax.Array]:
  """``(max(||v||, eps), ||v|| > eps)`` per slice, keepdims; 1 for an all-zero slice."""
  return _clamped(norm_keepdims(v, kept), eps)


def _clamped(n: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """``(max(n, eps), n > eps)``; 1 where ``n`` is 0 (``eps = 0``)."""
  active = ~(n <= eps)  # NaN counts as active, so it propagates to the slice
  return jnp.where(active, n, eps if eps > 0 else 1.0), active


def _normalize_tangent_impl(v, s, inv_n, active, dv, dg, red):
  # With s = g / n and u = v / n (n the clamped norm):
  #   dw = s dv + u (dg - s <u, dv>)
  # The projection term drops out where n does not depend on v (n clamped to eps, or an
  # all-zero slice, where u = 0 anyway). Linear in (dv, dg), so JAX transposes it into
  # the paper's eq. 3: grad_g = <grad_w, u>, grad_v = s grad_w - u (s grad_g). u is
  # formed inside the elementwise passes, never alone: that keeps every intermediate in
  # range for weights near the ends of the float range (1 / n is representable for
  # every norm up to ~8e37).
  u_dv = projection(v, inv_n, dv, red)
  return s * dv + (v * inv_n) * (dg - jnp.where(active, s * u_dv, 0.0))


def _factor_tangent_impl(v, s, inv_n, active, dv, dg, red):
  # With s = g / n and u = v / n (n the clamped norm): ds = (dg - s <u, dv>) / n. As in
  # normalize's rule, u is formed inside the pass and the projection drops out where n
  # does not depend on v; dividing by n last keeps every intermediate in range (never
  # 1 / n ** 2), and reverse mode, the transpose, multiplies the cotangent by 1 / n first.
  u_dv = projection(v, inv_n, dv, red)
  return (dg - jnp.where(active, s * u_dv, 0.0)) * inv_n


# Under jax.linearize / grad, the tangent rules keep only their inputs (v, g and the
# per-slice norm) as residuals and recompute u = v / n inside the backward's fused
# passes: nothing weight-sized beyond v itself is stored.
_normalize_tangent = jax.checkpoint(_normalize_tangent_impl, prevent_cse=False, static_argnums=(6,))
_factor_tangent = jax.checkpoint(_factor_tangent_impl, prevent_cse=False, static_argnums=(6,))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _factor(v: jax.Array, g: jax.Array, kept: tuple[int, ...], eps: float) -> jax.Array:
  """``g / ||v||`` per slice, keepdims, in the reduction dtype: the factor ``_weight``
  multiplies ``v`` by, for a layer that applies it to its output instead.

  A ``custom_jvp``, as :func:`_normalize`: plain autodiff through ``g / n`` forms
  ``n ** 2``, which leaves float32's range for norms beyond about 1e19 or below 1e-19.
  """
  n, _ = _denominator(v, kept, eps)
  return g / n


@_factor.defjvp
def _factor_jvp(kept, eps, primals, tangents):
  (v, g), (dv, dg) = primals, tangents
  n, active = _denominator(v, kept, eps)
  inv_n = 1.0 / n
  return g / n, _factor_tangent(v, g * inv_n, inv_n, active, dv, dg, reduced(v.ndim, kept))


def _weight(v: jax.Array, g: jax.Array, n: jax.Array) -> jax.Array:
  """``w = v * (g / n)`` (PyTorch's order), ``n`` the clamped norm: the formula, once."""
  return v * (g / n)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _normalize(v: jax.Array, g: jax.Array, kept: tuple[int, ...], eps: float) -> jax.Array:
  """``v * (g / ||v||)``, ``g`` broadcast keepdims, all in the reduction dtype."""
  return _weight(v, g, _denominator(v, kept, eps)[0])


@_normalize.defjvp
def _normalize_jvp(kept, eps, primals, tangents):
  (v, g), (dv, dg) = primals, tangents
  n, active = _denominator(v, kept, eps)
  return _weight(v, g, n), _tangent_at(v, g, n, active, kept)(dv, dg)


def _tangent_at(v, g, n, active, kept):
  """``(dv, dg) -> dw``, normalize's tangent map at ``(v, g)``, ``n`` the clamped norm."""
  inv_n = 1.0 / n  # per slice: the weight-sized passes multiply, never divide
  red = reduced(v.ndim, kept)
  return lambda dv, dg: _normalize_tangent(v, g * inv_n, inv_n, active, dv, dg, red)


@labelled('wn_jax.normalize')
def normalize(v: ArrayLike, g: ArrayLike, axis: Axis = -1, *, eps: float = 0.0) -> jax.Array:
  r"""The weight-normalized weight $w = g \, v / \lVert v \rVert$.

  The norm runs over every axis of ``v`` except the kept ``axis``, so there is one ``g``
  per slice along ``axis``: for a Flax ``Dense`` kernel of layout ``(in, out)`` the
  default ``axis=-1`` keeps the output features, and ``w[:, j] = g[j] * v[:, j] /
  ||v[:, j]||``. For a ``Conv`` kernel ``(*window, in // groups, out)`` ``-1`` is again
  the output features.

  ``axis`` counts as in NumPy: a negative int indexes from the end. This differs from
  PyTorch's ``weight_norm(dim=...)``, where ``dim=-1`` (like ``dim=None``) means the
  whole tensor; here the whole tensor is ``axis=None`` and ``g`` is then a scalar.

  The norm is reduced in float32 (float64 for float64 ``v``), the product is formed as
  ``v * (g / ||v||)`` (PyTorch's order) in that dtype and cast to the promoted dtype of
  ``v`` and ``g`` (``v``'s for a weakly typed ``g``, a Python float, as in JAX). No
  epsilon touches a nonzero slice unless ``eps`` asks for one. An all-zero slice of ``v``
  gives a zero slice of ``w`` and finite gradients: those of ``g * v``, so the slice revives if its ``g`` is nonzero (the default initialization,
  :func:`decompose`, gives ``g = 1`` there) and stays at 0 if ``g = 0``.

  Differentiable in both modes, to any order (``grad``, ``jvp``, ``jacfwd``,
  ``jacrev``, ``hessian``, ``linearize``): a ``custom_jvp`` reuses the forward's norm,
  and its tangent rule, with $s = g / \lVert v \rVert$ and $u = v / \lVert v \rVert$,

  $$ \dot w = s \, (\dot v - u \langle u, \dot v \rangle) + u \, \dot g, $$

  is linear in the tangents, so reverse mode is its transpose (the paper's eq. 3).

  When every axis is kept (a 1-D ``v`` with ``axis=-1``, or ``axis`` naming every axis),
  each slice is a single entry and $w = g \operatorname{sign}(v)$ (0 where $v = 0$): the
  magnitude of ``v`` is then lost, by definition, and no warning is given.
  :func:`wn_jax.weight_norm` selects only leaves with ``ndim >= 2`` by default. Empty
  slices (a kernel with a 0-sized reduced axis) have norm 0 and give an empty or zero ``w``.

  Args:
    v: the direction, any real floating dtype, rank >= 1.
    g: the magnitude, of shape ``tuple(v.shape[a] for a in sorted kept axes)`` (a
      scalar for ``axis=None``).
    axis: the kept axis or axes: an int, a tuple of ints, or ``None`` for the whole
      tensor.
    eps: a lower bound on ``||v||`` (default 0: none). A static Python float: each
      value is compiled once, and an array is refused.

  Returns:
    ``w``, of the shape of ``v``.

  References:
    Salimans & Kingma, *Weight Normalization: A Simple Reparameterization to Accelerate
    Training of Deep Neural Networks*, 2016. https://arxiv.org/abs/1602.07868

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> v = jnp.array([[3.0, 0.0], [4.0, 0.0]])
    >>> wn_jax.normalize(v, jnp.array([10.0, 2.0]))
    Array([[6., 0.],
           [8., 0.]], dtype=float32)
  """
  v, g, kept = _checked(v, g, axis, eps)
  return _normalize_jit(v, g, kept, float(eps))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _normalize_jit(v: jax.Array, g: jax.Array, kept: tuple[int, ...], eps: float) -> jax.Array:
  acc = reduce_dtype(v.dtype)
  w = _normalize(v.astype(acc), _keepdims(g, v.shape, kept, acc), kept, eps)
  return w.astype(_out_dtype(v, g))


def _out_dtype(v: jax.Array, g: jax.Array) -> jnp.dtype:
  """``w``'s dtype: ``v``'s and ``g``'s promoted, or ``v``'s for a weakly typed ``g`` (a Python
  float, eager or traced), as JAX gives ``v * 2.0`` ``v``'s dtype. ``w`` is formed in float32
  or wider either way, and rounded once."""
  return v.dtype if jax.typeof(g).weak_type else result_dtype(v.dtype, g.dtype)


def _keepdims(g: jax.Array, shape: tuple[int, ...], kept: tuple[int, ...], dtype) -> jax.Array:
  """``g`` in ``dtype``, reshaped to broadcast against a weight of ``shape`` (keepdims)."""
  return g.astype(dtype).reshape([shape[i] if i in kept else 1 for i in range(len(shape))])


def _checked(
  v: ArrayLike, g: ArrayLike, axis: Axis, eps: float
) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
  """``(v, g, kept)`` as arrays and kept axes, or a ``ValueError``."""
  v, g = floating_array(v, 'v'), floating_array(g, 'g')
  if not is_eps(eps):
    raise ValueError(
      f'eps must be a finite non-negative number (a Python or NumPy float); got {eps!r}.'
    )
  kept = kept_axes(v.ndim, axis)
  expected = scale_shape(v.shape, kept)
  if g.shape != expected:
    raise ValueError(
      f'g must have the shape of v along the kept axis {axis!r}, '
      f'{expected}, for v of shape {v.shape}; got g of shape {g.shape}. '
      f'Build g with wn_jax.decompose(w, axis) or reshape it.'
    )
  return v, g, kept


@labelled('wn_jax factor')
def factor(v: ArrayLike, g: ArrayLike, axis: Axis = -1, *, eps: float = 0.0) -> jax.Array:
  r"""The per-slice factor $g / \lVert v \rVert$, so that ``normalize(v, g, axis)`` is ``v`` times it.

  Of shape ``g.shape``, in the reduction dtype (float32, or float64 for float64 ``v``).
  The same norm, clamp and derivatives as :func:`normalize` (an all-zero slice gives
  ``g``). A layer that is linear in its weight can apply it to its output instead of
  forming ``w``: ``x @ normalize(v, g) == (x @ v) * factor(v, g)`` for a Dense kernel
  ``(in, out)`` with ``axis=-1`` (the paper's section 2.1).
  """
  v, g, kept = _checked(v, g, axis, eps)
  return _factor_jit(v, g, kept, float(eps))


def factor_of(v: jax.Array, g: jax.Array, kept: tuple[int, ...]) -> jax.Array:
  """:func:`factor` of checked arguments (``g`` of ``v``'s scale shape), no ``eps``: for a
  layer that has checked them itself (Python checks cost per call site under a trace)."""
  return _factor_jit(v, g, kept, 0.0)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _factor_jit(v: jax.Array, g: jax.Array, kept: tuple[int, ...], eps: float) -> jax.Array:
  acc = reduce_dtype(v.dtype)
  return _factor(v.astype(acc), _keepdims(g, v.shape, kept, acc), kept, eps).reshape(g.shape)


@labelled('wn_jax.decompose')
def decompose(w: ArrayLike, axis: Axis = -1) -> tuple[jax.Array, jax.Array]:
  r"""Splits ``w`` into ``(v, g)`` with ``v = w`` and ``g = ||w||`` along the kept ``axis``.

  The inverse of :func:`normalize`: ``normalize(*decompose(w, axis), axis) == w`` (to
  float rounding). ``g`` has ``w``'s dtype and the shape of ``w`` along ``axis``. Axis
  conventions as in :func:`normalize`.

  Where a slice of ``w`` is all zero, $g = 1$ instead of $\lVert w \rVert = 0$: the
  weight is still 0 there, but the slice trains (with $g = 0$ every gradient of the
  slice would be 0 forever). This is the one rule every default initialization of ``g``
  uses (the linen and NNX layers, the wrappers, :func:`wn_jax.weight_norm`), so a
  zero-initialized layer computes what the plain layer computes and still learns.

  Args:
    w: a real floating weight, rank >= 1.
    axis: the kept axis or axes, or ``None`` for the whole tensor.

  Returns:
    ``(v, g)``.

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> v, g = wn_jax.decompose(jnp.array([[3.0, 0.0], [4.0, 1.0]]))
    >>> g
    Array([5., 1.], dtype=float32)
    >>> bool(jnp.allclose(wn_jax.normalize(v, g), v))
    True
    >>> wn_jax.decompose(jnp.zeros((2, 2)))[1]  # an all-zero slice starts at g = 1
    Array([1., 1.], dtype=float32)
  """
  w, kept = _checked_weight(w, axis)
  return w, _scale_of(w, kept)


@functools.partial(jax.jit, static_argnums=(1,))
def _scale_of(w: jax.Array, kept: tuple[int, ...]) -> jax.Array:
  """``||w||`` in ``w``'s dtype, 1 on an all-zero slice: :func:`decompose`'s ``g``."""
  n = _norm_jit(w, kept)
  # == 0, not <= 0: a NaN norm stays NaN.
  return jnp.where(n == 0, jnp.ones_like(n), n).astype(w.dtype)


@labelled('wn_jax normalize_with_norm')
def normalize_with_norm(v: jax.Array, g: jax.Array, axis: Axis) -> tuple[jax.Array, jax.Array]:
  """``(normalize(v, g, axis), ||v||)``, the norm computed once: for an optimizer's update,
  which is not differentiated. The norm has ``g``'s shape, in the reduction dtype."""
  v, g, kept = _checked(v, g, axis, 0.0)
  return _normalize_with_norm_jit(v, g, kept)


@functools.partial(jax.jit, static_argnums=(2,))
def _normalize_with_norm_jit(
  v: jax.Array, g: jax.Array, kept: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
  acc = reduce_dtype(v.dtype)
  va = v.astype(acc)
  n = norm_keepdims(va, kept)
  w = _weight(va, _keepdims(g, v.shape, kept, acc), _clamped(n, 0.0)[0])
  return w.astype(_out_dtype(v, g)), n.reshape(g.shape)


@labelled('wn_jax pullback')
def pullback(
  v: jax.Array, g: jax.Array, n: jax.Array, grad_w: jax.Array, axis: Axis
) -> tuple[jax.Array, jax.Array]:
  """``(grad_v, grad_g)`` from ``grad_w`` for ``w = normalize(v, g, axis)``, given
  ``n = ||v||`` (as :func:`normalize_with_norm` returns it): the transpose of
  normalize's tangent map, without computing the norm again."""
  v, g, kept = _checked(v, g, axis, 0.0)
  return _pullback_jit(v, g, n, grad_w, kept)


@functools.partial(jax.jit, static_argnums=(4,))
def _pullback_jit(
  v: jax.Array, g: jax.Array, n: jax.Array, grad_w: jax.Array, kept: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
  acc = reduce_dtype(v.dtype)
  va, gb = v.astype(acc), _keepdims(g, v.shape, kept, acc)
  d, active = _clamped(jnp.asarray(n, acc).reshape(gb.shape), 0.0)
  grad_v, grad_g = jax.linear_transpose(_tangent_at(va, gb, d, active, kept), va, gb)(
    jnp.asarray(grad_w).astype(acc)
  )
  return grad_v.astype(v.dtype), grad_g.reshape(g.shape).astype(g.dtype)
