"""What a weight-normalized part of a parameter tree is, read from its structure alone.

One rule, for ``linen.fold``, ``nnx.fold``, ``decay_mask``, ``project_directions``,
``direction_stats`` and the default selection of ``weight_norm``: a WN layer is a ``kernel``
beside a ``scale`` shaped like the kernel along its kept axes; a ``WeightNorm`` wrapper is a
``scale`` tree that mirrors a layer's parameters (:func:`wrapped_layers`). Trees are given as
``shapes``: each array's key path (a tuple of key strings) to its shape.
"""

from __future__ import annotations

from wn_jax import _axes

Keys = tuple[str, ...]
Shape = tuple[int, ...]
Shapes = dict[Keys, Shape]


def is_wrapper_scale(shapes: Shapes, prefix: tuple[str, ...]) -> bool:
  """Whether the subtree at ``prefix`` (ending in ``'scale'``) is a ``WeightNorm`` wrapper's.

  ``shapes`` maps every array's key path to its shape. A wrapper's params are its ``scale``
  tree and, where the layer was built inside it, the ``layer`` (a linen layer built by the
  parent keeps its params beside the wrapper, under the same parent; a layer made of several
  modules the parent built, an inline ``nn.Sequential``, has its ``scale`` tree start with
  their names). The ``scale`` tree mirrors that layer: each of its arrays sits at the path of a layer parameter and has that
  parameter's shape along a STRICT subset of its axes (in order). A plain submodule named
  ``scale`` (AdaLN's ``Dense``) has arrays of its own ranks, and is not a wrapper's.

  >>> shapes = {('wn', 'scale', 'kernel'): (4,), ('dense', 'kernel'): (3, 4)}
  >>> is_wrapper_scale(shapes, ('wn', 'scale'))
  True
  >>> is_wrapper_scale({('ada', 'scale', 'kernel'): (4, 4), ('fc', 'kernel'): (4, 4)}, ('ada', 'scale'))
  False
  """
  return bool(wrapped_layers(shapes, prefix))


def wn_layer_scale(shapes: Shapes, keys: tuple[str, ...]) -> tuple[int, ...] | None:
  """The shape of the ``scale`` beside ``keys`` if it is a WN layer's ``kernel`` (a ``scale``
  shaped like it along some axes beside it), else ``None``.

  The axes in any order: a layer stacked along a middle axis (``variable_axes={'params':
  1}``) has a kernel ``(in, layers, out)`` and a scale ``(out, layers)``. It is a WN layer,
  whose axes the tools then refuse to guess, not a plain one to skip or decay.

  >>> wn_layer_scale({('kernel',): (5, 2, 3), ('scale',): (3, 2)}, ('kernel',))
  (3, 2)
  """
  kernel = shapes.get(keys) if keys and keys[-1] == 'kernel' else None
  if kernel is None:
    return None
  scale = shapes.get(keys[:-1] + ('scale',))
  if scale is None:
    return None
  left = list(kernel)
  for size in scale:
    if size not in left:
      return None
    left.remove(size)
  return scale


def wrapped_layers(shapes: Shapes, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
  """The layers whose parameters the ``scale`` tree at ``prefix`` mirrors (the rule of
  :func:`is_wrapper_scale`): each a key path whose parameter at ``layer + r`` is the ``v``
  of the magnitude at ``prefix + r``. Empty: not a wrapper's; one: the wrapped layer.

  >>> wrapped_layers({('wn', 'scale', 'kernel'): (4,), ('dense', 'kernel'): (3, 4)}, ('wn', 'scale'))
  [('dense',)]
  """

  def under(pre: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [k for k in shapes if len(k) > len(pre) and k[: len(pre)] == pre]

  parent, n = prefix[:-1], len(prefix)
  if {k[len(parent)] for k in under(parent)} - {'scale', 'layer'}:
    return []
  inside = [k[n:] for k in under(prefix)]
  if (layer := parent + ('layer',)) in {k[:n] for k in under(parent)}:
    candidates = {layer}
  elif parent:  # the layer's params beside the wrapper; several modules: by their names
    candidates = {parent[:-1] + (k[len(parent) - 1],) for k in under(parent[:-1])} - {parent}
    candidates.add(parent[:-1])
  else:
    return []

  def mirrors(r: tuple[str, ...], c: tuple[str, ...]) -> bool:
    g, w = shapes[prefix + r], shapes.get(c + r)
    fits = w is not None and len(g) < len(w) and _axes.fits_kept_axes(g, w)
    return fits and wn_layer_scale(shapes, c + r) is None  # no wrapper takes a WN kernel

  if not inside:
    return []
  return sorted(c for c in candidates if all(mirrors(r, c) for r in inside))


def wrapped_parameters(shapes: Shapes, other_fix: str) -> dict[Keys, tuple[Keys, Shape]]:
  """Each parameter a ``WeightNorm`` wrapper normalizes: the wrapper's path and its scale's
  shape (the mirror of the parameter in the wrapper's ``scale`` tree). A wrapper that several
  layers fit is refused, with the fix of building it unbound or ``other_fix``."""
  wrapped: dict[Keys, tuple[Keys, Shape]] = {}
  prefixes = {k[: i + 1] for k in shapes for i, part in enumerate(k[:-1]) if part == 'scale'}
  for prefix in sorted(prefixes):
    layers = wrapped_layers(shapes, prefix)
    if len(layers) > 1:
      raise ValueError(
        f"the WeightNorm wrapper scale tree '{'/'.join(prefix)}' mirrors the "
        f'parameters of several layers ({["/".join(c) for c in layers]}), so the parameters '
        f'do not say which one it normalizes. Build the wrapped layer unbound, so that the '
        f'wrapper adopts it and its params sit under the wrapper: in a compact method, '
        f'wl.WeightNorm(nn.Dense(16, parent=None)); or {other_fix}.'
      )
    for layer in layers:
      for k, shape in shapes.items():
        if k[: len(prefix)] == prefix:
          wrapped[layer + k[len(prefix) :]] = (prefix[:-1], shape)
  return wrapped


def layer_normalized(shapes: Shapes, other_fix: str) -> set[Keys]:
  """The arrays that a layer weight-normalizes already: each WN layer's ``kernel`` and
  ``scale``, each wrapper's ``scale`` tree and the parameters it mirrors (``other_fix``: as
  in :func:`wrapped_parameters`).

  >>> shapes = {('wn', 'kernel'): (3, 4), ('wn', 'scale'): (4,), ('fc', 'kernel'): (3, 4)}
  >>> sorted(layer_normalized(shapes, ''))
  [('wn', 'kernel'), ('wn', 'scale')]
  """
  wrapped = wrapped_parameters(shapes, other_fix)
  scales = {owner + ('scale',) for owner, _ in wrapped.values()}
  out = set(wrapped) | {k for k in shapes if any(k[: len(s)] == s for s in scales)}
  for keys in shapes:
    if wn_layer_scale(shapes, keys) is not None:
      out |= {keys, keys[:-1] + ('scale',)}
  return out
