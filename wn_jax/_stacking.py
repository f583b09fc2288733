"""A stacked layer's kept axes, read from its shapes: what ``layer_axes`` reports for it.

``nn.scan``, ``nn.vmap`` and ``nnx.vmap`` stack a layer built inside them by inserting a layer
axis at the same index (``variable_axes`` / ``out_axes``; negative from the end) into each
of its parameters. The kept axes of the stacked kernel are the layer's own, moved past the
inserted axes, and the inserted axes themselves. The transform's index is not recorded
anywhere the tools can read, so it is read back from the shapes: every insertion index (and
nesting of them) that turns one layer's shapes, as built, into the stored ones. Where those
readings disagree (sizes that coincide), or where the scale no longer follows its kernel
(stacked along a middle axis: a scale ``(out, layers)`` beside a kernel ``(in, layers,
out)``, which no kept axes describe), the layer is refused, named: guessing is silently
wrong for some models.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

from wn_jax import _axes

Shape = tuple[int, ...]
Labels = tuple[tuple[str, int], ...]  # ('k', i): the layer's kernel axis i; ('L', j): stack j


class Pair(NamedTuple):
  """One weight a layer normalizes and its scale: their shapes as stored and, where known,
  as one layer has them (built inside the transform that stacks it)."""

  kernel: Shape | None
  scale: Shape
  step_kernel: Shape | None = None
  step_scale: Shape | None = None


class Unreadable(ValueError):
  """The stored shapes do not say the layer's kept axes (the message says why). ``given``:
  whether giving the axes by hand is the fix (else the layer must be stacked otherwise)."""

  def __init__(self, message: str, given: bool = True):
    super().__init__(message)
    self.given = given


def stacked_axis(axis: _axes.Axis, pairs: list[Pair]) -> _axes.Axis:
  """The layer's ``axis`` for its parameters as stored, or :class:`Unreadable`.

  ``axis``: the layer's own, as built. Not stacked (every scale has as many axes as it keeps):
  ``axis`` itself. Stacked along the first axis (``variable_axes`` / ``out_axes`` 0): ``-1``
  becomes ``(0, -1)``, ``0`` becomes ``(0, 1)``; along the last: ``-1`` becomes ``(-2, -1)``.

  >>> stacked_axis(-1, [Pair((3, 8, 8), (3, 8), (8, 8), (8,))])
  (0, -1)
  >>> stacked_axis(0, [Pair((4, 4, 3), (4, 3), (4, 4), (4,))])
  (0, -1)
  >>> stacked_axis(-1, [Pair((8, 8), (8,), (8, 8), (8,))])
  -1
  """
  own = () if axis is None else tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  extra = {len(p.scale) - (len(own) if p.step_scale is None else len(p.step_scale)) for p in pairs}
  if len(extra) != 1 or (m := extra.pop()) <= 0:
    return axis
  shapes = f'weight {pairs[0].kernel}, scale {pairs[0].scale}'
  if any(p.kernel is None for p in pairs):
    raise Unreadable(f'is stacked ({shapes}), and its kernel is not where its scale says.')
  ranks = [len(p.kernel) for p in pairs if p.kernel is not None]
  found = _readings(own, pairs, m)
  readings = {kept for kept, _, _ in found}
  if len(readings) == 1 and None not in (only := next(iter(readings))):
    spec = _spec(only, ranks, found[0][1])
    if spec is None:  # a wrapper's weights of several ranks that no one axis keeps
      raise Unreadable(f'is stacked ({shapes}), its weights kept at axes {only}.')
    return spec
  if len(readings) > 1:
    ways: dict[str, list[str]] = {}  # each stacking index (nesting), inner first -> its kept axes
    for kept, signs, nesting in found:
      spec = None if None in kept else _spec(kept, ranks, signs)
      ways.setdefault(str(spec), []).append(str(nesting[0] if len(nesting) == 1 else nesting))
    told = '; '.join(
      f'{"no kept axes (restack it)" if spec == "None" else spec} if stacked at index '
      f'{" or ".join(at)}'
      for spec, at in ways.items()
    )
    raise Unreadable(
      f'is stacked ({shapes}), and its shapes fit several stackings (variable_axes / '
      f'out_axes), whose kept axes differ, as some sizes coincide with the stack length: '
      f'{told}.'
    )
  raise Unreadable(
    f'is stacked ({shapes}) along a middle axis, or along first and last axes mixed: its '
    f'scale is then not its kernel along any kept axes, which no axis describes. Stack it '
    f"along the first axes (variable_axes={{'params': 0}}, out_axes=0) or the last (-1).",
    given=False,
  )


def read_axes(
  layers: dict[str, tuple[_axes.Axis, list[Pair]]], stacked: Mapping[str, Any] | None, fix: str
) -> dict[str, Any]:
  """``layer_axes``' result: each layer's :func:`stacked_axis`, ``stacked`` (the user's, by
  path) where given. Every layer whose shapes do not say its axes is refused at once, named;
  ``fix`` (formatted with an example ``path``) says how to give them."""
  given = dict(stacked or {})
  if unknown := sorted(set(given) - set(layers)):
    raise ValueError(
      f'stacked= names {unknown}, which are not WN layers or wrappers of the model '
      f'(those are {sorted(layers)}).'
    )
  out, refused, fixable = {}, [], []
  for path in sorted(layers):
    try:
      out[path] = given[path] if path in given else stacked_axis(*layers[path])
    except Unreadable as e:
      refused.append(f'{layer_name(path)} {e}')
      fixable += [path] if e.given else []
  if refused:
    raise ValueError(' '.join(refused) + (f' {fix.format(path=fixable[0])}' if fixable else ''))
  return out


def layer_name(path: str) -> str:
  return f"layer '{path}'" if path else 'the root layer (the model itself)'


def only_reading(kernel: Shape, scale: Shape, kept: tuple[int, ...]) -> bool:
  """Whether ``scale`` beside ``kernel`` reads as kept axes ``kept`` only, with nothing known
  of how the layer was built: no stacking of a layer keeping fewer axes reads otherwise (a
  middle-axis stack ``(in, layers, out)`` / ``(out, layers)`` fits kept axes ``(0, 1)`` in
  order when ``in == out``).

  >>> only_reading((3, 4, 5), (4, 5), (1, 2)), only_reading((4, 3, 4), (4, 3), (0, 1))
  (True, False)
  """
  found = set()
  for m in range(1, len(scale) + 1):
    for own in itertools.combinations(range(len(kernel) - m), len(scale) - m):
      pairs = [Pair(kernel, scale)]
      found |= {kept for kept, _, _ in _readings(own, pairs, m)}
  return found <= {(kept,)}


def _readings(own: tuple, pairs: list[Pair], m: int) -> list[tuple[tuple, tuple, tuple]]:
  """For each nesting of ``m`` insertion indices that turns every pair's one-layer shapes
  into its stored ones: the kept axes of every stored kernel (``None`` for one whose scale no
  kept axes describe), the first one's signs (:func:`_reading`) and the nesting."""
  rank = min(len(p.scale) for p in pairs) - m  # the scale's rank, one layer's
  indices = [*range(rank + m), *range(-1, -rank - m - 1, -1)]
  out = []
  for nesting in itertools.product(indices, repeat=m):
    kept = [_reading(own, p, nesting) for p in pairs]
    if all(k is not False for k in kept):
      out.append((tuple(k[0] for k in kept), kept[0][1], nesting))
  return out


def _reading(own: tuple, p: Pair, nesting: tuple[int, ...]) -> Any:
  """The kept axes of ``p``'s stored kernel if ``nesting`` stacks it so (``None`` where no
  kept axes describe its scale), and whether each is counted from the end as the layer's
  ``axis`` and the stacking index count it; else ``False``."""
  assert p.kernel is not None
  n = len(p.kernel) - len(nesting)
  if p.step_kernel is not None and len(p.step_kernel) != n:
    return False
  kept = _axes.kept_axes(n, own)
  kernel: Labels = tuple(('k', i) for i in range(n))
  scale: Labels = tuple(('k', i) for i in kept)
  for j, index in enumerate(nesting):
    if not (-len(scale) - 1 <= index <= len(scale)):  # the transform inserts into every leaf
      return False
    kernel, scale = _insert(kernel, index, j), _insert(scale, index, j)
  sizes = _sizes(kernel, p.kernel, p.step_kernel)
  if sizes is None or tuple(sizes[label] for label in scale) != p.scale:
    return False
  if p.step_scale is not None and p.step_scale != tuple(sizes[('k', i)] for i in kept):
    return False
  where = [kernel.index(label) for label in scale]
  if where != sorted(where):
    return None, ()
  negative = {a % n: a < 0 for a in own}  # count each axis as the layer and the stack did
  signs = tuple(negative[i] if kind == 'k' else nesting[i] < 0 for kind, i in scale)
  return tuple(where), signs


def _insert(labels: Labels, index: int, j: int) -> Labels:
  at = index if index >= 0 else len(labels) + 1 + index
  return (*labels[:at], ('L', j), *labels[at:])


def _sizes(labels: Labels, stored: Shape, step: Shape | None) -> dict | None:
  """Each label's size in ``stored``; ``None`` if one layer's (``step``) disagrees."""
  sizes = dict(zip(labels, stored))
  if step is not None and tuple(sizes[('k', i)] for i in range(len(step))) != step:
    return None
  return sizes


def _spec(kept: tuple, ranks: list[int], signs: tuple) -> Any:
  """One ``axis`` for every pair's kept axes (``kept``, one tuple per pair; ``ranks``: their
  kernels'), each axis counted from the start or from the end (as ``signs`` says, first);
  ``None`` if none fits all."""
  for flags in (signs, *itertools.product((False, True), repeat=len(kept[0]))):
    spec = tuple(a - ranks[0] if neg else a for a, neg in zip(kept[0], flags))
    if all(_axes.kept_axes(r, spec) == k for r, k in zip(ranks, kept)):
      return spec
  return None
