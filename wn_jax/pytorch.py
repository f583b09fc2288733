"""Exact loading and export of PyTorch weight-normed checkpoints. Never imports torch.

PyTorch stores a weight-normed tensor as ``g`` and ``v``, in one of two key styles:

- legacy ``torch.nn.utils.weight_norm``: ``<prefix>.weight_g``, ``<prefix>.weight_v``;
- ``torch.nn.utils.parametrizations.weight_norm``:
  ``<prefix>.parametrizations.weight.original0`` (g), ``...original1`` (v).

:func:`from_torch` turns them into the parameters of wn_jax's WN layers (``kernel`` =
v in Flax layout, ``scale`` = g, ``bias``) and says how each layer must be configured
(``axis``, ``transpose_kernel``); :func:`to_torch` goes back, bit for bit.

Layouts (PyTorch -> Flax kernel):

====================  ===========================  ===========================  ==================
PyTorch layer         PyTorch weight               Flax kernel                  default ``dim=0``
====================  ===========================  ===========================  ==================
Linear                ``(out, in)``                ``(in, out)``                ``axis=-1`` (out)
Conv{1,2,3}d          ``(out, in/groups, *k)``     ``(*k, in/groups, out)``     ``axis=-1`` (out)
ConvTranspose{1,2}d   ``(in, out, *k)``            ``(*k, out, in)`` with       ``axis=-1`` (in)
                                                   ``transpose_kernel=True``
====================  ===========================  ===========================  ==================

PyTorch's ``dim`` counts PyTorch's axes; its ``dim=None`` and ``dim=-1`` both mean the
whole tensor (a scalar g), which is wn_jax's ``axis=None``. Arguments of the layers
(:func:`conv_kwargs` does this mapping):

=====================  =====================================================================
PyTorch                Flax ``WNConv`` / ``WNConvTranspose``
=====================  =====================================================================
``stride``             ``strides``
``padding=p``          Conv: ``padding=[(p, p), ...]``; ``'same'`` / ``'valid'`` as they are
``dilation``           ``kernel_dilation``
``groups``             Conv: ``feature_group_count`` (ConvTranspose: only ``groups=1``)
``output_padding=op``  ConvTranspose: ``padding=[(d(k-1)-p, d(k-1)-p+op), ...]`` and
                       ``transpose_kernel=True``
=====================  =====================================================================

Inputs are channels-last in Flax: a PyTorch ``(N, C, L)`` batch is ``x.transpose(0, 2, 1)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from wn_jax import _core

KINDS = (
  'Linear',
  'Conv1d',
  'Conv2d',
  'Conv3d',
  'ConvTranspose1d',
  'ConvTranspose2d',
  'ConvTranspose3d',
)
_DEFAULT_KIND = {2: 'Linear', 3: 'Conv1d', 4: 'Conv2d', 5: 'Conv3d'}
_STYLES = {
  'legacy': ('.weight_g', '.weight_v'),
  'parametrization': ('.parametrizations.weight.original0', '.parametrizations.weight.original1'),
}


@dataclasses.dataclass(frozen=True)
class TorchLayer:
  """One converted PyTorch layer: what its wn_jax twin needs to compute exactly the same.

  Attributes:
    kind: the PyTorch layer kind, e.g. ``'Conv1d'`` or ``'ConvTranspose1d'``.
    params: ``{'kernel', 'scale'[, 'bias']}`` for ``WNDense`` / ``WNConv`` /
      ``WNConvTranspose`` (linen) or ``WNLinear`` / ``WNConv`` / ``WNConvTranspose``
      (NNX), as NumPy arrays in Flax layout.
    axis: the ``axis`` the wn_jax layer must be built with (``None``: whole tensor).
    transpose_kernel: the ``transpose_kernel`` a ``WNConvTranspose`` must be built with.
    dim: PyTorch's ``dim`` (``None`` for the whole tensor).
    style: the key style it came in, ``'legacy'`` or ``'parametrization'``.

  Examples:
    >>> import numpy as np
    >>> sd = {'weight_g': np.full((4, 1, 1), 2.0, np.float32), 'weight_v': np.ones((4, 3, 5), np.float32)}
    >>> layer = from_torch(sd)['']
    >>> layer.kind, layer.params['kernel'].shape, layer.axis
    ('Conv1d', (5, 3, 4), -1)
    >>> module, variables = layer.linen(padding=2)
    >>> module.apply(variables, np.ones((1, 7, 3), np.float32)).shape
    (1, 7, 4)
  """

  kind: str
  params: dict[str, np.ndarray]
  axis: int | None
  transpose_kernel: bool
  dim: int | None
  style: str

  def _layer_kwargs(self, torch_args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    kernel = self.params['kernel']
    kw: dict[str, Any] = {'axis': self.axis, 'use_bias': 'bias' in self.params}
    if self.kind == 'Linear':
      if torch_args:
        raise _error(f'a Linear layer takes no conv arguments; got {sorted(torch_args)}.')
      return kernel.shape[-1], kw
    kw.update(conv_kwargs(self.kind, kernel.shape[:-2], **torch_args))
    del kw['kernel_size']
    return (kernel.shape[-2] if self.transpose_kernel else kernel.shape[-1]), kw

  def linen(self, **torch_args: Any) -> tuple[Any, dict[str, Any]]:
    """The configured linen layer and its variables: ``layer.apply(variables, x)``.

    Args:
      **torch_args: the PyTorch layer's ``stride``, ``padding``, ``dilation``,
        ``groups``, ``output_padding`` (see :func:`conv_kwargs`).

    Returns:
      ``(WNDense | WNConv | WNConvTranspose, {'params': ...})``; inputs are
      channels-last.
    """
    from wn_jax import linen as wl

    features, kw = self._layer_kwargs(torch_args)
    kernel_size = self.params['kernel'].shape[:-2]
    if self.kind == 'Linear':
      layer: Any = wl.WNDense(features, **kw)
    elif self.transpose_kernel:
      layer = wl.WNConvTranspose(features, kernel_size, **kw)
    else:
      layer = wl.WNConv(features, kernel_size, **kw)
    return layer, {'params': {k: np.asarray(v) for k, v in self.params.items()}}

  def nnx(self, *, rngs: Any = None, **torch_args: Any) -> Any:
    """The configured NNX layer with these parameters loaded (``rngs`` optional)."""
    from flax import nnx as fnnx

    from wn_jax import nnx as wx

    features, kw = self._layer_kwargs(torch_args)
    kernel = self.params['kernel']
    rngs = rngs or fnnx.Rngs(0)
    if self.kind == 'Linear':
      layer: Any = wx.WNLinear(kernel.shape[0], features, rngs=rngs, **kw)
    elif self.transpose_kernel:
      layer = wx.WNConvTranspose(kernel.shape[-1], features, kernel.shape[:-2], rngs=rngs, **kw)
    else:
      groups = kw.get('feature_group_count', 1)
      layer = wx.WNConv(kernel.shape[-2] * groups, features, kernel.shape[:-2], rngs=rngs, **kw)
    for name, value in self.params.items():
      getattr(layer, name).set_value(np.asarray(value))
    return layer


def _perm(kind: str, ndim: int) -> tuple[int, ...]:
  """PyTorch axis order -> Flax axis order: flax_kernel = torch_weight.transpose(perm)."""
  if kind == 'Linear':
    return (1, 0)
  return (*range(2, ndim), 1, 0)


def _error(msg: str) -> ValueError:
  return ValueError(f'wn_jax.pytorch: {msg}')


def _load(state_dict: Any) -> Mapping[str, Any]:
  if isinstance(state_dict, (str, os.PathLike)):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise _error(
        'reading a .safetensors file needs the safetensors package: pip install "wn_jax[safetensors]".'
      ) from e
    return load_file(os.fspath(state_dict))
  if not isinstance(state_dict, Mapping):
    raise _error(
      f'expected a state dict (a mapping of key -> array) or a .safetensors path; got {type(state_dict).__name__}.'
    )
  return state_dict


def _array(x: Any) -> np.ndarray:
  if hasattr(x, 'detach'):  # a torch tensor, without importing torch
    x = x.detach().cpu().numpy()
  return np.asarray(x)


def find_prefixes(state_dict: Mapping[str, Any]) -> dict[str, str]:
  """Every weight-normed prefix in ``state_dict`` and its key style.

  Examples:
    >>> import numpy as np
    >>> find_prefixes({'a.weight_g': np.ones(1), 'b.parametrizations.weight.original1': np.ones(1)})
    {'a': 'legacy', 'b': 'parametrization'}
  """
  found: dict[str, str] = {}
  for key in state_dict:
    for style, suffixes in _STYLES.items():
      for suffix in suffixes:
        if key.endswith(suffix) or key == suffix[1:]:
          found.setdefault(key[: -len(suffix)] if key.endswith(suffix) else '', style)
  return found


def _key(prefix: str, suffix: str) -> str:
  """``prefix + suffix``; a top-level module's keys have no prefix and no dot."""
  return prefix + suffix if prefix else suffix[1:]


def _torch_dim(g: np.ndarray, v: np.ndarray, where: str) -> int | None:
  """PyTorch's ``dim`` from g's shape: size ``v.shape[dim]`` along it, 1 elsewhere; or a scalar."""
  if g.ndim == 0:
    return None
  fits = g.ndim == v.ndim and all(s in (1, n) for s, n in zip(g.shape, v.shape))
  kept = [i for i, (s, n) in enumerate(zip(g.shape, v.shape)) if s == n != 1] if fits else []
  ones = [i for i, n in enumerate(v.shape) if n == 1]
  if not fits or len(kept) > 1 or (not kept and not ones):
    raise _error(
      f'{where}: g of shape {g.shape} does not fit v of shape {v.shape}: PyTorch keeps g with '
      f"v's rank, size v.shape[dim] along dim and 1 elsewhere (or a scalar for dim=None)."
    )
  return kept[0] if kept else ones[0]


def from_torch(
  state_dict: Mapping[str, Any] | str | os.PathLike,
  kinds: Mapping[str, str] | None = None,
) -> dict[str, TorchLayer]:
  """Converts the weight-normed layers of a PyTorch state dict to wn_jax parameters.

  Args:
    state_dict: a mapping of key -> array (NumPy arrays, or torch tensors), or the
      path of a ``.safetensors`` file.
    kinds: the PyTorch layer kind of prefixes whose kernel shape cannot tell it, e.g.
      ``{'ups.0': 'ConvTranspose1d'}``. By default a 2-D weight is a ``Linear``, 3-D a
      ``Conv1d``, 4-D ``Conv2d``, 5-D ``Conv3d``. One of ``KINDS``.

  Returns:
    ``{prefix: TorchLayer}`` for every weight-normed prefix, in key order.

  Raises:
    ValueError: naming the key, for a missing ``weight_g`` / ``weight_v`` (or
      ``original0`` / ``original1``), a ``g`` whose shape does not fit ``v``, an unknown
      kind, or a ``kinds`` prefix that matches no weight-normed layer. Nothing is
      returned half-converted.

  Examples:
    >>> import numpy as np
    >>> from wn_jax.pytorch import from_torch
    >>> sd = {'fc.weight_g': np.ones((3, 1), np.float32), 'fc.weight_v': np.ones((3, 2), np.float32),
    ...       'fc.bias': np.zeros(3, np.float32)}
    >>> layer = from_torch(sd)['fc']
    >>> layer.kind, layer.axis, layer.params['kernel'].shape, layer.params['scale'].shape
    ('Linear', -1, (2, 3), (3,))
  """
  sd = _load(state_dict)
  kinds = dict(kinds or {})
  prefixes = find_prefixes(sd)
  for p, k in kinds.items():
    if p not in prefixes:
      raise _error(
        f'kinds names prefix {p!r}, which matches no weight-normed layer (found: {sorted(prefixes)}).'
      )
    if k not in KINDS:
      raise _error(f'unknown kind {k!r} for prefix {p!r}; expected one of {KINDS}.')
  out: dict[str, TorchLayer] = {}
  for prefix, style in prefixes.items():
    g_key, v_key = (_key(prefix, s) for s in _STYLES[style])
    for key in (g_key, v_key):
      if key not in sd:
        raise _error(f'{key!r} is missing: a weight-normed layer needs both g and v.')
    g, v = _array(sd[g_key]), _array(sd[v_key])
    if not np.issubdtype(v.dtype, np.floating) or not np.issubdtype(g.dtype, np.floating):
      raise _error(f'{prefix!r}: g and v must be floating arrays; got {g.dtype} and {v.dtype}.')
    kind = kinds.get(prefix, _DEFAULT_KIND.get(v.ndim))
    if kind is None:
      raise _error(f'{v_key!r} has rank {v.ndim}; pass its kind in kinds={{{prefix!r}: ...}}.')
    expected_rank = 2 if kind == 'Linear' else int(kind[-2]) + 2
    if v.ndim != expected_rank:
      raise _error(f'{v_key!r} of shape {v.shape} is not a {kind} weight (rank {expected_rank}).')
    dim = _torch_dim(g, v, repr(g_key))
    perm = _perm(kind, v.ndim)
    kernel = np.ascontiguousarray(v.transpose(perm))
    axis = None if dim is None else perm.index(dim) - v.ndim
    scale = g.reshape(_core.scale_shape(kernel.shape, axis, 'wn_jax.pytorch.from_torch'))
    params = {'kernel': kernel, 'scale': scale}
    if _key(prefix, '.bias') in sd:
      params['bias'] = _array(sd[_key(prefix, '.bias')])
    out[prefix] = TorchLayer(kind, params, axis, kind.startswith('ConvTranspose'), dim, style)
  return out


def to_torch(
  layers: Mapping[str, TorchLayer | Mapping[str, Any]], *, style: str | None = None
) -> dict[str, np.ndarray]:
  """The reverse of :func:`from_torch`: a state dict PyTorch's ``load_state_dict`` takes.

  Args:
    layers: ``{prefix: TorchLayer}`` (e.g. from :func:`from_torch`, with trained params
      swapped in via ``dataclasses.replace``).
    style: ``'legacy'`` (``weight_g`` / ``weight_v``) or ``'parametrization'``; default:
      each layer's own.

  Returns:
    ``{key: np.ndarray}`` with PyTorch's shapes: v as PyTorch lays it out, g with v's
    rank (size 1 but along ``dim``), or a scalar for ``dim=None``.

  Examples:
    >>> import numpy as np
    >>> from wn_jax.pytorch import from_torch, to_torch
    >>> sd = {'c.weight_g': np.ones((4, 1, 1), np.float32), 'c.weight_v': np.ones((4, 2, 3), np.float32)}
    >>> back = to_torch(from_torch(sd))
    >>> all(np.array_equal(back[k], sd[k]) for k in sd)
    True
  """
  out: dict[str, np.ndarray] = {}
  for prefix, layer in layers.items():
    if not isinstance(layer, TorchLayer):
      raise _error(
        f'{prefix!r}: expected a TorchLayer (from from_torch); got {type(layer).__name__}.'
      )
    s = style or layer.style
    if s not in _STYLES:
      raise _error(f'unknown style {s!r}; expected one of {sorted(_STYLES)}.')
    kernel = np.asarray(layer.params['kernel'])
    perm = _perm(layer.kind, kernel.ndim)
    v = np.ascontiguousarray(kernel.transpose(np.argsort(perm)))
    g = np.asarray(layer.params['scale'])
    if layer.dim is None:
      g = g.reshape(())
    else:
      g = g.reshape([v.shape[i] if i == layer.dim else 1 for i in range(v.ndim)])
    g_suffix, v_suffix = _STYLES[s]
    out[_key(prefix, g_suffix)] = g
    out[_key(prefix, v_suffix)] = v
    if 'bias' in layer.params:
      out[_key(prefix, '.bias')] = np.asarray(layer.params['bias'])
  return out


def _tuple(x: Any, n: int) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


def conv_kwargs(
  kind: str,
  kernel_size: int | tuple[int, ...],
  *,
  stride: int | tuple[int, ...] = 1,
  padding: int | tuple[int, ...] | str = 0,
  dilation: int | tuple[int, ...] = 1,
  groups: int = 1,
  output_padding: int | tuple[int, ...] = 0,
) -> dict[str, Any]:
  """The Flax ``WNConv`` / ``WNConvTranspose`` arguments of a PyTorch conv layer.

  Args:
    kind: ``'Conv1d'`` ... ``'ConvTranspose3d'``.
    kernel_size: PyTorch's.
    stride: PyTorch's.
    padding: PyTorch's (ints, or ``'same'`` / ``'valid'`` for Conv).
    dilation: PyTorch's.
    groups: PyTorch's (Conv only; ConvTranspose takes 1).
    output_padding: PyTorch's (ConvTranspose only).

  Returns:
    ``kernel_size``, ``strides``, ``padding``, ``kernel_dilation`` and, for Conv,
    ``feature_group_count``, for ConvTranspose ``transpose_kernel=True``.

  Examples:
    >>> conv_kwargs('ConvTranspose1d', 16, stride=8, padding=4)
    {'kernel_size': (16,), 'strides': (8,), 'padding': ((11, 11),), 'kernel_dilation': (1,), 'transpose_kernel': True}
  """
  if kind not in KINDS or kind == 'Linear':
    raise _error(f'conv_kwargs: unknown conv kind {kind!r}; expected one of {KINDS[1:]}.')
  n = int(kind[-2])
  k, s, d = _tuple(kernel_size, n), _tuple(stride, n), _tuple(dilation, n)
  out: dict[str, Any] = {'kernel_size': k, 'strides': s}
  if kind.startswith('ConvTranspose'):
    if groups != 1:
      raise _error('conv_kwargs: Flax ConvTranspose has no groups; only groups=1 converts.')
    if isinstance(padding, str):
      raise _error('conv_kwargs: PyTorch ConvTranspose takes integer padding only.')
    p, op = _tuple(padding, n), _tuple(output_padding, n)
    out['padding'] = tuple(
      (di * (ki - 1) - pi, di * (ki - 1) - pi + oi) for ki, di, pi, oi in zip(k, d, p, op)
    )
    out['kernel_dilation'] = d
    out['transpose_kernel'] = True
  else:
    if isinstance(padding, str):
      if padding.lower() not in ('same', 'valid'):
        raise _error(f'conv_kwargs: unknown padding {padding!r}.')
      out['padding'] = padding.upper()
    else:
      out['padding'] = tuple((pi, pi) for pi in _tuple(padding, n))
    out['kernel_dilation'] = d
    out['feature_group_count'] = groups
  return out


__all__ = ['KINDS', 'TorchLayer', 'conv_kwargs', 'find_prefixes', 'from_torch', 'to_torch']
