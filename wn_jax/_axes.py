"""Kept axes, the scale's shape and the dtype rules: what every part of wn_jax agrees on."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from wn_jax._errors import labelled
from wn_jax._errors import type_name

Axis = int | Sequence[int] | None
# The kept axes of the leaves a pytree function selects: one for all, or each leaf's own by
# its '/'-joined path (a mapping, or a callable on it).
LeafAxis = Axis | Mapping[str, Axis] | Callable[[str], Axis]


def as_array(x: ArrayLike, dtype=None) -> jax.Array:
  """``jnp.asarray(x, dtype)``, without its cost (tens of microseconds eagerly) for a JAX
  array (or tracer) that already has the dtype."""
  if isinstance(x, jax.Array) and (dtype is None or x.dtype == dtype):
    return x
  return jnp.asarray(x, dtype)


def kept_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
  """Canonicalizes ``axis`` (the KEPT axes) for an array of rank ``ndim``.

  Returns the kept axes as non-negative ints in increasing order; ``None`` gives ``()``.

  >>> kept_axes(4, (-1, 0)), kept_axes(2, None)
  ((0, 3), ())
  """
  if _plain_ints(axis):  # remembered: an eager layer call asks several times
    return _kept_axes_of_ints(ndim, axis)
  return _kept_axes(ndim, axis)


def _plain_ints(x: object) -> bool:
  """Whether ``x`` is a Python int or a tuple of them (not a bool, a float or a NumPy
  integer, which compare equal to ints but are told apart by the checks): safe to cache."""
  return type(x) is int or (type(x) is tuple and all(type(a) is int for a in x))


def _kept_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
  if axis is None:
    return ()
  axes = tuple(axis) if isinstance(axis, Sequence) and not isinstance(axis, str) else (axis,)
  out = []
  for a in axes:
    a = _index(a, axis)
    if not ndim:
      raise ValueError(
        f'axis {a} is out of range for a weight of rank 0 (a scalar has no axis to keep); '
        f'pass axis=None, or a weight with at least one axis.'
      )
    if not -ndim <= a < ndim:
      raise ValueError(
        f'axis {a} is out of range for a weight of rank {ndim} (valid: '
        f'{-ndim}..{ndim - 1}); pass an axis of the weight, or None for the whole tensor.'
      )
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f'axis {axis!r} repeats an axis; name each kept axis once.')
  return tuple(sorted(out))


_kept_axes_of_ints = functools.lru_cache(maxsize=1024)(_kept_axes)


def _index(a: object, axis: Axis) -> int:
  """``a``, one entry of ``axis``, as an int (NumPy integers too, not bools)."""
  if not isinstance(a, bool):
    try:
      return operator.index(a)  # type: ignore[arg-type]
    except TypeError:
      pass
  if isinstance(a, jax.core.Tracer):
    raise ValueError(
      f'axis is traced ({a!r}): it must be static. Under jax.jit, mark it static '
      f"(jax.jit(f, static_argnames='axis')) or close over it (functools.partial); "
      f'optax.inject_hyperparams makes every number an array: keep it static there with '
      f"inject_hyperparams(..., static_args=('axis',))."
    )
  raise ValueError(f'axis must be an int, a tuple of ints or None; got {axis!r}.')


def reduce_dtype(dtype) -> jnp.dtype:
  """The dtype the norm is reduced in: float32, or float64 for float64 input."""
  return result_dtype(dtype, jnp.float32)


def is_eps(eps: object) -> bool:
  """Whether ``eps`` is a static lower bound on a norm: a finite real number >= 0."""
  return (
    isinstance(eps, (int, float, np.integer, np.floating))
    and not isinstance(eps, bool)
    and math.isfinite(eps)
    and float(eps) >= 0
  )


def check_scale_init(scale_init: object) -> None:
  """A ``ValueError`` unless ``scale_init`` is ``None`` or callable (an initializer)."""
  if scale_init is not None and not callable(scale_init):
    raise ValueError(
      f'scale_init must be None (g = ||v||) or a Flax initializer, a callable '
      f'(key, shape, dtype) -> array; got {scale_init!r}. For a constant g pass '
      f'nn.initializers.constant({scale_init!r}).'
    )


def floating_array(x: ArrayLike, name: str) -> jax.Array:
  """``x`` (called ``name`` in the message) as a real floating array, or a ``ValueError``:
  for something that is no array (a parameter dict, a string) or of another dtype."""
  if isinstance(x, jax.ShapeDtypeStruct):
    raise ValueError(
      f'{name} is abstract (a jax.ShapeDtypeStruct of shape {tuple(x.shape)}): there is no value '
      f'to compute with. For shapes and dtypes only, run the call under jax.eval_shape (e.g. '
      f'jax.eval_shape(wn_jax.materialize, tree)).'
    )
  try:
    x = as_array(x)
  except (TypeError, ValueError):
    raise ValueError(
      f'{name} must be an array (a JAX or NumPy array, or a nested list of numbers); got '
      f'{type_name(x)}. For a tree of parameters use wn_jax.weight_norm and '
      f'wn_jax.materialize.'
    ) from None
  require_floating(x.dtype, name)
  return x


def require_floating(dtype: Any, name: str) -> None:
  """A ``ValueError`` unless ``dtype`` is a real floating one."""
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f'{name} must be a real floating array (float16, bfloat16, float32 or '
      f'float64); got dtype {dtype}. Cast it first: jnp.asarray({name}, jnp.float32).'
    )


@labelled('wn_jax.scale_shape')
def scale_shape(shape: Sequence[int], axis: Axis) -> tuple[int, ...]:
  """The shape of ``g`` for a weight of ``shape`` keeping ``axis``.

  >>> scale_shape((3, 3, 16, 32), -1)
  (32,)
  >>> scale_shape((4, 5), None)
  ()
  """
  if _plain_ints(shape) and _plain_ints(axis):  # remembered, as kept_axes
    return _scale_shape_of_ints(shape, axis)
  return _scale_shape(shape, axis)


def _scale_shape(shape: Sequence[int], axis: Axis) -> tuple[int, ...]:
  dims = _dims(shape)
  return tuple(dims[a] for a in kept_axes(len(dims), axis))


_scale_shape_of_ints = functools.lru_cache(maxsize=1024)(_scale_shape)


def _dims(shape: object) -> tuple[int, ...]:
  """``shape`` as a tuple of ints, or a ``ValueError`` (for an array in place of its shape)."""
  dims: tuple[Any, ...] = ()
  try:  # a symbolic dimension (jax.export) stays as it is
    dims = tuple(d if jax.export.is_symbolic_dim(d) else operator.index(d) for d in shape)  # type: ignore[attr-defined]
    ok = all(jax.export.is_symbolic_dim(d) or d >= 0 for d in dims)
  except TypeError:
    ok = False
  if not ok:
    got = type_name(shape) if hasattr(shape, 'dtype') else repr(shape)
    raise ValueError(
      f"shape must be a sequence of non-negative ints (a weight's .shape); got {got}. "
      f'Pass w.shape, not w.'
    )
  return dims


def fits_kept_axes(g_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> bool:
  """Whether ``g_shape`` is ``v_shape`` along some kept axes (in order): a possible ``g``.

  >>> fits_kept_axes((4,), (3, 4)), fits_kept_axes((), (3, 4)), fits_kept_axes((4, 3), (3, 4))
  (True, True, False)
  """
  rest = iter(v_shape)
  return all(any(d == e for e in rest) for d in g_shape)


def reduced(ndim: int, kept: tuple[int, ...]) -> tuple[int, ...]:
  """The axes the norm runs over: every axis of a rank-``ndim`` weight but the ``kept`` ones."""
  return tuple(i for i in range(ndim) if i not in kept)


def result_dtype(*dtypes) -> jnp.dtype:
  """The float dtype of a result from these float dtypes, even under strict promotion.

  The widest wins; bfloat16 with float16 gives float32.
  """
  ds = {jnp.dtype(d) for d in dtypes}
  if len(ds) == 1:
    return ds.pop()
  widest = max(d.itemsize for d in ds)
  return jnp.dtype(jnp.float32) if widest == 2 else max(ds, key=lambda d: d.itemsize)


def abstract_scale(w: jax.ShapeDtypeStruct, kept: tuple[int, ...]) -> jax.ShapeDtypeStruct:
  """The abstract ``g`` of an abstract weight (a real floating one): its shape along ``kept``,
  its dtype, and its sharding: a ``NamedSharding``'s mesh and memory with the partitions of
  the kept axes, a single device's as it is (none where the weight has another kind)."""
  require_floating(w.dtype, 'w')
  sharding = getattr(w, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = jax.sharding.PartitionSpec(*kept_names(tuple(sharding.spec), kept) or ())
    sharding = jax.sharding.NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)
  elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
    sharding = None
  return jax.ShapeDtypeStruct(tuple(w.shape[a] for a in kept), w.dtype, sharding=sharding)


def kept_names(names: Sequence[object] | None, kept: tuple[int, ...]) -> tuple[object, ...] | None:
  """The partition names of a scale: those of its kernel's kept axes (``None``: unpartitioned).

  ``names`` may be shorter than the kernel's rank: as in Flax, the missing trailing axes are
  unsharded (``None``).
  """
  if names is None:
    return None
  return tuple(names[a] if a < len(names) else None for a in kept)


def axis_at(axis: LeafAxis) -> Callable[[str], Axis]:
  """``axis`` (one for all, a mapping of paths, or a callable) as a function of a selected
  leaf's ``/``-joined path."""
  if isinstance(axis, Mapping):
    table = dict(axis)

    def lookup(path: str) -> Axis:
      if path not in table:
        hint = ''
        if f'{path}/value' in table:
          hint = " Its key ends in '/value' (a JAX key path of an NNX State): leave that out."
        elif any(isinstance(a, Mapping) for a in table.values()):
          hint = " The mapping is flat: '/'-joined paths to axes, not nested like the params."
        raise ValueError(f'no axis in the mapping (it names {sorted(table)[:6]}).{hint}')
      return table[path]

    return lookup
  if callable(axis):
    return axis
  return lambda path: cast(Axis, axis)
