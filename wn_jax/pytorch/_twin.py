"""The Flax model's own tree and axes, checked against a converted one."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from collections.abc import Container
from collections.abc import Iterable
from typing import Any

import numpy as np

from wn_jax.pytorch._kinds import KINDS
from wn_jax.pytorch._layer import TorchLayer
from wn_jax.pytorch._naming import _flatten
from wn_jax.pytorch._naming import _path
from wn_jax.pytorch._naming import _rng_state
from wn_jax.pytorch._state_dict import _error
from wn_jax.pytorch._twin_conv import CONV_ARGS
from wn_jax.pytorch._twin_conv import _conv_args_off
from wn_jax.pytorch._twin_conv import _refuse_conv_args


@dataclasses.dataclass(frozen=True)
class _TwinLayer:
  """What the twin's WN layer at a path fixes beyond its shapes."""

  axis: Any  # its kept axis
  kind: str  # 'Dense', 'Conv', 'ConvTranspose' (PyTorch's kernel layout) or 'Flax ConvTranspose'
  name: str  # its class, as the error names it
  conv: dict[str, Any] = dataclasses.field(default_factory=dict)  # strides, padding, ...
  weight_normed: bool = True  # a WN layer (else a plain Flax conv: only conv is read)


# PyTorch's layers by the Flax layer that computes as they do, for the errors.
_BUILD = {
  'Dense': 'WNDense (linen) / WNLinear (NNX)',
  'Conv': 'WNConv',
  'ConvTranspose': 'WNConvTranspose with transpose_kernel=True',
}


def _twin_layer(layer: Any, conv: type, conv_transpose: type) -> _TwinLayer:
  """The twin's WN ``layer`` (``conv``, ``conv_transpose``: linen's or NNX's classes)."""
  axis, name = layer.axis, type(layer).__name__
  args = _conv_config(layer)
  if isinstance(layer, conv_transpose):
    if getattr(layer, 'transpose_kernel', False):
      return _TwinLayer(axis, 'ConvTranspose', name, args)
    return _TwinLayer(axis, 'Flax ConvTranspose', f'{name} with transpose_kernel=False', args)
  if isinstance(layer, conv):
    return _TwinLayer(axis, 'Conv', name, args)
  return _TwinLayer(axis, 'Dense', name)


def _conv_config(layer: Any) -> dict[str, Any]:
  return {k: getattr(layer, k) for k in CONV_ARGS if hasattr(layer, k)}


def _plain_conv(layer: Any, transpose: bool) -> _TwinLayer:
  """The twin's plain Flax conv ``layer`` (``transpose``: a ConvTranspose): its kind and
  conv arguments."""
  name, kind = type(layer).__name__, 'ConvTranspose' if transpose else 'Conv'
  if transpose and not getattr(layer, 'transpose_kernel', False):
    name, kind = f'{name} with transpose_kernel=False', 'Flax ConvTranspose'
  return _TwinLayer(None, kind, name, _conv_config(layer), weight_normed=False)


def _torch_kind(kind: str) -> str:
  """The ``_TwinLayer.kind`` that computes as PyTorch's layer ``kind`` does."""
  if kind == 'Linear':
    return 'Dense'
  return 'ConvTranspose' if kind.startswith('ConvTranspose') else 'Conv'


def _twin(twin: Any, naming: str) -> tuple[Any, dict[tuple[str, ...], _TwinLayer]]:
  """(the twin's variables, for the template; its WN layers by module path)."""
  return _nnx_twin(twin) if naming == 'nnx' else _linen_twin(twin)


def _nnx_twin(twin: Any) -> tuple[Any, dict[tuple[str, ...], _TwinLayer]]:
  """An NNX model's state and its WN layers, by module path."""
  from flax import nnx

  from wn_jax.nnx._layers import WNConv
  from wn_jax.nnx._layers import WNConvTranspose
  from wn_jax.nnx._layers import _WeightNormedKernel

  if not isinstance(twin, nnx.Module):
    raise TypeError(
      f'wn_jax.pytorch.to_nnx: twin= takes the NNX model itself; got {type(twin).__name__}.'
    )
  found = {}
  for path, m in nnx.iter_graph(twin):
    if isinstance(m, _WeightNormedKernel):
      found[tuple(map(str, path))] = _twin_layer(m, WNConv, WNConvTranspose)
    elif isinstance(m, (nnx.Conv, nnx.ConvTranspose)):
      found[tuple(map(str, path))] = _plain_conv(m, isinstance(m, nnx.ConvTranspose))
  return nnx.state(twin), found


def _linen_twin(twin: Any) -> tuple[Any, dict[tuple[str, ...], _TwinLayer]]:
  """``(module, *inputs)``: its variables from an abstract ``init``, and its WN layers."""
  import flax.linen as nn
  import jax

  from wn_jax.linen._layers import WNConv
  from wn_jax.linen._layers import WNConvTranspose
  from wn_jax.linen._layers import _WeightNormedKernel

  if not (isinstance(twin, (tuple, list)) and twin and isinstance(twin[0], nn.Module)):
    raise TypeError(
      'wn_jax.pytorch.to_linen: twin= takes (module, *inputs), the linen model and inputs '
      f'its init runs on (abstractly); got {type(twin).__name__}.'
    )
  module, *inputs = twin
  axes: dict[tuple[str, ...], _TwinLayer] = {}

  def record(call: Any, args: Any, kwargs: Any, context: Any) -> Any:
    layer = context.module
    if isinstance(layer, _WeightNormedKernel) and isinstance(layer, nn.Module):
      axes[tuple(layer.path)] = _twin_layer(layer, WNConv, WNConvTranspose)
    elif isinstance(layer, (nn.Conv, nn.ConvTranspose)):
      axes[tuple(layer.path)] = _plain_conv(layer, isinstance(layer, nn.ConvTranspose))
    return call(*args, **kwargs)

  with nn.intercept_methods(record):
    template = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return template, axes


def _kept(axis: Any, ndim: int) -> tuple[int, ...] | None:
  """An ``axis`` (int, tuple or None) as sorted non-negative axes of an ``ndim`` kernel."""
  if axis is None:
    return None
  return tuple(sorted(a % ndim for a in (axis if isinstance(axis, (tuple, list)) else (axis,))))


def _check_twin_layers(
  layers: dict[str, TorchLayer],
  found: dict[tuple[str, ...], _TwinLayer],
  naming: str,
  move: Callable[[tuple[Any, ...]], tuple[Any, ...]],
  known: set[str],
) -> None:
  """Each weight-normed layer's kind and kept axis against the twin's layer at its path
  (``move``: a converted path as the twin has it, ``nnx.Sequential``'s ``layers`` put in).
  ``known``: the layers whose kind the source tells (a module, or ``kinds=``); a bare state
  dict's rank-3 weight may be a Conv1d's or a ConvTranspose1d's, which convert alike."""
  for prefix, layer in layers.items():
    if layer.kind not in KINDS:
      continue  # no WN layer in the twin: its layout is PyTorch's
    path = move(_path(prefix, 'scale', 'params', naming))[1 if naming == 'linen' else 0 : -1]
    where = tuple(map(str, path))
    if where not in found or not found[where].weight_normed:
      continue
    twin, want = found[where], _torch_kind(layer.kind)
    guessed = prefix not in known
    if twin.kind != want and not (guessed and (want, twin.kind) == ('Conv', 'ConvTranspose')):
      build = _BUILD[want] + (f' (or a {_BUILD["ConvTranspose"]} for a ConvTranspose)' * guessed)
      raise _error(
        f"{'/'.join(where)!r}: the twin builds a {twin.name}, but PyTorch's {prefix!r} is a "
        f'{layer.kind}{" by its weight rank (no kinds= for it)" * guessed}: build that layer '
        f"as a {build}, which computes as PyTorch's does."
      )
    ndim = np.ndim(layer.params['kernel'])
    if _kept(twin.axis, ndim) != _kept(layer.axis, ndim):
      raise _error(
        f'{"/".join(where)!r}: the twin keeps axis {twin.axis}, but PyTorch weight-normed '
        f'{prefix!r} with dim={layer.dim}, which is wn_jax axis={layer.axis}: build that '
        f"layer with axis={layer.axis} (layer_axes(torch_model) gives every layer's)."
      )
    window = tuple(np.shape(layer.params['kernel'])[:-2])
    _refuse_conv_args(
      where, prefix, twin, _conv_args_off(layer.kind, layer.args, window, twin.conv)
    )


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


def _name_hints(fit: _Fit) -> list[str]:
  """Paths missing or unexpected: the collection, the submodule names, ``drop=``."""
  lacking, extra = fit.bias_off
  biases = {f'{m}/bias' for m in lacking + extra}
  missing = [m for m in fit.missing if m not in biases]
  unexpected = [u for u in fit.unexpected if u not in biases]
  hints = []
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
  if (missing or unexpected) and not fit.plain:
    hints.append('name Flax submodules as the PyTorch ones (lists in setup / nnx.List)')
  if unexpected and not fit.plain:
    hints.append(
      'leave out tensors the Flax model does not hold with drop=<regex> (to_torch brings '
      'them back from like)'
    )
  return hints


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
) -> None:
  """Every name and shape of the converted tree against the Flax model's own."""
  fit = _fit(flat, template, layers, naming, inputs, move)
  missing, unexpected, bad = fit.missing, fit.unexpected, fit.bad
  shapes = [f'{"/".join(p)}: {fit.got[p]} vs {fit.want[p]}' for p in bad]
  if not (missing or unexpected or shapes):
    return
  hints = [
    *_axis_hints(fit),
    *_size_hints(fit),
    *_layout_hints(fit),
    *_plain_hints(fit),
    *_name_hints(fit),
    *_rules_hints(fit),
  ]
  raise _error(
    'the converted tree does not fit the template: '
    f'missing {missing}, unexpected {unexpected}, shapes (converted vs template) {shapes}. '
    f'Fix: {"; ".join(hints)}.'
  )
