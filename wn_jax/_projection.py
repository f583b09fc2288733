"""Normalize-and-Project: an optax transformation that keeps each direction ``v`` on its sphere."""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wn_jax import _core
from wn_jax import _fold
from wn_jax import _tree
from wn_jax._directions import direction
from wn_jax._directions import direction_axes
from wn_jax._optax_util import check_update_args
from wn_jax._optax_util import in_structure
from wn_jax._optax_util import is_masked
from wn_jax._optax_util import is_node
from wn_jax._optax_util import unwrap

_CALLER = 'wn_jax.optim.project_directions'


class ProjectDirectionsState(NamedTuple):
  """State of :func:`project_directions`."""

  # params-shaped: each direction's target norms (g's shape, float32, or float64 for float64
  # v), MaskedNode() elsewhere; None for a constant norm (read from the factory at update).
  targets: Any


def project_directions(
  norm: str | float | jax.Array = 'init', *, axis: _fold.AxisSpec = _fold.INFER
) -> optax.GradientTransformationExtraArgs:
  r"""Keeps every weight-normalization direction on its sphere: Normalize-and-Project.

  Chained after any optimizer, it returns updates $u'$ such that each direction
  $v$ (a slice per kept index, as ``g`` is) lands on its target norm $\rho$:

  $$ v' = \rho \, \frac{v + u}{\lVert v + u \rVert}, \qquad u' = v' - v, $$

  computed as :func:`wn_jax.normalize` ``(v + u, rho)`` (the same norm, range-safe; an
  all-zero slice stays zero). The weight $w = g \, v / \lVert v \rVert$ does not depend on
  $\lVert v \rVert$, so $w$ and $g$ are those of the unprojected step to float rounding;
  only $\lVert v \rVert$ is held. Without it, every step with a gradient orthogonal to
  $v$ (weight normalization's is) makes $\lVert v \rVert$ grow, and the effective step on
  the direction, $\lVert \Delta v \rVert / \lVert v \rVert$, decays like
  $1 / \lVert v \rVert^2$ (see :func:`wn_jax.optim.direction_stats` and the guide
  *Effective learning rate*).

  It comes last in a chain, after every transformation that changes the updates (the
  learning rate, ``optax.scale``, clipping): ``chain(scale_by_adam(), project_directions(),
  scale_by_learning_rate(lr))`` projects an lr-free step and then scales it, so
  $\lVert v \rVert$ is not held (nothing detects it).

  Directions are found by structure, with the rule :func:`wn_jax.optim.decay_mask` and
  :func:`wn_jax.linen.fold` use: the ``kernel`` of a linen or NNX WN layer (a ``kernel``
  beside a ``scale`` shaped like its kept axes), each parameter of a layer a
  ``WeightNorm`` wrapper normalizes (its ``scale`` tree, :func:`wn_jax.optim.decay_mask`'s
  rule), and ``v`` of every :class:`wn_jax.WeightNormed`. Every other leaf's update passes
  unchanged. Under ``optax.masked``, a layer's ``scale`` goes in the mask with its
  ``kernel`` (a mask that hides it is refused), and a wrapper's ``scale`` tree with its
  layer's parameters (a mask that hides it leaves no shapes to check: that layer is then
  left alone).
  For the optimizer route, where ``v`` lives in the state, use
  ``weight_norm(inner, project=...)``.

  Args:
    norm: ``'init'`` (each slice keeps its norm at ``init``; an all-zero slice gets 1, as
      :func:`wn_jax.decompose` gives ``g``), or a positive constant for every slice (a
      float, or an array under ``optax.inject_hyperparams``, there with
      ``static_args=('axis',)`` if ``axis`` is given) that the directions' dtype holds (at
      most 65504 for float16).
    axis: the kept axis of WN layers and wrappers, as :func:`wn_jax.linen.fold` takes it:
      ``'infer'`` (from each scale's shape, refused where several axes fit, e.g. a
      square kernel), an int, tuple or ``None`` for all, or a mapping from layer path
      (``'block/WNDense_0'``; a wrapper's own path) to axis: ``wn_jax.linen.layer_axes(
      model, x)`` or ``wn_jax.nnx.layer_axes(model)``. ``WeightNormed`` nodes carry theirs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  Raises:
    ValueError: for a ``norm`` that is neither ``'init'`` nor positive and finite, or that
      the directions' dtype does not hold (a traced one, from ``optax.inject_hyperparams``
      under ``jit``, is checked by a debug callback when the step runs: the step then fails
      with this message, as a ``JaxRuntimeError``, and gives no new state); from ``init`` or
      ``update``, for a layer whose axis cannot be read (named) or whose scale a mask
      hides, for params that changed structure since ``init``, or for ``update`` without
      ``params`` or with a state that is not a ``ProjectDirectionsState``.

  References:
    Salimans & Kingma, 2016 (section 2.2). https://arxiv.org/abs/1602.07868

    Lyle et al., *Normalization and effective learning rates in reinforcement learning*,
    NeurIPS 2024. https://arxiv.org/abs/2407.01800

    Hoffer et al., *Norm matters: efficient and accurate normalization schemes in deep
    networks*, NeurIPS 2018. https://arxiv.org/abs/1803.01814

  Examples:
    >>> import jax, jax.numpy as jnp, optax, wn_jax
    >>> params = wn_jax.weight_norm({'w': jnp.array([[3.0, 1.0], [4.0, 1.0]])})
    >>> tx = optax.chain(optax.sgd(0.5), wn_jax.optim.project_directions())
    >>> state = tx.init(params)
    >>> grads = wn_jax.WeightNormed(jnp.array([[-1.0, 0.0], [0.0, 2.0]]), jnp.zeros(2))
    >>> updates, state = tx.update({'w': grads}, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> wn_jax.norm(new['w'].v)  # the norms at init: 5 and sqrt(2)
    Array([5.       , 1.4142135], dtype=float32)
  """
  return projection(norm, axis, nodes_only=False)


def projection(
  norm: str | float | jax.Array,
  axis: _fold.AxisSpec,
  *,
  nodes_only: bool,
  named: tuple[str, str] = (_CALLER, 'norm'),
) -> optax.GradientTransformationExtraArgs:
  """:func:`project_directions`; with ``nodes_only``, of ``WeightNormed`` nodes alone (the
  optimizer's ``project=``: what it reparametrizes, not the WN layers beside). ``named``: the
  caller and the argument ``norm`` came as, for its refusal."""
  if isinstance(norm, str) and norm != 'init':
    caller, name = named
    raise ValueError(f"{caller}: {name} must be 'init' or a positive number; got {norm!r}.")
  constant = not isinstance(norm, str)
  if constant:
    _check_norm(norm, *named)

  def init_fn(params):
    params = unwrap(params)
    kept = direction_axes(params, axis, _CALLER, nodes_only=nodes_only)
    if all(k is None for k in kept):
      raise _nothing_to_project()
    if constant:
      return ProjectDirectionsState(None)
    nodes, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_node)
    targets = [
      optax.MaskedNode() if k is None else _target(direction(x), k) for x, k in zip(nodes, kept)
    ]
    return ProjectDirectionsState(treedef.unflatten(targets))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    check_update_args(
      _CALLER, state, params, ProjectDirectionsState, 'the current parameters, holding v'
    )
    structure = jax.tree_util.tree_structure(updates, is_leaf=is_masked)  # optax.masked's
    params, updates = unwrap(params), unwrap(updates)
    kept = direction_axes(params, axis, _CALLER, nodes_only=nodes_only)
    nodes, node_def = jax.tree_util.tree_flatten(params, is_leaf=is_node)
    update_nodes = node_def.flatten_up_to(updates)
    if constant:
      dtypes = [jnp.result_type(direction(x)) for x, k in zip(nodes, kept) if k is not None]
      _check_constant(norm, dtypes, named)
    targets = [None] * len(nodes) if constant else _saved_targets(node_def, state.targets)
    project = functools.partial(_projected_update, norm=norm)
    out = list(map(project, nodes, update_nodes, kept, targets))
    return in_structure(structure, node_def.unflatten(out)), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_norm(norm: Any, caller: str, name: str) -> None:
  """A constant target must be positive and finite: refused here where it is concrete (a
  traced one, from ``optax.inject_hyperparams`` under ``jit``, when the step runs)."""
  if not isinstance(norm, jax.core.Tracer):
    _refuse_norm(norm, caller, name)


def _check_constant(norm: Any, dtypes: list[Any], named: tuple[str, str]) -> None:
  """``update``'s check of a constant target: positive, finite, and held by every direction's
  dtype (a slice with one nonzero entry holds the whole norm; float16's largest is 65504).
  Value-dependent: at once where ``norm`` is concrete; under ``jit`` a debug callback raises
  the same ``ValueError`` when the step runs, which then returns no new state."""
  narrowest = min(dtypes, key=lambda d: float(jnp.finfo(d).max), default=None)
  refuse = functools.partial(_refuse_norm, caller=named[0], name=named[1], narrowest=narrowest)
  if isinstance(norm, jax.core.Tracer):
    jax.debug.callback(refuse, norm)
  else:
    refuse(norm)


def _refuse_norm(norm: Any, caller: str, name: str, narrowest: Any = None) -> None:
  try:
    value = np.asarray(norm, np.float64)
  except (TypeError, ValueError):
    value = np.array(np.nan)
  if isinstance(norm, bool) or not (np.all(np.isfinite(value)) and np.all(value > 0)):
    raise ValueError(
      f'{caller}: {name} must be positive and finite (a direction of norm 0 has no direction, '
      f"and a negative one flips it); got {norm!r}. Pass {name}='init' to keep each slice's "
      f'norm at init.' + _cast_hint(norm, value, name)
    )
  if narrowest is not None and float(np.max(value)) > float(jnp.finfo(narrowest).max):
    raise ValueError(
      f'{caller}: {name} {norm!r} is beyond what a {jnp.dtype(narrowest).name} direction '
      f'holds ({float(jnp.finfo(narrowest).max):.6g}); a slice could overflow to inf. Pass a '
      f'smaller {name}, or keep the directions in float32.'
    )


def _cast_hint(norm: Any, value: np.ndarray, name: str) -> str:
  """Where an infinite norm is narrower than float32: ``optax.inject_hyperparams`` casts it to
  the parameters' dtype, so a norm beyond that dtype's range came as inf."""
  dtype = getattr(norm, 'dtype', None)
  if not (np.any(np.isinf(value)) and dtype is not None and jnp.finfo(dtype).bits < 32):
    return ''
  return (
    f' An inf of {jnp.dtype(dtype).name}: optax.inject_hyperparams casts the {name}'
    f" to the parameters' dtype, which holds at most {float(jnp.finfo(dtype).max):.6g}. Pass a"
    f' smaller value, or inject_hyperparams(..., hyperparam_dtype=jnp.float32).'
  )


def _nothing_to_project() -> ValueError:
  return ValueError(
    f'{_CALLER}: found no weight-normalized direction in the params (a kernel beside a '
    f"scale of a WN layer, a WeightNorm wrapper's parameters, or WeightNormed.v), so it "
    f'would do nothing. Chain it after the optimizer of a model with WN layers, or use '
    f'wn_jax.optim.weight_norm(inner, project=...) for a plain model.'
  )


def _saved_targets(node_def: Any, targets: Any) -> list[Any]:
  """The state's target norms, one per node of ``params``."""
  try:
    return node_def.flatten_up_to(targets)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f'{_CALLER}: params do not have the structure they had at init ({e}). Re-run '
      f'tx.init on the new params.'
    ) from None


def _projected_update(x: Any, u: Any, kept: Any, target: Any, *, norm: Any) -> Any:
  """The update ``u`` of the node ``x``, its direction's step projected onto the sphere of
  radius ``target`` (``norm`` for a constant); unchanged where ``x`` holds no direction."""
  if kept is None:
    return u
  v, dv = direction(x), direction(u)
  shape = _core.scale_shape(v.shape, kept)
  if target is None:
    target = jnp.broadcast_to(jnp.asarray(norm, _acc(v)), shape)
  if jnp.shape(target) != shape:
    raise ValueError(
      f'{_CALLER}: a direction of shape {v.shape} meets a target norm of shape '
      f'{jnp.shape(target)} in the state; the params changed since init. Re-run tx.init.'
    )
  dv = _project(v, dv, target, kept)
  return _tree.WeightNormed(dv, u.g, u.axis) if isinstance(u, _tree.WeightNormed) else dv


def _acc(x: Any) -> jnp.dtype:
  return _core.reduce_dtype(jnp.result_type(x))


def _target(v: Any, kept: tuple[int, ...]) -> jax.Array:
  """``||v||`` per slice in the reduction dtype, 1 on an all-zero slice (``decompose``'s ``g``)."""
  v = jnp.asarray(v)
  return _core.decompose(v.astype(_acc(v)), kept)[1]


@functools.partial(jax.jit, static_argnums=(3,))
def _project(v: jax.Array, dv: jax.Array, target: jax.Array, kept: tuple[int, ...]) -> jax.Array:
  """``u'`` with ``v + u' = normalize(v + dv, target)``, in the dtype of ``dv``."""
  step = (v + dv.astype(v.dtype)).astype(v.dtype)  # what optax.apply_updates gives
  return (_core.normalize(step, target, kept).astype(v.dtype) - v).astype(dv.dtype)
