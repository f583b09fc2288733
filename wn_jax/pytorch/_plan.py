"""Where each tensor of a state dict goes: weight-normed layers, plain leaves, rules, buffers, drop."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import numpy as np

from wn_jax.pytorch._conv import refuse_groups
from wn_jax.pytorch._kinds import KINDS
from wn_jax.pytorch._kinds import PLAIN_KINDS
from wn_jax.pytorch._kinds import _perm
from wn_jax.pytorch._layer import TorchLayer
from wn_jax.pytorch._layer import _layer_keys
from wn_jax.pytorch._layer import _layers
from wn_jax.pytorch._state_dict import _error
from wn_jax.pytorch._state_dict import _is_module
from wn_jax.pytorch._state_dict import _key
from wn_jax.pytorch._state_dict import _split
from wn_jax.pytorch._state_dict import refuse_a_non_array
from wn_jax.pytorch._walk import _Info
from wn_jax.pytorch._walk import _plain_kind

Rule = tuple[Callable[[np.ndarray], Any], Callable[[np.ndarray], Any]]


@dataclasses.dataclass(frozen=True)
class _Options:
  """The keyword arguments to_linen, to_nnx and to_torch share: which tensor goes where, how."""

  kinds: Mapping[str, str] | None = None
  rules: Mapping[str, Rule] | None = None
  decompose: bool | str = False
  dtype: Any = None
  buffers: str = 'buffers'
  drop: str | None = None
  buffer_keys: str | None = None


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


def _buffer_keys(source: Any) -> set[str]:
  """The state dict keys of a torch module's buffers (none for a state dict: it cannot tell)."""
  if not _is_module(source) or not hasattr(source, 'named_buffers'):
    return set()
  return {name for name, _ in source.named_buffers()}


def _check_patterns(
  sd: Mapping[str, Any], layers: dict[str, TorchLayer], options: _Options
) -> None:
  """Raises for a ``drop=``, ``buffer_keys=`` or ``rules=`` pattern that ``re.fullmatch``es no key:
  a typo would otherwise convert silently as if it were not there."""
  keys = list(sd)
  in_layers = {p: set(_layer_keys(p, layer)) for p, layer in layers.items()}
  some = f'{keys[:6]}{" ..." if len(keys) > 6 else ""}'
  named = [('drop=', options.drop), ('buffer_keys=', options.buffer_keys)]
  for what, pattern in named + [('rules= key', p) for p in options.rules or {}]:
    if pattern is None:
      continue
    hits = [k for k in keys if re.fullmatch(pattern, k)]
    if what == 'rules= key' and hits and set(hits) <= set().union(*in_layers.values()):
      names = [list(layer._names) for p, layer in layers.items() if in_layers[p] & set(hits)]
      raise _error(
        f"{what} '{pattern}' matches only keys of weight-normed layers ({hits[:3]}), which "
        f'convert as they are, to {names[0]}{" ..." * (len(names) > 1)}: rules= applies to '
        'the other tensors, and a weight-normed tensor is not split (per-gate leaves of an '
        "LSTM's: take weight norm off it first, torch.nn.utils.remove_weight_norm, and split "
        'the plain tensor; or split it in the Flax model).'
      )
    if not hits:
      raise _error(
        f"{what}{'' if what.endswith('=') else ' '}'{pattern}' matches no key of the state dict "
        '(patterns must re.fullmatch '
        rf"the whole key, e.g. r'.*\.alpha'); its keys: {some}."
      )


def _plan(
  source: Any, options: _Options
) -> tuple[Mapping[str, Any], dict[str, _Info], dict[str, TorchLayer], list[_Leaf], set[str]]:
  """(state dict, each prefix's layer info, weight-normed layers, every other tensor's rule,
  keys left out of Flax)."""
  buffers, drop, buffer_keys = options.buffers, options.drop, options.buffer_keys
  if not isinstance(buffers, str) or not buffers:
    raise _error(
      f"buffers= names the linen collection torch buffers go to ('buffers' by default, "
      f"'params' to train them); got {buffers!r}."
    )
  sd, infos, layers = _layers(source, options.kinds, options.decompose, options.dtype, drop)
  _check_patterns(sd, layers, options)
  skipped = {k for k in sd if drop is not None and re.fullmatch(drop, k)}
  for p in [p for p, layer in layers.items() if skipped & set(_layer_keys(p, layer))]:
    skipped |= set(_layer_keys(p, layers.pop(p)))  # a layer goes whole, or not at all
  used = {k for p, layer in layers.items() for k in _layer_keys(p, layer)} | skipped
  held = _buffer_keys(source) | {k for k in sd if buffer_keys and re.fullmatch(buffer_keys, k)}
  leaves = []
  for key in sd:
    if key in used:
      continue
    refuse_a_non_array(key, sd[key])
    prefix = _split(key)[0]
    kind = _plain_kind(prefix, sd, infos)
    refuse_groups(repr(prefix), kind, infos.get(prefix, _Info(None, {})).args)
    collection = buffers if key in held else 'params'
    leaf = _leaf(key, kind, len(sd[key].shape), options.rules or {}, collection)
    if leaf is None:
      skipped.add(key)
    else:
      leaves.append(leaf)
  return sd, infos, layers, leaves, skipped
