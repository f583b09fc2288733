"""Error labels: internal helpers raise plain messages, a public entry point adds its name once."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType


class labelled(contextlib.ContextDecorator):
  """Prefixes ``label: `` to a ``ValueError`` raised inside (once: not to one that starts with
  it): a ``with`` block, or a decorated public function.

  It costs well under a microsecond, so eager calls of the layers pay nothing for it.

  >>> with labelled('wn_jax.norm'):
  ...   raise ValueError('axis 3 is out of range.')
  Traceback (most recent call last):
  ValueError: wn_jax.norm: axis 3 is out of range.
  """

  def __init__(self, label: object):  # a str, or a later(...)
    self.label = label

  def __enter__(self) -> None:
    return None

  def __exit__(
    self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
  ) -> None:
    if kind is not None and issubclass(kind, ValueError):
      label = str(self.label)
      if not str(error).startswith(f'{label}: '):  # named already (a check under a vmap)
        # The traceback kept: it shows where the error came from (a user's where= callable).
        raise ValueError(f'{label}: {error}').with_traceback(tb) from None


class later:  # noqa: N801 (used as a function: later(f))
  """A label made only when a message needs it: ``str(later(f))`` is ``f()``. An eager call
  of a WN layer names the layer (its class, kernel shape, path) for errors it rarely raises:
  formatting that eagerly cost each call more than 5% of an ``nnx.Linear`` call.

  >>> with labelled(later(lambda: 'WNDense')):
  ...   raise ValueError('a bad axis.')
  Traceback (most recent call last):
  ValueError: WNDense: a bad axis.
  """

  __slots__ = ('_make',)

  def __init__(self, make: Callable[[], str]):
    self._make = make

  def __str__(self) -> str:
    return self._make()


def type_name(value: object) -> str:
  """``value``'s class as an error message names it (``flax.nnx.statelib.State``), with its
  shape where it has one."""
  shape = f' of shape {tuple(value.shape)}' if hasattr(value, 'shape') else ''  # type: ignore[attr-defined]
  return f'{type(value).__module__}.{type(value).__qualname__}{shape}'


def require(ok: bool, label: str, expected: str, value: object, fix: str) -> None:
  """A ``TypeError`` unless ``ok``: ``label: expected <expected>; got <value's type>. <fix>``."""
  if not ok:
    raise TypeError(f'{label}: expected {expected}; got {type_name(value)}. {fix}')
