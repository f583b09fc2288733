"""linen: finding the WN layers a call of a model runs, for ``data_init`` and ``layer_axes``.

Both trace the model abstractly with an interceptor that records each WN layer's call. Flax's
``nn.jit`` reuses a traced body for modules of equal configuration and variables, and from an
earlier call, which runs no layer's Python: each search here applies the model so that no trace
is shared (a mutable filter and marks of its own), or, where a layer may have been missed that
way, runs again with every ``jit`` inlined.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wn_jax.linen._layers import _WeightNormedKernel
from wn_jax.linen._wrapper import WeightNorm

_CALLS = itertools.count()


def every(*but: str) -> flax.core.DenyList:
  """Every collection mutable (``but`` these), as a filter no other call uses: ``nn.jit``
  reuses its body's trace for the same shapes and filter, which runs no layer's Python (an
  earlier ``init`` or apply with ``mutable=True``, data init's search for its layers). A
  data init's marks (``marked``) also tell apart modules of equal configuration, where the
  ``nn.jit`` lifts every collection."""
  return flax.core.DenyList((*but, f'wn_jax:{next(_CALLS)}'))


_MARKS = 'wn_jax_marks'  # a collection no module reads


def marked(variables: Mapping) -> dict:
  """``variables`` with a collection of marks: an empty node of its own in each node of the
  params tree, named for this call (no leaf: ``nn.scan(variable_axes={True: 0})`` splits
  every collection's leaves). ``nn.jit`` reuses a trace for modules of equal configuration
  and variables (a block class lifted once, used many times), and from an earlier call (the
  user's apply, data init's search for its layers), which runs no layer's Python: a layer
  the search does not see is not initialized, and one the pass does not run takes another's
  trace (its ``init_scale``, its name in errors). With the marks no two share one."""
  call, index = next(_CALLS), itertools.count()

  def walk(tree: Mapping) -> dict:
    node: dict = {f'{call}.{next(index)}': {}}
    node.update((k, walk(v)) for k, v in tree.items() if isinstance(v, Mapping))
    return node

  return {**variables, _MARKS: walk(variables['params'])}


def layer_paths(model: nn.Module, variables: Any, args: tuple, method: Any, kwargs: dict) -> set:
  """The scope paths of the WN layers a call of ``model`` runs: traced abstractly, with
  only the arrays among ``args`` abstract (a flag, a string, a depth stay Python values),
  or run as it is where the model reads values (``float(x.max())``)."""
  paths = set()
  wrapped = [0]  # how many WeightNorm wrappers' calls this one runs inside

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if isinstance(module, WeightNorm):
      wrapped[0] += 1
      try:
        return next_fun(*call_args, **call_kwargs)
      finally:
        wrapped[0] -= 1
    if isinstance(module, _WeightNormedKernel) and context.method_name == '__call__':
      # Not a layer a wrapper hands its parameters read-only: data_init leaves it as it is.
      if not wrapped[0] or module.is_mutable_collection('params'):
        paths.add(tuple(module.scope.path))
    return next_fun(*call_args, **call_kwargs)

  def run(variables, *call_args):
    return model.apply(variables, *call_args, mutable=every(), method=method, **kwargs)

  def search(inline: bool) -> set:
    paths.clear()
    tagged = marked(variables)
    with nn.intercept_methods(record), inlined(inline):
      try:
        eval_abstractly(run, tagged, *args)
      except Exception:  # the model reads or prints values: run it as it is
        run(tagged, *args)
    return paths

  # The marks tell modules apart where nn.jit lifts every collection; one that lifts only
  # some (variables='params') may still reuse a trace: then the search runs inlined.
  return search(True) if reused(variables['params'], search(False)) else paths


def inlined(inline: bool) -> contextlib.AbstractContextManager:
  """Every ``jit`` inlined, where ``inline``: for a search that may have missed layers in a
  trace ``nn.jit`` reused (``reused``). Slower: it traces every layer's core anew, and
  unrolls every scan."""
  return jax.disable_jit() if inline else contextlib.nullcontext()


def reused(params: Any, seen: Any) -> bool:
  """Whether ``params`` hold a layer's ``kernel`` and ``scale`` at a path not in ``seen``
  (tuples of names) inside a module whose parameters equal, in structure and shapes, those
  of a module holding a layer at a path in ``seen`` (the same path below the two): ``nn.jit``
  may have reused the second's trace for the first, which ran none of its layers' Python.
  A layer that did not run at all (another method's) seldom sits in such a twin."""
  nodes: dict[tuple[str, ...], Any] = {}

  def walk(tree: Any, path: tuple[str, ...]) -> None:
    if isinstance(tree, Mapping):
      nodes[path] = tree
      for k, v in tree.items():
        walk(v, (*path, str(k)))

  walk(params, ())
  shapes = functools.cache(lambda p: str(jax.tree.map(jnp.shape, nodes[p])))
  layers = [p for p, t in nodes.items() if 'kernel' in t and 'scale' in t]
  return any(
    u[k:] == s[k:] and shapes(u[:k]) == shapes(s[:k])
    for u in layers
    if u not in seen
    for s in seen
    if len(s) == len(u) and s in nodes
    for k in range(1, len(u))
  )


def eval_abstractly(fn: Callable, *args: Any) -> Any:
  """``jax.eval_shape(fn, *args)`` with only the arrays among ``args`` abstract (arrays and
  ``jax.ShapeDtypeStruct``): a flag, a string, a depth stay Python values."""
  leaves, tree = jax.tree.flatten(args)
  arrays = [
    i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))
  ]

  def run(*values):
    filled = list(leaves)
    for i, x in zip(arrays, values):
      filled[i] = x
    return fn(*jax.tree.unflatten(tree, filled))

  return jax.eval_shape(run, *[leaves[i] for i in arrays])
