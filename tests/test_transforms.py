"""Every JAX transformation, on the core, the pytree functions, and every layer and wrapper.

Forward mode (jvp, jacfwd, linearize), reverse mode to any order, their compositions
(hessian = jacfwd(jacrev), vmap of jvp), and the README's claim that everything is jit-,
grad-, vmap-, scan- and remat-safe and that the same configuration never recompiles.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wn_jax
from tests import reference as ref
from tests.helpers import assert_trees_close
from wn_jax import _core as core

CASES = [
  ((5,), None),
  ((4, 3), -1),
  ((4, 3), 0),
  ((4, 3), (0, 1)),
  ((2, 3, 4), (0, 2)),
  ((3, 3, 2, 5), -1),
]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64]


def _vg(shape, axis, seed=0):
  rng = np.random.default_rng(seed)
  v = rng.normal(size=shape)
  g = rng.uniform(0.5, 2.0, size=wn_jax.scale_shape(shape, axis))
  return v, g


# --- the core ---


@pytest.mark.parametrize('shape,axis', CASES)
def test_jvp_matches_finite_differences_of_the_reference(shape, axis, x64):
  v, g = _vg(shape, axis)
  dv, dg = _vg(shape, axis, seed=1)
  w, dw = jax.jvp(lambda v, g: wn_jax.normalize(v, g, axis), (v, g), (dv, dg))
  h = 1e-6
  fd = (
    ref.normalize(v + h * dv, g + h * dg, axis) - ref.normalize(v - h * dv, g - h * dg, axis)
  ) / (2 * h)
  np.testing.assert_allclose(w, ref.normalize(v, g, axis), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(dw, fd, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize('shape,axis', CASES)
def test_jacfwd_equals_jacrev(shape, axis, x64):
  v, g = _vg(shape, axis)
  f = lambda v, g: wn_jax.normalize(v, g, axis)
  fwd = jax.jacfwd(f, argnums=(0, 1))(v, g)
  rev = jax.jacrev(f, argnums=(0, 1))(v, g)
  assert_trees_close(fwd, rev, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('shape,axis', CASES)
def test_hessian_forward_over_reverse_equals_jvp_of_grad(shape, axis, x64):
  v, g = _vg(shape, axis)
  gw = _vg(shape, axis, seed=2)[0]
  d = _vg(shape, axis, seed=3)[0]
  loss = lambda v: jnp.sum(jnp.sin(wn_jax.normalize(v, g, axis)) * gw)
  hess = jax.jacfwd(jax.jacrev(loss))(v)
  hvp = jax.jvp(jax.grad(loss), (v,), (d,))[1]
  np.testing.assert_allclose(np.tensordot(hess, d, axes=d.ndim), hvp, rtol=1e-10, atol=1e-12)
  # Reverse over reverse agrees too.
  np.testing.assert_allclose(jax.hessian(loss)(v), hess, rtol=1e-10, atol=1e-12)
  # Third order, forward over forward over reverse: against finite differences of the hvp.
  third = jax.jvp(lambda v: jax.jvp(jax.grad(loss), (v,), (d,))[1], (v,), (d,))[1]
  h = 1e-5
  hvp_at = lambda v: jax.jvp(jax.grad(loss), (v,), (d,))[1]
  np.testing.assert_allclose(
    third, (hvp_at(v + h * d) - hvp_at(v - h * d)) / (2 * h), rtol=1e-6, atol=1e-8
  )


def test_linearize_keeps_no_weight_sized_residual_but_v():
  v, g = (jnp.asarray(a, jnp.float32) for a in _vg((64, 32), -1))
  dv, dg = (jnp.asarray(a, jnp.float32) for a in _vg((64, 32), -1, seed=1))
  f = lambda v, g: wn_jax.normalize(v, g)
  w, lin = jax.linearize(f, v, g)
  np.testing.assert_allclose(lin(dv, dg), jax.jvp(f, (v, g), (dv, dg))[1], rtol=1e-6)
  residuals = [x for x in jax.tree_util.tree_leaves(lin) if hasattr(x, 'shape')]
  # v itself, and per-slice quantities: no weight-sized intermediate (u = v / ||v||, w, ...)
  # is stored for the backward pass.
  assert sum(x.size >= v.size for x in residuals) == 1, [x.shape for x in residuals]
  _, vjp = jax.vjp(f, v, g)
  residuals = [x for x in jax.tree_util.tree_leaves(vjp) if hasattr(x, 'shape')]
  assert sum(x.size >= v.size for x in residuals) == 1, [x.shape for x in residuals]


def _ref_factor(v, g, axis):
  return np.asarray(g, np.float64) / ref.norm(v, axis).reshape(np.shape(g))


@pytest.mark.parametrize('shape,axis', CASES)
def test_factor_in_both_modes_and_to_second_order(shape, axis, x64):
  # The factor g / ||v|| a Dense layer applies to its output: its own custom_jvp.
  v, g = _vg(shape, axis)
  dv, dg = _vg(shape, axis, seed=1)
  f = lambda v, g: core.factor(v, g, axis)
  s, ds = jax.jvp(f, (v, g), (dv, dg))
  h = 1e-6
  fd = (_ref_factor(v + h * dv, g + h * dg, axis) - _ref_factor(v - h * dv, g - h * dg, axis)) / (
    2 * h
  )
  np.testing.assert_allclose(s, _ref_factor(v, g, axis), rtol=1e-12)
  np.testing.assert_allclose(ds, fd, rtol=1e-7, atol=1e-8)
  fwd = jax.jacfwd(f, argnums=(0, 1))(v, g)
  assert_trees_close(fwd, jax.jacrev(f, argnums=(0, 1))(v, g), rtol=1e-12, atol=1e-12)
  loss = lambda v: jnp.sum(jnp.sin(f(v, g)))
  d = _vg(shape, axis, seed=3)[0]
  hess = jax.jacfwd(jax.jacrev(loss))(v)
  hvp = jax.jvp(jax.grad(loss), (v,), (d,))[1]
  np.testing.assert_allclose(np.tensordot(hess, d, axes=d.ndim), hvp, rtol=1e-10, atol=1e-12)
  grad_at = lambda v: jax.grad(loss)(v)
  np.testing.assert_allclose(
    hvp, (grad_at(v + h * d) - grad_at(v - h * d)) / (2 * h), rtol=1e-6, atol=1e-8
  )


def test_factor_at_a_zero_slice_and_a_clamped_one():
  # Where the norm does not depend on v (an all-zero slice, or one clamped to eps), the
  # factor is g / n locally: ds = dg / n, and no derivative w.r.t. v.
  v = jnp.asarray([[1.0, 0.0, 0.3], [2.0, 0.0, -0.4]])
  g = jnp.asarray([1.5, 3.0, 0.5])
  dv, dg = jnp.ones_like(v), jnp.asarray([0.0, 1.0, 1.0])
  s, ds = jax.jvp(lambda v, g: core.factor(v, g, eps=1.0), (v, g), (dv, dg))
  np.testing.assert_allclose(s, [1.5 / 5**0.5, 3.0, 0.5], rtol=1e-6)
  expected_0 = -1.5 / 5**0.5 * (3.0 / 5**0.5) / 5**0.5  # -s <u, dv> / n
  np.testing.assert_allclose(ds, [expected_0, 1.0, 1.0], rtol=1e-6)
  loss = lambda v: jnp.sum(core.factor(v, g, eps=1.0) ** 2)
  for d in (jax.grad(loss)(v), jax.hessian(loss)(v)):
    assert np.all(np.isfinite(np.asarray(d)))
  np.testing.assert_array_equal(jax.grad(loss)(v)[:, 1:], 0.0)


def test_factor_keeps_no_weight_sized_residual_but_v():
  v, g = (jnp.asarray(a, jnp.float32) for a in _vg((64, 32), -1))
  f = lambda v, g: core.factor(v, g)
  for fn in (jax.linearize(f, v, g)[1], jax.vjp(f, v, g)[1]):
    residuals = [x for x in jax.tree_util.tree_leaves(fn) if hasattr(x, 'shape')]
    assert sum(x.size >= v.size for x in residuals) == 1, [x.shape for x in residuals]


@pytest.mark.parametrize('dtype', DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_jvp_on_an_all_zero_slice_is_finite_and_that_of_g_times_v(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    v = jnp.asarray([[1.0, 0.0, 2.0], [2.0, 0.0, -1.0]], dtype)
    g = jnp.asarray([1.5, 3.0, 0.5], dtype)
    dv = jnp.ones_like(v)
    dg = jnp.ones_like(g)
    _, dw = jax.jvp(wn_jax.normalize, (v, g), (dv, dg))
    dw = np.asarray(dw.astype(jnp.float32))
    assert np.all(np.isfinite(dw))
    # On the zero column w = g * v locally: dw = g dv (+ v dg = 0).
    np.testing.assert_allclose(dw[:, 1], 3.0)
    # Second order at the zero slice, and the whole-tensor all-zero weight.
    z = jnp.zeros((3, 2), dtype)
    two = jnp.asarray(2.0, dtype)
    loss = lambda v: jnp.sum(wn_jax.normalize(v, two, None).astype(jnp.float32) ** 2)
    for h in (jax.jacfwd(jax.grad(loss))(z), jax.hessian(loss)(z)):
      assert np.all(np.isfinite(np.asarray(h)))
    _, dn = jax.jvp(lambda v: wn_jax.norm(v), (v,), (dv,))
    assert np.all(np.isfinite(np.asarray(dn))) and float(dn[1]) == 0.0


def test_vmap_of_jvp_and_jvp_of_vmap():
  v, g = (jnp.asarray(a, jnp.float32) for a in _vg((5, 4, 3), (0, 2)))
  dv, dg = (jnp.asarray(a, jnp.float32) for a in _vg((5, 4, 3), (0, 2), seed=1))
  v = v.at[1].set(0.0)  # one example with all-zero slices
  f = lambda v, g: jax.jvp(lambda v, g: wn_jax.normalize(v, g), (v, g), (dv[0], dg[0]))[1]
  batched = jax.vmap(f)(v, g)
  loop = jnp.stack([f(v[i], g[i]) for i in range(5)])
  np.testing.assert_allclose(batched, loop, rtol=1e-6, atol=1e-7)
  assert np.all(np.isfinite(batched))
  _, outer = jax.jvp(jax.vmap(wn_jax.normalize), (v, g), (dv, dg))
  inner = jax.vmap(lambda *a: jax.jvp(wn_jax.normalize, a[:2], a[2:])[1])(v, g, dv, dg)
  np.testing.assert_allclose(outer, inner, rtol=1e-6, atol=1e-7)


def test_jit_grad_vmap_scan_remat_of_forward_mode():
  v, g = (jnp.asarray(a, jnp.float32) for a in _vg((4, 3), -1))
  dv, dg = (jnp.asarray(a, jnp.float32) for a in _vg((4, 3), -1, seed=1))
  f = lambda v, g: jax.jvp(wn_jax.normalize, (v, g), (dv, dg))[1]
  expected = f(v, g)
  np.testing.assert_allclose(jax.jit(f)(v, g), expected, rtol=1e-6)
  np.testing.assert_allclose(jax.checkpoint(f)(v, g), expected, rtol=1e-6)
  _, scanned = jax.lax.scan(lambda c, x: (c, f(*x)), 0, (v[None], g[None]))
  np.testing.assert_allclose(scanned[0], expected, rtol=1e-6)
  # jacfwd under jit and remat, through a scan.
  loss = lambda v: jnp.sum(
    jax.lax.scan(lambda c, _: (jax.checkpoint(wn_jax.normalize)(c, g), None), v, None, length=2)[0]
    ** 2
  )
  np.testing.assert_allclose(jax.jit(jax.jacfwd(loss))(v), jax.grad(loss)(v), rtol=1e-5, atol=1e-6)


# --- pytrees, layers and wrappers: jacfwd == jacrev of a loss w.r.t. the parameters ---

X = jnp.asarray(np.random.default_rng(7).normal(size=(2, 6, 3)), jnp.float32)


def _linen_case(module, x):
  params = module.init(jax.random.key(0), x)['params']
  return lambda p: jnp.sum(jnp.tanh(module.apply({'params': p}, x)) ** 2), params


def _nnx_case(module, x):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  return lambda p: jnp.sum(jnp.tanh(nnx.merge(graphdef, p, rest)(x)) ** 2), params


def _materialize_case():
  params = {'a': jnp.asarray(_vg((3, 4), -1)[0], jnp.float32), 'b': jnp.ones(4)}
  wn = wn_jax.weight_norm(params)
  x = X[0]
  return lambda p: jnp.sum(jnp.tanh(x @ wn_jax.materialize(p)['a'] + p['b']) ** 2), wn


WIDE = X.reshape(2, 18)  # fewer rows than input features: a Dense layer scales its output

LAYERS = {
  'linen.WNDense': lambda: _linen_case(wn_jax.linen.WNDense(4), X),
  'linen.WNDense/scaled': lambda: _linen_case(wn_jax.linen.WNDense(4), WIDE),
  'linen.WNConv': lambda: _linen_case(wn_jax.linen.WNConv(4, (3,)), X),
  'linen.WNConvTranspose': lambda: _linen_case(wn_jax.linen.WNConvTranspose(4, (3,)), X),
  'linen.WeightNorm': lambda: _linen_case(wn_jax.linen.WeightNorm(nn.Conv(4, (3,))), X),
  'nnx.WNLinear': lambda: _nnx_case(wn_jax.nnx.WNLinear(3, 4, rngs=nnx.Rngs(0)), X),
  'nnx.WNLinear/scaled': lambda: _nnx_case(wn_jax.nnx.WNLinear(18, 4, rngs=nnx.Rngs(0)), WIDE),
  'nnx.WNConv': lambda: _nnx_case(wn_jax.nnx.WNConv(3, 4, (3,), rngs=nnx.Rngs(0)), X),
  'nnx.WNConvTranspose': lambda: _nnx_case(
    wn_jax.nnx.WNConvTranspose(3, 4, (3,), rngs=nnx.Rngs(0)), X
  ),
  'nnx.WeightNorm': lambda: _nnx_case(
    wn_jax.nnx.WeightNorm(nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0))), X
  ),
  'materialize': _materialize_case,
}


@pytest.mark.parametrize('name', list(LAYERS))
def test_layer_jacfwd_equals_jacrev_and_linearize_works(name):
  loss, params = LAYERS[name]()
  fwd = jax.jit(jax.jacfwd(loss))(params)
  rev = jax.jit(jax.jacrev(loss))(params)
  assert_trees_close(fwd, rev, rtol=1e-4, atol=1e-6)
  # linearize: the linear map's value on a direction is the directional derivative.
  _, lin = jax.linearize(loss, params)
  d = jax.tree_util.tree_map(jnp.ones_like, params)
  along = sum(
    jnp.sum(a * b) for a, b in zip(jax.tree_util.tree_leaves(rev), jax.tree_util.tree_leaves(d))
  )
  np.testing.assert_allclose(lin(d), along, rtol=1e-4)


@pytest.mark.parametrize(
  'name',
  ['linen.WNDense', 'linen.WNDense/scaled', 'nnx.WNLinear', 'nnx.WNLinear/scaled', 'materialize'],
)
def test_layer_hessian_forward_over_reverse_equals_jvp_of_grad(name):
  loss, params = LAYERS[name]()
  d = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
  hvp = jax.jvp(jax.grad(loss), (params,), (d,))[1]
  # jacfwd(jacrev) gives the full Hessian as a tree of trees: contract it with d.
  hess = jax.jacfwd(jax.jacrev(loss))(params)
  leaves_d = jax.tree_util.tree_leaves(d)
  rows = jax.tree_util.tree_structure(params).flatten_up_to(hess)
  contracted = [
    sum(
      jnp.tensordot(block, dj, axes=dj.ndim)
      for block, dj in zip(jax.tree_util.tree_structure(params).flatten_up_to(row), leaves_d)
    )
    for row in rows
  ]
  for a, b in zip(contracted, jax.tree_util.tree_leaves(hvp)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# --- the README's claims: jit-, grad-, vmap-, scan- and remat-safe; never recompiles ---


def test_layer_under_jit_grad_vmap_scan_remat():
  layer = wn_jax.linen.WNDense(4)
  params = layer.init(jax.random.key(0), X[0])['params']
  apply = lambda p, x: layer.apply({'params': p}, x)
  y = apply(params, X)
  np.testing.assert_allclose(jax.jit(apply)(params, X), y, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(apply, in_axes=(None, 0))(params, X), y, rtol=1e-6)
  _, scanned = jax.lax.scan(lambda c, x: (c, apply(params, x)), 0, X)
  np.testing.assert_allclose(scanned, y, rtol=1e-5, atol=1e-6)
  loss = lambda p: jnp.sum(apply(p, X) ** 2)
  remat = jax.checkpoint(loss)
  assert_trees_close(jax.grad(remat)(params), jax.grad(loss)(params), rtol=1e-5)
  # Per-example gradients (vmap of grad).
  per = jax.vmap(jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2)), in_axes=(None, 0))(params, X)
  assert_trees_close(
    jax.tree_util.tree_map(lambda a: a.sum(0), per), jax.grad(loss)(params), rtol=1e-5
  )


def test_the_same_configuration_never_recompiles():
  traces = {'layer': 0, 'tree': 0, 'jvp': 0}
  layer = wn_jax.linen.WNDense(4)

  @jax.jit
  def step(params, x):
    traces['layer'] += 1
    return jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x) ** 2))(params)

  @jax.jit
  def tree(p):
    traces['tree'] += 1
    return wn_jax.materialize(p)

  @jax.jit
  def fwd(v, g, dv):
    traces['jvp'] += 1
    return jax.jvp(lambda v: wn_jax.normalize(v, g), (v,), (dv,))

  for seed in range(3):
    params = layer.init(jax.random.key(seed), X[0])['params']
    step(params, X[seed % 2])
    tree(wn_jax.weight_norm(params, where='kernel'))
    fwd(params['kernel'], params['scale'], params['kernel'])
  assert traces == {'layer': 1, 'tree': 1, 'jvp': 1}
