"""Griffe extension: docstrings as Python has them, Sphinx roles as mkdocs-autorefs links.

Griffe reads docstrings from the source. Where the module rewrites a docstring at import time
(``f.__doc__ = f.__doc__.format(...)``), the page shows the runtime docstring, as ``help()`` does.

Docstrings say :func:`normalize` or :class:`wn_jax.WeightNormed` (readable in ``help()``). At
docs build time each role becomes a Markdown autoref, ``[`normalize`][wn_jax._core.normalize]``,
resolved in the scope of the object whose docstring holds it. Names outside wn_jax (``flax...``)
have no page here and stay inline code. A wn_jax name that resolves nowhere is left as a link
whose target autorefs cannot find, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

ROLE = re.compile(r':(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`(~?)([\w.]+)(\(\))?`')


def _target(obj: griffe.Object, name: str) -> str | None:
  if name.startswith('wn_jax'):
    return name
  try:
    return obj.resolve(name)
  except griffe.NameResolutionError:
    pass
  head, _, rest = name.partition('.')
  if rest:
    try:
      return f'{obj.resolve(head)}.{rest}'
    except griffe.NameResolutionError:
      pass
  return None


def rewrite(text: str, obj: griffe.Object) -> str:
  """Rewrites every Sphinx role in ``text`` as an autoref (wn_jax) or inline code (others)."""

  def sub(m: re.Match[str]) -> str:
    tilde, name, parens = m.group(1), m.group(2), m.group(3) or ''
    shown = (name.rsplit('.', 1)[-1] if tilde else name) + parens
    target = _target(obj, name)
    if target is None or not target.startswith('wn_jax'):
      return f'`{shown}`'
    return f'[`{shown}`][{target}]'

  return ROLE.sub(sub, text)


def _runtime_doc(obj: griffe.Object) -> str | None:
  """The docstring Python has for ``obj`` at runtime (``None`` if it cannot be imported)."""
  if not (obj.is_function or obj.is_class):
    return None
  module = obj.module.path
  try:
    target: Any = importlib.import_module(module)
    for part in obj.path[len(module) + 1 :].split('.'):
      target = getattr(target, part)
  except (ImportError, AttributeError):
    return None
  return inspect.cleandoc(target.__doc__) if target.__doc__ else None


def _walk(obj: griffe.Object, seen: set[str]) -> None:
  if obj.path in seen:
    return
  seen.add(obj.path)
  if obj.docstring is not None:
    runtime = _runtime_doc(obj)
    if runtime is not None and runtime != obj.docstring.value:
      obj.docstring.value = runtime
    obj.docstring.value = rewrite(obj.docstring.value, obj)
  for member in obj.members.values():
    if not member.is_alias:
      _walk(member, seen)  # type: ignore[arg-type]


class SphinxRoles(griffe.Extension):
  """Rewrites Sphinx roles once the whole package is loaded (so every name resolves)."""

  def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
    del kwargs
    _walk(pkg, set())
