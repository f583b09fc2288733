"""One weight-normed layer, PyTorch's ``g`` and ``v`` to Flax parameters and back."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from wn_jax import _axes
from wn_jax import _core
from wn_jax.pytorch._conv import conv_kwargs
from wn_jax.pytorch._conv import refuse_groups
from wn_jax.pytorch._kinds import _DEFAULT_KIND
from wn_jax.pytorch._kinds import KINDS
from wn_jax.pytorch._kinds import TORCH_ARGS
from wn_jax.pytorch._kinds import _perm
from wn_jax.pytorch._state_dict import _array
from wn_jax.pytorch._state_dict import _error
from wn_jax.pytorch._state_dict import _finish
from wn_jax.pytorch._state_dict import _is_float
from wn_jax.pytorch._state_dict import _jax
from wn_jax.pytorch._state_dict import _key
from wn_jax.pytorch._state_dict import _load
from wn_jax.pytorch._state_dict import _split
from wn_jax.pytorch._state_dict import _unwrap
from wn_jax.pytorch._state_dict import refuse_meta
from wn_jax.pytorch._styles import _STYLES
from wn_jax.pytorch._styles import _layer_key
from wn_jax.pytorch._styles import _suffixes
from wn_jax.pytorch._styles import half_a_pair
from wn_jax.pytorch._walk import _MISSING
from wn_jax.pytorch._walk import _Info
from wn_jax.pytorch._walk import _infos
from wn_jax.pytorch._walk import _plain_kind
from wn_jax.pytorch._walk import weight_normed_here


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
    style: the key style it came in, ``'legacy'``, ``'parametrization'`` or ``'plain'``
      (a plain ``weight``, decomposed by ``from_torch(..., decompose=True)``).
    args: the PyTorch layer's ``stride``, ``padding``, ... as read from the torch
      module (empty for a state dict); :meth:`linen` and :meth:`nnx` use them.
    tensor: the name of the weight-normed PyTorch tensor (``'weight'``, or e.g.
      ``'weight_hh_l0'`` for ``weight_norm(lstm, name='weight_hh_l0')``).

  A layer wn_jax has no WN layer for keeps its tensor's name and PyTorch layout: weight
  norm on another tensor than ``weight`` (kind ``'Tensor'``), on the ``weight`` of a module
  class wn_jax does not know, read from the module itself (``'Tensor'``), or of an
  ``Embedding`` (``'Embedding'``, named ``embedding``). Its ``params`` are ``{name: v,
  name + '_scale': g[, 'bias']}``, ``v`` in PyTorch's layout, ``g`` of shape
  ``(v.shape[dim],)`` (``()`` for ``dim=None``), and ``axis = dim - v.ndim``.

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
  args: dict[str, Any] = dataclasses.field(default_factory=dict)
  tensor: str = 'weight'

  @property
  def _names(self) -> tuple[str, str]:
    """The Flax names of ``v`` and ``g``: ``kernel`` and ``scale`` for a WN layer."""
    if self.kind in KINDS:
      return 'kernel', 'scale'
    name = 'embedding' if self.kind == 'Embedding' else self.tensor
    return name, f'{name}_scale'

  def _layer_kwargs(self, kwargs: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(features, the Flax layer's keyword arguments): PyTorch's arguments mapped, Flax's kept."""
    if self.kind not in KINDS:
      raise _error(
        f'{self.tensor!r} of kind {self.kind!r} has no wn_jax layer: its params keep '
        f"PyTorch's name and layout ({sorted(self.params)}), the kept axis is {self.axis}; "
        'build its Flax twin by hand, or pass kinds= if it is a Linear / Conv.'
      )
    kernel = self.params['kernel']
    torch_args = {**self.args, **{k: v for k, v in kwargs.items() if k in TORCH_ARGS}}
    kw: dict[str, Any] = {'axis': self.axis, 'use_bias': 'bias' in self.params}
    if self.kind == 'Linear':
      if torch_args:
        raise _error(f'a Linear layer takes no conv arguments; got {sorted(torch_args)}.')
      features = kernel.shape[-1]
    else:
      kw.update(conv_kwargs(self.kind, kernel.shape[:-2], **torch_args))
      del kw['kernel_size']
      features = kernel.shape[-2] if self.transpose_kernel else kernel.shape[-1]
    kw.update({k: v for k, v in kwargs.items() if k not in TORCH_ARGS})
    return features, kw

  def linen(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """The configured linen layer and its variables: ``layer.apply(variables, x)``.

    Args:
      **kwargs: the PyTorch layer's ``stride``, ``padding``, ``dilation``, ``groups``,
        ``output_padding``, ``padding_mode`` (see :func:`conv_kwargs`); any other
        argument (``name``, ``dtype``, ``param_dtype``, ``precision``, ...) goes to the
        Flax layer as it is.

    Returns:
      ``(WNDense | WNConv | WNConvTranspose, {'params': ...})``, the parameters as JAX
      arrays; inputs are channels-last.
    """
    from wn_jax import linen as wl

    features, kw = self._layer_kwargs(kwargs)
    kernel_size = self.params['kernel'].shape[:-2]
    if self.kind == 'Linear':
      layer: Any = wl.WNDense(features, **kw)
    elif self.transpose_kernel:
      layer = wl.WNConvTranspose(features, kernel_size, **kw)
    else:
      layer = wl.WNConv(features, kernel_size, **kw)
    return layer, {'params': {k: _jax(v, k) for k, v in self.params.items()}}

  def nnx(self, *, rngs: Any = None, **kwargs: Any) -> Any:
    """The configured NNX layer with these parameters loaded.

    Built abstractly (``nnx.eval_shape``), as the porting guide builds a twin: no initializer
    runs and nothing compiles; every parameter comes from here. ``rngs`` is accepted for
    symmetry with the NNX layers and not used. Takes the arguments :meth:`linen` takes.
    """
    from flax import nnx as fnnx

    from wn_jax import nnx as wx

    del rngs  # nothing random: every parameter is the checkpoint's
    features, kw = self._layer_kwargs(kwargs)
    kernel = self.params['kernel']

    def build() -> Any:
      rngs = fnnx.Rngs(0)
      if self.kind == 'Linear':
        return wx.WNLinear(kernel.shape[0], features, rngs=rngs, **kw)
      if self.transpose_kernel:
        return wx.WNConvTranspose(kernel.shape[-1], features, kernel.shape[:-2], rngs=rngs, **kw)
      groups = kw.get('feature_group_count', 1)
      return wx.WNConv(kernel.shape[-2] * groups, features, kernel.shape[:-2], rngs=rngs, **kw)

    graph, state = fnnx.split(fnnx.eval_shape(build))
    fnnx.replace_by_pure_dict(state, {k: _jax(v, k) for k, v in self.params.items()})
    return fnnx.merge(graph, state)


def _torch_dim(g: np.ndarray, v: np.ndarray, g_key: str) -> int | None:
  """PyTorch's ``dim`` from g's shape (``g_key`` its state-dict key): size ``v.shape[dim]``
  along it, 1 elsewhere; or a scalar."""
  if g.ndim == 0:
    return None
  fits = g.ndim == v.ndim and all(s in (1, n) for s, n in zip(g.shape, v.shape))
  kept = [i for i, (s, n) in enumerate(zip(g.shape, v.shape)) if s == n != 1] if fits else []
  ones = [i for i, n in enumerate(v.shape) if n == 1]
  if not fits or len(kept) > 1 or (not kept and not ones):
    raise _error(
      f'{g_key!r}: g of shape {g.shape} does not fit v of shape {v.shape}: PyTorch keeps g with '
      f"v's rank, size v.shape[dim] along dim and 1 elsewhere (or a scalar for dim=None)."
    )
  return kept[0] if kept else ones[0]


def _kept_layout(info: _Info, tensor: str, v: np.ndarray) -> str | None:
  """The kind of a weight-normed tensor that keeps its PyTorch layout, or ``None``."""
  if tensor != 'weight':
    return 'Tensor'
  if info.kind in KINDS:
    return None
  if info.kind is not None:
    return info.kind  # Embedding, a norm: kinds= or the module says so
  return 'Tensor' if info.live or v.ndim not in _DEFAULT_KIND else None


def _wn_layer(
  prefix: str,
  g: np.ndarray,
  v: np.ndarray,
  bias: np.ndarray | None,
  info: _Info,
  style: str,
  g_key: str,
  v_key: str,
  tensor: str = 'weight',
) -> TorchLayer:
  """PyTorch's ``g`` and ``v`` as a :class:`TorchLayer` in Flax layout; the module's ``dim``, where
  it tells one, settles what ``g``'s shape alone cannot."""
  if not _is_float(v) or not _is_float(g):
    raise _error(f'{prefix!r}: g and v must be floating arrays; got {g.dtype} and {v.dtype}.')
  kept = _kept_layout(info, tensor, v)
  kind = kept or (info.kind if info.kind in KINDS else _DEFAULT_KIND.get(v.ndim))
  if kind is None:  # pragma: no cover - _kept_layout takes every other rank
    raise _error(f'{v_key!r} has rank {v.ndim}; pass its kind in kinds={{{prefix!r}: ...}}.')
  expected_rank = 2 if kind == 'Linear' else int(kind[-2]) + 2 if kind in KINDS else v.ndim
  if v.ndim != expected_rank:
    raise _error(f'{v_key!r} of shape {v.shape} is not a {kind} weight (rank {expected_rank}).')
  refuse_groups(repr(prefix), kind, info.args)
  dim = _torch_dim(g, v, g_key)
  if info.dim is not _MISSING and info.dim != dim:  # g's shape alone can be ambiguous
    told = None if info.dim is None else info.dim % v.ndim
    want = () if told is None else tuple(n if i == told else 1 for i, n in enumerate(v.shape))
    if g.shape != want:
      raise _error(f"{g_key!r} of shape {g.shape} does not fit the module's dim={info.dim}.")
    dim = told
  perm = tuple(range(v.ndim)) if kept else _perm(kind, v.ndim)
  kernel = np.ascontiguousarray(v.transpose(perm))
  axis = None if dim is None else perm.index(dim) - v.ndim
  scale = g.reshape(_axes.scale_shape(kernel.shape, axis))
  layer = TorchLayer(kind, {}, axis, False, dim, style, dict(info.args), tensor)
  v_name, g_name = layer._names
  params = {v_name: kernel, g_name: scale}
  if bias is not None:
    params['bias'] = bias
  transposed = kind.startswith('ConvTranspose')
  return dataclasses.replace(layer, params=params, transpose_kernel=transposed)


def _decomposable(
  prefix: str, sd: Mapping[str, Any], infos: dict[str, _Info], decompose: Any
) -> bool:
  """Whether ``decompose`` asks for the plain Linear / Conv ``weight`` at ``prefix``."""
  if decompose is False or decompose is None or _key(prefix, '.weight') not in sd:
    return False
  kind = _plain_kind(prefix, sd, infos)
  if kind not in KINDS:
    return False
  return decompose is True or re.search(decompose, prefix) is not None


def _stored(
  prefix: str, style: str, sd: Mapping[str, Any], info: _Info, dtype: Any, tensor: str = 'weight'
) -> TorchLayer:
  """A weight-normed tensor as PyTorch stored it: ``g`` and ``v`` in one of the key styles."""
  g_key, v_key = (_key(prefix, s) for s in _suffixes(style, tensor))
  for key in (g_key, v_key):
    if key not in sd:
      raise half_a_pair(sd, key)
  bias_key = _key(prefix, '.bias')
  bias = _array(sd[bias_key], dtype) if bias_key in sd and tensor == 'weight' else None
  g, v = _array(sd[g_key], dtype), _array(sd[v_key], dtype)
  info = dataclasses.replace(
    info, dim=info.dims.get(tensor, info.dim if tensor == 'weight' else _MISSING)
  )
  return _wn_layer(prefix, g, v, bias, info, style, g_key, v_key, tensor)


def _decomposed(
  prefix: str, kind: str | None, sd: Mapping[str, Any], info: _Info, dtype: Any
) -> TorchLayer:
  """A plain ``weight`` as ``v = w``, ``g = ||w||``, with PyTorch's default ``dim=0``."""
  w_key, bias_key = _key(prefix, '.weight'), _key(prefix, '.bias')
  w = _array(sd[w_key], dtype)
  shape_g = np.ones((w.shape[0],) + (1,) * (w.ndim - 1), w.dtype)  # PyTorch's default dim=0
  told = dataclasses.replace(info, kind=kind, dim=0)
  layer = _wn_layer(prefix, shape_g, w, None, told, 'plain', w_key, w_key)
  direction, norm = _core.decompose(layer.params['kernel'], layer.axis)
  params = {'kernel': np.array(direction), 'scale': np.array(norm.astype(w.dtype))}
  if bias_key in sd:
    params['bias'] = _array(sd[bias_key], dtype)
  return dataclasses.replace(layer, params=params)


def _layers(
  source: Any, kinds: Mapping[str, str] | None, decompose: Any, dtype: Any, drop: Any = None
) -> tuple[Mapping[str, Any], dict[str, _Info], dict[str, TorchLayer]]:
  """(state dict, infos, {prefix: TorchLayer}) for every weight-normed (or decomposed) layer.

  A key that looks weight-normed (``weight_v``) is not when the module says so (it has no
  weight norm on that tensor: an attention's own ``weight_v``), or when ``drop`` takes it."""
  sd = _load(source)
  infos = _infos(source, sd, kinds)
  out: dict[str, TorchLayer] = {}
  for (prefix, tensor), style in weight_normed_here(sd, infos, drop).items():
    info = infos.get(prefix, _Info(None, {}))
    out[_layer_key(prefix, tensor)] = _stored(prefix, style, sd, info, dtype, tensor)
  plain = [p for p in dict.fromkeys(_split(k)[0] for k in sd) if p not in out]
  chosen = [p for p in plain if _decomposable(p, sd, infos, decompose)]
  if isinstance(decompose, str) and not chosen:
    some = [p for p in plain if _decomposable(p, sd, infos, True)]
    raise _error(
      f"decompose='{decompose}' matches no plain Linear / Conv layer (it is re.search'ed in "
      f'each prefix); the plain ones: {some[:6] if some else "none"}{" ..." * (len(some) > 6)}.'
    )
  for p in chosen:
    out[p] = _decomposed(p, _plain_kind(p, sd, infos), sd, infos.get(p, _Info(None, {})), dtype)
  return sd, infos, out


def from_torch(
  state_dict: Any,
  kinds: Mapping[str, str] | None = None,
  *,
  decompose: bool | str = False,
  dtype: Any = None,
) -> dict[str, TorchLayer]:
  """Converts the weight-normed layers of a PyTorch model or state dict to wn_jax parameters.

  Args:
    state_dict: a torch module (its layer kinds, arguments and weight norm ``dim`` are
      read from it; duck typed, torch is not imported), a mapping of key -> array
      (NumPy, JAX, ml_dtypes or torch), or the path of a ``.safetensors`` file.
    kinds: the PyTorch layer kind of prefixes whose kernel shape cannot tell it, e.g.
      ``{'ups.0': 'ConvTranspose1d'}`` (not needed with a module). By default a 2-D
      weight is a ``Linear``, 3-D a ``Conv1d``, 4-D ``Conv2d``, 5-D ``Conv3d``. One of
      ``KINDS`` (or ``PLAIN_KINDS``).
    decompose: also convert plain (not weight-normed) Linear / Conv layers, e.g. of a
      checkpoint after ``remove_weight_norm``: ``True`` for all of them, or a regular
      expression ``re.search``ed in the prefix (``decompose='^ups'``). Each becomes ``v = w``, ``g = ||w||`` with
      PyTorch's default ``dim=0`` (the function is unchanged); ``to_torch`` writes it
      back as a plain ``weight`` (its ``style`` is ``'plain'``).
    dtype: cast the floating parameters to this floating dtype, NumPy's, JAX's or torch's
      (``torch.bfloat16``); default: keep the checkpoint's, bfloat16 and float16 included.

  Returns:
    ``{prefix: TorchLayer}`` for every weight-normed prefix, in key order. The arrays
    are copies: changing the torch model afterwards changes nothing here.

  Raises:
    ValueError: naming the key, for a missing ``weight_g`` / ``weight_v`` (or
      ``original0`` / ``original1``), a ``g`` whose shape does not fit ``v``, an unknown
      kind, a ``kinds`` prefix or ``decompose`` pattern that matches no layer, a module
      with two weight-norm pairs (or a plain weight beside its pair), or a checkpoint
      without any weight-normed layer. Nothing is returned half-converted.

  Examples:
    >>> import numpy as np
    >>> from wn_jax.pytorch import from_torch
    >>> sd = {'fc.weight_g': np.ones((3, 1), np.float32), 'fc.weight_v': np.ones((3, 2), np.float32),
    ...       'fc.bias': np.zeros(3, np.float32)}
    >>> layer = from_torch(sd)['fc']
    >>> layer.kind, layer.axis, layer.params['kernel'].shape, layer.params['scale'].shape
    ('Linear', -1, (2, 3), (3,))
  """
  sd, _, layers = _layers(_unwrap(state_dict)[0], kinds, decompose, dtype)
  refuse_meta(sd)
  if not layers:
    raise _error(
      f'no weight-normed layer in this checkpoint ({len(sd)} keys, e.g. {list(sd)[:3]}): '
      'expected <prefix>.weight_g / .weight_v or <prefix>.parametrizations.weight.original0/1. '
      'A plain checkpoint (after remove_weight_norm) converts with decompose=True; '
      'to_linen / to_nnx convert every tensor of a model.'
    )
  return layers


def _module_prefix(key: str, layer: TorchLayer) -> str:
  """The torch module of the layer at ``key`` (``key`` itself, but for a tensor not ``weight``)."""
  return key if layer.tensor == 'weight' else _split(key)[0]


def _export_layer(key: str, layer: TorchLayer, style: str) -> dict[str, np.ndarray]:
  """The PyTorch tensors of one layer, in ``style``."""
  if style != 'plain' and style not in _STYLES:
    raise _error(f'unknown style {style!r}; expected one of {sorted(_STYLES) + ["plain"]}.')
  prefix, (v_name, g_name) = _module_prefix(key, layer), layer._names
  kernel = np.asarray(layer.params[v_name])
  perm = _perm(layer.kind, kernel.ndim) if layer.kind in KINDS else tuple(range(kernel.ndim))
  inverse = np.argsort(perm)
  out: dict[str, np.ndarray] = {}
  if style == 'plain':
    w = np.asarray(_core.normalize(kernel, layer.params[g_name], layer.axis)).astype(kernel.dtype)
    out[_key(prefix, f'.{layer.tensor}')] = np.ascontiguousarray(w.transpose(inverse))
  else:
    v = np.ascontiguousarray(kernel.transpose(inverse))
    g = np.array(layer.params[g_name])
    if layer.dim is None:
      g = g.reshape(())
    else:
      g = g.reshape([v.shape[i] if i == layer.dim else 1 for i in range(v.ndim)])
    g_suffix, v_suffix = _suffixes(style, layer.tensor)
    out[_key(prefix, g_suffix)] = g
    out[_key(prefix, v_suffix)] = v
  if 'bias' in layer.params:
    out[_key(prefix, '.bias')] = np.array(layer.params['bias'])
  return out


def _is_layers(x: Any) -> bool:
  """``{prefix: TorchLayer}``, as :func:`from_torch` gives."""
  return isinstance(x, Mapping) and bool(x) and all(isinstance(v, TorchLayer) for v in x.values())


def _layers_to_torch(
  layers: Mapping[str, TorchLayer], like: Any, style: str | None
) -> dict[str, Any]:
  """``{prefix: TorchLayer}`` as PyTorch tensors: in ``like``'s key styles, else ``style``'s or
  each layer's own; the keys of ``like`` outside these layers copied from ``like``."""
  ref = None if like is None else _load(like)
  ref_styles = {}  # like's weight-normed layers, keyed as layers are
  if ref is not None:
    normed = weight_normed_here(ref, _infos(like, ref, None))
    ref_styles = {_layer_key(p, t): style for (p, t), style in normed.items()}
    lacking = [p for p in ref_styles if p not in layers]
    if lacking:
      raise _error(
        f'like holds weight-normed layers that layers lacks: {lacking}. (Where like is a state '
        "dict, a module's own tensor named like half a weight norm, weight_v, looks like one: "
        'pass the torch module as like, which tells.)'
      )
  out: dict[str, np.ndarray] = {}
  for prefix, layer in layers.items():
    weight = _key(_module_prefix(prefix, layer), f'.{layer.tensor}')
    plain = ref is not None and prefix not in ref_styles and weight in ref
    s = style or ref_styles.get(prefix) or ('plain' if plain else layer.style)
    out.update(_export_layer(prefix, layer, s))
  if ref is None:
    return out
  return _finish(out, like, {k for k in ref if k not in out})


def _layer_keys(key: str, layer: TorchLayer) -> list[str]:
  prefix = _module_prefix(key, layer)
  if layer.style == 'plain':
    names = [f'.{layer.tensor}']
  else:
    names = list(_suffixes(layer.style, layer.tensor))
  return [_key(prefix, n) for n in names + (['.bias'] if 'bias' in layer.params else [])]
