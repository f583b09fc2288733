"""The converted tree against the Flax model's own (a template, or a twin's variables): every
name and shape, and a hint at the fix for each kind of misfit."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from collections.abc import Container
from collections.abc import Iterable
from typing import Any

from wn_jax.pytorch._kinds import KINDS
from wn_jax.pytorch._layer import TorchLayer
from wn_jax.pytorch._naming import _flatten
from wn_jax.pytorch._naming import _path
from wn_jax.pytorch._naming import _rng_state
from wn_jax.pytorch._state_dict import _error


def _channels_first(
  inputs: Any, bad: list[tuple[str, ...]], got: dict[Any, Any], want: dict[Any, Any]
) -> list[tuple[int, ...]]:
  """The shapes of the twin's inputs that look channels-first: ``(N, C, ..., L)`` where a
  mismatched tensor has ``C`` input features in the converted tree and ``L`` in the twin's
  (a kernel's ``in`` axis, -2 in Flax layout; a 1-D tensor's only axis, as a norm's)."""
  found = []
  for x in inputs or ():
    shape = tuple(getattr(x, 'shape', ()))
    if len(shape) < 3 or shape[1] == shape[-1]:
      continue
    for p in bad:
      c, t = got[p], want[p]
      i = -2 if len(c) > 1 else -1
      if len(c) == len(t) and c and (c[i], t[i]) == (shape[1], shape[-1]):
        found.append(shape)
        break
  return found


@dataclasses.dataclass(frozen=True)
class _Fit:
  """The converted tree against the template: their shapes by path, and how they differ."""

  got: dict[tuple[str, ...], tuple[int, ...]]  # the converted tree's shapes
  want: dict[tuple[str, ...], tuple[int, ...]]  # the template's
  scales: dict[tuple[str, ...], TorchLayer]  # each WN layer's scale path: its layer
  spatial: list[tuple[int, ...]]  # the twin's inputs that look channels-first

  @property
  def missing(self) -> list[str]:
    return sorted('/'.join(p) for p in self.want if p not in self.got)

  @property
  def unexpected(self) -> list[str]:
    return sorted('/'.join(p) for p in self.got if p not in self.want)

  @property
  def bad(self) -> list[tuple[str, ...]]:
    return sorted(p for p in self.got if p in self.want and self.got[p] != self.want[p])

  @property
  def permuted(self) -> list[tuple[str, ...]]:
    """Mismatched plain tensors whose shape permutes the template's: a layout mix-up."""
    return [
      p for p in self.bad if p not in self.scales and sorted(self.got[p]) == sorted(self.want[p])
    ]

  @property
  def resized(self) -> list[str]:
    """Layers (modules with a kernel) whose kernel, scale or bias has another shape."""
    return sorted({'/'.join(p[:-1]) for p in self.bad if (*p[:-1], 'kernel') in self.got})

  @property
  def bias_off(self) -> tuple[list[str], list[str]]:
    """(layers whose bias the template has and the converted tree lacks, and the reverse),
    of modules both hold."""
    held = {p[:-1] for p in self.got} & {p[:-1] for p in self.want}

    def biases(paths: Iterable[tuple[str, ...]], other: Container[tuple[str, ...]]) -> list[str]:
      return sorted(
        '/'.join(p[:-1]) for p in paths if p not in other and p[-1] == 'bias' and p[:-1] in held
      )

    return biases(self.want, self.got), biases(self.got, self.want)

  @property
  def undecomposed(self) -> list[str]:
    """Modules the template builds as WN layers (a kernel and a scale) that PyTorch holds plain
    (the converted tree has their kernel, no scale): ``decompose=`` converts them."""
    return sorted(
      '/'.join(p[:-1])
      for p in self.want
      if p[-1] == 'scale' and p not in self.got and (*p[:-1], 'kernel') in self.got
    )

  @property
  def plain(self) -> list[str]:
    """Modules PyTorch weight-normed that the template builds as plain layers (it holds
    the module, but not its scale)."""
    wn = {p[:-1] for p in self.scales}
    held = {w[:-1] for w in self.want}
    return sorted(
      {'/'.join(u[:-1]) for u in self.scales if u not in self.want and u[:-1] in wn & held}
    )


def _fit(
  flat: dict[tuple[Any, ...], Any],
  template: Any,
  layers: dict[str, TorchLayer],
  naming: str,
  inputs: Any,
  move: Callable[[tuple[Any, ...]], tuple[Any, ...]] = tuple,
) -> _Fit:
  """The shapes of ``flat`` and ``template`` by path, a linen params tree read as one
  (``move``: a converted path as the template has it, as :func:`_check_twin_layers`)."""
  got = {tuple(map(str, p)): tuple(v.shape) for p, v in flat.items()}
  template_flat = _flatten(template)
  rng = _rng_state(template_flat)  # no torch tensor: not missing
  want = {p: tuple(getattr(v, 'shape', ())) for p, v in template_flat.items() if p not in rng}
  scales = {
    tuple(map(str, move(_path(p, 'scale', 'params', naming)))): x
    for p, x in layers.items()
    if x.kind in KINDS
  }
  if want and all(p[0] != 'params' for p in want) and all(p[0] == 'params' for p in got):
    got = {p[1:]: s for p, s in got.items()}  # a linen params tree, not variables
    scales = {p[1:]: x for p, x in scales.items()}
  bad = sorted(p for p in got if p in want and got[p] != want[p])
  return _Fit(got, want, scales, _channels_first(inputs, bad, got, want))


def _axis_hints(fit: _Fit) -> list[str]:
  """A WN layer's scale off with its kernel right: the axis PyTorch's ``dim`` means."""
  return [
    f'build {"/".join(p[:-1])!r} with axis={fit.scales[p].axis} (PyTorch weight-normed it '
    f'with dim={fit.scales[p].dim})'
    for p in fit.bad
    if p in fit.scales and (*p[:-1], 'kernel') not in fit.bad
  ]


def _size_hints(fit: _Fit) -> list[str]:
  """A layer of another size, or with a bias on one side only."""
  lacking, extra = fit.bias_off
  hints = []
  if fit.resized and not fit.spatial:
    hints.append(
      f'{", ".join(map(repr, fit.resized))}: another size in the twin than in PyTorch: build '
      "with PyTorch's features / kernel_size / channels (the shapes above; kernels in Flax "
      'layout (*window, in, out))'
    )
  hints += [f"build {m!r} with use_bias=False: PyTorch's has no bias" for m in lacking]
  hints += [f"build {m!r} with use_bias=True: PyTorch's has a bias" for m in extra]
  return hints


def _layout_hints(fit: _Fit) -> list[str]:
  """A shape off by a layout: the twin's inputs channels-first, or a permuted tensor."""
  if fit.bad and fit.spatial:
    return [
      "the twin's inputs must be channels-last, Flax's layout (N, ..., C): a PyTorch "
      f'(N, C, ...) input x is np.moveaxis(x, 1, -1) (the twin got '
      f'{", ".join(map(str, fit.spatial))})'
    ]
  if fit.permuted:
    return [
      f"{', '.join('/'.join(p) for p in fit.permuted)}: a permutation of the template's shape, "
      'so a layout mix-up: the converted values are in Flax layout (kernels (*window, in, out)); '
      'a tensor of a layout of its own takes rules='
    ]
  return []


def _plain_hints(fit: _Fit) -> list[str]:
  """A layer PyTorch weight-normed, plain in the template: build it as a WN layer."""
  if not fit.plain:
    return []
  return [
    f'build {", ".join(map(repr, fit.plain))} with a WN layer (WNDense / WNConv / '
    'WNConvTranspose(transpose_kernel=True) in linen, WNLinear / WNConv / WNConvTranspose in '
    'NNX), with the axis layer_axes gives: PyTorch weight-normed it, its scale is g'
  ]


def _decompose_hints(fit: _Fit) -> list[str]:
  """A WN layer in the template where PyTorch's is plain: ``decompose=``."""
  if not fit.undecomposed:
    return []
  return [
    f'{", ".join(map(repr, fit.undecomposed))}: a WN layer in the template, plain in PyTorch (no '
    'weight norm, as after remove_weight_norm): convert with decompose=True (or a regex '
    "re.search'ed in the torch prefixes), which gives each v = w and g = ||w||"
  ]


def _name_hints(fit: _Fit, unsaved: Container[str]) -> list[str]:
  """Paths missing or unexpected: buffers torch does not save, the collection, the submodule
  names, ``drop=``."""
  lacking, extra = fit.bias_off
  explained = {f'{m}/bias' for m in lacking + extra} | {f'{m}/scale' for m in fit.undecomposed}
  held_back = [m for m in fit.missing if m in unsaved]
  missing = [m for m in fit.missing if m not in explained and m not in held_back]
  unexpected = [u for u in fit.unexpected if u not in explained]
  hints = []
  if held_back:
    hints.append(
      f'{held_back}: torch buffers registered with persistent=False, which its state dict '
      'lacks: convert without twin= / template= and set them by hand (or register them '
      'persistent)'
    )
  if any(m.split('/', 1)[-1] == u.split('/', 1)[-1] for m in missing for u in unexpected):
    hints.append(
      "put each tensor in the template's collection (torch buffers go to buffers=, "
      "'buffers' by default, read from a module or marked by buffer_keys=)"
    )
  if unexpected and any(re.search(r'(^|/)layers(_\d+)?/', m) for m in missing):
    hints.append(
      "a torch nn.Sequential's child i is a Flax Sequential's layers_i (linen) / layers i "
      '(NNX): keep its layers without parameters (activations) in the Flax Sequential too, so '
      'that the indices agree'
    )
  automatic = _automatic_names(missing) if unexpected else []
  if automatic:
    hints.append(
      f"{automatic} are Flax's own names for layers built in @nn.compact without a name (an "
      "nn.Sequential's layers too, when the Sequential is built there): pass each its torch "
      "name, WNDense(8, name='net_0'), or assign the Sequential in setup (self.net = "
      'nn.Sequential([...]))'
    )
  elif (missing or unexpected) and not fit.plain:
    hints.append('name Flax submodules as the PyTorch ones (lists in setup / nnx.List)')
  hints += _dict_hints(missing, unexpected)
  if unexpected and not fit.plain:
    hints.append(
      'leave out tensors the Flax model does not hold with drop=<regex> (to_torch brings '
      'them back from like)'
    )
  return hints


def _dict_hints(missing: list[str], unexpected: list[str]) -> list[str]:
  """A torch ``nn.ModuleDict``'s ``blocks/a`` where linen's dict in ``setup`` is ``blocks_a``."""
  flat = lambda p: (p.split('/')[0], '_'.join(p.split('/')[1:-1]), p.split('/')[-1])
  pairs = [(u, m) for u in unexpected for m in missing if u.count('/') > m.count('/')]
  pairs = [(u, m) for u, m in pairs if flat(u) == flat(m)]
  if not pairs:
    return []
  (u, m) = pairs[0]
  module = lambda p: p.split('/')[1:-1]
  same = next(i for i, (a, b) in enumerate(zip(module(u), module(m) + [''])) if a != b)
  parent = module(u)[same]  # where the two part: torch's nesting, linen's joined name
  return [
    f"torch's {'/'.join(module(u))!r} (an nn.ModuleDict's child, or a nested module) is "
    f'{"/".join(module(m))!r} here, as linen names a dict of submodules assigned in setup: '
    f'hold them in a submodule named {parent!r}, or name the Flax module as torch nests it'
  ]


def _automatic_names(paths: Iterable[str]) -> list[str]:
  """The module names in ``paths`` that linen made up (``ClassName_i``), sorted."""
  names = {m for p in paths for m in p.split('/') if re.fullmatch(r'[A-Z]\w*_\d+', m)}
  return sorted(names)


def _rules_hints(fit: _Fit) -> list[str]:
  """A plain tensor's shape off with no layout to blame: ``rules=``."""
  resized = set(fit.resized)
  others = [p for p in fit.bad if p not in fit.scales and '/'.join(p[:-1]) not in resized]
  if others and not fit.spatial and not fit.permuted:
    return ['pass rules= for tensors of a layout of their own']
  return []


def _check(
  flat: dict[tuple[Any, ...], Any],
  template: Any,
  layers: dict[str, TorchLayer],
  naming: str,
  inputs: Any = None,
  move: Callable[[tuple[Any, ...]], tuple[Any, ...]] = tuple,
  unsaved: Container[str] = (),
  wrapped: str = '',
) -> None:
  """Every name and shape of the converted tree against the Flax model's own (``unsaved``:
  the paths of torch buffers registered ``persistent=False``, which no state dict holds;
  ``wrapped``: the hint for a state dict saved from a torch wrapper, or ``''``)."""
  fit = _fit(flat, template, layers, naming, inputs, move)
  missing, unexpected, bad = fit.missing, fit.unexpected, fit.bad
  shapes = [f'{"/".join(p)}: {fit.got[p]} vs {fit.want[p]}' for p in bad]
  if not (missing or unexpected or shapes):
    return
  hints = [
    *([wrapped] if wrapped and (missing or unexpected) else []),
    *_axis_hints(fit),
    *_size_hints(fit),
    *_layout_hints(fit),
    *_plain_hints(fit),
    *_decompose_hints(fit),
    *_name_hints(fit, unsaved),
    *_rules_hints(fit),
  ]
  raise _error(
    'the converted tree does not fit the template: '
    f'missing {missing}, unexpected {unexpected}, shapes (converted vs template) {shapes}. '
    f'Fix: {"; ".join(hints)}.'
  )
