"""The optax transformation: same trajectory as weight_norm + materialize; composition."""

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import wn_jax
from tests.helpers import assert_trees_close
from wn_jax import linen as wl
from wn_jax import nnx as wx

pytestmark = pytest.mark.standard_promotion  # optax's adam needs standard promotion

MODEL = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(16), nn.tanh, nn.Dense(3)])
X = jax.random.normal(jax.random.key(1), (32, 5))
Y = jax.random.normal(jax.random.key(2), (32, 3))


def _loss(params):
  return jnp.mean((MODEL.apply({'params': params}, X) - Y) ** 2)


def _params():
  return MODEL.init(jax.random.key(0), X)['params']


def _run_tx(tx, params, steps):
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(_loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, state, losses


def _run_reparam(inner, params, steps):
  wn = wn_jax.weight_norm(params)
  state = inner.init(wn)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(lambda p: _loss(wn_jax.materialize(p)))(p)
    u, s = inner.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses = []
  for _ in range(steps):
    wn, state, loss = step(wn, state)
    losses.append(float(loss))
  return wn, losses


@pytest.mark.parametrize('inner', [optax.sgd(0.1), optax.adam(3e-3)], ids=['sgd', 'adam'])
def test_same_trajectory_as_reparameterized_training(inner):
  params = _params()
  p_tx, state, l_tx = _run_tx(wn_jax.optim.weight_norm(inner), params, 50)
  wn, l_re = _run_reparam(inner, params, 50)
  np.testing.assert_allclose(l_tx, l_re, rtol=2e-5)
  assert_trees_close(p_tx, wn_jax.materialize(wn), rtol=1e-4, atol=2e-6)
  # The state's (v, g) are the reparameterized run's.
  d = state.directions['layers_0']['kernel']
  np.testing.assert_allclose(d.g, wn['layers_0']['kernel'].g, rtol=1e-4, atol=1e-6)
  assert isinstance(state.directions['layers_0']['bias'], optax.MaskedNode)
  assert l_tx[-1] < 0.8 * l_tx[0]


def test_the_three_ways_follow_one_trajectory():
  # Way 1: WN layers (kernel = v, scale = g); the plain model's params are their weights.
  wn_model = nn.Sequential([wl.WNDense(16), nn.tanh, wl.WNDense(16), nn.tanh, wl.WNDense(3)])
  layers = wn_model.init(jax.random.key(0), X)['params']
  params = {k: {'kernel': p['kernel'], 'bias': p['bias']} for k, p in layers.items()}
  inner = optax.adam(3e-3)
  state = inner.init(layers)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(lambda p: jnp.mean((wn_model.apply({'params': p}, X) - Y) ** 2))(p)
    u, s = inner.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  l_layers = []
  for _ in range(50):
    layers, state, loss = step(layers, state)
    l_layers.append(float(loss))
  wn, l_re = _run_reparam(inner, params, 50)  # way 2
  p_tx, _, l_tx = _run_tx(wn_jax.optim.weight_norm(inner), params, 50)  # way 3
  np.testing.assert_allclose(l_layers, l_re, rtol=2e-5)
  np.testing.assert_allclose(l_tx, l_re, rtol=2e-5)
  for k, p in layers.items():
    np.testing.assert_allclose(p['kernel'], wn[k]['kernel'].v, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(p['scale'], wn[k]['kernel'].g, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(
      p_tx[k]['kernel'], wn_jax.materialize(wn)[k]['kernel'], rtol=1e-4, atol=2e-6
    )
  assert l_layers[-1] < 0.8 * l_layers[0]


def test_gradients_follow_the_papers_formulas():
  from tests import reference as ref

  w = jax.random.normal(jax.random.key(0), (4, 3))
  gw = jax.random.normal(jax.random.key(1), (4, 3))
  tx = wn_jax.optim.weight_norm(optax.sgd(1.0))
  state = tx.init({'w': w})
  # With sgd(1), the (v, g) update is minus the gradient.
  _, new_state = tx.update({'w': gw}, state, {'w': w})
  v, g = np.asarray(w, np.float64), np.asarray(wn_jax.norm(w), np.float64)
  ev, eg = ref.grads(v, g, -1, np.asarray(gw, np.float64))
  np.testing.assert_allclose(new_state.directions['w'].v, v - ev, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.directions['w'].g, g - eg, rtol=1e-5, atol=1e-6)


def test_state_keeps_each_directions_norm_and_rebuilds_it_when_absent():
  params = _params()
  tx = wn_jax.optim.weight_norm(optax.adam(3e-3))
  p_tx, state, losses = _run_tx(tx, params, 5)
  from tests import reference as ref

  for d, n in zip(
    jax.tree_util.tree_leaves(
      state.directions, is_leaf=lambda x: isinstance(x, wn_jax.WeightNormed)
    ),
    jax.tree_util.tree_leaves(state.norms),
  ):
    if isinstance(d, wn_jax.WeightNormed):
      np.testing.assert_allclose(n, ref.norm(np.asarray(d.v, np.float64), -1)[0], rtol=1e-6)
  # A state without norms (built by hand, or from before they were kept) gives the same update.
  grads = jax.tree_util.tree_map(jnp.ones_like, p_tx)
  a = tx.update(grads, state, p_tx)
  b = tx.update(grads, state.replace(norms=None), p_tx)
  assert_trees_close(a[0], b[0], rtol=1e-6, atol=1e-7)
  assert_trees_close(a[1].norms, b[1].norms, rtol=1e-6, atol=1e-7)


def test_a_state_saved_before_norms_were_kept_restores():
  from flax import serialization

  params = _params()
  tx = wn_jax.optim.weight_norm(optax.adam(3e-3))
  p_tx, state, _ = _run_tx(tx, params, 3)
  old = serialization.to_state_dict(state)
  del old['norms']  # what a two-field state (v0.1) saved
  restored = serialization.from_bytes(tx.init(params), serialization.msgpack_serialize(old))
  assert restored.norms is None
  grads = jax.tree_util.tree_map(jnp.ones_like, p_tx)
  a, b = tx.update(grads, state, p_tx), tx.update(grads, restored, p_tx)
  assert_trees_close(a[0], b[0], rtol=1e-6, atol=1e-7)
  assert_trees_close(a[1].norms, b[1].norms, rtol=1e-6, atol=1e-7)
  # A full state round-trips, norms and all, with MaskedNode where there are none.
  back = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
  assert_trees_close(back.norms, state.norms, rtol=0, atol=0)


def test_composes_with_chain_inject_multisteps_and_donation():
  params = _params()
  txs = [
    optax.chain(optax.clip_by_global_norm(1.0), wn_jax.optim.weight_norm(optax.adam(1e-2))),
    wn_jax.optim.weight_norm(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)),
    optax.MultiSteps(wn_jax.optim.weight_norm(optax.sgd(0.1)), every_k_schedule=2),
  ]
  for tx in txs:
    state = tx.init(params)

    @jax.jit
    def step(p, s, tx=tx):
      g = jax.grad(_loss)(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    donated = jax.jit(
      step.__wrapped__ if hasattr(step, '__wrapped__') else step, donate_argnums=(0, 1)
    )
    p, s = jax.tree_util.tree_map(jnp.copy, params), state
    for _ in range(6):
      p, s = donated(p, s)
    assert _loss(p) < _loss(params)


def test_works_inside_optax_masked():
  # optax.masked hands it MaskedNode() for the leaves left out (update used to crash on them).
  params = _params()
  mask = jax.tree_util.tree_map_with_path(lambda path, _: path[0].key != 'layers_4', params)
  inside = {k: v for k, v in params.items() if k != 'layers_4'}
  tx = optax.masked(wn_jax.optim.weight_norm(optax.adam(1e-2)), mask)
  alone = wn_jax.optim.weight_norm(optax.adam(1e-2))
  state, alone_state = tx.init(params), alone.init(inside)
  for _ in range(2):
    grads = jax.grad(_loss)(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    expected, alone_state = alone.update({k: grads[k] for k in inside}, alone_state, inside)
    assert_trees_close({k: updates[k] for k in inside}, expected, rtol=1e-6, atol=1e-7)
    assert_trees_close(updates['layers_4'], grads['layers_4'], rtol=0, atol=0)  # passed through
    params = optax.apply_updates(params, updates)
    inside = optax.apply_updates(inside, expected)


def test_apply_if_finite_skips_a_nan_step_without_corrupting_state():
  params = _params()
  tx = optax.apply_if_finite(wn_jax.optim.weight_norm(optax.adam(1e-2)), max_consecutive_errors=5)
  state = tx.init(params)
  grads = jax.grad(_loss)(params)
  u, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, u)
  bad = jax.tree_util.tree_map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  u_bad, state_bad = tx.update(bad, state, params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(u_bad))
  assert int(state_bad.notfinite_count) == 1
  assert_trees_close(state_bad.inner_state.directions, state.inner_state.directions, rtol=0, atol=0)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state_bad))


def test_state_is_a_plain_checkpointable_pytree():
  params = _params()
  tx = wn_jax.optim.weight_norm(optax.adam(1e-2))
  state = tx.init(params)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  restored = jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])
  u1, _ = tx.update(jax.grad(_loss)(params), state, params)
  u2, _ = tx.update(jax.grad(_loss)(params), restored, params)
  assert_trees_close(u1, u2, rtol=0, atol=0)


def test_decay_mask_never_decays_magnitudes():
  # linen WN layers and a WeightNorm wrapper.
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = wl.WNDense(4)(x)
      return wl.WeightNorm(nn.Dense(2))(x)

  params = M().init(jax.random.key(0), jnp.ones((1, 3)))['params']
  mask = wn_jax.optim.decay_mask(params)
  assert mask['WNDense_0'] == {'bias': True, 'kernel': True, 'scale': False}
  assert mask['WeightNorm_0']['scale'] == {'kernel': False}
  # With a zero gradient only the decay acts.
  tx = optax.adamw(1.0, weight_decay=0.5, mask=wn_jax.optim.decay_mask)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  u, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_array_equal(u['WNDense_0']['scale'], 0.0)
  np.testing.assert_array_equal(u['WeightNorm_0']['scale']['kernel'], 0.0)
  np.testing.assert_allclose(
    u['WNDense_0']['kernel'], -0.5 * params['WNDense_0']['kernel'], rtol=1e-6
  )
  # WeightNormed trees.
  wn = wn_jax.weight_norm(_params())
  u, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, wn), tx.init(wn), wn)
  np.testing.assert_array_equal(u['layers_0']['kernel'].g, 0.0)
  assert np.all(np.asarray(u['layers_0']['kernel'].v) != 0)
  # NNX state.
  layer = wx.WNLinear(3, 2, rngs=nnx.Rngs(0))
  m = wn_jax.optim.decay_mask(nnx.state(layer, nnx.Param))
  val = lambda x: x.get_value() if isinstance(x, nnx.Variable) else x
  assert val(m['scale']) is False and val(m['kernel']) is True and val(m['bias']) is True


def test_bad_input():
  params = _params()
  with pytest.raises(ValueError, match=r'^wn_jax.optim.weight_norm: where=.*selected no leaf'):
    wn_jax.optim.weight_norm(optax.sgd(0.1), where='nothing').init(params)
  tx = wn_jax.optim.weight_norm(optax.sgd(0.1))
  state = tx.init(params)
  with pytest.raises(ValueError, match='update needs params'):
    tx.update(params, state)
  changed = {**params, 'extra': jnp.ones((2, 2))}
  with pytest.raises(ValueError, match='structure they had at init'):
    tx.update(changed, state, changed)
  bigger = jax.tree_util.tree_map(lambda x: jnp.ones((x.shape[0] + 1, *x.shape[1:])), params)
  with pytest.raises(ValueError, match='changed since init'):
    tx.update(bigger, state, bigger)


class _AdaLN(nn.Module):
  """Adaptive LayerNorm: a Dense named `scale` (and one named `shift`) of a condition."""

  @nn.compact
  def __call__(self, x, c):
    x = nn.LayerNorm(use_scale=False, use_bias=False)(x)
    return x * (1 + nn.Dense(x.shape[-1], name='scale')(c)) + nn.Dense(x.shape[-1], name='shift')(c)


class _NNXAdaLN(nnx.Module):
  def __init__(self):
    self.scale = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    self.shift = nnx.Linear(4, 3, rngs=nnx.Rngs(1))


def _value(x):
  return x.get_value() if isinstance(x, nnx.Variable) else x


def test_decay_mask_decides_by_structure_not_by_name():
  # A Dense named `scale` is an ordinary layer: its kernel and bias are decayed.
  ada = _AdaLN().init(jax.random.key(0), jnp.ones((1, 3)), jnp.ones((1, 4)))['params']
  assert wn_jax.optim.decay_mask(ada)['scale'] == {'kernel': True, 'bias': True}
  m = wn_jax.optim.decay_mask(nnx.state(_NNXAdaLN(), nnx.Param))
  assert _value(m['scale']['kernel']) is True and _value(m['scale']['bias']) is True
  # Wrapped in a WeightNorm: the wrapper's `scale` tree mirrors the layer's params and is
  # never decayed; the wrapped AdaLN's own `scale` Dense still is.
  wrapped = wl.WeightNorm(_AdaLN())
  p = wrapped.init(jax.random.key(0), jnp.ones((1, 3)), jnp.ones((1, 4)))['params']
  m = wn_jax.optim.decay_mask(p)
  assert m['layer']['scale'] == {'kernel': True, 'bias': True}
  assert m['scale'] == {'scale': {'kernel': False}, 'shift': {'kernel': False}}
  m = wn_jax.optim.decay_mask(nnx.state(wx.WeightNorm(_NNXAdaLN()), nnx.Param))
  assert _value(m['layer']['scale']['kernel']) is True
  assert _value(m['scale']['scale']['kernel']) is False

  # A linen layer built in the parent's setup keeps its params there, beside the wrapper.
  class Parent(nn.Module):
    def setup(self):
      self.dense = nn.Dense(2)
      self.wn = wl.WeightNorm(self.dense)

    def __call__(self, x):
      return self.wn(x)

  p = Parent().init(jax.random.key(0), jnp.ones((1, 3)))['params']
  assert set(p) == {'dense', 'wn'}
  assert wn_jax.optim.decay_mask(p) == {
    'dense': {'kernel': True, 'bias': True},
    'wn': {'scale': {'kernel': False}},
  }


@pytest.mark.parametrize(
  'kernel,scale,decayed',
  [
    ((3, 4), (4,), False),  # a WN layer, axis=-1
    ((3, 4), (), False),  # axis=None
    ((2, 3, 4), (2, 4), False),  # axis=(0, 2)
    ((3, 4), (3, 4), False),  # every axis kept
    ((3, 4), (5,), True),  # not a magnitude of this kernel
    ((2, 3, 4), (4, 2), False),  # out of order: a WN layer stacked along a middle axis
    ((2, 3, 4), (4, 4), True),  # each kernel axis once
    (None, (4,), True),  # LayerNorm's scale: no kernel beside it
  ],
)
def test_decay_mask_scale_array_beside_a_kernel(kernel, scale, decayed):
  params = {'scale': jnp.ones(scale), 'bias': jnp.zeros(4)}
  if kernel is not None:
    params['kernel'] = jnp.ones(kernel)
  m = wn_jax.optim.decay_mask(params)
  assert m['scale'] is decayed and m['bias'] is True
  assert m.get('kernel', True) is True


def test_decay_mask_scale_tree_that_does_not_mirror_the_layer():
  params = {
    'layer': {'kernel': jnp.ones((3, 4))},
    'scale': {'kernel': jnp.ones(5)},  # no kept axes of the layer's kernel give (5,)
    'other': {'layer': {'kernel': jnp.ones((3, 4))}, 'scale': {'bias': jnp.ones(4)}},
  }
  m = wn_jax.optim.decay_mask(params)
  assert m['scale'] == {'kernel': True}
  assert m['other']['scale'] == {'bias': True}


def _least_squares():
  a = jax.random.normal(jax.random.key(0), (24, 6), jnp.float64)
  b = jax.random.normal(jax.random.key(1), (24, 3), jnp.float64)
  params = {
    'w': 0.3 * jax.random.normal(jax.random.key(2), (6, 3), jnp.float64),
    'b': jnp.zeros(3, jnp.float64),
  }

  def loss(p):
    return 0.5 * jnp.mean((a @ p['w'] + p['b'] - b) ** 2)

  ones = jnp.ones((24, 1), jnp.float64)
  sol, *_ = np.linalg.lstsq(np.asarray(jnp.concatenate([a, ones], 1)), np.asarray(b), rcond=None)
  return loss, params, float(loss({'w': jnp.asarray(sol[:-1]), 'b': jnp.asarray(sol[-1])}))


def test_lbfgs_line_search_in_weight_normed_coordinates(x64):
  loss, params, best = _least_squares()
  steps = 25

  # Way 3: the transformation, value and grad taken in w each step.
  tx = wn_jax.optim.weight_norm(optax.lbfgs())

  @jax.jit
  def step(p, s):
    value, grad = jax.value_and_grad(loss)(p)
    u, s = tx.update(grad, s, p, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(p, u), s, value

  p, s, l_tx = params, tx.init(params), []
  for _ in range(steps):
    p, s, value = step(p, s)
    l_tx.append(float(value))

  # Way 2: weight_norm + materialize, lbfgs on (v, g), optax's own recipe.
  opt = optax.lbfgs()
  fn = lambda q: loss(wn_jax.materialize(q))
  value_and_grad = optax.value_and_grad_from_state(fn)

  @jax.jit
  def step_re(q, s):
    value, grad = value_and_grad(q, state=s)
    u, s = opt.update(grad, s, q, value=value, grad=grad, value_fn=fn)
    return optax.apply_updates(q, u), s, value

  q, s_re, l_re = wn_jax.weight_norm(params), None, []
  s_re = opt.init(q)
  for _ in range(steps):
    q, s_re, value = step_re(q, s_re)
    l_re.append(float(value))

  np.testing.assert_allclose(l_tx, l_re, rtol=1e-9)
  assert_trees_close(p, wn_jax.materialize(q), rtol=1e-7, atol=1e-9)
  assert float(loss(p)) - best < 1e-6 * best  # converged to the least-squares optimum
  assert l_tx[0] - best > 0.1 * best


def test_a_weight_normed_tree_is_refused_with_the_fix():
  wn = wn_jax.weight_norm(_params())
  tx = wn_jax.optim.weight_norm(optax.sgd(0.1))
  with pytest.raises(
    ValueError, match=r"'layers_0/kernel'.*already.*WeightNormed.*inner optimizer"
  ):
    tx.init(wn)
  state = tx.init(_params())
  with pytest.raises(ValueError, match=r"'layers_0/kernel'.*already.*WeightNormed"):
    tx.update(wn, state, wn)


def _nnx_losses(model_fn, use_jit):
  x = jax.random.normal(jax.random.key(0), (64, 8))
  y = jnp.sin(x[:, :2])
  loss = lambda m: jnp.mean((m(x) - y) ** 2)
  tx = wn_jax.optim.weight_norm(optax.adam(1e-2))
  # The standard NNX loop: nnx.Optimizer wraps the state's arrays in its own variables.
  m = model_fn()
  opt = nnx.Optimizer(m, tx, wrt=nnx.Param)

  def step(m, opt):
    value, g = nnx.value_and_grad(loss)(m)
    opt.update(m, g)
    return value

  step = nnx.jit(step) if use_jit else step
  l_opt = [float(step(m, opt)) for _ in range(3)]
  # The manual loop on nnx.state(m, nnx.Param).
  m2 = model_fn()
  params = nnx.state(m2, nnx.Param)
  state = tx.init(params)
  l_manual = []
  for _ in range(3):
    value, g = nnx.value_and_grad(loss)(m2)
    u, state = tx.update(nnx.state(g, nnx.Param), state, params)
    params = optax.apply_updates(params, u)
    nnx.update(m2, params)
    l_manual.append(float(value))
  return l_opt, l_manual, m, m2


@pytest.mark.parametrize('use_jit', [False, True])
@pytest.mark.parametrize('sequential', [False, True])
def test_nnx_optimizer_loop_trains_like_the_manual_loop(use_jit, sequential):
  def model_fn():
    if sequential:
      r = nnx.Rngs(0)
      return nnx.Sequential(nnx.Linear(8, 16, rngs=r), nnx.tanh, nnx.Linear(16, 2, rngs=r))
    return nnx.Linear(8, 2, rngs=nnx.Rngs(0))

  l_opt, l_manual, m, m2 = _nnx_losses(model_fn, use_jit)
  np.testing.assert_allclose(l_opt, l_manual, rtol=1e-5)
  assert l_opt[-1] < l_opt[0]
  assert_trees_close(nnx.state(m, nnx.Param), nnx.state(m2, nnx.Param), rtol=1e-5, atol=1e-6)


def test_nnx_optimizer_still_refuses_a_changed_structure():
  tx = wn_jax.optim.weight_norm(optax.sgd(0.1))
  state = tx.init(nnx.state(nnx.Linear(8, 2, rngs=nnx.Rngs(0)), nnx.Param))
  other = nnx.state(nnx.Linear(8, 2, use_bias=False, rngs=nnx.Rngs(0)), nnx.Param)
  with pytest.raises(ValueError, match='structure they had at init'):
    tx.update(other, state, other)


def test_a_state_restored_without_a_target_is_refused_with_the_fix():
  params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
  tx = wn_jax.optim.weight_norm(optax.sgd(0.1))
  state = tx.init(params)
  # What orbax's restore(path) gives without a target: plain containers, axis lost.
  restored = {
    'directions': {'w': {'v': state.directions['w'].v, 'g': state.directions['w'].g}, 'b': None},
    'inner_state': [{}, {}],
  }
  with pytest.raises(ValueError, match=r'restore.*target.*tx\.init\(params\)'):
    tx.update(params, restored, params)


@pytest.mark.parametrize('use_bias', [False, True])
def test_decay_mask_decays_a_dense_named_scale_alone_in_its_module(use_bias):
  class Mod(nn.Module):
    @nn.compact
    def __call__(self, x, c):
      return x * nn.Dense(4, use_bias=use_bias, name='scale')(c)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, c):
      return nn.Dense(4)(Mod(name='ada')(x, c))

  p = Net().init(jax.random.key(0), jnp.ones((2, 4)), jnp.ones((2, 4)))['params']
  m = wn_jax.optim.decay_mask(p)
  assert all(jax.tree_util.tree_leaves(m)), m
  # A scale tree needs a layer parameter at the same relative path, of higher rank.
  elsewhere = {
    'far': {'deep': {'kernel': jnp.ones((3, 4))}},
    'wn': {'scale': {'kernel': jnp.ones(4)}},
  }
  assert wn_jax.optim.decay_mask(elsewhere)['wn']['scale'] == {'kernel': True}


# Each contrib optimizer with the extra arguments optax passes it, as a function of the loss
# and of the point (in the coordinates the optimizer sees) that they are taken at.
CONTRIB = {
  'sophia': (
    lambda: optax.contrib.sophia(1e-2, update_interval=2),
    lambda loss, value, grad: {'obj_fn': loss},
  ),
  'momo': (lambda: optax.contrib.momo(0.1), lambda loss, value, grad: {'value': value}),
  'reduce_on_plateau': (
    lambda: optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=2)),
    lambda loss, value, grad: {'value': value},
  ),
  'zoom_linesearch': (
    lambda: optax.chain(optax.sgd(1.0), optax.scale_by_zoom_linesearch(8)),
    lambda loss, value, grad: {'value': value, 'grad': grad, 'value_fn': loss},
  ),
}


@pytest.mark.parametrize('name', sorted(CONTRIB))
def test_contrib_optimizers_extra_arguments_in_weight_normed_coordinates(name, x64):
  # sophia's obj_fn used to reach it in w coordinates: TypeError on a WeightNormed node.
  make, extra = CONTRIB[name]
  loss, params, _ = _least_squares()
  tx = wn_jax.optim.weight_norm(make())

  @jax.jit
  def step(p, s):
    value, grad = jax.value_and_grad(loss)(p)
    u, s = tx.update(grad, s, p, **extra(loss, value, grad))
    return optax.apply_updates(p, u), s

  # Way 2: the same optimizer on (v, g), every extra argument taken there.
  opt, fn = make(), lambda q: loss(wn_jax.materialize(q))

  @jax.jit
  def step_re(q, s):
    value, grad = jax.value_and_grad(fn)(q)
    u, s = opt.update(grad, s, q, **extra(fn, value, grad))
    return optax.apply_updates(q, u), s

  p, s = params, tx.init(params)
  q = wn_jax.weight_norm(params)
  s_re = opt.init(q)
  for _ in range(6):
    p, s = step(p, s)
    q, s_re = step_re(q, s_re)
  assert_trees_close(p, wn_jax.materialize(q), rtol=1e-9, atol=1e-12)
  assert float(loss(p)) < float(loss(params))  # it trains


def _sf_eval_at(state, q, names):
  """optax's evaluation point at the parameters ``names`` of ``q`` (those ``state``
  trains), ``q`` itself at the others."""
  trained = {k: q[k] if k in names else optax.MaskedNode() for k in q}
  x = optax.contrib.schedule_free_eval_params(state, trained)
  return {k: x[k] if k in names else q[k] for k in q}


def _sf_masked():
  return optax.masked(optax.contrib.schedule_free_sgd(0.1), {'w': True, 'b': False})


def _sf_partitioned():
  sf = optax.contrib.schedule_free_sgd
  return optax.multi_transform({'sf': sf(0.1), 'other': sf(0.2)}, {'w': 'sf', 'b': 'other'})


_SCHEDULE_FREE = {
  # name: (inner, project, the reference optimizer on (v, g), its evaluation point)
  'alone': (
    lambda: optax.contrib.schedule_free_sgd(0.1),
    None,
    lambda: optax.contrib.schedule_free_sgd(0.1),
    optax.contrib.schedule_free_eval_params,
  ),
  # With project=, the state of weight_norm(inner) is a chain's: it used to fail on a tuple
  # (AttributeError: b1). Projection rescales the directions after schedule-free's update:
  # optax recomputes its x from the params it is given, so the evaluation point follows.
  'project': (
    lambda: optax.contrib.schedule_free_sgd(0.1),
    'init',
    lambda: optax.chain(
      optax.contrib.schedule_free_sgd(0.1), wn_jax.optim.project_directions('init')
    ),
    lambda s, q: optax.contrib.schedule_free_eval_params(s[0], q),
  ),
  'in a chain': (
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.contrib.schedule_free_sgd(0.1)),
    None,
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.contrib.schedule_free_sgd(0.1)),
    lambda s, q: optax.contrib.schedule_free_eval_params(s[1], q),
  ),
  # optax.masked and multi_transform hold schedule-free states of parts of the tree: they
  # used to fail inside optax (TypeError). Each state gives the evaluation point of the
  # parameters it trains.
  'masked': (_sf_masked, None, _sf_masked, lambda s, q: _sf_eval_at(s.inner_state, q, {'w'})),
  'partitioned': (
    _sf_partitioned,
    None,
    _sf_partitioned,
    lambda s, q: _sf_eval_at(
      s.inner_states['sf'].inner_state,
      _sf_eval_at(s.inner_states['other'].inner_state, q, {'b'}),
      {'w'},
    ),
  ),
}


@pytest.mark.parametrize('case', sorted(_SCHEDULE_FREE))
def test_schedule_free_eval_params(x64, case):
  # optax.contrib.schedule_free_eval_params used to fail on the wrapper's state (b1).
  loss, params, _ = _least_squares()
  inner, project, reference, eval_point = _SCHEDULE_FREE[case]
  tx = wn_jax.optim.weight_norm(inner(), project=project)
  opt, fn = reference(), lambda q: loss(wn_jax.materialize(q))
  p, s = params, tx.init(params)
  q = wn_jax.weight_norm(params)
  s_re = opt.init(q)
  for _ in range(5):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, u)
    u, s_re = opt.update(jax.grad(fn)(q), s_re, q)
    q = optax.apply_updates(q, u)
  got = wn_jax.optim.schedule_free_eval_params(s, p)
  want = wn_jax.materialize(eval_point(s_re, q))
  assert_trees_close(got, want, rtol=1e-9, atol=1e-12)
  assert not np.allclose(got['w'], p['w'])  # the evaluation point is not the training point
  with pytest.raises(ValueError, match=r'wn_jax.optim.schedule_free_eval_params'):
    wn_jax.optim.schedule_free_eval_params(s_re, p)


def test_schedule_free_eval_params_refuses_other_optimizers():
  params = {'w': jnp.ones((3, 2))}
  for inner in (
    optax.adam(0.1),
    optax.chain(optax.contrib.schedule_free_sgd(0.1), optax.contrib.schedule_free_sgd(0.1)),
  ):
    tx = wn_jax.optim.weight_norm(inner)
    with pytest.raises(
      ValueError, match=r'schedule_free_eval_params: (found no|2) schedule-free state'
    ):
      wn_jax.optim.schedule_free_eval_params(tx.init(params), params)


def test_schedule_free_eval_params_refuses_params_of_other_shapes():
  # It used to return the state's (5, 4) weight for (2, 4) params, where update refuses.
  tx = wn_jax.optim.weight_norm(optax.contrib.schedule_free_sgd(0.1))
  state = tx.init({'w': jnp.ones((5, 4)), 'b': jnp.zeros(4)})
  for w, b in (((2, 4), (4,)), ((5, 4), (1,))):
    with pytest.raises(ValueError, match=r'schedule_free_eval_params: .*shape .*tx.init'):
      wn_jax.optim.schedule_free_eval_params(state, {'w': jnp.ones(w), 'b': jnp.zeros(b)})


def test_schedule_free_eval_params_takes_an_nnx_optimizer_state_and_a_whole_chain():
  # The nnx.Optimizer's state holds its arrays in OptArray variables: it failed with a pytree
  # structure error. A chain around weight_norm(...) was refused ("got a tuple").

  def make():
    return optax.chain(
      optax.clip_by_global_norm(10.0),
      wn_jax.optim.weight_norm(optax.contrib.schedule_free_sgd(0.1)),
    )

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
  optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = make()
  state = tx.init(params)

  def loss(p):
    return jnp.mean((x @ p['kernel'] + p['bias'] - 1.0) ** 2)

  for _ in range(3):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    optimizer.update(model, nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model))
  want = wn_jax.optim.schedule_free_eval_params(state[1], params)
  assert_trees_close(wn_jax.optim.schedule_free_eval_params(state, params), want, rtol=0, atol=0)
  got = wn_jax.optim.schedule_free_eval_params(optimizer.opt_state, nnx.state(model, nnx.Param))
  assert_trees_close(nnx.to_pure_dict(got), want, rtol=1e-6, atol=1e-7)
  # The optimizer's state with a pure dict: refused with the form it needs (it said only
  # "re-run tx.init").
  with pytest.raises(
    ValueError, match=r'(?s)structure they had at init.*nnx.state\(model, nnx.Param\)'
  ):
    wn_jax.optim.schedule_free_eval_params(optimizer.opt_state, params)


def test_the_optimizer_route_keeps_a_users_own_v_and_g_parameters():
  # A module of the user's whose params are named v and g (not a WeightNormed node): the
  # optimizer's own materialize took it for a node restored without a target and refused.
  params = {
    'dense': {'kernel': jnp.ones((3, 2)) + jnp.arange(2.0)},
    'gate': {'v': jnp.ones((3, 2)), 'g': jnp.ones(2)},
  }
  tx = wn_jax.optim.weight_norm(optax.contrib.schedule_free_sgd(0.1), where='dense')
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  out = wn_jax.optim.schedule_free_eval_params(state, params)
  assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, params)
  assert np.all(np.isfinite(out['gate']['v']))


def test_the_default_selection_leaves_a_wn_layer_to_itself():
  # optim.weight_norm() took a WNDense's kernel too: its ||v|| was frozen at init (a
  # projection the user did not ask for), so it trained unlike the same layer alone.
  model = nn.Sequential([nn.Dense(6), nn.tanh, wl.WNDense(3)])
  params = model.init(jax.random.key(0), X)['params']
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  tx = wn_jax.optim.weight_norm(optax.sgd(0.5))
  updates, _ = tx.update(grads, tx.init(params), params)
  wn_layer = updates['layers_2']
  for name in ('kernel', 'scale', 'bias'):  # plain SGD on the WN layer's own parameters
    np.testing.assert_allclose(wn_layer[name], -0.5 * grads['layers_2'][name], rtol=1e-6)
  plain = updates['layers_0']['kernel']  # the plain layer: in weight-normalized coordinates
  assert not np.allclose(plain, -0.5 * grads['layers_0']['kernel'])


def test_project_keeps_to_the_directions_it_selected():
  # project='init' also reached a square WN layer's kernel, beside the selection, and refused
  # it ("fits several kept axes ... pass axis=") with no axis to pass (a user trial).
  model = nn.Sequential([nn.Dense(8), nn.tanh, wl.WNDense(8)])
  x = jnp.ones((4, 8))
  params = model.init(jax.random.key(0), x)['params']
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  tx = wn_jax.optim.weight_norm(optax.sgd(0.5), project='init')
  updates, _ = tx.update(grads, tx.init(params), params)
  wn_layer = updates['layers_2']
  for name in ('kernel', 'scale', 'bias'):  # plain SGD: neither reparametrized nor projected
    np.testing.assert_allclose(wn_layer[name], -0.5 * grads['layers_2'][name], rtol=1e-6)


def test_gradients_that_do_not_fit_the_params_are_refused_with_the_fix():
  # A user's trial: JAX's 'cotangent type does not match' from deep inside the pullback, or a
  # bare pytree-structure error.
  params = {'w': jnp.ones((3, 2)) + jnp.eye(3, 2), 'b': jnp.zeros(2)}
  tx = wn_jax.optim.weight_norm(optax.sgd(0.1))
  state = tx.init(params)
  for w in (jnp.ones((2, 3)), jnp.ones((3, 1))):
    with pytest.raises(
      ValueError, match=rf"hold an array of shape \({w.shape[0]}, .*'w'.*jax.grad"
    ):
      tx.update({'w': w, 'b': jnp.ones(2)}, state, params)
  # An unselected leaf too: optax would broadcast it silently (a review trial).
  with pytest.raises(ValueError, match=r"hold an array of shape \(1,\) at 'b'"):
    tx.update({'w': jnp.ones((3, 2)), 'b': jnp.ones(1)}, state, params)
  with pytest.raises(ValueError, match=r"hold None at 'w'"):
    tx.update({'w': None, 'b': jnp.ones(2)}, state, params)
  with pytest.raises(ValueError, match=r"gradients do not have the structure.*missing \['b'\]"):
    tx.update({'w': jnp.ones((3, 2))}, state, params)
  # A review trial: an NNX State of gradients for a pure dict of params.
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
  with pytest.raises(ValueError, match=r'structure of params.*a State for a dict.*to_pure_dict'):
    tx.update(grads, tx.init(pure), pure)
  frozen = flax.core.freeze(params)
  with pytest.raises(ValueError, match=r'a FrozenDict for a dict: flax.core.freeze / unfreeze'):
    tx.update(frozen, state, params)
  with pytest.raises(ValueError, match=r"extra argument 'grad' hold an array of shape \(2, 3\)"):
    tx.update(params, state, params, grad={'w': jnp.ones((2, 3)), 'b': jnp.ones(2)})
  with pytest.raises(ValueError, match=r'inner must be an optax.*optax.sgd\(\.\.\.\)'):
    wn_jax.optim.weight_norm(optax.sgd)


def test_inject_hyperparams_around_weight_norm_keeps_its_axis_static():
  # A user's trial: inject_hyperparams turns axis=-1 into an array, and init raised
  # "iteration over a 0-d array".
  params = _params()
  outer = optax.inject_hyperparams(wn_jax.optim.weight_norm)(inner=optax.sgd(0.1))
  p, _, losses = _run_tx(outer, params, 3)
  q, _, expected = _run_tx(wn_jax.optim.weight_norm(optax.sgd(0.1)), params, 3)
  assert losses == expected
  assert_trees_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize('project', [True, -1.0, 0.0, float('nan')])
def test_a_bad_project_is_refused_by_its_name(project):
  # Found by a user trial: project=True was refused as project_directions' "norm".
  with pytest.raises(
    ValueError, match=r"^wn_jax.optim.weight_norm: project must be .*project='init'"
  ):
    wn_jax.optim.weight_norm(optax.adam(1e-3), project=project)


def _first_nonfinite_step(tx, params, loss, steps=50):
  step = jax.jit(
    lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(jax.grad(loss)(p), s, p))
  )
  state = tx.init(params)
  for i in range(steps):
    params, state = step(params, state)
    if not all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(params)):
      return i
  return None


def test_float16_adam_needs_an_eps_float16_holds():
  # The mixed-precision guide's measurement (a user trial): float16 adam's eps (1e-8) is 0 in
  # float16 and the second moment of a direction's small gradient entries underflows, so adam
  # on (v, g) divided by zero at the first step where plain adam stayed finite.
  rng = np.random.default_rng(0)
  a, b, w = (jnp.asarray(rng.standard_normal(s), jnp.float16) for s in ((32, 16), (32, 4), (16, 4)))

  def loss(p):
    return jnp.mean((a @ p['w'] - b).astype(jnp.float32) ** 2)

  def wn_loss(p):
    return loss(wn_jax.materialize(p))

  assert _first_nonfinite_step(optax.adam(1e-2), {'w': w}, loss) is None
  for eps, want in [(1e-8, 0), (1e-4, None)]:
    adam = optax.adam(1e-2, eps=eps)
    assert _first_nonfinite_step(adam, wn_jax.weight_norm({'w': w}), wn_loss) == want
    assert _first_nonfinite_step(wn_jax.optim.weight_norm(adam), {'w': w}, loss) == want
