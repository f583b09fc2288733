"""A twin conv's arguments against PyTorch's layer's (stride, padding, dilation, groups), for
:mod:`wn_jax.pytorch._twin`'s checks of the weight-normed and the plain convs."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from wn_jax.pytorch._conv import conv_kwargs
from wn_jax.pytorch._state_dict import _error

# The conv arguments the twin's layer must share with PyTorch's (conv_kwargs gives them).
CONV_ARGS = ('strides', 'padding', 'kernel_dilation', 'feature_group_count', 'input_dilation')


def _conv_args_off(
  kind: str, args: dict[str, Any], window: tuple[int, ...], conv: dict[str, Any]
) -> dict[str, str]:
  """``{name: 'name=twin's (PyTorch: ...)'}`` for each argument in ``conv``, the twin layer's,
  that differs from PyTorch's layer (``kind``, its ``args`` as read from the module, its
  kernel's ``window``; a state dict tells no args). Paddings are compared as the pairs they
  pad where the kernel and strides fix them (``'SAME'``, ``'VALID'``, ints)."""
  if not args or not conv or kind == 'Linear':
    return {}
  transpose = kind.startswith('ConvTranspose')
  try:
    want, padded = conv_kwargs(kind, window, **args), ''
  except ValueError:  # a padding no Flax layer does: the model must pad its input itself
    try:
      want = conv_kwargs(kind, window, **{**args, 'padding': 0, 'padding_mode': 'zeros'})
    except ValueError:
      return {}
    padded = f', which no Flax padding does ({args.get("padding_mode")} padding)'
  n = len(window)
  strides, dilation = _per_axis(want['strides'], n), _per_axis(want['kernel_dilation'], n)
  dilated = tuple(d * (k - 1) + 1 for k, d in zip(window, dilation))
  off = {}
  for name in CONV_ARGS:
    if name not in conv:
      continue
    have, need = conv[name], want.get(name)
    if name == 'padding':
      have_n = _padding(have, dilated, strides, transpose)
      need = _padding(need, dilated, strides, transpose)
    elif name == 'feature_group_count':
      have_n, need = int(have), 1 if need is None else int(need)
    else:
      have_n, need = _per_axis(have, n), _per_axis(need, n)
    if have_n != need:
      torch_side = (
        f'{args.get("padding")!r}{padded}' if name == 'padding' and padded else repr(need)
      )
      off[name] = f'{name}={have!r} (PyTorch: {torch_side})'
  return off


def _per_axis(value: Any, n: int) -> tuple[int, ...]:
  """Strides or a dilation as one int per axis (``None``: 1)."""
  return (1,) * n if value is None else tuple(int(x) for x in np.broadcast_to(value, (n,)))


def _padding(
  value: Any, dilated: tuple[int, ...], strides: tuple[int, ...], transpose: bool
) -> Any:
  """A Flax padding as the pairs it pads (``dilated``: the dilated kernel), where the kernel
  and strides fix them; else its name (``'SAME'`` of a strided Conv depends on the input)."""
  n = len(dilated)
  if not isinstance(value, str):
    if isinstance(value, int):
      return ((value, value),) * n
    return tuple((int(p), int(p)) if isinstance(p, int) else tuple(map(int, p)) for p in value)
  name = value.upper()
  if transpose and name in ('SAME', 'VALID'):  # lax.conv_transpose's pads
    pairs = []
    for k, s in zip(dilated, strides):
      if name == 'SAME':
        total, before = k + s - 2, k - 1 if s > k - 1 else -(-(k + s - 2) // 2)
      else:
        total, before = k + s - 2 + max(k - s, 0), k - 1
      pairs.append((before, total - before))
    return tuple(pairs)
  if transpose:
    return name
  if name == 'VALID' or (name in ('REFLECT', 'CIRCULAR') and set(dilated) == {1}):
    return ((0, 0),) * n
  if name == 'CAUSAL':
    return tuple((k - 1, 0) for k in dilated)
  if name in ('SAME', 'SAME_LOWER') and all(s == 1 or k == 1 for k, s in zip(dilated, strides)):
    half = [(k - 1) // 2 for k in dilated]  # the smaller half
    lower = name == 'SAME_LOWER'
    return tuple((k - 1 - h, h) if lower else (h, k - 1 - h) for k, h in zip(dilated, half))
  return name


def _refuse_conv_args(
  where: tuple[str, ...], prefix: str, twin: Any, off: Mapping[str, str]
) -> None:
  """Raises for ``off``, the twin conv's arguments at ``where`` that differ from ``prefix``'s;
  warns for a padding alone, which a model may do around the conv itself."""
  at = f"{'/'.join(where)!r}: the twin's {twin.name} has"
  build = f"build it with conv_kwargs of PyTorch's {prefix!r} (TorchLayer.linen / .nnx do)"
  others = [text for name, text in off.items() if name != 'padding']
  if others:
    raise _error(f"{at} {', '.join(others)}: {build}, which computes as PyTorch's does.")
  if 'padding' in off:
    warnings.warn(
      f'wn_jax.pytorch: {at} {off["padding"]}. Right where the model pads around the conv '
      'itself (F.pad before it, a slice after it, jnp.pad in the twin); else the outputs '
      f'differ: {build}.',
      UserWarning,
      stacklevel=5,
    )
