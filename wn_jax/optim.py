"""Weight normalization as an optax gradient transformation.

The model keeps plain weights ``w``; the optimizer trains them in weight-normalized
coordinates. There are three ways to train with weight normalization in wn_jax:

1. WN layers (:mod:`wn_jax.linen`, :mod:`wn_jax.nnx`): ``kernel`` and ``scale`` are
   ordinary parameters; any optax optimizer trains them.
2. :func:`wn_jax.weight_norm` + :func:`wn_jax.materialize` on any parameter pytree:
   ``loss(materialize(wn_params))``; any optax optimizer trains ``v`` and ``g``.
3. :func:`weight_norm` here, on an untouched model: ``tx = weight_norm(optax.adam(lr))``.

All three follow the same trajectory for the same inner optimizer (tested).
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import serialization
from flax import struct

from wn_jax import _axes
from wn_jax import _core
from wn_jax import _errors
from wn_jax import _fold
from wn_jax import _tree

_is_node = lambda x: isinstance(x, (_tree.WeightNormed, optax.MaskedNode))


def _values(tree: Any) -> Any:
  """``tree`` with every ``nnx.Variable`` replaced by its value (``Param(w)`` -> ``w``).

  The state holds bare arrays, never a variable around a ``WeightNormed`` node: ``nnx.Optimizer``
  wraps the state's variables whole, and writing an update back into such a wrapper turns the
  node into a dict (its static ``axis`` lost).
  """
  return jax.tree_util.tree_map(
    lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


@struct.dataclass
class WeightNormState:
  """State of :func:`weight_norm`: a plain pytree, checkpointable as it is.

  Examples:
    >>> import jax.numpy as jnp, optax, wn_jax
    >>> state = wn_jax.optim.weight_norm(optax.sgd(0.1)).init({'w': jnp.ones((2, 3)), 'b': jnp.zeros(3)})
    >>> state.directions['w'], state.directions['b']
    (WeightNormed(v=float32[2, 3], g=float32[3], axis=-1), MaskedNode())
  """

  directions: Any  # params-shaped: WeightNormed(v, g) at selected leaves, MaskedNode() elsewhere
  inner_state: optax.OptState  # the inner optimizer's state over (v, g) and unselected leaves
  # ||v|| of each direction (float32, g's shape), MaskedNode() elsewhere: each update
  # computes the new norms to form the new weights, and the next one reuses them. None
  # (a state built by hand, or restored with flax.serialization from a checkpoint saved
  # before the norms were kept): computed from the directions.
  norms: Any = None


def _state_to_dict(state: WeightNormState) -> dict[str, Any]:
  return {
    'directions': serialization.to_state_dict(state.directions),
    'inner_state': serialization.to_state_dict(state.inner_state),
    'norms': serialization.to_state_dict(state.norms),
  }


def _state_from_dict(target: WeightNormState, state: dict[str, Any]) -> WeightNormState:
  # A state saved before the norms were kept has no 'norms'; a target without norms wants
  # none. Either way the norms are left out, and the next update computes them.
  keep = 'norms' in state and target.norms is not None
  return WeightNormState(
    serialization.from_state_dict(target.directions, state['directions'], name='directions'),
    serialization.from_state_dict(target.inner_state, state['inner_state'], name='inner_state'),
    serialization.from_state_dict(target.norms, state['norms'], name='norms') if keep else None,
  )


# Registered over flax.struct's own handler, so a state saved without norms restores.
serialization.register_serialization_state(
  WeightNormState, _state_to_dict, _state_from_dict, override=True
)


def weight_norm(
  inner: optax.GradientTransformation,
  axis: _core.Axis = -1,
  *,
  where: _tree.Where = None,
  project: str | float | None = None,
) -> optax.GradientTransformation:
  r"""Trains plain weights ``w`` in weight-normalized coordinates ``w = g v / ||v||``.

  The state keeps ``(v, g)`` for every selected leaf (initialized function-preserving,
  ``v = w``, ``g = ||w||``). Each update maps the gradient with respect to ``w`` to the
  gradients with respect to ``(v, g)`` by the chain rule (the paper's eq. 3):

  $$
  \nabla_g L = \frac{\nabla_w L \cdot v}{\lVert v \rVert}, \qquad
  \nabla_v L = \frac{g}{\lVert v \rVert} \nabla_w L
              - \frac{g \nabla_g L}{\lVert v \rVert^2} v,
  $$

  applies ``inner`` to them, recomposes $w' = g' v' / \lVert v' \rVert$ and
  returns the update $w' - w$. Unselected leaves go through ``inner`` unchanged.
  Training ``params`` with ``weight_norm(inner)`` follows the trajectory of training
  ``wn_jax.weight_norm(params)`` with ``inner``.

  The state is authoritative: it keeps the weights as ``(v, g)``, and each update moves
  ``params`` to the weights the state recomposes. A weight changed outside the
  transformation (an EMA swap, a checkpoint loaded into the model, surgery) jumps back to
  the state's weight at the next update. After changing weights outside, re-run
  ``tx.init(params)``. Works with ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` as with
  ``tx.update(grads, state, nnx.state(model, nnx.Param))``.

  Extra arguments of ``update`` reach ``inner`` in (v, g) coordinates, so line-search
  optimizers (``optax.lbfgs``, ``optax.scale_by_zoom_linesearch``) and optax's contrib
  optimizers (``sophia``, ``momo``, ``reduce_on_plateau``) work: ``grad`` is pulled back
  like the updates, ``value_fn`` and ``obj_fn`` are composed with
  :func:`wn_jax.materialize`, ``value`` is the same. For ``optax.contrib.schedule_free``,
  evaluate at :func:`schedule_free_eval_params` (optax's own reads the inner state). Take ``value`` and ``grad`` in ``w`` each step with
  ``jax.value_and_grad(fn)(params)``: ``optax.value_and_grad_from_state`` would read the
  gradient the inner state keeps, which is in (v, g) coordinates.

  Args:
    inner: the optimizer applied in (v, g) coordinates, e.g. ``optax.adam(1e-3)``.
    axis: the kept axis or axes of every selected leaf (default ``-1``, the output
      features of Flax kernels).
    where: the selection, as in :func:`wn_jax.weight_norm` (default: floating leaves with
      ``ndim >= 2``).
    project: ``None`` (or ``False``: off), or ``'init'`` or a positive number: each step
      puts every ``v`` back on its target norm, as :func:`project_directions` (chained after ``inner``
      in (v, g) coordinates) does; ``w`` is the same to float rounding.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  Raises:
    ValueError: from ``init`` or ``update``, if ``params`` already hold
      :class:`wn_jax.WeightNormed` nodes (train those with ``inner`` alone), or have
      changed structure or shapes since ``init``; from ``update``, for a state that is not
      a ``WeightNormState`` (a checkpoint restored without a target).

  References:
    Salimans & Kingma, 2016. https://arxiv.org/abs/1602.07868

  Examples:
    >>> import jax, jax.numpy as jnp, optax, wn_jax
    >>> params = {'w': jnp.array([[3.0, 1.0], [4.0, 1.0]])}
    >>> tx = wn_jax.optim.weight_norm(optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.array([[1.0, 0.0], [0.0, 0.0]])}
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> bool(jnp.allclose(wn_jax.norm(new['w']), state.directions['w'].g))
    True
  """

  if project is not None and project is not False:
    inner = optax.chain(inner, project_directions(project))

  def init_fn(params):
    _refuse_weight_normed(params)
    # Copies, so the state never shares a buffer with params (safe to donate both).
    wn = _tree.weight_norm(jax.tree_util.tree_map(jnp.copy, _values(params)), axis, where=where)
    directions = jax.tree_util.tree_map(
      lambda x: x if isinstance(x, _tree.WeightNormed) else optax.MaskedNode(),
      wn,
      is_leaf=_is_node,
    )
    return WeightNormState(directions, inner.init(wn), _norms(directions))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        'wn_jax.optim.weight_norm: update needs params (the current weights w); call '
        'tx.update(grads, state, params).'
      )
    if not isinstance(state, WeightNormState):
      raise ValueError(
        f'wn_jax.optim.weight_norm: update got a state of type {type(state).__name__}, not '
        f'the WeightNormState that tx.init returns: a checkpoint restored without a target '
        f'(orbax `restore(path)` gives plain dicts and loses the static axis). Restore with a '
        f'target: `ckptr.restore(path, jax.eval_shape(tx.init, params))` (tx.init(params) as '
        f'the abstract target).'
      )
    _refuse_weight_normed(params)
    # Updates come back in the structure of the incoming updates (variables and all).
    treedef = jax.tree_util.tree_structure(updates, is_leaf=_is_masked)  # optax.masked's
    params, updates = _values(params), _values(updates)
    wn = _directions_and_rest(state, params, 'wn_jax.optim.weight_norm')
    for d, p in zip(
      jax.tree_util.tree_leaves(state.directions, is_leaf=_is_node),
      jax.tree_util.tree_leaves(params),
    ):
      if isinstance(d, _tree.WeightNormed) and jnp.shape(d.v) != jnp.shape(p):
        raise ValueError(
          f'wn_jax.optim.weight_norm: a weight of shape {jnp.shape(p)} meets a state '
          f'direction of shape {jnp.shape(d.v)}; the params changed since init. Re-run '
          f'tx.init on the new params.'
        )
    norms = _norms(state.directions) if state.norms is None else state.norms

    def pullback(grads: Any) -> Any:  # w-coordinates -> (v, g) coordinates
      return jax.tree_util.tree_map(
        lambda d, n, gw: (
          gw
          if isinstance(d, optax.MaskedNode)
          else _tree.WeightNormed(*_core.pullback(d.v, d.g, n, gw, d.axis), d.axis)
        ),
        state.directions,
        norms,
        grads,
        is_leaf=_is_node,
      )

    inner_updates, inner_state = inner.update(
      pullback(updates), state.inner_state, wn, **_in_vg_coordinates(extra_args, pullback)
    )
    new_wn = optax.apply_updates(wn, inner_updates)
    leaves, structure = jax.tree_util.tree_flatten(state.directions, is_leaf=_is_node)
    out, directions, new_norms = [], [], []
    for d, nw, p, u in zip(
      leaves,
      structure.flatten_up_to(new_wn),
      structure.flatten_up_to(params),
      structure.flatten_up_to(inner_updates),
    ):
      if isinstance(d, optax.MaskedNode):
        out.append(u)
        directions.append(d)
        new_norms.append(d)
        continue
      w, n = _core.normalize_with_norm(nw.v, nw.g, nw.axis)
      out.append((w - p).astype(p.dtype))
      directions.append(nw)
      new_norms.append(n)
    out = jax.tree_util.tree_unflatten(treedef, jax.tree_util.tree_leaves(structure.unflatten(out)))
    return out, WeightNormState(
      structure.unflatten(directions), inner_state, structure.unflatten(new_norms)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _directions_and_rest(state: WeightNormState, params: Any, caller: str) -> Any:
  """The tree ``inner`` trains: the state's (v, g) at selected leaves, ``params`` elsewhere."""
  try:
    return jax.tree_util.tree_map(
      lambda d, p: p if isinstance(d, optax.MaskedNode) else d,
      state.directions,
      params,
      is_leaf=_is_node,
    )
  except ValueError as e:
    raise ValueError(
      f'{caller}: params do not have the structure they had at init ({e}). Re-run '
      f'tx.init on the new params.'
    ) from None


def schedule_free_eval_params(state: WeightNormState, params: Any) -> Any:
  r"""The weights to evaluate at, for ``weight_norm(optax.contrib.schedule_free(...))``.

  ``optax.contrib.schedule_free_eval_params`` on the inner optimizer's state and its (v, g)
  tree, then recomposed: schedule-free averages in the coordinates it trains, so the
  evaluation weights are $g_x v_x / \lVert v_x \rVert$ of its (v, g) evaluation point.

  Args:
    state: the ``WeightNormState`` of ``weight_norm(schedule_free(...))`` (or of a
      ``schedule_free_*`` optimizer), as ``tx.update`` returns it.
    params: the current weights ``w``, as passed to ``tx.update``.

  Returns:
    A tree like ``params`` (bare arrays) of the weights to evaluate the model at.

  Examples:
    >>> import jax.numpy as jnp, optax, wn_jax
    >>> params = {'w': jnp.array([[3.0, 1.0], [4.0, 1.0]])}
    >>> tx = wn_jax.optim.weight_norm(optax.contrib.schedule_free_sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((2, 2))}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> wn_jax.optim.schedule_free_eval_params(state, params)['w'].shape
    (2, 2)
  """
  caller = 'wn_jax.optim.schedule_free_eval_params'
  if not isinstance(state, WeightNormState):
    raise ValueError(
      f'{caller}: expected the WeightNormState of wn_jax.optim.weight_norm(...), got a '
      f'{type(state).__name__}. For a schedule-free optimizer used alone, call '
      f'optax.contrib.schedule_free_eval_params.'
    )
  wn = _directions_and_rest(state, _values(params), caller)
  return _tree.materialize(optax.contrib.schedule_free_eval_params(state.inner_state, wn))


def _norms(directions: Any) -> Any:
  """``||v||`` of each ``WeightNormed`` direction (``MaskedNode`` elsewhere)."""
  return jax.tree_util.tree_map(
    lambda d: d if isinstance(d, optax.MaskedNode) else _core.norm(d.v, d.axis),
    directions,
    is_leaf=_is_node,
  )


# The extra arguments of optax's optimizers that are functions of the params: the line
# searches' value_fn, sophia's (Hutchinson estimator's) obj_fn.
_FUNCTIONS_OF_PARAMS = ('value_fn', 'obj_fn')


def _in_vg_coordinates(extra_args: dict[str, Any], pullback: Any) -> dict[str, Any]:
  """The inner optimizer's extra arguments, moved from ``w`` to ``(v, g)`` coordinates.

  ``grad`` is pulled back like the updates; ``value_fn`` and ``obj_fn`` are composed with
  :func:`wn_jax.materialize` (their signatures kept, so optax hands them the same keyword
  arguments); ``value`` and anything else are the same in both coordinates.
  """
  out = dict(extra_args)
  if out.get('grad') is not None:
    out['grad'] = pullback(out['grad'])
  for name in _FUNCTIONS_OF_PARAMS:
    if out.get(name) is not None:
      out[name] = _of_directions(out[name])
  return out


def _of_directions(fn: Any) -> Any:
  """``fn`` of the weights as a function of the (v, g) tree: ``fn(materialize(wn), ...)``."""

  @functools.wraps(fn)
  def fn_vg(wn, *args, **kwargs):
    return fn(_tree.materialize(wn), *args, **kwargs)

  return fn_vg


def _refuse_weight_normed(params: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)[0]:
    if isinstance(leaf, _tree.WeightNormed):
      raise ValueError(
        f'wn_jax.optim.weight_norm: params {_tree.path_str(path)!r} is already a '
        f'WeightNormed node. This transformation takes plain weights w and keeps (v, g) '
        f"itself. Either hand it plain weights (a plain model's params, or "
        f'wn_jax.materialize(params)), or train the WeightNormed tree with the inner '
        f'optimizer alone, the loss calling wn_jax.materialize (way 2).'
      )


def _path_keys(path: tuple) -> tuple[str, ...]:
  keys = _tree.path_str(path).split('/')
  return tuple(keys[:-1]) if keys and keys[-1] == 'value' else tuple(keys)


def decay_mask(params: Any) -> Any:
  """A mask for weight decay that never decays a magnitude ``g``.

  ``True`` for every leaf but the magnitudes, recognised by structure (a name alone
  decides nothing: an AdaLN's ``nn.Dense(name='scale')`` is decayed like any layer):

  - ``g`` of a :class:`wn_jax.WeightNormed`;
  - a WN layer's ``scale`` (linen or NNX): an array beside a ``kernel`` whose shape is
    the kernel's along some kept axes (in order), e.g. ``(out,)`` for an ``(in, out)``
    kernel, ``()`` for ``axis=None``;
  - a ``WeightNorm`` wrapper's ``scale`` tree (linen or NNX): a tree whose only
    neighbours are the wrapped ``layer`` (or none: a linen layer built by the parent
    keeps its parameters beside the wrapper), that mirrors the layer's parameters, each
    of its arrays at the path of a layer parameter and shaped like it along a strict
    subset of its axes (a wrapper keeping every axis is not recognised, and is decayed).

  A ``scale`` array without such a ``kernel`` (LayerNorm's), or whose shape does not
  fit it, is decayed as usual. Decaying ``g`` would shrink the weights' length, which
  weight decay on ``v`` leaves alone (``w`` does not depend on ``||v||``). Pass it as
  ``optax.adamw(lr, mask=wn_jax.optim.decay_mask)``.

  A hand-written module with a ``kernel`` and a ``scale`` shaped like its kept axes
  reads as a WN layer; give it another name to have it decayed.

  Args:
    params: parameters: a linen params dict, an NNX ``State``, or a tree with
      ``WeightNormed`` leaves.

  Returns:
    A pytree of bools with the structure of ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp, wn_jax
    >>> layer = wn_jax.linen.WNDense(2)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3)))['params']
    >>> wn_jax.optim.decay_mask(params)
    {'bias': True, 'kernel': True, 'scale': False}
    >>> wn_jax.optim.decay_mask({'scale': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}})
    {'scale': {'bias': True, 'kernel': True}}
  """
  shapes = {
    _path_keys(p): jnp.shape(x)
    for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)[0]
    if not _is_node(x)
  }

  def fits(keys: tuple[str, ...], of: tuple[str, ...]) -> bool:
    return of in shapes and _axes.fits_kept_axes(shapes[keys], shapes[of])

  wrapper_scale = functools.cache(lambda prefix: _fold.is_wrapper_scale(shapes, prefix))

  def is_magnitude(keys: tuple[str, ...]) -> bool:
    return any(
      k == 'scale'
      and (
        fits(keys, keys[:i] + ('kernel',)) if i == len(keys) - 1 else wrapper_scale(keys[: i + 1])
      )
      for i, k in enumerate(keys)
    )

  def mask(path, leaf):
    if isinstance(leaf, _tree.WeightNormed):
      return _tree.WeightNormed(True, False, leaf.axis)
    return not is_magnitude(_path_keys(path))

  return jax.tree_util.tree_map_with_path(mask, params, is_leaf=_is_node)


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
  $1 / \lVert v \rVert^2$ (see :func:`direction_stats` and the guide *Effective learning
  rate*).

  Directions are found by structure, with the rule :func:`decay_mask` and
  :func:`wn_jax.linen.fold` use: the ``kernel`` of a linen or NNX WN layer (a ``kernel``
  beside a ``scale`` shaped like its kept axes), each parameter of a layer a
  ``WeightNorm`` wrapper normalizes (its ``scale`` tree, :func:`decay_mask`'s rule), and
  ``v`` of every :class:`wn_jax.WeightNormed`. Every other leaf's update passes unchanged.
  For the optimizer route, where ``v`` lives in the state, use
  ``weight_norm(inner, project=...)``.

  Args:
    norm: ``'init'`` (each slice keeps its norm at ``init``; an all-zero slice gets 1, as
      :func:`wn_jax.decompose` gives ``g``), or a positive constant for every slice (a
      float, or an array under ``optax.inject_hyperparams``).
    axis: the kept axis of WN layers and wrappers, as :func:`wn_jax.linen.fold` takes it:
      ``'infer'`` (from each scale's shape, refused where several axes fit, e.g. a
      square kernel), an int, tuple or ``None`` for all, or a mapping from layer path
      (``'block/WNDense_0'``; a wrapper's own path) to axis: ``wn_jax.linen.layer_axes(
      model, x)`` or ``wn_jax.nnx.layer_axes(model)``. ``WeightNormed`` nodes carry theirs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  Raises:
    ValueError: for a ``norm`` that is neither ``'init'`` nor positive; from ``init`` or
      ``update``, for a layer whose axis cannot be read (named), for params that changed
      structure since ``init``, or for ``update`` without ``params`` or with a state that
      is not a ``ProjectDirectionsState``.

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
  caller = 'wn_jax.optim.project_directions'
  if isinstance(norm, str) and norm != 'init':
    raise ValueError(f"{caller}: norm must be 'init' or a positive number; got {norm!r}.")
  constant = not isinstance(norm, str)
  if constant:
    _check_norm(norm, caller)

  def init_fn(params):
    params = _values(params)
    kept = _direction_axes(params, axis, caller)
    if all(k is None for k in kept):
      raise ValueError(
        f'{caller}: found no weight-normalized direction in the params (a kernel beside a '
        f"scale of a WN layer, a WeightNorm wrapper's parameters, or WeightNormed.v), so it "
        f'would do nothing. Chain it after the optimizer of a model with WN layers, or use '
        f'wn_jax.optim.weight_norm(inner, project=...) for a plain model.'
      )
    if constant:
      return ProjectDirectionsState(None)
    nodes, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_node)
    targets = [
      optax.MaskedNode() if k is None else _target(_direction(x), k) for x, k in zip(nodes, kept)
    ]
    return ProjectDirectionsState(treedef.unflatten(targets))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
        f'{caller}: update needs params (the current parameters, holding v); call '
        f'tx.update(grads, state, params), as optax.chain does when given params.'
      )
    if not isinstance(state, ProjectDirectionsState):
      raise ValueError(
        f'{caller}: update got a state of type {type(state).__name__}, not the '
        f'ProjectDirectionsState that tx.init returns (a checkpoint restored without a '
        f'target?). Restore with a target: jax.eval_shape(tx.init, params).'
      )
    treedef = jax.tree_util.tree_structure(updates, is_leaf=_is_masked)  # optax.masked's
    params, updates = _values(params), _values(updates)
    kept = _direction_axes(params, axis, caller)
    nodes, node_def = jax.tree_util.tree_flatten(params, is_leaf=_is_node)
    update_nodes = node_def.flatten_up_to(updates)
    if constant:
      targets = [None] * len(nodes)
    else:
      try:
        targets = node_def.flatten_up_to(state.targets)
      except (ValueError, TypeError) as e:
        raise ValueError(
          f'{caller}: params do not have the structure they had at init ({e}). Re-run '
          f'tx.init on the new params.'
        ) from None
    out = []
    for x, u, k, t in zip(nodes, update_nodes, kept, targets):
      if k is None:
        out.append(u)
        continue
      v, dv = _direction(x), _direction(u)
      shape = _core.scale_shape(v.shape, k)
      t = jnp.broadcast_to(jnp.asarray(norm, _acc(v)), shape) if t is None else t
      if jnp.shape(t) != shape:
        raise ValueError(
          f'{caller}: a direction of shape {v.shape} meets a target norm of shape '
          f'{jnp.shape(t)} in the state; the params changed since init. Re-run tx.init.'
        )
      dv = _project(v, dv, t, k)
      out.append(_tree.WeightNormed(dv, u.g, u.axis) if isinstance(u, _tree.WeightNormed) else dv)
    leaves = jax.tree_util.tree_leaves(node_def.unflatten(out), is_leaf=_is_masked)
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_norm(norm: Any, caller: str) -> None:
  """A constant target must be positive and finite (checked where it is concrete: not under
  ``jit``, where ``optax.inject_hyperparams`` passes a traced one)."""
  if isinstance(norm, jax.core.Tracer):
    return
  try:
    value = np.asarray(norm, np.float64)
  except (TypeError, ValueError):
    value = np.array(np.nan)
  if isinstance(norm, bool) or not (np.all(np.isfinite(value)) and np.all(value > 0)):
    raise ValueError(
      f'{caller}: norm must be positive and finite (a direction of norm 0 has no direction, '
      f"and a negative one flips it); got {norm!r}. Pass norm='init' to keep each slice's "
      f'norm at init.'
    )


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _direction(x: Any) -> Any:
  """``v``: the node's, or the leaf itself (a WN layer's or a wrapped layer's kernel)."""
  return x.v if isinstance(x, _tree.WeightNormed) else x


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


def _direction_axes(params: Any, axis: _fold.AxisSpec, caller: str) -> list[Any]:
  """For each leaf of ``params`` flattened with ``WeightNormed`` nodes whole: the kept axes
  of its direction, or ``None`` where it holds none.

  A ``WeightNormed`` node's ``v`` (its own axis); a WN layer's ``kernel`` (beside a
  ``scale`` array shaped like its kept axes, :func:`decay_mask`'s rule); each parameter a
  ``WeightNorm`` wrapper's ``scale`` tree mirrors (:func:`wn_jax._fold.wrapped_layers`).
  The axis of the latter two is ``axis`` at the layer's (the wrapper's) path, as in fold.
  """
  nodes = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)[0]
  shapes = {_path_keys(p): tuple(jnp.shape(x)) for p, x in nodes if not _is_node(x)}
  with _errors.labelled(caller):
    axis_of = _fold.axis_of(axis)
  wrapped: dict[tuple[str, ...], tuple[tuple[int, ...], tuple[str, ...]]] = {}
  prefixes = {k[: i + 1] for k in shapes for i, part in enumerate(k[:-1]) if part == 'scale'}
  for prefix in sorted(prefixes):
    layers = _fold.wrapped_layers(shapes, prefix)
    if len(layers) > 1:
      raise ValueError(
        f"{caller}: the WeightNorm wrapper scale tree '{'/'.join(prefix)}' mirrors the "
        f'parameters of several layers ({["/".join(c) for c in layers]}), so the parameters '
        f'do not say which one it normalizes. Build the wrapped layer inside the wrapper '
        f'(its params then sit under the wrapper), or use the pytree route.'
      )
    for layer in layers:
      for k, shape in shapes.items():
        if k[: len(prefix)] == prefix:
          wrapped[layer + k[len(prefix) :]] = (shape, prefix[:-1])

  def kept_of(owner: tuple[str, ...], v_shape: tuple[int, ...], g_shape: tuple[int, ...]):
    where = '/'.join(owner)
    with _errors.labelled(caller):
      a = axis_of(where)
      if isinstance(a, str):
        a = _fold.inferred(where, v_shape, g_shape)
      with _errors.labelled(f"layer '{where}'"):
        kept = _axes.kept_axes(len(v_shape), a)
    if _core.scale_shape(v_shape, kept) != g_shape:
      raise ValueError(
        f"{caller}: layer '{where}': its scale has shape {g_shape}, but a kernel of shape "
        f'{v_shape} keeping axis {a!r} needs {_core.scale_shape(v_shape, kept)}. Pass each '
        f"layer's own axis: axis=layer_axes(model, ...), or a mapping {{'{where}': ...}}."
      )
    return kept

  out: list[Any] = []
  for path, x in nodes:
    if isinstance(x, _tree.WeightNormed):
      with _errors.labelled(caller):
        out.append(_axes.kept_axes(jnp.ndim(x.v), x.axis))
      continue
    keys = _path_keys(path) if not _is_node(x) else ()
    scale = shapes.get(keys[:-1] + ('scale',)) if keys and keys[-1] == 'kernel' else None
    if scale is not None and _axes.fits_kept_axes(scale, shapes[keys]):
      out.append(kept_of(keys[:-1], shapes[keys], scale))
    elif keys in wrapped:
      out.append(kept_of(wrapped[keys][1], shapes[keys], wrapped[keys][0]))
    else:
      out.append(None)
  return out


def direction_stats(
  params: Any, updates: Any = None, *, axis: _fold.AxisSpec = _fold.INFER
) -> dict[str, jax.Array]:
  r"""Per-direction norms and effective step sizes, for a training loop to log.

  For each direction $v$ that :func:`project_directions` finds (same rule, same ``axis``),
  averaged over its slices $j$ (one per ``g`` entry):

  - ``'<path>/norm'``: the mean of $\lVert v_j \rVert$;
  - ``'<path>/step'`` (with ``updates``): the mean of $\lVert \Delta v_j \rVert / \lVert
    v_j \rVert$, the effective step: how far the step turns the direction of $w$.

  Why it matters (Salimans & Kingma, section 2.2): with $w = g \, v / \lVert v \rVert$,
  $\nabla_v L = \frac{g}{\lVert v \rVert} (I - u u^\top) \nabla_w L$, $u = v / \lVert v
  \rVert$: orthogonal to $v$ and scaled by $g / \lVert v \rVert$. A gradient step then
  makes $\lVert v \rVert$ grow ($\lVert v + \Delta v \rVert^2 = \lVert v \rVert^2 +
  \lVert \Delta v \rVert^2$), and the effective step shrinks like $1 / \lVert v
  \rVert^2$ for SGD (like $1 / \lVert v \rVert$ for Adam, whose step size does not scale
  with the gradient): an implicit learning-rate decay. :func:`project_directions` holds
  $\lVert v \rVert$ fixed, which keeps the effective step at the one the learning rate sets
  (Lyle et al., 2024; Hoffer et al., 2018).

  Args:
    params: the parameters (linen, NNX state or pure dict, or a tree with
      ``WeightNormed`` nodes, e.g. ``weight_norm``'s ``state.directions``).
    updates: the updates of the step (as the optimizer returns them), or ``None``.
    axis: the kept axis of WN layers and wrappers, as in :func:`project_directions`.

  Returns:
    A flat dict of float32 scalars keyed ``'<path>/norm'`` and ``'<path>/step'``, the path
    ``/``-joined (``'Dense_0/kernel'``). Works under ``jit``.

  Examples:
    >>> import jax.numpy as jnp, wn_jax
    >>> params = wn_jax.weight_norm({'w': jnp.array([[3.0, 0.0], [4.0, 2.0]])})
    >>> updates = wn_jax.WeightNormed(jnp.array([[0.4, 0.0], [-0.3, 1.0]]), jnp.zeros(2))
    >>> stats = wn_jax.optim.direction_stats(params, {'w': updates})
    >>> round(float(stats['w/norm']), 6), round(float(stats['w/step']), 6)  # (5+2)/2, (.1+.5)/2
    (3.5, 0.3)
  """
  caller = 'wn_jax.optim.direction_stats'
  params = _values(params)
  kept = _direction_axes(params, axis, caller)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)[0]
  paths, nodes = [p for p, _ in flat], [x for _, x in flat]
  if updates is None:
    update_nodes: list[Any] = [None] * len(nodes)
  else:  # updates have the structure of params
    update_nodes = jax.tree_util.tree_leaves(_values(updates), is_leaf=_is_node)
  out = {}
  for path, x, u, k in zip(paths, nodes, update_nodes, kept):
    if k is None:
      continue
    name = '/'.join(_path_keys(path))
    n = _core.norm(_direction(x), k)
    out[f'{name}/norm'] = jnp.mean(n)
    if u is not None:
      safe = jnp.where(n > 0, n, 1.0)
      out[f'{name}/step'] = jnp.mean(_core.norm(_direction(u), k) / safe)
  return out
