"""PyTorch conv layer arguments as Flax's."""

from __future__ import annotations

from typing import Any

from wn_jax.pytorch._kinds import KINDS
from wn_jax.pytorch._state_dict import _error


def _tuple(x: Any, n: int) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


_PADDING_MODES = {'reflect': 'REFLECT', 'circular': 'CIRCULAR'}


def _padding_mode(kind: str, padding: Any, mode: str, k: tuple, d: tuple) -> Any:
  """Flax's ``'REFLECT'`` / ``'CIRCULAR'`` padding for PyTorch's ``padding_mode``, if it is the same."""
  if mode not in _PADDING_MODES:
    hint = " (pad the input with jnp.pad(x, ..., mode='edge') and use padding=0)"
    raise _error(
      f'conv_kwargs: padding_mode={mode!r} has no Flax equivalent'
      f'{hint if mode == "replicate" else ""}; Flax pads with zeros, reflect or circular.'
    )
  dilated = [di * (ki - 1) + 1 for ki, di in zip(k, d)]
  same = [((kd - 1) // 2, kd // 2) for kd in dilated]  # what Flax pads for REFLECT/CIRCULAR
  if not isinstance(padding, str) and not any(_tuple(padding, len(k))):
    return tuple((0, 0) for _ in k)  # no padding: its mode does not matter
  if isinstance(padding, str):
    if padding.lower() == 'same':
      return _PADDING_MODES[mode]
    return 'VALID'
  asked = [(p, p) for p in _tuple(padding, len(k))]
  if asked != same:
    raise _error(
      f'conv_kwargs: {kind} with padding_mode={mode!r} pads {asked}, but Flax pads '
      f'{_PADDING_MODES[mode]!r} as {same} (half the dilated kernel): no Flax equivalent; '
      f'pad the input with jnp.pad(x, ..., mode={mode!r}) and use padding=0.'
    )
  return _PADDING_MODES[mode]


def refuse_groups(where: str, kind: str | None, args: dict[str, Any]) -> None:
  """A ``ValueError`` for a grouped PyTorch ConvTranspose (``args``: its arguments, as read from
  the module): Flax's ConvTranspose has no groups, so its weight is no kernel of a Flax layer."""
  groups = args.get('groups', 1)
  if kind is not None and kind.startswith('ConvTranspose') and groups != 1:
    raise _error(
      f"{where}: Flax's ConvTranspose has no groups, and PyTorch's {kind} has groups={groups}: "
      'only groups=1 converts (its weight, (in, out/groups, *k), fits no Flax layer). Build '
      'this layer by hand, one Flax ConvTranspose per group on its slice of the channels.'
    )


def _transpose_padding(
  k: tuple[int, ...], d: tuple[int, ...], padding: Any, output_padding: Any, mode: str
) -> tuple[tuple[int, int], ...]:
  """Flax's explicit padding for a PyTorch ConvTranspose (zeros only)."""
  if isinstance(padding, str):
    raise _error('conv_kwargs: PyTorch ConvTranspose takes integer padding only.')
  if mode != 'zeros':
    raise _error(f'conv_kwargs: a ConvTranspose pads with zeros only; got {mode!r}.')
  p, op = _tuple(padding, len(k)), _tuple(output_padding, len(k))
  return tuple((di * (ki - 1) - pi, di * (ki - 1) - pi + oi) for ki, di, pi, oi in zip(k, d, p, op))


def _conv_padding(
  kind: str, k: tuple[int, ...], d: tuple[int, ...], padding: Any, output_padding: Any, mode: str
) -> Any:
  """Flax's padding for a PyTorch Conv: explicit pairs, ``'SAME'`` / ``'VALID'`` or a mode."""
  n = len(k)
  if any(_tuple(output_padding, n)):
    raise _error(
      f'conv_kwargs: output_padding={output_padding!r} is an argument of a ConvTranspose, '
      f"which {kind} is not. A ConvTranspose whose weight shape looks like a Conv's converts "
      f"with kinds={{prefix: 'ConvTranspose{n}d'}}, or from the torch module itself."
    )
  if mode != 'zeros':
    return _padding_mode(kind, padding, mode, k, d)
  if isinstance(padding, str):
    if padding.lower() not in ('same', 'valid'):
      raise _error(f'conv_kwargs: unknown padding {padding!r}.')
    return padding.upper()
  return tuple((pi, pi) for pi in _tuple(padding, n))


def conv_kwargs(
  kind: str,
  kernel_size: int | tuple[int, ...],
  *,
  stride: int | tuple[int, ...] = 1,
  padding: int | tuple[int, ...] | str = 0,
  dilation: int | tuple[int, ...] = 1,
  groups: int = 1,
  output_padding: int | tuple[int, ...] = 0,
  padding_mode: str = 'zeros',
) -> dict[str, Any]:
  """The Flax ``WNConv`` / ``WNConvTranspose`` arguments of a PyTorch conv layer.

  Args:
    kind: ``'Conv1d'`` ... ``'ConvTranspose3d'``.
    kernel_size: PyTorch's.
    stride: PyTorch's.
    padding: PyTorch's (ints, or ``'same'`` / ``'valid'`` for Conv).
    dilation: PyTorch's.
    groups: PyTorch's (Conv only; ConvTranspose takes 1).
    output_padding: PyTorch's (ConvTranspose only: a Conv refuses it, since a
      ConvTranspose mistaken for a Conv would otherwise compute silently wrong).
    padding_mode: PyTorch's: ``'zeros'``; for Conv also ``'reflect'`` / ``'circular'``
      where they pad half the dilated kernel on each side (Flax's ``'REFLECT'`` /
      ``'CIRCULAR'``); other cases, and ``'replicate'``, raise.

  Returns:
    ``kernel_size``, ``strides``, ``padding``, ``kernel_dilation`` and, for Conv,
    ``feature_group_count``, for ConvTranspose ``transpose_kernel=True``.

  Examples:
    >>> conv_kwargs('ConvTranspose1d', 16, stride=8, padding=4)
    {'kernel_size': (16,), 'strides': (8,), 'padding': ((11, 11),), 'kernel_dilation': (1,), 'transpose_kernel': True}
    >>> conv_kwargs('Conv1d', 3, padding=1, padding_mode='reflect')['padding']
    'REFLECT'
  """
  if kind not in KINDS or kind == 'Linear':
    raise _error(f'conv_kwargs: unknown conv kind {kind!r}; expected one of {KINDS[1:]}.')
  n = int(kind[-2])
  k, s, d = _tuple(kernel_size, n), _tuple(stride, n), _tuple(dilation, n)
  out: dict[str, Any] = {'kernel_size': k, 'strides': s}
  if kind.startswith('ConvTranspose'):
    refuse_groups('conv_kwargs', kind, {'groups': groups})
    out['padding'] = _transpose_padding(k, d, padding, output_padding, padding_mode)
    out['kernel_dilation'] = d
    out['transpose_kernel'] = True
  else:
    out['padding'] = _conv_padding(kind, k, d, padding, output_padding, padding_mode)
    out['kernel_dilation'] = d
    out['feature_group_count'] = groups
  return out
