"""Torch module prefixes as linen and NNX paths, and nested trees from flat ones."""

from __future__ import annotations

import re
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import jax

from wn_jax.pytorch._state_dict import _error


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


def _layers_mover(template: Any, naming: str) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
  """Paths moved to where the template has a Flax ``Sequential``'s children: torch's
  ``nn.Sequential`` names its children ``0``, ``1``, ..., NNX's keeps them in ``layers``
  (:func:`_mover`) and linen's names them ``layers_0``, ... (:func:`_linen_mover`)."""
  paths = _flatten(template)
  return _mover(paths) if naming == 'nnx' else _linen_mover(paths)


def _mover(paths: Iterable[tuple[str, ...]]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
  """NNX paths moved under ``layers`` where the tree of ``paths`` (its leaves') has an
  ``nnx.Sequential``: ``(P, i, ...)`` becomes ``(P, 'layers', i, ...)`` where the tree has
  ``P/layers/i`` and no ``P/i`` (nested ones too)."""
  nodes = {p[:n] for p in paths for n in range(1, len(p) + 1)}

  def move(path: tuple[Any, ...]) -> tuple[Any, ...]:
    new: tuple[Any, ...] = ()
    for part in path:
      key = tuple(map(str, new))
      if (
        isinstance(part, int)
        and (*key, str(part)) not in nodes
        and (*key, 'layers', str(part)) in nodes
      ):
        new += ('layers',)
      new += (part,)
    return new

  return move


def _linen_mover(paths: Iterable[tuple[str, ...]]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
  """Linen paths moved to a linen ``nn.Sequential``'s names where the tree of ``paths`` (its
  leaves') has one: torch's ``body.0`` is linen's ``body_0`` (a list in ``setup``), or
  ``body/layers_0`` where the tree has that and no ``body_0`` (``0`` alone: ``layers_0``;
  ``body.0.1``: ``body/layers_0/layers_1`` or ``body_0/layers_1``, whichever it has)."""
  nodes = {p[:n] for p in paths for n in range(1, len(p) + 1)}

  def candidates(part: str) -> list[tuple[str, ...]]:
    """``'body_0_1'`` -> ``[('body', 'layers_0', 'layers_1'), ('body_0', 'layers_1')]``."""
    m = re.fullmatch(r'(?:(.*?[^\d_].*?)_)?(\d+(?:_\d+)*)', part)  # a base name has a letter
    if m is None:
      return []
    base, digits = [m[1]] if m[1] else [], m[2].split('_')
    heads = ['_'.join(base + digits[:j]) for j in range(len(digits))]
    return [
      (*([h] if h else []), *(f'layers_{d}' for d in digits[j:])) for j, h in enumerate(heads)
    ]

  def move(path: tuple[Any, ...]) -> tuple[Any, ...]:
    new: tuple[Any, ...] = ()
    for part in path:
      if (*new, part) not in nodes:
        found = [c for c in candidates(str(part)) if (*new, *c) in nodes]
        if found:
          new += found[0]
          continue
      new += (part,)
    return new

  return move


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
  """``{path of str: leaf}`` of a nested dict, nnx.State or pure dict; Flax's boxes
  (``nn.Partitioned``, from ``nn.with_partitioning``) read as the arrays they hold."""
  import jax

  if hasattr(tree, 'to_pure_dict'):  # an nnx.State
    from flax import nnx

    tree = nnx.to_pure_dict(tree)
  else:
    from flax.core import meta

    tree = meta.unbox(tree)
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = tuple(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)
    flat[parts] = leaf
  return flat


def _rng_state(flat: dict[tuple[str, ...], Any]) -> set[tuple[str, ...]]:
  """The paths of a flat tree's RNG state, which has no torch tensor: each PRNG key, and the
  ``count`` beside a ``key`` (an NNX RNG stream: ``nnx.Rngs``, a ``Dropout``'s)."""
  keys = {
    p
    for p, x in flat.items()
    if hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  }
  return keys | {(*p[:-1], 'count') for p in keys if p[-1] == 'key'}
