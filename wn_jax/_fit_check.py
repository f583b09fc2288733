"""data_init's refusal of a ``g`` or ``b`` that does not fit its dtypes, or of a batch too
small to estimate a standard deviation: checked on concrete values at once, under a trace
when the computation runs (a debug callback, once however many vmaps batch it)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching
from jax.experimental import multihost_utils

_TOO_FEW = (
  'data_init needs at least 2 values per feature to estimate a standard deviation: pass a '
  'larger batch.'
)


def per_feature(
  g: jax.Array, b: jax.Array | None, mu: jax.Array, sigma: jax.Array, new: jax.Array
) -> jax.Array:
  """What :func:`check` checks, per feature, as one array whose rows a max reduces to their
  worst (``bad``, a sum to its count): ``new``, ``bad`` (1 or 0), ``-sigma``, ``|g|`` and
  ``|b|``, each 0 (``-sigma`` -1) where ``new`` is False (only the fresh features are set:
  only they must fit); ``bad`` where the pre-activation's statistics ``mu``, ``sigma`` are
  not finite. Elementwise, and one output: XLA computes it in the pass that computes ``g``."""
  bad = new & ~(jnp.isfinite(mu) & jnp.isfinite(sigma))
  found = [g] if b is None else [g, b]
  rows = [new, bad, -jnp.where(new, sigma, 1.0), *(jnp.abs(jnp.where(new, x, 0.0)) for x in found)]
  return jnp.stack([r.astype(sigma.dtype) for r in rows])


def _fits(largest: tuple[Any, ...], dtypes: tuple[Any, ...]) -> bool:
  """Whether every entry whose largest magnitude is ``largest`` is finite in every one of
  ``dtypes`` (rounding is monotone: the largest entry is the first to round to inf; a NaN
  one stays NaN)."""
  with np.errstate(over='ignore', invalid='ignore'):
    return all(
      np.isfinite(np.asarray(v).astype(d).astype(np.float64)) for v in largest for d in dtypes
    )


def check(label: object, fit: jax.Array, dtypes: tuple[Any, ...], one_value: bool) -> None:
  """A ``ValueError`` unless ``g`` and ``b`` are finite in every one of ``dtypes`` (their
  parameter dtypes and the layer's compute dtype: ``w``'s entries reach ``g``, and ``b`` is
  added in it), from ``fit`` (:func:`per_feature`); it names a pre-activation that is not
  finite as the cause. ``one_value``: the batch has one value per feature (refused where a
  feature is set).

  Value-dependent: raised at once on concrete arrays; under a trace (``jit``) a debug
  callback raises it when the computation runs, with ``label`` (no caller is left to add it
  then). Reduced over the features in NumPy: no program of XLA's.
  """
  compute = jnp.dtype(dtypes[-1])

  def refuse(fit, prefix=''):  # fit: per feature, or the worst over them (_worst)
    new, bad, neg_sigma, *magnitudes = np.asarray(fit)
    if one_value and np.any(new > 0):  # the use that ran first had one value per feature
      raise ValueError(f'{prefix}{_TOO_FEW}')
    # NaN-propagating, as the check needs; -inf (no entries: an empty vmap) is 0
    largest = [np.maximum(np.max(m), 0.0) for m in magnitudes]
    if _fits(largest, dtypes):
      return
    bad_features, sigma_min = np.sum(bad), -np.max(neg_sigma)
    if int(bad_features):
      raise ValueError(
        f'{prefix}data_init: the pre-activation is not finite on this batch ({int(bad_features)} '
        f'feature(s) with NaN or inf statistics): the batch, or a layer before this one, has '
        f'NaN or inf, or the pre-activation overflows {compute} (largest finite '
        f"{float(jnp.finfo(compute).max):.3g}), or the model reads a WN layer's scale before "
        f"that layer's first use (during data_init it is -inf until then). Initialize on a "
        f'finite batch at the scale the layer sees in training, or compute this layer in '
        f'float32.'
      )
    big = max(float(v) for v in largest)
    narrow = [str(jnp.dtype(d)) for d in dtypes if float(jnp.finfo(d).max) < big] or dtypes
    raise ValueError(
      f'{prefix}data_init sets g = init_scale / sigma (here up to {float(largest[0]):.3g})'
      + ('' if len(largest) == 1 else f' and b = -mu * g (up to {float(largest[1]):.3g})')
      + f', which does not fit {"/".join(sorted(set(map(str, narrow))))}: the '
      f'pre-activation varies too little on this batch (smallest per-feature standard '
      f'deviation {float(sigma_min):.3g}). Compute this layer in float32 (dtype and '
      f'param_dtype float32), pass a smaller init_scale, or initialize on a batch at the '
      f'scale the layer sees in training.'
    )

  if isinstance(fit, jax.core.Tracer):
    callback_once(functools.partial(refuse, prefix=f'{label}: '), _worst(fit))
  elif not fit.is_fully_addressable:  # global, over processes: each reads the whole of it
    refuse(multihost_utils.process_allgather(fit, tiled=True))
  else:
    refuse(fit)


def _worst(fit: jax.Array) -> jax.Array:
  """``fit`` reduced over the features, in its computation: each row's max (the number of
  ``bad`` features, a sum), a column. A callback takes its operand on one device: the
  per-feature array, sharded over the features, would be gathered there (XLA warned of an
  "involuntary full rematerialization" for each layer)."""
  worst = jnp.max(fit, axis=1, keepdims=True, initial=-jnp.inf)
  return worst.at[1].set(jnp.sum(fit[1], keepdims=True))


def callback_once(callback: Callable[[Any], None], fit: jax.Array) -> None:
  """``jax.debug.callback(callback, fit)``, called once however many vmaps batch ``fit``: a
  batched ``fit`` is reduced to its worst (max) over the vmapped axis first. A plain debug
  callback runs once per element, and outside ``jit`` each element's slice is a new program
  (an eager ``data_init`` through a vmap of 64 elements compiled 192 slices)."""

  @custom_batching.custom_vmap
  def call(fit):
    jax.debug.callback(callback, fit)
    return fit  # custom_vmap wants an output; the callback's effect keeps it

  @call.def_vmap
  def _(axis_size, in_batched, fit):
    del axis_size
    (batched,) = in_batched
    return call(jnp.max(fit, axis=0, initial=-jnp.inf) if batched else fit), False

  # Values only: custom_vmap has no derivative rule, and a data init under nn.vjp or
  # nn.value_and_grad (a model whose forward differentiates a layer) failed to linearize.
  call(jax.lax.stop_gradient(fit))
