"""What the linen and NNX layers share: the dtype ``w`` is formed in, and the scale's metadata."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from wn_jax import _axes
from wn_jax import _core
from wn_jax import _errors
from wn_jax import _tree


def check_real(where: str, name: str, x: Any) -> None:
  """A ``ValueError`` naming the layer unless ``x`` is a real floating array."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f'{where}: the {name} must be a real floating array (float16, bfloat16, float32 or '
      f'float64) to be weight-normalized; got dtype {dtype}. Use a real param_dtype, or '
      f'leave this parameter out of the weight normalization.'
    )


def weight_dtype(where: str, v: Any, g: Any, layer_dtype: Any, inputs: Any = ()) -> jnp.dtype:
  """The dtype ``w`` is formed in: the widest of ``v``'s, ``g``'s and the layer's compute dtype.

  The compute dtype is ``layer_dtype`` (a Flax layer's ``dtype``) when it is set; with
  ``None`` a Flax layer promotes its parameters with its inputs, so the floating array
  leaves of ``inputs`` count instead. Forming ``w`` in the wider dtype rounds it at most
  once, to the dtype the layer computes in (``bfloat16`` parameters in a ``float32`` layer
  give a ``float32`` weight, not a ``bfloat16`` one).
  """
  check_real(where, 'kernel', v)
  check_real(where, 'scale', g)
  dtypes = [jnp.result_type(v), jnp.result_type(g)]
  if layer_dtype is not None:
    dtypes.append(jnp.dtype(layer_dtype))
  else:
    dtypes += [
      x.dtype
      for x in jax.tree_util.tree_leaves(inputs)
      if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)
    ]
  dtypes = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
  return _core.result_dtype(*dtypes)


def normalize(
  where: str, v: Any, g: Any, kept: _core.Axis, dtype: Any, eps: float = 0.0
) -> jax.Array:
  """``_core.normalize`` with ``v`` and ``g`` cast to ``dtype`` first (reduced in float32)."""
  try:
    return _core.normalize(_core.as_array(v, dtype), _core.as_array(g, dtype), kept, eps=eps)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None


def scales_output(
  kernel_ndim: int, kept: tuple[int, ...], inputs: Any, compute_dtype: Any, linear_dot: bool
) -> bool:
  r"""Whether a Dense layer applies $g / \lVert v \rVert$ to its output instead of forming ``w``.

  For a kernel ``(in, out)`` keeping ``out``, ``x @ w + b == (x @ v) * s + b`` with
  ``s = g / ||v||`` per output feature (the paper's section 2.1). Forming ``w`` costs
  weight-sized passes (write ``w``; backward: a reduction for ``dL/dg`` and the scaling
  of ``dL/dw``); scaling the output moves them to activation-sized arrays (rows x out)
  and leaves one weight-sized pass in the backward (``dL/dv`` gains ``v`` times a
  per-slice factor). So the output is scaled when the rows (every input axis but the
  last) are fewer than the input features. The choice is static (shapes are known at
  trace time) and changes rounding only.

  A symbolic row count (``jax.export`` with a symbolic batch) is never compared with the
  input features (that comparison is inconclusive for symbolic dimensions): ``w`` is then
  formed, which is right at every batch size, and the exported function gives the
  layer's results to rounding.

  Never with a custom ``dot_general`` (``linear_dot`` False): it may not be linear in the
  kernel (a quantized matmul), and it must see ``w``. Never with float16 compute:
  ``x @ v`` there follows the scale of ``||v||``, not of ``||w||``, and float16's narrow
  range would overflow or underflow it where ``x @ w`` is fine.
  """
  shape = jnp.shape(inputs)
  if kernel_ndim != 2 or kept != (1,) or not shape or not linear_dot:
    return False
  if jnp.dtype(compute_dtype) == jnp.dtype(jnp.float16):
    return False
  if any(jax.export.is_symbolic_dim(d) for d in shape):
    return False
  return math.prod(shape[:-1]) < shape[-1]


def scaled_output(
  where: str, y: jax.Array, v: Any, g: Any, kept: tuple[int, ...], dtype: Any, bias: Any
) -> jax.Array:
  """``y * (g / ||v||) + bias`` for ``y = x @ v``, formed in the wider of ``y``'s dtype and the
  factor's (float32), rounded once to ``y``'s dtype."""
  v, g = _core.as_array(v, dtype), _core.as_array(g, dtype)
  try:
    return _scaled_output(y, v, g, None if bias is None else _core.as_array(bias), kept)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None


@functools.partial(jax.jit, static_argnums=(4,))
def _scaled_output(y, v, g, bias, kept):
  # One jitted call: eagerly, one dispatch instead of one per operation.
  s = _core.factor(v, g, kept)
  acc = _core.result_dtype(y.dtype, s.dtype)
  out = y.astype(acc) * s
  if bias is not None:
    out = out + bias.astype(acc)
  return out.astype(y.dtype)


def kept_names(names: Sequence[Any] | None, kept: tuple[int, ...]) -> tuple[Any, ...] | None:
  """The partition names of a scale: those of its kernel's kept axes (``None``: unpartitioned).

  ``names`` may be shorter than the kernel's rank: as in Flax, the missing trailing axes are
  unsharded (``None``).
  """
  if names is None:
    return None
  return tuple(names[a] if a < len(names) else None for a in kept)


# fold's default: each layer's axis from its scale's shape, where only one choice fits.
INFER = 'infer'

AxisSpec = _core.Axis | str | Mapping[str, _core.Axis] | Callable[[str], _core.Axis]


def _layer_name(path: str) -> str:
  return f"layer '{path}'" if path else 'the root layer (the model itself)'


def _stacked(path: str, kernel_shape, scale_shape, from_model: bool = False) -> ValueError:
  # A scale with more axes than the layer keeps: most likely one leading layer axis on
  # every parameter (nn.scan, nn.vmap, nnx.vmap), which no axis choice undoes.
  several = (
    ''  # the axes come from the model (nnx.fold): only a stacked layer gets here
    if from_model
    else f"; a single layer built with several kept axes takes them in a mapping {{'{path}': ...}}"
  )
  return ValueError(
    f'{_layer_name(path)}: its scale of shape {tuple(scale_shape)} has more axes '
    f'than one layer keeping the default axis has, for a kernel of shape '
    f'{tuple(kernel_shape)}: it looks like a stacked layer (nn.scan, nn.vmap, nnx.vmap), which '
    f'fold does not support. Unstack it first and fold each layer (e.g. '
    f'jax.tree.map(lambda a: a[i], params) for layer i){several}.'
  )


def _inferred(path: str, kernel_shape: tuple[int, ...], scale_shape: tuple[int, ...]):
  fits = _fitting_axes(kernel_shape, scale_shape)
  if len(fits) == 1:
    return fits[0]
  if fits and len(scale_shape) > 1:
    raise _stacked(path, kernel_shape, scale_shape)
  if not fits:
    raise ValueError(
      f"layer '{path}': its scale of shape {scale_shape} fits no choice of kept "
      f'axes of its kernel of shape {kernel_shape}. Check the parameters (a stacked or '
      f'scanned layer is not a WN layer fold can read).'
    )
  raise ValueError(
    f"layer '{path}': its scale of shape {scale_shape} fits several kept axes "
    f'of its kernel of shape {kernel_shape} ({fits}), so the parameters alone do not say '
    f'which one the layer was built with. Pass axis=-1 if every layer kept the default '
    f"(the output features), or each layer's own: axis=layer_axes(model, x), or a "
    f"mapping {{'{path}': ...}}."
  )


def _axis_of(axis: AxisSpec) -> Callable[[str], _core.Axis]:
  if isinstance(axis, str):
    if axis != INFER:
      raise ValueError(
        f"axis must be 'infer', an int, a tuple of ints, None, a mapping from "
        f'layer path to axis or a callable; got {axis!r}.'
      )
    return lambda path: INFER  # type: ignore[return-value]
  if isinstance(axis, Mapping):
    table = dict(axis)

    def lookup(path: str) -> _core.Axis:
      if path not in table:
        raise ValueError(
          f"layer '{path}' has a kernel and a scale, but no axis in the mapping "
          f'(it names {sorted(table)}). Add it, or build the mapping with layer_axes(model, ...).'
        )
      return table[path]

    return lookup
  if callable(axis):
    return axis
  return lambda path: axis


def _fitting_axes(kernel_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> list[Any]:
  """Every choice of kept kernel axes (NumPy-style negative ints) that gives ``scale_shape``."""
  n = len(kernel_shape)
  out: list[Any] = []
  for kept in itertools.combinations(range(n), len(scale_shape)):
    if tuple(kernel_shape[a] for a in kept) == tuple(scale_shape):
      neg = tuple(a - n for a in kept)
      out.append(neg[0] if len(neg) == 1 else (None if not neg else neg))
  return out


def fold(params: Any, axis: AxisSpec, *, from_model: bool = False) -> Any:
  """Every ``{'kernel', 'scale', ...}`` dict of ``params`` folded into ``{'kernel': w, ...}``.

  ``from_model``: the axes come from the model (``nnx.fold``), not from the caller, so a
  mismatch is a stacked layer and the errors do not suggest a mapping.
  """
  axis_of = _axis_of(axis)
  shapes = {
    tuple(_tree.path_str(p).split('/')): jnp.shape(x)
    for p, x in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, _tree.WeightNormed)
    )[0]
    if not isinstance(x, _tree.WeightNormed)
  }

  def walk(tree: Any, path: tuple[str, ...]) -> Any:
    if isinstance(tree, _tree.WeightNormed):
      return tree.weight()
    if not hasattr(tree, 'items'):
      return tree
    if hasattr(tree.get('scale'), 'items') and _tree.is_wrapper_scale(shapes, (*path, 'scale')):
      raise ValueError(
        f"'{'/'.join((*path, 'scale'))}' is a WeightNorm wrapper's scale tree; fold "
        f"folds WN layers and WeightNormed leaves, not a wrapper (its layer's parameters hold "
        f'v, not w). Train or export that part with the pytree route (wn_jax.weight_norm + '
        f'wn_jax.materialize), or fold it by hand: each layer parameter v becomes '
        f'wn_jax.normalize(v, g, axis) with g from the scale tree, and the scale tree goes.'
      )
    if 'kernel' in tree and 'scale' in tree and hasattr(tree['scale'], 'shape'):
      where = '/'.join(path)
      kernel, scale = jnp.asarray(tree['kernel']), jnp.asarray(tree['scale'])
      a = axis_of(where)
      if isinstance(a, str):
        a = _inferred(where, kernel.shape, scale.shape)
      with _errors.labelled(f"layer '{where}'"):
        kept = _axes.kept_axes(kernel.ndim, a)
      need = _core.scale_shape(kernel.shape, kept)
      if scale.shape != need and scale.ndim > max(len(kept), 1):
        raise _stacked(where, kernel.shape, scale.shape, from_model)
      if scale.shape != need:
        raise ValueError(
          f"layer '{where}': its scale has shape {scale.shape}, but a kernel of "
          f'shape {kernel.shape} keeping axis {a!r} needs {need}; the layer was built with '
          f'another axis (the shapes fit axis in {_fitting_axes(kernel.shape, scale.shape)}). '
          f"Pass each layer's own axis: axis=layer_axes(model, ...), or a mapping "
          f"{{'{where}': ...}}."
        )
      rest = {k: walk(v, (*path, str(k))) for k, v in tree.items() if k not in ('kernel', 'scale')}
      dtype = weight_dtype(f"layer '{where}'", kernel, scale, None)
      return {'kernel': normalize(f"layer '{where}'", kernel, scale, kept, dtype), **rest}
    return {k: walk(v, (*path, str(k))) for k, v in tree.items()}

  return walk(params, ())
