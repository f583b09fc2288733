"""Hardening: hypothesis-generated shapes for every public array and pytree function,
compared with the reference; NaN/Inf inputs; parameters never touched by a forward pass."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import wn_jax
from tests import reference as ref
from tests.helpers import assert_close
from tests.helpers import assert_trees_equal
from tests.helpers import shape_and_axis


@functools.partial(jax.jit, static_argnums=3)
def _all(v, g, gw, axis):
  w, vjp = jax.vjp(lambda v, g: wn_jax.normalize(v, g, axis), v, g)
  dv, dg = vjp(gw)
  dv2, dg2 = vjp(gw)
  tree = wn_jax.weight_norm({'a': {'w': v}}, axis, where='w')
  mat = wn_jax.materialize(tree)['a']['w']
  return w, dv, dg, wn_jax.decompose(v, axis)[1], wn_jax.norm(v, axis), tree['a']['w'].g, mat


@settings(max_examples=60, deadline=None)
@given(shape_and_axis(max_rank=5, max_size=7), st.integers(0, 2**31 - 1))
def test_every_public_function_against_the_reference(sa, seed):
  shape, axis = sa
  rng = np.random.default_rng(seed)
  v = rng.normal(size=shape)
  g = rng.uniform(0.5, 2.0, size=wn_jax.scale_shape(shape, axis))
  gw = rng.normal(size=shape)
  w, dv, dg, g_dec, n, g_tree, mat = _all(*(jnp.asarray(a, jnp.float32) for a in (v, g, gw)), axis)
  v32 = np.asarray(jnp.asarray(v, jnp.float32), np.float64)
  g32 = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
  gw32 = np.asarray(jnp.asarray(gw, jnp.float32), np.float64)
  assert_close(w, ref.normalize(v32, g32, axis), factor=4)
  ev, eg = ref.grads(v32, g32, axis, gw32)
  # dL/dv is a difference of two terms of the size of (g / ||v||) dL/dw: that sets its rounding
  # (when every axis is kept the two cancel exactly and dL/dv is 0 up to that rounding).
  term = np.max(np.abs(ref._bcast(g32, shape, axis) / ref.norm(v32, axis) * gw32))
  assert_close(dv, ev, factor=16, floor=term)
  assert_close(dg, eg, factor=16)
  _, en = ref.decompose(v32, axis)
  assert_close(g_dec, en, factor=4)
  assert_close(n, en, factor=4)
  assert_close(g_tree, en, factor=4)
  assert_close(mat, v32, factor=4)


def test_nan_input_propagates_to_the_output_never_into_parameters():
  model = nn.Sequential([wn_jax.linen.WNDense(4), nn.relu, nn.Dense(2)])
  x = jnp.ones((3, 5)).at[1, 2].set(jnp.nan).at[2, 0].set(jnp.inf)
  variables = model.init(jax.random.key(0), jnp.ones((3, 5)))
  before = jax.tree_util.tree_map(jnp.copy, variables)
  y = model.apply(variables, x)
  assert (
    np.all(np.isfinite(y[0])) and not np.all(np.isfinite(y[1])) and not np.all(np.isfinite(y[2]))
  )
  assert_trees_equal(variables, before)
  wn = wn_jax.weight_norm(variables['params'])
  weights = wn_jax.materialize(wn)
  assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(weights))
  # Gradients of a NaN loss are NaN, but the parameters they came from are untouched.
  grads = jax.grad(lambda p: jnp.sum(model.apply({'params': wn_jax.materialize(p)}, x)))(wn)
  assert not all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(grads))
  assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(wn))


# A zero-initialized layer (zero output heads, zero residual branches) starts with ||v|| = 0.
# Its default g is 1 there, so it computes what the plain layer computes (w = 0) AND trains:
# with g = ||v|| = 0 every gradient would be 0 forever.
def _train(loss, params, steps=10):
  """Plain gradient descent; returns the losses (before each step) and the final params."""
  losses = []
  grad = jax.jit(jax.value_and_grad(loss))
  for _ in range(steps):
    value, g = grad(params)
    losses.append(float(value))
    params = jax.tree_util.tree_map(lambda p, d: p - 0.1 * d, params, g)
  return losses, params


_X = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
# A target the layer can fit, with weight columns of norm about 1.5 (g starts at 1).
_Y = _X @ jnp.array([[1.0, -0.5], [0.5, 1.0], [-1.0, 0.5]])


def _mse(y):
  return jnp.mean((y - _Y) ** 2)


def _assert_trains_from_zero(losses, weight):
  assert losses[-1] < 0.9 * losses[0], losses
  assert float(jnp.max(jnp.abs(weight))) > 0


def test_zero_initialized_linen_layer_trains():
  layer = wn_jax.linen.WNDense(2, kernel_init=nn.initializers.zeros)
  params = layer.init(jax.random.key(0), _X)['params']
  np.testing.assert_array_equal(params['scale'], np.ones(2, np.float32))
  plain = nn.Dense(2, kernel_init=nn.initializers.zeros)
  np.testing.assert_array_equal(
    layer.apply({'params': params}, _X), plain.apply(plain.init(jax.random.key(0), _X), _X)
  )
  losses, params = _train(lambda p: _mse(layer.apply({'params': p}, _X)), params)
  _assert_trains_from_zero(losses, params['kernel'])


def test_zero_initialized_nnx_layer_trains():
  from flax import nnx

  layer = wn_jax.nnx.WNLinear(3, 2, kernel_init=nn.initializers.zeros, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer.scale[...], np.ones(2, np.float32))
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss(p):
    return _mse(nnx.merge(graphdef, p)(_X))

  losses, params = _train(loss, params)
  _assert_trains_from_zero(losses, params['kernel'][...])


def test_zero_initialized_wrapped_layers_train():
  from flax import nnx

  model = wn_jax.linen.WeightNorm(nn.Dense(2, kernel_init=nn.initializers.zeros))
  params = model.init(jax.random.key(0), _X)['params']
  np.testing.assert_array_equal(params['scale']['kernel'], np.ones(2, np.float32))
  losses, params = _train(lambda p: _mse(model.apply({'params': p}, _X)), params)
  _assert_trains_from_zero(losses, params['layer']['kernel'])

  wrapped = wn_jax.nnx.WeightNorm(
    nnx.Linear(3, 2, kernel_init=nn.initializers.zeros, rngs=nnx.Rngs(0))
  )
  graphdef, state = nnx.split(wrapped, nnx.Param)
  losses, state = _train(lambda p: _mse(nnx.merge(graphdef, p)(_X)), state)
  _assert_trains_from_zero(losses, state['layer']['kernel'][...])


def test_weight_norm_of_a_zero_tree_trains():
  params = {'w': jnp.zeros((3, 2)), 'b': jnp.zeros(2)}
  wn = wn_jax.weight_norm(params)
  np.testing.assert_array_equal(wn['w'].g, np.ones(2, np.float32))
  np.testing.assert_array_equal(wn_jax.materialize(wn)['w'], np.zeros((3, 2), np.float32))

  def loss(p):
    w = wn_jax.materialize(p)
    return _mse(_X @ w['w'] + w['b'])

  losses, wn = _train(loss, wn)
  _assert_trains_from_zero(losses, wn_jax.materialize(wn)['w'])


def test_a_kernel_with_an_empty_axis_works_like_the_plain_layer():
  # Once "zero-size array to reduction operation max": the norm needs no max any more.
  x = jnp.ones((2, 0))
  # (Flax's default lecun_normal divides by the fan-in: zeros, as a plain Dense needs too.)
  layer = wn_jax.linen.WNDense(3, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.ones)
  variables = layer.init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables['params']['scale'], np.ones(3, np.float32))
  y, grads = jax.value_and_grad(lambda p: jnp.sum(layer.apply({'params': p}, x)))(
    variables['params']
  )
  assert float(y) == 6.0 and np.all(np.isfinite(grads['scale']))
  np.testing.assert_array_equal(wn_jax.normalize(jnp.ones((0, 3)), jnp.ones(3)), np.ones((0, 3)))
  np.testing.assert_array_equal(wn_jax.norm(jnp.ones((3, 0)), 0), np.zeros(3, np.float32))


def test_a_one_dimensional_weight_becomes_g_times_sign_v():
  v = jnp.asarray([3.0, -0.5, 0.0])
  np.testing.assert_array_equal(wn_jax.normalize(v, jnp.full(3, 2.0)), [2.0, -2.0, 0.0])


def _layer_calls():
  """(name, a WN layer's call on an input) for every WN layer and wrapper, linen and NNX."""
  from flax import nnx

  key, x = jax.random.key(0), np.ones((2, 5, 6), np.float32)
  calls = []
  for name, layer in (
    ('WNDense, scaled output', wn_jax.linen.WNDense(8)),
    ('WNDense, w formed', wn_jax.linen.WNDense(3)),
    ('WNConv', wn_jax.linen.WNConv(3, (3,))),
    ('WNConvTranspose', wn_jax.linen.WNConvTranspose(3, (3,))),
    ('linen WeightNorm', wn_jax.linen.WeightNorm(nn.Dense(3))),
  ):
    variables = layer.init(key, x if 'Conv' in name else x[0])
    calls.append((name, functools.partial(layer.apply, variables)))
  rngs = nnx.Rngs(0)
  return calls + [
    ('WNLinear, scaled output', wn_jax.nnx.WNLinear(6, 8, rngs=rngs)),
    ('WNLinear, w formed', wn_jax.nnx.WNLinear(6, 3, rngs=rngs)),
    ('nnx WNConv', wn_jax.nnx.WNConv(6, 3, (3,), rngs=rngs)),
    ('nnx WeightNorm', wn_jax.nnx.WeightNorm(nnx.Linear(6, 3, rngs=rngs))),
  ]


def test_a_numpy_float64_input_is_taken_as_float32_without_a_warning():
  # A NumPy float64 batch (np.random's default) with x64 off: Flax's layers canonicalize it
  # to float32 without a word; the WN layers asked for float64 arrays and JAX warned
  # ("Explicitly requested dtype float64 ... is not available"; an error in this suite).
  x = np.linspace(-1.0, 1.0, 8 * 6).reshape(8, 6)
  for name, call in _layer_calls():
    xn = x.reshape(2, 4, 6) if 'Conv' in name else (x[:2] if 'scaled' in name else x)
    y, want = call(xn), call(xn.astype(np.float32))
    assert y.dtype == jnp.float32, name
    np.testing.assert_array_equal(y, want, err_msg=name)


def test_a_nested_list_input_is_taken_as_its_array():
  # Found by a user: nnx.Linear takes a nested list of floats as its input (as jnp.asarray
  # would); WNLinear raised 'Cannot determine dtype' (jnp.result_type of the list), naming
  # neither the layer nor the cause. (nn.Dense takes one with a DeprecationWarning of JAX's;
  # the conv layers take none.)
  x = np.linspace(-1.0, 1.0, 8 * 6, dtype=np.float32).reshape(8, 6)
  for name, call in _layer_calls():
    if name.startswith(('WNLinear', 'nnx WeightNorm')):
      xn = x[:2] if 'scaled' in name else x
      np.testing.assert_array_equal(call(xn.tolist()), call(xn), err_msg=name)
