"""wn_jax parameters back to a PyTorch state dict."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from wn_jax.pytorch._layer import TorchLayer
from wn_jax.pytorch._layer import _export_layer
from wn_jax.pytorch._layer import _is_layers
from wn_jax.pytorch._layer import _layers_to_torch
from wn_jax.pytorch._layer import _module_prefix
from wn_jax.pytorch._naming import _flatten
from wn_jax.pytorch._naming import _linen_mover
from wn_jax.pytorch._naming import _mover
from wn_jax.pytorch._naming import _path
from wn_jax.pytorch._naming import _rng_state
from wn_jax.pytorch._plan import Rule
from wn_jax.pytorch._plan import _Leaf
from wn_jax.pytorch._plan import _Options
from wn_jax.pytorch._plan import _plan
from wn_jax.pytorch._state_dict import _array
from wn_jax.pytorch._state_dict import _error
from wn_jax.pytorch._state_dict import _finish
from wn_jax.pytorch._state_dict import _key
from wn_jax.pytorch._state_dict import _split
from wn_jax.pytorch._state_dict import _unwrap
from wn_jax.pytorch._state_dict import wrapper_hint

_SAME = (
  'If the tree came from to_linen / to_nnx with rules=, kinds=, decompose=, buffers= or drop=, '
  'pass to_torch the same rules=, kinds=, decompose=, buffers= and drop=.'
)


@dataclasses.dataclass(frozen=True)
class _Target:
  """What ``like`` needs from a tree: its state dict, and how each tensor is made."""

  sd: Mapping[str, Any]  # like's state dict
  layers: dict[str, TorchLayer]  # its weight-normed layers
  leaves: list[_Leaf]  # its other tensors' rules
  options: _Options


def _tree_to_torch(tree: Any, like: Any, options: _Options) -> dict[str, Any]:
  """A linen or NNX tree as ``like``'s state dict."""
  _check_tree(tree, like)
  sd, _, layers, leaves, skipped = _plan(like, options)
  target = _Target(sd, layers, leaves, options)
  naming = 'linen' if isinstance(tree, Mapping) and 'params' in tree else 'nnx'
  flat = _flatten(tree)
  out, read = _gather(flat, naming, target)
  unread = _unread(flat, read, skipped)
  if read.missing:
    raise _lacks(tree, flat, naming, read.missing, target, unread)
  if unread:
    some = f'{unread[:6]}{" ..." if len(unread) > 6 else ""}'
    raise _error(
      f"the {naming} tree holds {some}, for which like's state dict has no tensor: the result "
      'would leave them out. Pass like the torch module this tree is of (with the same '
      'layers), or take these entries out of the tree (NNX: nnx.state(model, nnx.Param, '
      'nnx.BatchStat, ...) keeps the variable types torch has).'
    )
  return _finish(out, like, skipped, _SAME)


def _unread(flat: dict[tuple[str, ...], Any], read: _Reader, skipped: set[str]) -> list[str]:
  """The tree's paths that no tensor of like was read from. Not counted: NNX's RNG state (a
  key and its count) and the modules of the keys taken from like as they are (``drop=``)."""
  kept = {m for key in skipped for m in read.modules(_torch_module(key))}
  ignored = read.seen | _rng_state(flat)
  return ['/'.join(p) for p in flat if p not in ignored and p[:-1] not in kept]


def _torch_module(key: str) -> str:
  """The torch module a state dict key is in (``'a.parametrizations.weight.original0'``: ``'a'``)."""
  return ('.' + _split(key)[0]).split('.parametrizations.')[0][1:]


def _check_tree(tree: Any, like: Any) -> None:
  """Raises unless ``tree`` is a linen or NNX tree, with the ``like`` it needs."""
  if not isinstance(tree, Mapping) and not hasattr(tree, 'to_pure_dict'):
    raise _error(
      'expected {prefix: TorchLayer} (from from_torch), linen variables or NNX state; got '
      f'{type(tree).__name__}.'
    )
  values = list(tree.values())
  if any(isinstance(v, TorchLayer) for v in values):
    raise _error(
      'expected {prefix: TorchLayer} (from from_torch), linen variables or NNX state; got a '
      f'mapping of {sorted({type(v).__name__ for v in values})}.'
    )
  if not any(isinstance(v, Mapping) for v in values) and any('.' in str(k) for k in tree):
    raise _error(
      f'got a PyTorch state dict (keys {list(tree)[:3]}), which is already in PyTorch form: '
      'to_torch takes what from_torch, to_linen or to_nnx give (a model with tensors only on '
      'its root module has no dotted keys).'
    )
  if like is None:
    raise _error(
      'a linen or NNX tree converts back with like=<the torch module or its state dict>, '
      'which sets the keys and their key style.'
    )


def _lacks(
  tree: Any,
  flat: dict[tuple[str, ...], Any],
  naming: str,
  missing: list[str],
  target: _Target,
  unread: list[str],
) -> ValueError:
  """The error for a tree that lacks ``missing`` (and holds ``unread``, which like has no
  tensor for: a misspelled module, say): a linen params tree is told apart."""
  if naming == 'nnx' and isinstance(tree, Mapping):
    # variables['params'] of a linen model: it lacks only what other collections hold.
    as_params = {('params', *p): v for p, v in flat.items()}
    lacking = _gather(as_params, 'linen', target)[1].missing
    params_only = all(not m.startswith('params/') for m in lacking)
    if params_only and hasattr(tree, 'to_pure_dict'):
      return _error(
        f"this NNX state lacks {missing}, which like's state dict needs (buffers or running "
        'statistics: variables of other types than nnx.Param): pass to_torch the whole '
        'nnx.state(model), not one filtered by type.'
      )
    if params_only:
      return _error(
        f"this looks like a linen params tree (variables['params']), which lacks {lacking}: "
        "pass to_torch the whole variables, {'params': ..., "
        f"'{target.options.buffers}': ..., 'batch_stats': ...}} as to_linen gives them; buffers "
        'and running statistics live in collections of their own. (An NNX pure dict: take '
        'the whole nnx.state(model), not one filtered by type.)'
      )
  holds = f" It holds {unread}, which like's state dict has no tensor for." if unread else ''
  wrapped = wrapper_hint(target.sd, "like's state dict")
  fix = f'{wrapped[0].upper()}{wrapped[1:]}.' if wrapped else _SAME
  return _error(f"the {naming} tree lacks {missing}, which like's state dict needs.{holds} {fix}")


class _Reader:
  """Reads a flat tree's arrays by PyTorch prefix and name, noting the paths it lacks."""

  def __init__(self, flat: dict[tuple[str, ...], Any], naming: str, buffers: str) -> None:
    self.flat, self.naming, self.buffers = flat, naming, buffers
    # torch's nn.Sequential children 0, 1, ... are a Flax Sequential's layers.
    self.move = _mover(flat) if naming == 'nnx' else _linen_mover(flat)
    self.missing: list[str] = []
    self.seen: set[tuple[str, ...]] = set()  # the paths read

  def path(self, prefix: str, name: str, collection: str) -> tuple[str, ...]:
    """The tree's path of the tensor ``prefix.name`` in ``collection``."""
    return tuple(map(str, self.move(_path(prefix, name, collection, self.naming))))

  def get(self, prefix: str, name: str, collection: str, shape: Any, owner: str) -> Any:
    """The array at ``prefix.name`` (``None`` if the tree lacks it, noted in ``missing``), of
    ``shape``, the one like's ``owner`` (a key, or a layer's prefix) needs: else a ``ValueError``
    that names its path."""
    # A state dict cannot tell buffers from parameters: either collection holds them.
    other = {'params': self.buffers, self.buffers: 'params'}.get(collection, collection)
    for c in (collection, other):
      path = self.path(prefix, name, c)
      if path in self.flat:
        self.seen.add(path)
        value = np.array(self.flat[path])
        if value.shape != tuple(shape):
          raise _error(
            f"{'/'.join(path)} has shape {value.shape}, but like's {owner!r} needs "
            f'{tuple(shape)} (in Flax layout): the tree is of another model than like, or of '
            f'another configuration. {_SAME}'
          )
        return value
    self.missing.append('/'.join(self.path(prefix, name, collection)))
    return None

  def modules(self, prefix: str) -> set[tuple[str, ...]]:
    """The tree's paths of the torch module ``prefix``, in either collection."""
    return {self.path(prefix, '_', c)[:-1] for c in ('params', self.buffers)}


def _gather(
  flat: dict[tuple[str, ...], Any], naming: str, target: _Target
) -> tuple[dict[str, np.ndarray], _Reader]:
  """(like's tensors from the flat tree, the reader: the paths it read, those the tree lacks)."""
  read = _Reader(flat, naming, target.options.buffers)
  out: dict[str, np.ndarray] = {}
  for prefix, layer in target.layers.items():
    out.update(_layer_tensors(prefix, layer, read))
  for leaf in target.leaves:
    out.update(_leaf_tensor(leaf, target.sd, read))
  return out, read


def _layer_tensors(prefix: str, layer: TorchLayer, read: _Reader) -> dict[str, np.ndarray]:
  """A weight-normed layer's tensors, in its key style (none if the tree lacks any)."""
  module = _module_prefix(prefix, layer)
  params = {n: read.get(module, n, 'params', np.shape(v), prefix) for n, v in layer.params.items()}
  if any(v is None for v in params.values()):
    return {}
  return _export_layer(prefix, dataclasses.replace(layer, params=params), layer.style)


def _leaf_tensor(leaf: _Leaf, sd: Mapping[str, Any], read: _Reader) -> dict[str, np.ndarray]:
  """``{key: tensor}`` for one other tensor, by its rule's inverse (empty if the tree lacks it)."""
  # The forward on like's own tensor names the leaves the inverse takes back, and their shapes
  # (a built-in rule only moves axes: a zero of like's shape, no copy, will do).
  ref = _array(sd[leaf.key]) if leaf.user else np.broadcast_to(np.float32(0), sd[leaf.key].shape)
  ahead = leaf.forward(ref)
  if isinstance(ahead, Mapping):
    parts = {
      rel: read.get(*_split(_key(leaf.prefix, f'.{rel}')), leaf.collection, np.shape(a), leaf.key)
      for rel, a in ahead.items()
    }
    if any(v is None for v in parts.values()):
      return {}
    return {leaf.key: np.asarray(leaf.inverse(parts))}
  value = read.get(leaf.prefix, leaf.name, leaf.collection, np.shape(ahead), leaf.key)
  return {} if value is None else {leaf.key: np.asarray(leaf.inverse(value))}


def to_torch(
  layers: Any,
  *,
  like: Any = None,
  style: str | None = None,
  kinds: Mapping[str, str] | None = None,
  rules: Mapping[str, Rule] | None = None,
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
    ``{key: array}`` with PyTorch's shapes, contiguous: torch tensors when ``like`` holds
    them (what ``load_state_dict`` takes), else NumPy arrays (torch is never imported:
    ``load_state_dict`` refuses them; pass the module as ``like``, or ``torch.from_numpy``
    each, which cannot read a bfloat16 array).

  Examples:
    >>> import numpy as np
    >>> from wn_jax.pytorch import from_torch, to_torch
    >>> sd = {'c.weight_g': np.ones((4, 1, 1), np.float32), 'c.weight_v': np.ones((4, 2, 3), np.float32)}
    >>> back = to_torch(from_torch(sd))
    >>> all(np.array_equal(back[k], sd[k]) for k in sd)
    True
  """
  options = _Options(kinds, rules, decompose, None, buffers, drop, buffer_keys)

  def export(target: Any) -> dict[str, Any]:
    if _is_layers(layers):
      return _layers_to_torch(layers, target, style)
    return _tree_to_torch(layers, target, options)

  model, prefix = _unwrap(like)  # a wrapper's keys: the model's, prefixed
  try:
    return {prefix + k: v for k, v in export(model).items()}
  except ValueError as first:
    if not prefix:
      raise
    try:  # a tree converted from the wrapper's own state dict, named with its prefix
      return export(like)
    except ValueError:
      raise first from None
