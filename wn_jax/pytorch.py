"""PyTorch models with weight normalization, to wn_jax and back, exactly.

wn_jax never imports torch here unless the caller hands it torch objects (modules and
tensors are duck typed).

PyTorch stores a weight-normed tensor as ``g`` and ``v``, in one of two key styles:

- legacy ``torch.nn.utils.weight_norm``: ``<prefix>.weight_g``, ``<prefix>.weight_v``;
- ``torch.nn.utils.parametrizations.weight_norm``:
  ``<prefix>.parametrizations.weight.original0`` (g), ``...original1`` (v).

:func:`from_torch` turns them into the parameters of wn_jax's WN layers (``kernel`` =
v in Flax layout, ``scale`` = g, ``bias``) and says how each layer must be configured
(``axis``, ``transpose_kernel``, and, from a torch module, its PyTorch arguments).
:func:`to_linen` and :func:`to_nnx` convert a whole model, every tensor, into a linen
``variables`` dict or an NNX pure dict named as the torch modules are;
:func:`to_torch` goes back from either, bit for bit.

Layouts (PyTorch -> Flax kernel):

| PyTorch layer | PyTorch weight | Flax kernel | default `dim=0` |
|---|---|---|---|
| Linear | `(out, in)` | `(in, out)` | `axis=-1` (out) |
| Conv{1,2,3}d | `(out, in/groups, *k)` | `(*k, in/groups, out)` | `axis=-1` (out) |
| ConvTranspose{1,2,3}d | `(in, out, *k)` | `(*k, out, in)` with `transpose_kernel=True` | `axis=-1` (in) |

PyTorch's ``dim`` counts PyTorch's axes; its ``dim=None`` and ``dim=-1`` both mean the
whole tensor (a scalar g), which is wn_jax's ``axis=None``. Arguments of the layers
(:func:`conv_kwargs` does this mapping):

| PyTorch | Flax `WNConv` / `WNConvTranspose` |
|---|---|
| `stride` | `strides` |
| `padding=p` | Conv: `padding=[(p, p), ...]`; `'same'` / `'valid'` as they are |
| `dilation` | `kernel_dilation` |
| `groups` | Conv: `feature_group_count` (ConvTranspose: only `groups=1`) |
| `output_padding=op` | ConvTranspose: `padding=[(d(k-1)-p, d(k-1)-p+op), ...]` and `transpose_kernel=True` (a Conv refuses it) |
| `padding_mode` | Conv: `'reflect'` / `'circular'` -> `'REFLECT'` / `'CIRCULAR'` where `p` is half the dilated kernel; else refused |

Inputs are channels-last in Flax: a PyTorch ``(N, C, L)`` batch is ``x.transpose(0, 2, 1)``.

"Exactly" means: every tensor goes to Flax and back bit for bit (float32, float16, bfloat16,
any ``dim``); outputs in float32 match PyTorch's to float32 rounding (the order of sums
differs); in bfloat16, wn_jax's ``w = g v / ||v||`` is the float32-reduced value rounded once,
which PyTorch's equals for ``dim=0`` and the last ``dim``, while for ``dim=None`` and ``dim=1``
of a Conv1d PyTorch reduces in bfloat16 and part of its entries differ by one or two bfloat16
steps (the porting guide gives the measurement).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
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
# PyTorch's own layer arguments; TorchLayer.linen/.nnx pass every other one to Flax.
TORCH_ARGS = ('stride', 'padding', 'dilation', 'groups', 'output_padding', 'padding_mode')
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
    style: the key style it came in, ``'legacy'``, ``'parametrization'`` or ``'plain'``
      (a plain ``weight``, decomposed by ``from_torch(..., decompose=True)``).
    args: the PyTorch layer's ``stride``, ``padding``, ... as read from the torch
      module (empty for a state dict); :meth:`linen` and :meth:`nnx` use them.

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

  def _layer_kwargs(self, kwargs: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(features, the Flax layer's keyword arguments): PyTorch's arguments mapped, Flax's kept."""
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
    return layer, {'params': {k: jnp.array(v) for k, v in self.params.items()}}

  def nnx(self, *, rngs: Any = None, **kwargs: Any) -> Any:
    """The configured NNX layer with these parameters loaded (``rngs`` optional).

    Takes the arguments :meth:`linen` takes.
    """
    from flax import nnx as fnnx

    from wn_jax import nnx as wx

    features, kw = self._layer_kwargs(kwargs)
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
      getattr(layer, name).set_value(jnp.array(value))
    return layer


def _perm(kind: str, ndim: int) -> tuple[int, ...]:
  """PyTorch axis order -> Flax axis order: flax_kernel = torch_weight.transpose(perm)."""
  if kind == 'Linear':
    return (1, 0)
  return (*range(2, ndim), 1, 0)


def _error(msg: str) -> ValueError:
  return ValueError(f'wn_jax.pytorch: {msg}')


def _is_module(x: Any) -> bool:
  """A torch ``nn.Module``, duck typed (torch is never imported here)."""
  return hasattr(x, 'named_modules') and hasattr(x, 'state_dict') and not isinstance(x, Mapping)


def _load(source: Any) -> Mapping[str, Any]:
  if _is_module(source):
    return source.state_dict()
  if isinstance(source, (str, os.PathLike)):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise _error(
        'reading a .safetensors file needs the safetensors package: pip install "wn_jax[safetensors]".'
      ) from e
    return load_file(os.fspath(source))
  if not isinstance(source, Mapping):
    raise _error(
      'expected a state dict (a mapping of key -> array), a .safetensors path or a torch '
      f'module; got {type(source).__name__}.'
    )
  return source


def _array(x: Any, dtype: Any = None) -> np.ndarray:
  """A NumPy copy of ``x`` (NumPy, JAX or torch), bit for bit, bfloat16 included.

  ``dtype`` casts floating arrays (``None``: keep their dtype).
  """
  if hasattr(x, 'detach'):  # a torch tensor, without importing torch
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':  # NumPy has no bfloat16: via float32, exactly
      x = x.float().numpy().astype(ml_dtypes.bfloat16)
    else:
      x = x.numpy()
  out = np.array(x, copy=True)
  if dtype is not None and _is_float(out):
    out = out.astype(dtype)
  return out


def _is_float(x: Any) -> bool:
  return bool(jnp.issubdtype(x.dtype, jnp.floating))


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


def _split(key: str) -> tuple[str, str]:
  """``'a.b.weight'`` -> ``('a.b', 'weight')``."""
  prefix, _, leaf = key.rpartition('.')
  return prefix, leaf


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


# The module walker: what a live torch module says about each of its layers.

_NORMS = (
  'LayerNorm',
  'GroupNorm',
  'RMSNorm',
  'BatchNorm1d',
  'BatchNorm2d',
  'BatchNorm3d',
  'InstanceNorm1d',
  'InstanceNorm2d',
  'InstanceNorm3d',
)
PLAIN_KINDS = (*_NORMS, 'Embedding')
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class _Info:
  """A prefix's layer: kind, PyTorch arguments and weight norm's ``dim`` (if the module tells)."""

  kind: str | None
  args: dict[str, Any]
  dim: Any = _MISSING


def _kind_of(module: Any) -> str | None:
  """The PyTorch layer kind from the class and its bases (``ParametrizedConv1d`` -> ``Conv1d``)."""
  for cls in type(module).__mro__:
    if cls.__name__ in KINDS or cls.__name__ in PLAIN_KINDS:
      return cls.__name__
  return None


def _wn_dim(module: Any) -> Any:
  """Weight norm's ``dim`` on ``module.weight`` (``None``: whole tensor), or ``_MISSING``."""
  for hook in getattr(module, '_forward_pre_hooks', {}).values():  # legacy weight_norm
    if type(hook).__name__ == 'WeightNorm' and getattr(hook, 'name', None) == 'weight':
      return None if hook.dim in (None, -1) else hook.dim
  try:
    parametrizations = module.parametrizations.weight
  except (AttributeError, KeyError):
    return _MISSING
  for p in parametrizations:
    if type(p).__name__ == '_WeightNorm':
      return None if p.dim in (None, -1) else p.dim
  return _MISSING


def _walk(module: Any) -> dict[str, _Info]:
  """``{prefix: _Info}`` for every submodule of a torch module (kind ``None``: a class wn_jax
  does not know, whose tensors keep their names and layout)."""
  out: dict[str, _Info] = {}
  for prefix, m in module.named_modules():
    kind = _kind_of(m)
    args: dict[str, Any] = {}
    if kind in KINDS and kind != 'Linear':
      names = [a for a in TORCH_ARGS if not (a == 'output_padding' and 'Transpose' not in kind)]
      args = {a: getattr(m, a) for a in names if hasattr(m, a)}
    out[prefix] = _Info(kind, args, _wn_dim(m))
  return out


def _guess_kind(prefix: str, sd: Mapping[str, Any]) -> str | None:
  """A plain layer's kind from its keys and shapes alone (a state dict without its module)."""
  if _key(prefix, '.running_mean') in sd:
    return 'BatchNorm1d'
  weight = sd.get(_key(prefix, '.weight'))
  if weight is None:
    return None
  ndim = len(weight.shape)
  return 'LayerNorm' if ndim == 1 else _DEFAULT_KIND.get(ndim)


def _plain_kind(prefix: str, sd: Mapping[str, Any], infos: dict[str, _Info]) -> str | None:
  """A plain layer's kind: the module's (or ``kinds``'), guessed only for a bare state dict."""
  info = infos.get(prefix)
  return info.kind if info is not None else _guess_kind(prefix, sd)


def _infos(source: Any, sd: Mapping[str, Any], kinds: Mapping[str, str] | None) -> dict[str, _Info]:
  """Each prefix's ``_Info``: from the module if given, overridden by ``kinds``."""
  infos = _walk(source) if _is_module(source) else {}
  prefixes = {_split(k)[0] for k in sd} | set(find_prefixes(sd))
  for p, k in (kinds or {}).items():
    if p not in prefixes:
      raise _error(
        f'kinds names prefix {p!r}, which matches no layer of the state dict '
        f'(weight-normed layers: {sorted(find_prefixes(sd))}).'
      )
    if k not in KINDS and k not in PLAIN_KINDS:
      raise _error(f'unknown kind {k!r} for prefix {p!r}; expected one of {KINDS + PLAIN_KINDS}.')
    old = infos.get(p, _Info(None, {}))
    infos[p] = dataclasses.replace(old, kind=k)
  return infos


def _wn_layer(
  prefix: str,
  g: np.ndarray,
  v: np.ndarray,
  bias: np.ndarray | None,
  info: _Info,
  style: str,
  g_key: str,
  v_key: str,
) -> TorchLayer:
  if not _is_float(v) or not _is_float(g):
    raise _error(f'{prefix!r}: g and v must be floating arrays; got {g.dtype} and {v.dtype}.')
  kind = info.kind if info.kind in KINDS else _DEFAULT_KIND.get(v.ndim)
  if kind is None:
    raise _error(f'{v_key!r} has rank {v.ndim}; pass its kind in kinds={{{prefix!r}: ...}}.')
  expected_rank = 2 if kind == 'Linear' else int(kind[-2]) + 2
  if v.ndim != expected_rank:
    raise _error(f'{v_key!r} of shape {v.shape} is not a {kind} weight (rank {expected_rank}).')
  dim = _torch_dim(g, v, repr(g_key))
  if info.dim is not _MISSING and info.dim != dim:  # g's shape alone can be ambiguous
    told = None if info.dim is None else info.dim % v.ndim
    want = () if told is None else tuple(n if i == told else 1 for i, n in enumerate(v.shape))
    if g.shape != want:
      raise _error(f"{g_key!r} of shape {g.shape} does not fit the module's dim={info.dim}.")
    dim = told
  perm = _perm(kind, v.ndim)
  kernel = np.ascontiguousarray(v.transpose(perm))
  axis = None if dim is None else perm.index(dim) - v.ndim
  scale = g.reshape(_core.scale_shape(kernel.shape, axis, 'wn_jax.pytorch.from_torch'))
  params = {'kernel': kernel, 'scale': scale}
  if bias is not None:
    params['bias'] = bias
  transposed = kind.startswith('ConvTranspose')
  return TorchLayer(kind, params, axis, transposed, dim, style, dict(info.args))


def _decomposable(
  prefix: str, sd: Mapping[str, Any], infos: dict[str, _Info], decompose: Any
) -> bool:
  if decompose is False or decompose is None or _key(prefix, '.weight') not in sd:
    return False
  kind = _plain_kind(prefix, sd, infos)
  if kind not in KINDS:
    return False
  return decompose is True or re.search(decompose, prefix) is not None


def _layers(
  source: Any, kinds: Mapping[str, str] | None, decompose: Any, dtype: Any
) -> tuple[Mapping[str, Any], dict[str, _Info], dict[str, TorchLayer]]:
  """(state dict, infos, {prefix: TorchLayer}) for every weight-normed (or decomposed) layer."""
  sd = _load(source)
  infos = _infos(source, sd, kinds)
  out: dict[str, TorchLayer] = {}
  for prefix, style in find_prefixes(sd).items():
    g_key, v_key = (_key(prefix, s) for s in _STYLES[style])
    for key in (g_key, v_key):
      if key not in sd:
        raise _error(f'{key!r} is missing: a weight-normed layer needs both g and v.')
    bias_key = _key(prefix, '.bias')
    bias = _array(sd[bias_key], dtype) if bias_key in sd else None
    g, v = _array(sd[g_key], dtype), _array(sd[v_key], dtype)
    info = infos.get(prefix, _Info(None, {}))
    out[prefix] = _wn_layer(prefix, g, v, bias, info, style, g_key, v_key)
  for prefix in dict.fromkeys(_split(k)[0] for k in sd):
    info = infos.get(prefix, _Info(None, {}))
    if prefix in out or not _decomposable(prefix, sd, infos, decompose):
      continue
    w_key, bias_key = _key(prefix, '.weight'), _key(prefix, '.bias')
    w = _array(sd[w_key], dtype)
    kind = _plain_kind(prefix, sd, infos)
    shape_g = np.ones((w.shape[0],) + (1,) * (w.ndim - 1), w.dtype)  # PyTorch's default dim=0
    told = dataclasses.replace(info, kind=kind, dim=0)
    layer = _wn_layer(prefix, shape_g, w, None, told, 'plain', w_key, w_key)
    direction, norm = _core.decompose(layer.params['kernel'], layer.axis)
    params = {'kernel': np.array(direction), 'scale': np.array(norm.astype(w.dtype))}
    if bias_key in sd:
      params['bias'] = _array(sd[bias_key], dtype)
    out[prefix] = dataclasses.replace(layer, params=params)
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
      expression searched in the prefix. Each becomes ``v = w``, ``g = ||w||`` with
      PyTorch's default ``dim=0`` (the function is unchanged); ``to_torch`` writes it
      back as a plain ``weight`` (its ``style`` is ``'plain'``).
    dtype: cast the floating parameters to this dtype (default: keep the checkpoint's,
      bfloat16 and float16 included).

  Returns:
    ``{prefix: TorchLayer}`` for every weight-normed prefix, in key order. The arrays
    are copies: changing the torch model afterwards changes nothing here.

  Raises:
    ValueError: naming the key, for a missing ``weight_g`` / ``weight_v`` (or
      ``original0`` / ``original1``), a ``g`` whose shape does not fit ``v``, an unknown
      kind, a ``kinds`` prefix that matches no layer, or a checkpoint without any
      weight-normed layer. Nothing is returned half-converted.

  Examples:
    >>> import numpy as np
    >>> from wn_jax.pytorch import from_torch
    >>> sd = {'fc.weight_g': np.ones((3, 1), np.float32), 'fc.weight_v': np.ones((3, 2), np.float32),
    ...       'fc.bias': np.zeros(3, np.float32)}
    >>> layer = from_torch(sd)['fc']
    >>> layer.kind, layer.axis, layer.params['kernel'].shape, layer.params['scale'].shape
    ('Linear', -1, (2, 3), (3,))
  """
  sd, _, layers = _layers(state_dict, kinds, decompose, dtype)
  if not layers:
    raise _error(
      f'no weight-normed layer in this checkpoint ({len(sd)} keys, e.g. {list(sd)[:3]}): '
      'expected <prefix>.weight_g / .weight_v or <prefix>.parametrizations.weight.original0/1. '
      'A plain checkpoint (after remove_weight_norm) converts with decompose=True; '
      'to_linen / to_nnx convert every tensor of a model.'
    )
  return layers


def _export_layer(prefix: str, layer: TorchLayer, style: str) -> dict[str, np.ndarray]:
  """The PyTorch tensors of one layer, in ``style``."""
  if style != 'plain' and style not in _STYLES:
    raise _error(f'unknown style {style!r}; expected one of {sorted(_STYLES) + ["plain"]}.')
  kernel = np.asarray(layer.params['kernel'])
  inverse = np.argsort(_perm(layer.kind, kernel.ndim))
  out: dict[str, np.ndarray] = {}
  if style == 'plain':
    w = np.asarray(_core.normalize(kernel, layer.params['scale'], layer.axis)).astype(kernel.dtype)
    out[_key(prefix, '.weight')] = np.ascontiguousarray(w.transpose(inverse))
  else:
    v = np.ascontiguousarray(kernel.transpose(inverse))
    g = np.array(layer.params['scale'])
    if layer.dim is None:
      g = g.reshape(())
    else:
      g = g.reshape([v.shape[i] if i == layer.dim else 1 for i in range(v.ndim)])
    g_suffix, v_suffix = _STYLES[style]
    out[_key(prefix, g_suffix)] = g
    out[_key(prefix, v_suffix)] = v
  if 'bias' in layer.params:
    out[_key(prefix, '.bias')] = np.array(layer.params['bias'])
  return out


def _like(ref: Any, value: np.ndarray, key: str, hint: str = '') -> Any:
  """``value`` as ``ref`` is: a torch tensor of its dtype and device, or a NumPy array of its dtype."""
  if tuple(ref.shape) != value.shape:
    raise _error(
      f'{key!r}: like has shape {tuple(ref.shape)}, the converted value {value.shape}. {hint}'
    )
  if hasattr(ref, 'new_tensor'):  # torch, without importing it
    if value.dtype.kind == 'V':  # ml_dtypes' bfloat16, float8: torch reads no such NumPy array
      value = value.astype(np.float32)  # exact; new_tensor casts back to ref's dtype
    return ref.new_tensor(value)
  return np.asarray(value).astype(np.asarray(ref).dtype, copy=False)


def _finish(
  out: dict[str, np.ndarray], like: Any, skipped: set[str], hint: str = ''
) -> dict[str, Any]:
  """``out`` in the order, types and dtypes of ``like``'s state dict; ``skipped`` keys from ``like``."""
  if like is None:
    return out
  ref = _load(like)
  extra = [k for k in out if k not in ref]
  missing = [k for k in ref if k not in out and k not in skipped]
  if extra or missing:
    raise _error(
      f"the converted keys do not match like's state dict: missing {missing}, unexpected {extra}. "
      f'{hint}'
    )
  return {k: (_like(ref[k], out[k], k, hint) if k in out else _copy(ref[k])) for k in ref}


def _copy(x: Any) -> Any:
  return x.clone() if hasattr(x, 'clone') else np.array(x, copy=True)


def to_torch(
  layers: Any,
  *,
  like: Any = None,
  style: str | None = None,
  kinds: Mapping[str, str] | None = None,
  rules: Mapping[str, tuple[Callable[..., Any], Callable[..., Any]]] | None = None,
  decompose: bool | str = False,
  buffers: str = 'buffers',
  drop: str | None = None,
  buffer_keys: str | None = None,
) -> dict[str, Any]:
  """The reverse of :func:`from_torch`, :func:`to_linen` and :func:`to_nnx`.

  ``module.load_state_dict(to_torch(..., like=module), strict=True)`` loads the result.
  A tree goes back with the ``kinds``, ``rules``, ``decompose``, ``buffers``,
  ``buffer_keys`` and ``drop`` it was made with; without them, the error says so.

  Args:
    layers: ``{prefix: TorchLayer}`` (e.g. from :func:`from_torch`, with trained params
      swapped in via ``dataclasses.replace``); or a whole linen ``variables`` dict
      (``{'params': ...}``, as :func:`to_linen` gives) or NNX state (``nnx.state(model)``
      or its pure dict, as :func:`to_nnx` gives), which need ``like``.
    like: the torch module (or its state dict) the result is for. Its state dict sets
      the keys, their order, key style, shapes and dtypes, and, for torch tensors, the
      result's type and device: a plain ``weight`` in ``like`` gets the folded
      ``g * v / ||v||``. With ``layers``, the keys of ``like`` that are not in a
      weight-normed layer are copied from ``like``; with a tree every value comes from
      the tree, except buffers Flax has no place for (BatchNorm's
      ``num_batches_tracked``) and ``drop``'s keys, copied from ``like``.
    style: ``'legacy'`` (``weight_g`` / ``weight_v``), ``'parametrization'`` or
      ``'plain'`` (the folded ``weight``), for ``layers`` without ``like``; default:
      each layer's own.
    kinds: as :func:`to_linen`, for a ``like`` state dict whose shapes cannot tell.
    rules: as :func:`to_linen`; the inverse of each pair is applied.
    decompose: as :func:`to_linen`.
    buffers: as :func:`to_linen`: the linen collection the buffers are read from (from a
      ``like`` state dict, which cannot tell buffers, ``params`` or this one).
    drop: as :func:`to_linen`: keys copied from ``like``, not read from the tree.
    buffer_keys: as :func:`to_linen`.

  Returns:
    ``{key: array}`` with PyTorch's shapes: NumPy arrays, or torch tensors when
    ``like`` holds them.

  Examples:
    >>> import numpy as np
    >>> from wn_jax.pytorch import from_torch, to_torch
    >>> sd = {'c.weight_g': np.ones((4, 1, 1), np.float32), 'c.weight_v': np.ones((4, 2, 3), np.float32)}
    >>> back = to_torch(from_torch(sd))
    >>> all(np.array_equal(back[k], sd[k]) for k in sd)
    True
  """
  if (
    isinstance(layers, Mapping)
    and layers
    and all(isinstance(v, TorchLayer) for v in layers.values())
  ):
    ref = None if like is None else _load(like)
    ref_styles = {} if ref is None else find_prefixes(ref)
    if ref is not None:
      lacking = [p for p in ref_styles if p not in layers]
      if lacking:
        raise _error(f'like holds weight-normed layers that layers lacks: {lacking}.')
    out: dict[str, np.ndarray] = {}
    for prefix, layer in layers.items():
      plain = ref is not None and prefix not in ref_styles and _key(prefix, '.weight') in ref
      s = style or ref_styles.get(prefix) or ('plain' if plain else layer.style)
      out.update(_export_layer(prefix, layer, s))
    if ref is None:
      return out
    return _finish(out, like, {k for k in ref if k not in out})
  if not isinstance(layers, Mapping) and not hasattr(layers, 'to_pure_dict'):
    raise _error(
      'expected {prefix: TorchLayer} (from from_torch), linen variables or NNX state; got '
      f'{type(layers).__name__}.'
    )
  values = list(layers.values())
  if any(isinstance(v, TorchLayer) for v in values):
    raise _error(
      'expected {prefix: TorchLayer} (from from_torch), linen variables or NNX state; got a '
      f'mapping of {sorted({type(v).__name__ for v in values})}.'
    )
  if not any(isinstance(v, Mapping) for v in values) and any('.' in str(k) for k in layers):
    raise _error(
      f'got a PyTorch state dict (keys {list(layers)[:3]}), which is already in PyTorch form: '
      'to_torch takes what from_torch, to_linen or to_nnx give (a model with tensors only on '
      'its root module has no dotted keys).'
    )
  if like is None:
    raise _error(
      'a linen or NNX tree converts back with like=<the torch module or its state dict>, '
      'which sets the keys and their key style.'
    )
  return _tree_to_torch(layers, like, kinds, rules, decompose, buffers, drop, buffer_keys)


# Whole models: every tensor of a state dict, in a linen or NNX tree.

Rule = tuple[Callable[[np.ndarray], Any], Callable[[np.ndarray], Any]]


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One tensor that is not part of a weight-normed layer, and where it goes."""

  key: str
  prefix: str
  name: str
  collection: str  # linen's: 'params', 'batch_stats' or the buffers'
  forward: Callable[[np.ndarray], Any]
  inverse: Callable[[Any], Any]
  user: bool = False  # a rules= entry: its forward may give several leaves


def _same(a: np.ndarray) -> np.ndarray:
  return a


def _leaf(
  key: str, kind: str | None, ndim: int, rules: Mapping[str, Rule], collection: str
) -> _Leaf | None:
  """The rule for one plain tensor: the user's, the layer kind's, or kept as it is.

  ``collection`` is linen's for it: ``'params'``, or the buffers' for a torch buffer.
  """
  prefix, leaf = _split(key)
  for pattern, (forward, inverse) in rules.items():
    if re.fullmatch(pattern, key):
      return _Leaf(key, prefix, leaf, collection, forward, inverse, user=True)
  if kind in KINDS and leaf == 'weight':
    perm = _perm(kind, ndim)
    back = tuple(int(i) for i in np.argsort(perm))
    return _Leaf(
      key, prefix, 'kernel', 'params', lambda a: a.transpose(perm), lambda a: a.transpose(back)
    )
  if kind in PLAIN_KINDS:
    if leaf == 'num_batches_tracked':
      return None  # no place in Flax; to_torch copies it from like
    weight = 'embedding' if kind == 'Embedding' else 'scale'
    name = {'weight': weight, 'running_mean': 'mean', 'running_var': 'var'}.get(leaf, leaf)
    stats = leaf in ('running_mean', 'running_var')
    return _Leaf(key, prefix, name, 'batch_stats' if stats else collection, _same, _same)
  return _Leaf(key, prefix, leaf, collection, _same, _same)


def _outputs(leaf: _Leaf, value: Any) -> dict[tuple[str, str], Any]:
  """``{(prefix, name): array}``: the Flax leaf a tensor becomes, or those a rule's dict names.

  A rule's dict names its leaves relative to the tensor's module, dotted as PyTorch keys
  (``'cell.ii.kernel'``), so linen and NNX name lists each their own way.
  """
  if isinstance(value, Mapping):
    named = {_split(_key(leaf.prefix, f'.{rel}')): v for rel, v in value.items()}
  else:
    named = {(leaf.prefix, leaf.name): value}
  for v in named.values():
    if not (hasattr(v, 'shape') and hasattr(v, 'dtype')):
      raise _error(
        f'the rules= entry for {leaf.key!r} gave {type(v).__name__}; expected an array or a '
        "dict {'sub.name': array} of several leaves, named relative to "
        f'{leaf.prefix or "the root module"!r} and dotted as PyTorch keys.'
      )
  return named


def _layer_keys(prefix: str, layer: TorchLayer) -> list[str]:
  if layer.style == 'plain':
    names = ['.weight']
  else:
    names = list(_STYLES[layer.style])
  return [_key(prefix, n) for n in names + (['.bias'] if 'bias' in layer.params else [])]


def _buffer_keys(source: Any) -> set[str]:
  """The state dict keys of a torch module's buffers (none for a state dict: it cannot tell)."""
  if not _is_module(source) or not hasattr(source, 'named_buffers'):
    return set()
  return {name for name, _ in source.named_buffers()}


def _plan(
  source: Any,
  kinds: Mapping[str, str] | None,
  rules: Mapping[str, Rule] | None,
  decompose: Any,
  dtype: Any,
  buffers: str = 'buffers',
  drop: str | None = None,
  buffer_keys: str | None = None,
) -> tuple[Mapping[str, Any], dict[str, TorchLayer], list[_Leaf], set[str]]:
  """(state dict, weight-normed layers, every other tensor's rule, keys left out of Flax)."""
  if not isinstance(buffers, str) or not buffers:
    raise _error(
      f"buffers= names the linen collection torch buffers go to ('buffers' by default, "
      f"'params' to train them); got {buffers!r}."
    )
  sd, infos, layers = _layers(source, kinds, decompose, dtype)
  skipped = {k for k in sd if drop is not None and re.fullmatch(drop, k)}
  for p in [p for p, layer in layers.items() if skipped & set(_layer_keys(p, layer))]:
    skipped |= set(_layer_keys(p, layers.pop(p)))  # a layer goes whole, or not at all
  used = {k for p, layer in layers.items() for k in _layer_keys(p, layer)} | skipped
  held = _buffer_keys(source) | {k for k in sd if buffer_keys and re.fullmatch(buffer_keys, k)}
  leaves = []
  for key in sd:
    if key in used:
      continue
    kind = _plain_kind(_split(key)[0], sd, infos)
    collection = buffers if key in held else 'params'
    leaf = _leaf(key, kind, len(sd[key].shape), rules or {}, collection)
    if leaf is None:
      skipped.add(key)
    else:
      leaves.append(leaf)
  return sd, layers, leaves, skipped


def _linen_path(prefix: str) -> tuple[str, ...]:
  """``'resblocks.0.convs1.1'`` -> ``('resblocks_0', 'convs1_1')``: linen's names for lists."""
  names: list[str] = []
  for part in prefix.split('.') if prefix else []:
    if part.isdigit() and names:
      names[-1] += f'_{part}'
    else:
      names.append(part)
  return tuple(names)


def _nnx_path(prefix: str) -> tuple[str | int, ...]:
  """``'resblocks.0.convs1.1'`` -> ``('resblocks', 0, 'convs1', 1)``: ``nnx.List`` indices."""
  return tuple(int(p) if p.isdigit() else p for p in (prefix.split('.') if prefix else []))


def _path(prefix: str, name: str, collection: str, naming: str) -> tuple[Any, ...]:
  if naming == 'linen':
    return (collection, *_linen_path(prefix), name)
  return (*_nnx_path(prefix), name)


def _nest(flat: dict[tuple[Any, ...], Any]) -> dict[Any, Any]:
  tree: dict[Any, Any] = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise _error(f'{"/".join(map(str, path))}: a parameter and a module share a name.')
    node[path[-1]] = value
  return tree


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
  """``{path of str: leaf}`` of a nested dict, nnx.State or pure dict."""
  import jax

  if hasattr(tree, 'to_pure_dict'):  # an nnx.State
    from flax import nnx

    tree = nnx.to_pure_dict(tree)
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = tuple(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)
    flat[parts] = leaf
  return flat


def _tree(
  source: Any,
  naming: str,
  kinds: Mapping[str, str] | None,
  rules: Mapping[str, Rule] | None,
  decompose: Any,
  dtype: Any,
  template: Any,
  twin: Any,
  buffers: str,
  drop: str | None,
  buffer_keys: str | None,
) -> dict[Any, Any]:
  sd, layers, leaves, _ = _plan(source, kinds, rules, decompose, dtype, buffers, drop, buffer_keys)
  flat: dict[tuple[Any, ...], Any] = {}
  where: dict[tuple[Any, ...], str] = {}

  def put(path: tuple[Any, ...], value: Any, key: str) -> None:
    if path in flat:
      raise _error(f'{where[path]!r} and {key!r} both convert to {"/".join(map(str, path))}.')
    flat[path], where[path] = jnp.array(value), key

  for prefix, layer in layers.items():
    for name, value in layer.params.items():
      put(_path(prefix, name, 'params', naming), value, _key(prefix, '.' + name))
  for leaf in leaves:
    for (prefix, name), value in _outputs(leaf, leaf.forward(_array(sd[leaf.key], dtype))).items():
      put(_path(prefix, name, leaf.collection, naming), value, leaf.key)
  if twin is not None:
    twin_template, axes = _twin(twin, naming)
    _check_axes(layers, axes, naming)
    template = twin_template if template is None else template
  if template is not None:
    _check(flat, template, layers, naming)
  return _nest(flat)


def _twin(twin: Any, naming: str) -> tuple[Any, dict[tuple[str, ...], Any]]:
  """(the twin's variables, for the template; ``{module path: axis}`` of its WN layers)."""
  import jax

  if naming == 'nnx':
    from flax import nnx

    from wn_jax import nnx as wx

    if not isinstance(twin, nnx.Module):
      raise TypeError(
        f'wn_jax.pytorch.to_nnx: twin= takes the NNX model itself; got {type(twin).__name__}.'
      )
    found = {
      tuple(map(str, path)): m.axis
      for path, m in nnx.iter_graph(twin)
      if isinstance(m, wx._WeightNormedKernel)
    }
    return nnx.state(twin), found
  import flax.linen as nn

  from wn_jax import linen as wl

  if not (isinstance(twin, (tuple, list)) and twin and isinstance(twin[0], nn.Module)):
    raise TypeError(
      'wn_jax.pytorch.to_linen: twin= takes (module, *inputs), the linen model and inputs '
      f'its init runs on (abstractly); got {type(twin).__name__}.'
    )
  module, *inputs = twin
  axes: dict[tuple[str, ...], Any] = {}

  def record(call: Any, args: Any, kwargs: Any, context: Any) -> Any:
    layer = context.module
    if isinstance(layer, wl._WeightNormedKernel) and isinstance(layer, nn.Module):
      axes[tuple(layer.path)] = layer.axis
    return call(*args, **kwargs)

  with nn.intercept_methods(record):
    template = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return template, axes


def _kept(axis: Any, ndim: int) -> tuple[int, ...] | None:
  """An ``axis`` (int, tuple or None) as sorted non-negative axes of an ``ndim`` kernel."""
  if axis is None:
    return None
  return tuple(sorted(a % ndim for a in (axis if isinstance(axis, (tuple, list)) else (axis,))))


def _check_axes(
  layers: dict[str, TorchLayer], axes: dict[tuple[str, ...], Any], naming: str
) -> None:
  """Each weight-normed layer's kept axis against the twin's layer at its path."""
  for prefix, layer in layers.items():
    path = _path(prefix, 'scale', 'params', naming)[1 if naming == 'linen' else 0 : -1]
    where = tuple(map(str, path))
    if where not in axes:
      continue
    ndim = np.ndim(layer.params['kernel'])
    if _kept(axes[where], ndim) != _kept(layer.axis, ndim):
      raise _error(
        f'{"/".join(where)!r}: the twin keeps axis {axes[where]}, but PyTorch weight-normed '
        f'{prefix!r} with dim={layer.dim}, which is wn_jax axis={layer.axis}: build that '
        f"layer with axis={layer.axis} (layer_axes(torch_model) gives every layer's)."
      )


def _check(
  flat: dict[tuple[Any, ...], Any], template: Any, layers: dict[str, TorchLayer], naming: str
) -> None:
  """Every name and shape of the converted tree against the Flax model's own."""
  got = {tuple(map(str, p)): tuple(v.shape) for p, v in flat.items()}
  want = {p: tuple(getattr(v, 'shape', ())) for p, v in _flatten(template).items()}
  scales = {tuple(map(str, _path(p, 'scale', 'params', naming))): x for p, x in layers.items()}
  if want and all(p[0] != 'params' for p in want) and all(p[0] == 'params' for p in got):
    got = {p[1:]: s for p, s in got.items()}  # a linen params tree, not variables
    scales = {p[1:]: x for p, x in scales.items()}
  missing = sorted('/'.join(p) for p in want if p not in got)
  unexpected = sorted('/'.join(p) for p in got if p not in want)
  bad = sorted(p for p in got if p in want and got[p] != want[p])
  shapes = [f'{"/".join(p)}: {got[p]} vs {want[p]}' for p in bad]
  if not (missing or unexpected or shapes):
    return
  hints = [
    f'build {"/".join(p[:-1])!r} with axis={scales[p].axis} (PyTorch weight-normed it with '
    f'dim={scales[p].dim})'
    for p in bad
    if p in scales
  ]
  if any(m.split('/', 1)[-1] == u.split('/', 1)[-1] for m in missing for u in unexpected):
    hints.append(
      "put each tensor in the template's collection (torch buffers go to buffers=, "
      "'buffers' by default, read from a module or marked by buffer_keys=)"
    )
  if missing or unexpected:
    hints.append('name Flax submodules as the PyTorch ones (lists in setup / nnx.List)')
  if unexpected:
    hints.append(
      'leave out tensors the Flax model does not hold with drop=<regex> (to_torch brings '
      'them back from like)'
    )
  if any(p not in scales for p in bad):
    hints.append('pass rules= for tensors of a layout of their own')
  raise _error(
    'the converted tree does not fit the template: '
    f'missing {missing}, unexpected {unexpected}, shapes (converted vs template) {shapes}. '
    f'Fix: {"; ".join(hints)}.'
  )


_TREE_ARGS = """
    kinds: as :func:`from_torch`: the kind of prefixes whose shape cannot tell it (not
      needed with a module); also ``'Embedding'``, ``'LayerNorm'``, ``'BatchNorm1d'`` ...
      for plain layers of a state dict.
    rules: ``{regex: (forward, inverse)}`` for model-specific tensors: a key that
      ``re.fullmatch``es a regex keeps its name, and its value becomes
      ``forward(array)``; :func:`to_torch` applies ``inverse``. E.g. a Snake activation's
      ``alpha`` of shape ``(1, C, 1)``:
      ``{r'.*\\.alpha': (lambda a: a.reshape(-1), lambda a: a.reshape(1, -1, 1))}``.
      ``forward`` may instead return a dict of several leaves, named relative to the
      tensor's module and dotted as PyTorch keys (``{'cell.ii.kernel': ..., ...}``, so a
      list index follows linen's or NNX's naming); ``inverse`` then takes that dict back
      to the one tensor (torch's ``nn.LSTM`` onto per-gate Flax cells, say). Anything
      else raises, naming the key.
    buffers: the linen collection torch buffers (``register_buffer``: a mel ``mean``, a
      codebook's ``cluster_size``) go to, read from a torch module (a state dict cannot
      tell them from parameters): ``'buffers'`` by default, so an optimizer of
      ``params`` never trains them; ``'params'`` puts them with the parameters. Running
      statistics of norm layers go to ``batch_stats`` all the same. NNX's pure dict is
      one tree: declare them in the twin as a ``nnx.Variable`` type that is not a
      ``nnx.Param``.
    buffer_keys: a regex: keys that ``re.fullmatch`` it are buffers too, for a state dict
      or ``.safetensors`` file, which cannot tell (a module tells its own).
    drop: a regex; keys that ``re.fullmatch`` it are left out (a weight-normed layer
      whole), e.g. codebooks ``__call__`` never runs, which a template from
      ``jax.eval_shape(model.init, ...)`` lacks. :func:`to_torch` given the same ``drop``
      copies them back from ``like``.
    decompose: as :func:`from_torch`: plain Linear / Conv weights to WN ``(kernel,
      scale)`` (``True``, or a regex searched in the prefix).
    dtype: cast the floating tensors to this dtype (default: keep the checkpoint's).
    template: optional, the Flax model's own tree (e.g. ``jax.eval_shape`` of ``init``,
      or ``nnx.state(model)``): every converted name and shape is checked against it,
      and a mismatch raises with the missing and unexpected paths."""


def to_linen(
  source: Any,
  kinds: Mapping[str, str] | None = None,
  *,
  rules: Mapping[str, Rule] | None = None,
  decompose: bool | str = False,
  dtype: Any = None,
  template: Any = None,
  twin: Any = None,
  buffers: str = 'buffers',
  drop: str | None = None,
  buffer_keys: str | None = None,
) -> dict[str, Any]:
  """A whole PyTorch model's tensors as linen ``variables``: ``model.apply(variables, x)``.

  Weight-normed layers become ``kernel`` (v in Flax layout), ``scale`` (g) and ``bias``
  (build them as ``WNConv`` / ``WNConvTranspose(transpose_kernel=True)`` / ``WNDense``
  with the ``axis`` :func:`from_torch` gives, ``-1`` for PyTorch's default ``dim=0``);
  plain Linear / Conv ``weight`` -> ``kernel`` in Flax layout; norm layers' ``weight``
  -> ``scale``, ``running_mean`` / ``running_var`` -> ``batch_stats`` ``mean`` / ``var``;
  Embedding ``weight`` -> ``embedding``; any other tensor keeps its name and layout
  (unless a ``rules`` entry says otherwise), as does every tensor of a module class
  wn_jax does not know when ``source`` is the module (a bare state dict's ``weight`` is
  read by its rank: 2-D a Linear, 3-D a Conv1d, ...; ``kinds`` overrides). Module names follow linen's for lists of
  submodules assigned in ``setup``: ``resblocks.0.convs1.1`` -> ``resblocks_0/convs1_1``.

  Args:
    source: a torch module (preferred: the kinds and weight norm ``dim`` come from
      it; duck typed, torch is not imported), a state dict or a ``.safetensors`` path.{args}
    twin: optional, ``(model, *inputs)``: the Flax model and inputs its ``init`` runs on
      (abstractly, nothing is computed). Its variables serve as ``template``, and each
      weight-normed layer's kept ``axis`` is checked against PyTorch's ``dim``, which
      shapes alone cannot always tell (wav2vec2's ``dim=2`` Conv1d with as many channels
      as window taps fits a twin left at ``axis=-1``, and computes wrong).

  Returns:
    ``{{'params': ...}}``, plus ``'batch_stats'`` when the model has running statistics;
    JAX arrays, copied.

  Examples:
    >>> import numpy as np
    >>> from wn_jax import pytorch
    >>> sd = {{'blocks.0.weight_g': np.ones((4, 1, 1), np.float32),
    ...       'blocks.0.weight_v': np.ones((4, 2, 3), np.float32),
    ...       'blocks.0.bias': np.zeros(4, np.float32), 'head.weight': np.ones((1, 4), np.float32)}}
    >>> variables = pytorch.to_linen(sd)
    >>> {{k: v.shape for k, v in variables['params']['blocks_0'].items()}}
    {{'kernel': (3, 2, 4), 'scale': (4,), 'bias': (4,)}}
    >>> variables['params']['head']['kernel'].shape
    (4, 1)
  """
  return _tree(
    source, 'linen', kinds, rules, decompose, dtype, template, twin, buffers, drop, buffer_keys
  )


def to_nnx(
  source: Any,
  kinds: Mapping[str, str] | None = None,
  *,
  rules: Mapping[str, Rule] | None = None,
  decompose: bool | str = False,
  dtype: Any = None,
  template: Any = None,
  twin: Any = None,
  buffers: str = 'buffers',
  drop: str | None = None,
  buffer_keys: str | None = None,
) -> dict[Any, Any]:
  """A whole PyTorch model's tensors as an NNX pure dict, for ``nnx.replace_by_pure_dict``.

  The same conversion as :func:`to_linen`, in one tree (running statistics under
  their NNX names ``mean`` / ``var``), with a torch ``nn.ModuleList`` index as an integer
  key: ``resblocks.0.convs1.1`` -> ``['resblocks'][0]['convs1'][1]``, the path of an
  ``nnx.List`` of submodules. Load it with
  ``state = nnx.state(model); nnx.replace_by_pure_dict(state, tree); nnx.update(model, state)``.

  Args:
    source: as :func:`to_linen`.{args}
    twin: optional, the NNX model itself (any parameter values): as ``template=nnx.state(twin)``,
      and each weight-normed layer's kept ``axis`` is checked against PyTorch's ``dim``
      (see :func:`to_linen`).

  Returns:
    A nested dict of JAX arrays (copied).

  Examples:
    >>> import numpy as np
    >>> from flax import nnx
    >>> import wn_jax
    >>> from wn_jax import pytorch
    >>> sd = {{'layers.0.weight_g': np.full((4, 1), 2.0, np.float32),
    ...       'layers.0.weight_v': np.ones((4, 3), np.float32), 'layers.0.bias': np.zeros(4, np.float32)}}
    >>> class Model(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.layers = nnx.List([wn_jax.nnx.WNLinear(3, 4, rngs=rngs)])
    >>> model = Model(nnx.Rngs(0))
    >>> state = nnx.state(model)
    >>> nnx.replace_by_pure_dict(state, pytorch.to_nnx(sd, template=state))
    >>> nnx.update(model, state)
    >>> model.layers[0].scale[...].tolist()
    [2.0, 2.0, 2.0, 2.0]
  """
  return _tree(
    source, 'nnx', kinds, rules, decompose, dtype, template, twin, buffers, drop, buffer_keys
  )


to_linen.__doc__ = (to_linen.__doc__ or '').format(args=_TREE_ARGS)
to_nnx.__doc__ = (to_nnx.__doc__ or '').format(args=_TREE_ARGS)


def layer_axes(
  source: Any, kinds: Mapping[str, str] | None = None, *, decompose: bool | str = False
) -> dict[str, int | None]:
  """Each weight-normed layer's kept ``axis``, keyed by its linen path, for ``linen.fold``.

  A converted layer's ``scale`` does not always tell its axis (a wav2vec2-style ``dim=2``
  Conv1d whose window equals its channel count fits ``axis=-1`` too), so fold a converted
  model with ``wn_jax.linen.fold(variables['params'], axis=layer_axes(torch_model))``.

  Args:
    source: as :func:`to_linen`.
    kinds: as :func:`to_linen`.
    decompose: as :func:`to_linen`.

  Returns:
    ``{'/'-joined linen path: axis}`` for every weight-normed (or decomposed) layer.

  Examples:
    >>> import numpy as np
    >>> sd = {'pos_conv.0.weight_g': np.ones((1, 1, 4), np.float32),
    ...       'pos_conv.0.weight_v': np.ones((4, 4, 4), np.float32)}
    >>> layer_axes(sd)
    {'pos_conv_0': -3}
  """
  _, _, layers = _layers(source, kinds, decompose, None)
  return {'/'.join(_linen_path(prefix)): layer.axis for prefix, layer in layers.items()}


_SAME = (
  'If the tree came from to_linen / to_nnx with rules=, kinds=, decompose=, buffers= or drop=, '
  'pass to_torch the same rules=, kinds=, decompose=, buffers= and drop=.'
)


def _tree_to_torch(
  tree: Any,
  like: Any,
  kinds: Mapping[str, str] | None,
  rules: Mapping[str, Rule] | None,
  decompose: Any,
  buffers: str,
  drop: str | None,
  buffer_keys: str | None,
) -> dict[str, Any]:
  sd, layers, leaves, skipped = _plan(
    like, kinds, rules, decompose, None, buffers, drop, buffer_keys
  )
  naming = 'linen' if isinstance(tree, Mapping) and 'params' in tree else 'nnx'
  flat = _flatten(tree)
  missing: list[str] = []

  def get(prefix: str, name: str, collection: str) -> Any:
    # A state dict cannot tell buffers from parameters: either collection holds them.
    other = {'params': buffers, buffers: 'params'}.get(collection, collection)
    for c in (collection, other):
      path = tuple(map(str, _path(prefix, name, c, naming)))
      if path in flat:
        return np.array(flat[path])
    missing.append('/'.join(map(str, _path(prefix, name, collection, naming))))
    return None

  out: dict[str, np.ndarray] = {}
  for prefix, layer in layers.items():
    params = {n: get(prefix, n, 'params') for n in layer.params}
    if all(v is not None for v in params.values()):
      out.update(_export_layer(prefix, dataclasses.replace(layer, params=params), layer.style))
  for leaf in leaves:
    # A rule's forward on like's own tensor names the leaves its inverse takes back.
    names = leaf.forward(_array(sd[leaf.key])) if leaf.user else None
    if isinstance(names, Mapping):
      parts = {rel: get(*_split(_key(leaf.prefix, f'.{rel}')), leaf.collection) for rel in names}
      if all(v is not None for v in parts.values()):
        out[leaf.key] = np.asarray(leaf.inverse(parts))
    else:
      value = get(leaf.prefix, leaf.name, leaf.collection)
      if value is not None:
        out[leaf.key] = np.asarray(leaf.inverse(value))
  if missing:
    raise _error(f"the {naming} tree lacks {missing}, which like's state dict needs. {_SAME}")
  return _finish(out, like, skipped, _SAME)


def _tuple(x: Any, n: int) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


_PADDING_MODES = {'reflect': 'REFLECT', 'circular': 'CIRCULAR'}


def _padding_mode(kind: str, padding: Any, mode: str, k: tuple, d: tuple) -> str:
  """Flax's ``'REFLECT'`` / ``'CIRCULAR'`` padding for PyTorch's ``padding_mode``, if it is the same."""
  if mode not in _PADDING_MODES:
    hint = " (pad the input with jnp.pad(x, ..., mode='edge') and use padding=0)"
    raise _error(
      f'conv_kwargs: padding_mode={mode!r} has no Flax equivalent'
      f'{hint if mode == "replicate" else ""}; Flax pads with zeros, reflect or circular.'
    )
  dilated = [di * (ki - 1) + 1 for ki, di in zip(k, d)]
  same = [((kd - 1) // 2, kd // 2) for kd in dilated]  # what Flax pads for REFLECT/CIRCULAR
  if isinstance(padding, str):
    if padding.lower() == 'same':
      return _PADDING_MODES[mode]
    return 'VALID'
  asked = [(p, p) for p in _tuple(padding, len(k))]
  if asked != same:
    raise _error(
      f'conv_kwargs: {kind} with padding_mode={mode!r} pads {asked}, but Flax pads '
      f'{_PADDING_MODES[mode]!r} as {same} (half the dilated kernel): no Flax equivalent; '
      f'pad the input with jnp.pad(x, ..., mode={mode!r}) and use padding=0.'
    )
  return _PADDING_MODES[mode]


def conv_kwargs(
  kind: str,
  kernel_size: int | tuple[int, ...],
  *,
  stride: int | tuple[int, ...] = 1,
  padding: int | tuple[int, ...] | str = 0,
  dilation: int | tuple[int, ...] = 1,
  groups: int = 1,
  output_padding: int | tuple[int, ...] = 0,
  padding_mode: str = 'zeros',
) -> dict[str, Any]:
  """The Flax ``WNConv`` / ``WNConvTranspose`` arguments of a PyTorch conv layer.

  Args:
    kind: ``'Conv1d'`` ... ``'ConvTranspose3d'``.
    kernel_size: PyTorch's.
    stride: PyTorch's.
    padding: PyTorch's (ints, or ``'same'`` / ``'valid'`` for Conv).
    dilation: PyTorch's.
    groups: PyTorch's (Conv only; ConvTranspose takes 1).
    output_padding: PyTorch's (ConvTranspose only: a Conv refuses it, since a
      ConvTranspose mistaken for a Conv would otherwise compute silently wrong).
    padding_mode: PyTorch's: ``'zeros'``; for Conv also ``'reflect'`` / ``'circular'``
      where they pad half the dilated kernel on each side (Flax's ``'REFLECT'`` /
      ``'CIRCULAR'``); other cases, and ``'replicate'``, raise.

  Returns:
    ``kernel_size``, ``strides``, ``padding``, ``kernel_dilation`` and, for Conv,
    ``feature_group_count``, for ConvTranspose ``transpose_kernel=True``.

  Examples:
    >>> conv_kwargs('ConvTranspose1d', 16, stride=8, padding=4)
    {'kernel_size': (16,), 'strides': (8,), 'padding': ((11, 11),), 'kernel_dilation': (1,), 'transpose_kernel': True}
    >>> conv_kwargs('Conv1d', 3, padding=1, padding_mode='reflect')['padding']
    'REFLECT'
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
    if padding_mode != 'zeros':
      raise _error(f'conv_kwargs: a ConvTranspose pads with zeros only; got {padding_mode!r}.')
    p, op = _tuple(padding, n), _tuple(output_padding, n)
    out['padding'] = tuple(
      (di * (ki - 1) - pi, di * (ki - 1) - pi + oi) for ki, di, pi, oi in zip(k, d, p, op)
    )
    out['kernel_dilation'] = d
    out['transpose_kernel'] = True
  else:
    if any(_tuple(output_padding, n)):
      raise _error(
        f'conv_kwargs: output_padding={output_padding!r} is an argument of a ConvTranspose, '
        f"which {kind} is not. A ConvTranspose whose weight shape looks like a Conv's converts "
        f"with kinds={{prefix: 'ConvTranspose{n}d'}}, or from the torch module itself."
      )
    if padding_mode != 'zeros':
      out['padding'] = _padding_mode(kind, padding, padding_mode, k, d)
    elif isinstance(padding, str):
      if padding.lower() not in ('same', 'valid'):
        raise _error(f'conv_kwargs: unknown padding {padding!r}.')
      out['padding'] = padding.upper()
    else:
      out['padding'] = tuple((pi, pi) for pi in _tuple(padding, n))
    out['kernel_dilation'] = d
    out['feature_group_count'] = groups
  return out


__all__ = [
  'KINDS',
  'PLAIN_KINDS',
  'TORCH_ARGS',
  'TorchLayer',
  'conv_kwargs',
  'find_prefixes',
  'from_torch',
  'layer_axes',
  'to_linen',
  'to_nnx',
  'to_torch',
]
