"""The optax transformation: same trajectory as weight_norm + materialize; composition."""

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
  with pytest.raises(ValueError, match='selected no leaf'):
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
