"""The twin: its variables (the template) and its layers (kind, kept axis, conv arguments)
checked against PyTorch's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import numpy as np

from wn_jax.pytorch._kinds import KINDS
from wn_jax.pytorch._layer import TorchLayer
from wn_jax.pytorch._naming import _path
from wn_jax.pytorch._state_dict import _error
from wn_jax.pytorch._state_dict import _key
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


def _where(
  prefix: str, naming: str, move: Callable[[tuple[Any, ...]], tuple[Any, ...]]
) -> tuple[str, ...]:
  """The twin's module path of the torch module ``prefix`` (``move``: a converted path as the
  twin has it, a Flax Sequential's names put in)."""
  path = move(_path(prefix, '_', 'params', naming))
  return tuple(map(str, path[1 if naming == 'linen' else 0 : -1]))


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
    where = _where(prefix, naming, move)
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


def _check_plain_convs(
  sd: Mapping[str, Any],
  infos: Mapping[str, Any],
  found: dict[tuple[str, ...], _TwinLayer],
  naming: str,
  move: Callable[[tuple[Any, ...]], tuple[Any, ...]],
) -> None:
  """Each plain torch conv (``infos``, from the module) against the twin's plain conv at its
  path: its kind (a ConvTranspose's ``transpose_kernel=True``) and its arguments."""
  for prefix, info in infos.items():
    weight = sd.get(_key(prefix, '.weight'))
    if info.kind not in KINDS or info.kind == 'Linear' or not info.args or weight is None:
      continue
    where = _where(prefix, naming, move)
    twin = found.get(where)
    if twin is None or twin.weight_normed:
      continue
    want = _torch_kind(info.kind)
    if twin.kind != want:
      build = 'a ConvTranspose with transpose_kernel=True' if want == 'ConvTranspose' else 'a Conv'
      raise _error(
        f"{'/'.join(where)!r}: the twin builds a {twin.name}, but PyTorch's {prefix!r} is a "
        f"{info.kind}: build it as {build}, which computes as PyTorch's does."
      )
    off = _conv_args_off(info.kind, info.args, tuple(np.shape(weight)[2:]), twin.conv)
    _refuse_conv_args(where, prefix, twin, off)
