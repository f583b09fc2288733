"""What a live torch module says about each of its layers (or a state dict's shapes guess)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from wn_jax.pytorch._kinds import _DEFAULT_KIND
from wn_jax.pytorch._kinds import KINDS
from wn_jax.pytorch._kinds import PLAIN_KINDS
from wn_jax.pytorch._kinds import TORCH_ARGS
from wn_jax.pytorch._state_dict import _error
from wn_jax.pytorch._state_dict import _is_module
from wn_jax.pytorch._state_dict import _key
from wn_jax.pytorch._state_dict import _load
from wn_jax.pytorch._state_dict import _split
from wn_jax.pytorch._state_dict import _unwrap
from wn_jax.pytorch._styles import _suffixes
from wn_jax.pytorch._styles import chain_error
from wn_jax.pytorch._styles import detected
from wn_jax.pytorch._styles import layer_keys
from wn_jax.pytorch._styles import refuse_a_chain
from wn_jax.pytorch._styles import refuse_a_normed_bias
from wn_jax.pytorch._styles import refuse_a_second_weight

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class _Info:
  """A prefix's layer: kind, PyTorch arguments and weight norm's ``dim`` (if the module tells)."""

  kind: str | None
  args: dict[str, Any]
  dim: Any = _MISSING  # of the tensor at hand (see dims)
  dims: dict[str, Any] = dataclasses.field(default_factory=dict)  # {weight-normed tensor: dim}
  live: bool = False  # read from a torch module: a kind None is a class wn_jax does not know
  styles: dict[str, str] = dataclasses.field(default_factory=dict)  # {weight-normed tensor: style}


def _kind_of(module: Any) -> str | None:
  """The PyTorch layer kind from the class and its bases (``ParametrizedConv1d`` -> ``Conv1d``)."""
  for cls in type(module).__mro__:
    if cls.__name__ in KINDS or cls.__name__ in PLAIN_KINDS:
      return cls.__name__
  return None


def _wn_dims(module: Any, prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
  """Weight norm's ``dim`` on each weight-normed tensor of ``module`` (``None``: whole tensor),
  and its key style (``'legacy'`` for the hook, ``'parametrization'``); a ``ValueError`` for
  one that has other parametrizations too (torch computes the tensor through all of them,
  wn_jax reads weight norm's ``g`` and ``v`` only)."""
  dims: dict[str, Any] = {}
  styles: dict[str, str] = {}
  for hook in getattr(module, '_forward_pre_hooks', {}).values():  # legacy weight_norm
    if type(hook).__name__ == 'WeightNorm' and isinstance(getattr(hook, 'name', None), str):
      dims[hook.name] = None if hook.dim in (None, -1) else hook.dim
      styles[hook.name] = 'legacy'
  parametrizations = getattr(module, 'parametrizations', None)
  if parametrizations is None:
    return dims, styles
  names = parametrizations.keys() if hasattr(parametrizations, 'keys') else vars(parametrizations)
  for name in list(names):
    chain = list(getattr(parametrizations, name))
    for p in chain:
      if type(p).__name__ == '_WeightNorm':
        dims[name] = None if p.dim in (None, -1) else p.dim
        styles[name] = 'parametrization'
    if name in dims and len(chain) > 1:
      kinds = ', '.join(type(p).__name__ for p in chain)
      raise chain_error(prefix, name, f'{len(chain)} parametrizations ({kinds})')
  return dims, styles


def _walk(module: Any) -> dict[str, _Info]:
  """``{prefix: _Info}`` for every submodule of a torch module (kind ``None``: a class wn_jax
  does not know, whose tensors keep their names and layout)."""
  out: dict[str, _Info] = {}
  try:  # every name of a module registered twice (tied, m.dec = m.enc), as the state dict has
    named = list(module.named_modules(remove_duplicate=False))
  except TypeError:  # a duck-typed module without the argument
    named = list(module.named_modules())
  for prefix, m in named:
    kind = _kind_of(m)
    args: dict[str, Any] = {}
    if kind in KINDS and kind != 'Linear':
      names = [a for a in TORCH_ARGS if not (a == 'output_padding' and 'Transpose' not in kind)]
      args = {a: getattr(m, a) for a in names if hasattr(m, a)}
    dims, styles = _wn_dims(m, prefix)
    out[prefix] = _Info(kind, args, dims.get('weight', _MISSING), dims, True, styles)
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
  found = layer_keys(detected(sd, sd.__contains__))  # refused later, after drop=
  prefixes = {_split(k)[0] for k in sd} | set(found)
  for p, k in (kinds or {}).items():
    if p not in prefixes:
      raise _error(
        f'kinds names prefix {p!r}, which matches no layer of the state dict '
        f'(weight-normed layers: {sorted(found)}).'
      )
    if k not in KINDS and k not in PLAIN_KINDS:
      raise _error(f'unknown kind {k!r} for prefix {p!r}; expected one of {KINDS + PLAIN_KINDS}.')
    old = infos.get(p, _Info(None, {}))
    infos[p] = dataclasses.replace(old, kind=k)
  return infos


def weight_normed_here(
  sd: Mapping[str, Any], infos: dict[str, _Info], drop: Any = None
) -> dict[tuple[str, str], str]:
  """``{(prefix, tensor): style}`` of the weight-normed tensors (:func:`~wn_jax.pytorch._styles.detected`), where a torch module, if given,
  has the last word: keys that only look weight-normed (an attention's own ``weight_v``) are
  not, and the module's style wins. The style is the one the keys ``drop`` leaves show; a pair
  it takes whole stays (its layer is dropped whole, bias included). Without a module, a
  second weight is refused (:func:`wn_jax.pytorch._state_dict.refuse_a_second_weight`), and so is
  the state of other parametrizations on a converted one (:func:`~wn_jax.pytorch._state_dict.refuse_a_chain`).
  A weight-normed ``bias`` is refused (:func:`~wn_jax.pytorch._state_dict.refuse_a_normed_bias`)."""
  present = lambda key: key in sd and (drop is None or re.fullmatch(drop, key) is None)
  kept, out = detected(sd, present), {}
  for (prefix, tensor), style in detected(sd, sd.__contains__).items():
    info = infos.get(prefix, _Info(None, {}))
    style = info.styles.get(tensor) or kept.get((prefix, tensor), style)
    if info.live and tensor not in info.dims:
      continue
    keys = [_key(prefix, s) for s in _suffixes(style, tensor)]
    if not any(map(present, keys)) and not all(k in sd for k in keys):
      continue  # a lone key that drop= takes: no pair (a whole pair taken drops the layer)
    if not info.live:
      refuse_a_second_weight(present, prefix, tensor)
      if all(map(present, keys)):  # converted: not a layer drop= takes whole
        refuse_a_chain(sd, prefix, tensor)
    if all(map(present, keys)):
      refuse_a_normed_bias(prefix, tensor, keys)
    out[prefix, tensor] = style
  return out


def find_prefixes(source: Any) -> dict[str, str]:
  """Every weight-normed prefix of a PyTorch model and its key style, as :func:`from_torch` and
  :func:`to_linen` find them.

  Args:
    source: what :func:`from_torch` takes: a torch module (it tells which tensors are
      weight-normed: an attention's own ``weight_v`` is not), a state dict or a
      ``.safetensors`` path.

  Returns:
    ``{prefix: 'legacy' | 'parametrization'}``, in key order. The prefix is the module's for a
    weight-normed ``weight``, and ``<module>.<name>`` for weight norm on another tensor
    (``weight_norm(lstm, name='weight_hh_l0')``: keys ``weight_hh_l0_g`` / ``_v`` or
    ``parametrizations.weight_hh_l0.original0`` / ``1``).

  Examples:
    >>> import numpy as np
    >>> find_prefixes({'a.weight_g': np.ones(1), 'b.parametrizations.weight.original1': np.ones(1)})
    {'a': 'legacy', 'b': 'parametrization'}
    >>> find_prefixes({'lstm.w_hh_g': np.ones((1, 3)), 'lstm.w_hh_v': np.ones((4, 3))})
    {'lstm.w_hh': 'legacy'}
  """
  source = _unwrap(source)[0]
  sd = _load(source)
  return layer_keys(weight_normed_here(sd, _infos(source, sd, None)))
