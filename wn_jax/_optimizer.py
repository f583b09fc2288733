"""The optax transformation that trains plain weights ``w`` in coordinates ``(v, g)``."""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any
from typing import cast

import jax
import jax.numpy as jnp
import optax

from wn_jax import _axes
from wn_jax import _boxes
from wn_jax import _core
from wn_jax import _errors
from wn_jax import _fold
from wn_jax import _tree
from wn_jax._optax_util import check_update_args
from wn_jax._optax_util import in_structure
from wn_jax._optax_util import is_masked
from wn_jax._optax_util import is_node
from wn_jax._optax_util import unwrap
from wn_jax._projection import projection

_CALLER = 'wn_jax.optim.weight_norm'


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=['directions', 'inner_state', 'norms'],
  meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
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

  def replace(self, **changes: Any) -> WeightNormState:
    """The state with the fields named in ``changes`` replaced."""
    return dataclasses.replace(self, **changes)


def weight_norm(
  inner: optax.GradientTransformation,
  axis: _axes.LeafAxis = -1,
  *,
  where: _tree.Where = None,
  project: str | float | None = None,
) -> optax.GradientTransformation:
  r"""Trains plain weights ``w`` in weight-normalized coordinates ``w = g v / ||v||``.

  The state keeps ``(v, g)`` for every selected leaf (initialized function-preserving,
  ``v = w``, ``g = ||w||``; ``g = 1`` on an all-zero slice, as :func:`wn_jax.decompose`
  sets it, so after the first step such a slice has ``||w|| = 1`` whatever the learning
  rate: leave a zero-initialized layer out with ``where=``, or start it small and random).
  Each update maps the gradient with respect to ``w`` to the gradients with respect to
  ``(v, g)`` by the chain rule (the paper's eq. 3):

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
  ``tx.init(params)``. So nothing may change the updates after it: in ``optax.chain`` it
  comes last (``optax.scale``, clipping, ``scale_by_learning_rate`` or ``reduce_on_plateau``
  after it take wrong steps, silently; put them in ``inner``). And each update must reach
  ``params`` before the next: a wrapper that holds updates back or resets ``params``
  between them (``optax.apply_every``,
  ``optax.lookahead`` around this transformation) takes wrong steps, silently; accumulate
  with ``optax.MultiSteps``, which passes the parameters it holds. Works with
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` as with
  ``tx.update(grads, state, nnx.state(model, nnx.Param))``.

  Extra arguments of ``update`` reach ``inner`` in (v, g) coordinates, so line-search
  optimizers (``optax.lbfgs``, ``optax.scale_by_zoom_linesearch``) and optax's contrib
  optimizers (``sophia``, ``momo``, ``reduce_on_plateau``) work: ``grad`` is pulled back
  like the updates, ``value_fn`` and ``obj_fn`` are composed with
  :func:`wn_jax.materialize`, ``value`` is the same. For ``optax.contrib.schedule_free``,
  evaluate at :func:`schedule_free_eval_params` (optax's own reads the inner state). Take
  ``value`` and ``grad`` in ``w`` each step with ``jax.value_and_grad(fn)(params)``:
  ``optax.value_and_grad_from_state`` would read the gradient the inner state keeps, which
  is in (v, g) coordinates.

  Args:
    inner: the optimizer applied in (v, g) coordinates, e.g. ``optax.adam(1e-3)``.
    axis: the kept axis or axes of every selected leaf (default ``-1``, the output
      features of Flax kernels), or each leaf's own, as in :func:`wn_jax.weight_norm` (a
      mapping from each selected leaf's ``/``-joined path, or a callable on it): a stack
      of layers keeps its layer axis too, ``(0, -1)``. (Under ``optax.inject_hyperparams``,
      which takes a callable for a schedule, pass ``static_args=('axis',)``.)
    where: the selection, as in :func:`wn_jax.weight_norm` (default: floating leaves with
      ``ndim >= 2`` but biases and what a WN layer or wrapper normalizes already).
    project: ``None`` (or ``False``: off), or ``'init'`` or a positive number: each step
      puts every ``v`` it selected back on its target norm, as :func:`project_directions`
      (chained after ``inner`` in (v, g) coordinates) does; ``w`` is the same to float
      rounding. WN layers and wrappers beside them are not projected: chain
      ``project_directions(axis=layer_axes(...))`` for those.

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
  if not (callable(getattr(inner, 'init', None)) and callable(getattr(inner, 'update', None))):
    raise ValueError(
      f'{_CALLER}: inner must be an optax GradientTransformation, such as optax.sgd(0.1); '
      f'got {inner!r}. Call the optimizer: weight_norm(optax.sgd(...)), not '
      f'weight_norm(optax.sgd).'
    )
  if project is not None and project is not False:
    named = (_CALLER, 'project')  # True is refused: 'init' or a target norm switches it on
    inner = optax.chain(inner, projection(project, _fold.INFER, nodes_only=True, named=named))

  def init_fn(params):
    _boxes.refuse_module(params, _CALLER)
    _refuse_weight_normed(params)
    # Copies, so the state never shares a buffer with params (safe to donate both).
    with _errors.labelled(_CALLER):
      wn = _tree.decomposed(jax.tree_util.tree_map(jnp.copy, unwrap(params)), axis, where)
    directions = jax.tree_util.tree_map(
      lambda x: x if isinstance(x, _tree.WeightNormed) else optax.MaskedNode(), wn, is_leaf=is_node
    )
    return WeightNormState(directions, inner.init(wn), _norms(directions))

  def update_fn(updates, state, params=None, **extra_args):
    check_update_args(_CALLER, state, params, WeightNormState, 'the current weights w')
    _refuse_weight_normed(params)
    structure = jax.tree_util.tree_structure(updates, is_leaf=is_masked)  # optax.masked's
    params, updates = unwrap(params), unwrap(updates)
    wn = _directions_and_rest(state.directions, params, _CALLER)
    _check_shapes(state.directions, params)
    _check_gradients(params, updates)
    if extra_args.get('grad') is not None:
      _check_gradients(params, extra_args['grad'], "the extra argument 'grad'")
    norms = _norms(state.directions) if state.norms is None else state.norms
    pullback = functools.partial(_pullback, state.directions, norms)
    inner_updates, inner_state = inner.update(
      pullback(updates), state.inner_state, wn, **_in_vg_coordinates(extra_args, pullback)
    )
    new_wn = optax.apply_updates(wn, inner_updates)
    out, directions, new_norms = _recompose(state.directions, new_wn, params, inner_updates)
    return in_structure(structure, out), WeightNormState(directions, inner_state, new_norms)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _refuse_weight_normed(params: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]:
    if isinstance(leaf, _tree.WeightNormed):
      raise ValueError(
        f'{_CALLER}: params {_tree.path_str(path)!r} is already a '
        f'WeightNormed node. This transformation takes plain weights w and keeps (v, g) '
        f"itself. Either hand it plain weights (a plain model's params, or "
        f'wn_jax.materialize(params)), or train the WeightNormed tree with the inner '
        f'optimizer alone, the loss calling wn_jax.materialize (way 2).'
      )


def _check_shapes(directions: Any, params: Any, caller: str = _CALLER) -> None:
  def check(d: _tree.WeightNormed, w: Any) -> None:
    if jnp.shape(d.v) != jnp.shape(w):
      raise ValueError(
        f'{caller}: a weight of shape {jnp.shape(w)} meets a state '
        f'direction of shape {jnp.shape(d.v)}; the params changed since init. Re-run '
        f'tx.init on the new params.'
      )

  _at_directions(check, directions, params)


def _check_gradients(params: Any, updates: Any, what: str = 'the gradients') -> None:
  """The gradients ``update`` got (or its extra ``grad``) fit ``params``: their structure, and
  each leaf's shape (optax would broadcast a wrong one silently)."""
  fix = (
    'Pass the gradients of the loss with respect to params, jax.grad(loss)(params): one '
    'of each weight, in the tree tx.update gets as params.'
  )
  leaf = lambda x: x is None or is_masked(x)  # a None gradient (a frozen leaf) is named
  ours, expected = jax.tree_util.tree_flatten_with_path(params, is_leaf=leaf)
  theirs, got = jax.tree_util.tree_flatten_with_path(updates, is_leaf=leaf)
  if cast(Any, expected) != got:  # other keys, or the same keys in other containers
    keys = lambda leaves: {_tree.path_str(_tree.param_path(p)) for p, _ in leaves}
    missing, extra = sorted(keys(ours) - keys(theirs))[:4], sorted(keys(theirs) - keys(ours))[:4]
    kinds, names = '', {type(updates).__name__, type(params).__name__}
    if len(names) > 1:
      to = 'nnx.to_pure_dict' if 'State' in names else 'flax.core.freeze / unfreeze'
      kinds = f'; a {type(updates).__name__} for a {type(params).__name__}: {to}'
    elif not (missing or extra):  # where the containers part (a box, a dataclass's fields)
      at = next((pa for (pa, _), (pb, _) in zip(ours, theirs) if pa != pb), None)
      kinds = f'; they part at {_tree.path_str(at)!r}' if at else '; containers differ'
    raise ValueError(
      f'{_CALLER}: {what} do not have the structure of params (missing {missing}, extra '
      f'{extra}{kinds}). {fix}'
    )
  shape = lambda x: None if x is None else jnp.shape(x)
  for (path, w), (_, u) in zip(ours, theirs):
    if not is_masked(w) and shape(u) != shape(w):
      got_u = f'an array of shape {jnp.shape(u)}' if hasattr(u, 'shape') else f'{u!r}'
      raise ValueError(
        f'{_CALLER}: {what} hold {got_u} at {_tree.path_str(_tree.param_path(path))!r}, for '
        f'a parameter of shape {jnp.shape(w)}. {fix}'
      )


def _at_directions(fn: Callable[..., Any], directions: Any, *trees: Any) -> Any:
  """``fn(d, *xs)`` at each ``WeightNormed`` direction ``d`` of ``directions``, with the
  subtrees ``xs`` of ``trees`` at its place; ``MaskedNode()`` elsewhere."""
  return jax.tree_util.tree_map(
    lambda d, *xs: d if is_masked(d) else fn(d, *xs), directions, *trees, is_leaf=is_node
  )


def _or_rest(directions: Any, at: Any, rest: Any) -> Any:
  """``at``'s subtree at each direction, ``rest``'s elsewhere."""
  return jax.tree_util.tree_map(
    lambda d, a, r: r if is_masked(d) else a, directions, at, rest, is_leaf=is_node
  )


def _directions_and_rest(directions: Any, params: Any, caller: str) -> Any:
  """The tree ``inner`` trains: the state's (v, g) at selected leaves, ``params`` elsewhere."""
  try:
    return _or_rest(directions, directions, params)
  except ValueError as e:
    raise ValueError(
      f'{caller}: params do not have the structure they had at init ({e}). Pass them in '
      f'the form tx.init got (for nnx.Optimizer: nnx.state(model, nnx.Param), not a pure '
      f'dict), or re-run tx.init on new params.'
    ) from None


def _norms(directions: Any) -> Any:
  """``||v||`` of each ``WeightNormed`` direction (``MaskedNode`` elsewhere)."""
  return _at_directions(lambda d: _core.norm(d.v, d.axis), directions)


def _pullback(directions: Any, norms: Any, grads: Any) -> Any:
  """Gradients with respect to ``w`` -> with respect to ``(v, g)`` (unselected leaves kept)."""
  vg = lambda d, n, gw: _tree.WeightNormed(*_core.pullback(d.v, d.g, n, gw, d.axis), d.axis)
  return _or_rest(directions, _at_directions(vg, directions, norms, grads), grads)


def _recompose(directions: Any, new_wn: Any, params: Any, inner_updates: Any) -> tuple:
  """After the inner step to ``new_wn``: the updates of ``params`` (the recomposed weights
  minus the current ones; ``inner``'s own at unselected leaves), the new directions and
  their norms."""
  directions = _at_directions(lambda d, new: new, directions, new_wn)
  weights_and_norms = _at_directions(
    lambda d: _core.normalize_with_norm(d.v, d.g, d.axis), directions
  )
  step = lambda d, wn, p: (wn[0] - p).astype(p.dtype)
  out = _or_rest(
    directions, _at_directions(step, directions, weights_and_norms, params), inner_updates
  )
  norms = _at_directions(lambda d, wn: wn[1], directions, weights_and_norms)
  return out, directions, norms


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
    return fn(_tree.weights(wn), *args, **kwargs)

  return fn_vg


def _weight_norm_state(state: Any) -> Any:
  """The one ``WeightNormState`` in ``state`` (a chain's, say), else ``state`` as it is."""
  found = [
    x
    for x in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, WeightNormState))
    if isinstance(x, WeightNormState)
  ]
  return found[0] if len(found) == 1 else state


def schedule_free_eval_params(state: WeightNormState, params: Any) -> Any:
  r"""The weights to evaluate at, for ``weight_norm(optax.contrib.schedule_free(...))``.

  ``optax.contrib.schedule_free_eval_params`` on the inner optimizer's state and its (v, g)
  tree, then recomposed: schedule-free averages in the coordinates it trains, so the
  evaluation weights are $g_x v_x / \lVert v_x \rVert$ of its (v, g) evaluation point.

  Args:
    state: the ``WeightNormState`` of ``weight_norm(schedule_free(...))`` (or of a
      ``schedule_free_*`` optimizer, alone or in a chain, with or without ``project=``), as
      ``tx.update`` returns it, or a state holding one (a chain around ``weight_norm``,
      ``nnx.Optimizer``'s ``opt_state``). Under ``optax.masked`` or ``multi_transform``, each
      schedule-free state evaluates the parameters it trains; the others are ``params``.
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
  state = _weight_norm_state(unwrap(state))  # nnx.Optimizer's OptArray variables, a chain
  if not isinstance(state, WeightNormState):
    raise ValueError(
      f'{caller}: expected the WeightNormState of wn_jax.optim.weight_norm(...), got a '
      f'{type(state).__name__}. For a schedule-free optimizer used alone, call '
      f'optax.contrib.schedule_free_eval_params.'
    )
  params = unwrap(params)
  wn = _directions_and_rest(state.directions, params, caller)
  _check_shapes(state.directions, params, caller)
  found = _schedule_free_states(state.inner_state)
  if not found:
    raise ValueError(
      f"{caller}: found no schedule-free state in the inner optimizer's state: expected "
      f'weight_norm(optax.contrib.schedule_free_*(...)), alone, in a chain or under '
      f'optax.masked / multi_transform. Evaluate a model trained with another optimizer at '
      f'params.'
    )
  trained: collections.Counter[str] = collections.Counter()
  x = wn
  for sf in found:
    # sf.z holds MaskedNode() at the parameters this schedule-free optimizer does not train
    # (optax.masked, multi_transform): evaluate the others, keep the point found so far there.
    y = _trained_part(sf.z, wn, caller)
    trained.update(_tree.path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(y))
    at = optax.contrib.schedule_free_eval_params(sf, y)
    x = jax.tree_util.tree_map(lambda a, b: b if is_masked(a) else a, at, x, is_leaf=is_masked)
  twice = [path for path, n in trained.items() if n > 1]
  if twice:
    raise ValueError(
      f'{caller}: {max(trained.values())} schedule-free states train the same parameters '
      f'({", ".join(twice[:4])}): their evaluation points differ. Train each parameter with '
      f'one schedule-free optimizer.'
    )
  return _tree.weights(x)


def _trained_part(z: Any, wn: Any, caller: str) -> Any:
  """``wn`` where ``z`` (a schedule-free state's) holds values, ``MaskedNode()`` elsewhere."""

  def part(zi: Any, yi: Any) -> Any:
    if is_masked(zi):
      return zi
    for a, b in zip(jax.tree_util.tree_leaves(zi), jax.tree_util.tree_leaves(yi)):
      if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
          f'{caller}: a parameter of shape {jnp.shape(b)} meets the schedule-free '
          f"state's of shape {jnp.shape(a)}; the params changed since init. Re-run tx.init "
          f'on the new params.'
        )
    return yi

  return jax.tree_util.tree_map(part, z, wn, is_leaf=is_masked)


def _schedule_free_states(state: Any) -> list[Any]:
  """Every ``ScheduleFreeState`` in an optax state: alone, or inside the states of
  ``optax.chain`` (``project=`` chains one), ``masked``, ``inject_hyperparams``, ... ."""
  if isinstance(state, optax.contrib.ScheduleFreeState):
    return [state]
  if isinstance(state, dict):
    state = list(state.values())
  if isinstance(state, (tuple, list)):
    return [found for part in state for found in _schedule_free_states(part)]
  return []
