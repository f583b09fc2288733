"""The float64 NumPy reference: the single source of truth for every test.

``w = g * v / ||v||`` and the paper's gradients (Salimans & Kingma 2016, eq. 3):

    grad_g = (grad_w . v) / ||v||
    grad_v = (g / ||v||) grad_w - (g grad_g / ||v||^2) v

where the dot product and the norm run over every axis but the kept ones.
"""

from __future__ import annotations

import numpy as np


def kept(ndim: int, axis) -> tuple[int, ...]:
  if axis is None:
    return ()
  axes = (axis,) if isinstance(axis, int) else axis
  return tuple(sorted(a % ndim for a in axes))


def _reduced(ndim: int, axis) -> tuple[int, ...]:
  k = kept(ndim, axis)
  return tuple(i for i in range(ndim) if i not in k)


def _bcast(g: np.ndarray, shape: tuple[int, ...], axis) -> np.ndarray:
  k = kept(len(shape), axis)
  return np.asarray(g, np.float64).reshape([shape[i] if i in k else 1 for i in range(len(shape))])


def norm(v, axis) -> np.ndarray:
  """||v|| over the reduced axes, keepdims."""
  v = np.asarray(v, np.float64)
  return np.sqrt(np.sum(v * v, axis=_reduced(v.ndim, axis), keepdims=True))


def normalize(v, g, axis=-1) -> np.ndarray:
  v = np.asarray(v, np.float64)
  n = norm(v, axis)
  safe = np.where(n > 0, n, 1.0)
  return _bcast(g, v.shape, axis) * v / safe


def decompose(w, axis=-1) -> tuple[np.ndarray, np.ndarray]:
  w = np.asarray(w, np.float64)
  return w, norm(w, axis).reshape([w.shape[i] for i in kept(w.ndim, axis)])


def grads(v, g, axis, grad_w) -> tuple[np.ndarray, np.ndarray]:
  """The paper's (grad_v, grad_g) for the cotangent ``grad_w`` of ``w``."""
  v = np.asarray(v, np.float64)
  grad_w = np.asarray(grad_w, np.float64)
  red = _reduced(v.ndim, axis)
  n = norm(v, axis)
  n = np.where(n > 0, n, 1.0)
  gb = _bcast(g, v.shape, axis)
  grad_g = np.sum(grad_w * v, axis=red, keepdims=True) / n
  grad_v = gb / n * grad_w - gb * grad_g / n**2 * v
  return grad_v, grad_g.reshape(np.shape(g))


def dense(x, kernel, bias=None) -> np.ndarray:
  y = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
  return y if bias is None else y + np.asarray(bias, np.float64)
