"""PyTorch state dicts' weight-norm keys: their two styles, which tensors they norm, and the
key layouts wn_jax refuses."""

from __future__ import annotations

import re
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

from wn_jax.pytorch._state_dict import _error
from wn_jax.pytorch._state_dict import _key
from wn_jax.pytorch._state_dict import _split

_STYLES = ('legacy', 'parametrization')


def _suffixes(style: str, tensor: str = 'weight') -> tuple[str, str]:
  """The ``g`` and ``v`` key suffixes of weight norm on the tensor ``tensor`` in ``style``."""
  if style == 'legacy':
    return f'.{tensor}_g', f'.{tensor}_v'
  return f'.parametrizations.{tensor}.original0', f'.parametrizations.{tensor}.original1'


_NAMED = {
  'legacy': re.compile(r'(?:(.*)\.)?(\w+)_([gv])'),
  'parametrization': re.compile(r'(?:(.*)\.)?parametrizations\.(\w+)\.original([01])'),
}


def detected(
  state_dict: Mapping[str, Any], present: Callable[[str], bool]
) -> dict[tuple[str, str], str]:
  """``{(module prefix, tensor name): style}`` of every weight-normed tensor among the keys
  ``present`` keeps, in key order, without refusals (:func:`wn_jax.pytorch._walk.weight_normed_here`
  decides, with a torch module if given, and refuses).

  A tensor ``w`` is weight-normed when both of its keys are there: ``w_g`` and ``w_v``, or
  ``parametrizations.w.original0`` and ``original1`` (for ``weight``, one of them does); for a
  name other than ``weight``, the legacy ``g`` must also have ``v``'s rank (or be a scalar), so
  that two unrelated tensors ``x_g``, ``x_v`` are not taken for one.
  """
  found: dict[tuple[str, str], str] = {}
  for key in filter(present, state_dict):
    for style, pattern in _NAMED.items():
      match = pattern.fullmatch(key)
      if match is None:
        continue
      prefix, tensor = match.group(1) or '', match.group(2)
      g_key, v_key = (_key(prefix, s) for s in _suffixes(style, tensor))
      if tensor == 'weight' and present(_key(prefix, '.weight_orig')) and not present(g_key):
        continue  # spectral norm's weight_u / weight_v beside its weight_orig
      if tensor == 'weight':  # a complete pair before a lone key (an attention's own weight_v)
        old = found.get((prefix, tensor))
        if old is None or (
          present(g_key) and present(v_key) and not _complete(present, prefix, old)
        ):
          found[prefix, tensor] = style
      elif present(g_key) and present(v_key):
        g, v = state_dict[g_key], state_dict[v_key]
        if style == 'parametrization' or len(g.shape) in (0, len(v.shape)):
          found.setdefault((prefix, tensor), style)
  return found


def _complete(present: Callable[[str], bool], prefix: str, style: str) -> bool:
  """Whether both keys of ``weight``'s pair in ``style`` at ``prefix`` are ``present``."""
  return all(present(_key(prefix, s)) for s in _suffixes(style))


def refuse_a_second_weight(present: Callable[[str], bool], prefix: str, tensor: str) -> None:
  """A ``ValueError`` where a weight-normed tensor has its pair and a key of the other style,
  or its pair and a plain tensor: weight norm keeps one pair and no plain tensor, so the others
  are the module's own tensors or strays, which a state dict alone does not tell apart."""
  keys = {style: [_key(prefix, s) for s in _suffixes(style, tensor)] for style in _NAMED}
  pairs = [k for k in keys.values() if all(map(present, k))]
  found = [key for k in keys.values() for key in k if present(key)]
  plain = _key(prefix, f'.{tensor}')
  fix = (
    "If some are a module's own tensors (an attention's weight_v), pass the torch module, "
    'which tells; else remove the keys that are not the weight from the state dict '
    '(to_linen / to_nnx: or drop= them).'
  )
  if pairs and len(found) > 2:
    raise _error(
      f'{_layer_key(prefix, tensor)!r} has keys of both weight-norm styles, {found} '
      f'(torch.nn.utils.weight_norm keeps {tensor}_g / _v, torch.nn.utils.parametrizations.'
      f'weight_norm parametrizations.{tensor}.original0 / 1), and a weight-normed tensor has '
      f'one pair. {fix}'
    )
  if pairs and present(plain):
    raise _error(
      f'{plain!r} is beside the weight-normed pair {pairs[0][0]!r}, {pairs[0][1]!r}; a '
      f'weight-normed module keeps no plain {tensor!r} (PyTorch computes it from the pair). '
      f'{fix}'
    )


def refuse_a_chain(keys: Iterable[str], prefix: str, tensor: str) -> None:
  """A ``ValueError`` where weight-normed ``tensor`` has the state of further parametrizations
  (``parametrizations.<tensor>.1.alpha``, spectral norm's ``1._u``): torch computes the tensor
  through all of them. A stateless one leaves no key: only the module tells it."""
  head = _key(prefix, f'.parametrizations.{tensor}.')
  others = [k for k in keys if k.startswith(head) and k[len(head) :].split('.')[0].isdigit()]
  if others:
    raise chain_error(prefix, tensor, f'parametrizations after weight norm (keys {others[:4]})')


def refuse_a_normed_bias(prefix: str, tensor: str, keys: list[str]) -> None:
  """A ``ValueError`` for weight norm on a tensor named ``bias`` (``keys``: its g and v): its v
  would take the name of the layer's plain ``bias``, which Flax layers read as the bias itself."""
  if tensor == 'bias':
    raise _error(
      f"{_key(prefix, '.bias')!r} is weight-normed (weight_norm(module, name='bias')), which "
      "wn_jax does not convert: a Flax layer's 'bias' is the plain bias, and v would take its "
      'name. Take weight norm off the bias first (torch.nn.utils.remove_weight_norm(module, '
      "name='bias'), or torch.nn.utils.parametrize.remove_parametrizations(module, 'bias') "
      f'for the parametrization; the bias keeps its value), or leave its keys {keys} out with '
      'drop= (to_torch given the same drop= copies them back from like). If they are tensors '
      "of the model's own, not weight norm, pass the torch module, which tells."
    )


def half_a_pair(state_dict: Mapping[str, Any], key: str) -> ValueError:
  """The error for the ``g`` or ``v`` ``key`` of a weight-normed tensor missing from ``state_dict``."""
  prefix, name = _split(key)
  head = _key(prefix, f'.parametrizations.{name}.')
  held = [k for k in state_dict if k.startswith(head)]
  if held:  # legacy weight_norm's weight_v, then a parametrization on it
    return _error(
      f"{key!r} is itself parametrized (keys {held[:3]}): wn_jax reads weight norm's g and v "
      'as plain tensors. Fold its parametrizations into it first '
      f'(torch.nn.utils.parametrize.remove_parametrizations(module, {name!r})), or convert '
      'the plain weights.'
    )
  return _error(
    f'{key!r} is missing: a weight-normed layer needs both g and v. If the other is a '
    "tensor of the model's own (an attention's weight_v, no weight norm), pass the torch "
    'module, which tells, or drop= its keys.'
  )


def chain_error(prefix: str, tensor: str, found: str) -> ValueError:
  """The error for weight-normed ``tensor`` at ``prefix`` with other parametrizations too."""
  return _error(
    f'{repr(prefix) if prefix else "the module"}: its {tensor!r} has {found}, and wn_jax '
    'converts weight norm alone (torch computes the tensor through every parametrization). '
    'Fold the others into the tensor first: take them off with '
    'torch.nn.utils.parametrize.remove_parametrizations, or convert the plain weights.'
  )


def _layer_key(prefix: str, tensor: str) -> str:
  """A weight-normed tensor's key among the layers: its module's prefix for ``weight``,
  else ``prefix.tensor`` (a module may weight-norm several tensors)."""
  return prefix if tensor == 'weight' else _key(prefix, f'.{tensor}')


def layer_keys(found: dict[tuple[str, str], str]) -> dict[str, str]:
  """``{layer key: style}`` of :func:`detected`'s ``found``."""
  return {_layer_key(p, t): s for (p, t), s in found.items()}
