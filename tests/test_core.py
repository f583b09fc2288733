"""The array core against the float64 NumPy reference: values, gradients, zeros, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import wn_jax
from tests import reference as ref
from tests.helpers import assert_close
from tests.helpers import shape_and_axis
from wn_jax import _norm

CASES = [
  ((5,), -1),
  ((5,), None),
  ((4, 3), -1),
  ((4, 3), 0),
  ((4, 3), 1),
  ((4, 3), None),
  ((4, 3), (0, 1)),
  ((2, 3, 4), (0, 2)),
  ((2, 3, 4), (-1, -3)),
  ((2, 3, 4), -2),
  ((3, 3, 2, 5), -1),
  ((3, 3, 2, 5), (2, 3)),
  ((7, 1, 6), 0),
]
LOW_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _inputs(shape, axis, seed=0):
  rng = np.random.default_rng(seed)
  v = rng.normal(size=shape)
  g = rng.uniform(0.5, 2.0, size=ref.decompose(v, axis)[1].shape)
  gw = rng.normal(size=shape)
  return v, g, gw


def _as64(x):
  wide = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  return np.asarray(x.astype(wide), np.float64)


def _check(shape, axis, dtype):
  v, g, gw = _inputs(shape, axis)
  # The reference sees the same rounded inputs as the library.
  vd, gd = jnp.asarray(v, dtype), jnp.asarray(g, dtype)
  vr, gr = _as64(vd), _as64(gd)
  fn = jax.jit(lambda v, g: wn_jax.normalize(v, g, axis))
  w, vjp = jax.vjp(fn, vd, gd)
  assert w.dtype == dtype and w.shape == shape
  assert_close(w, ref.normalize(vr, gr, axis), dtype)
  dv, dg = vjp(jnp.asarray(gw, dtype))
  ev, eg = ref.grads(vr, gr, axis, _as64(jnp.asarray(gw, dtype)))
  assert dv.dtype == dtype and dg.dtype == dtype
  assert_close(dv, ev, dtype, factor=4)
  assert_close(dg, eg, dtype, factor=4)


@pytest.mark.parametrize('shape,axis', CASES)
@pytest.mark.parametrize('dtype', LOW_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_matches_reference(shape, axis, dtype):
  _check(shape, axis, dtype)


@pytest.mark.parametrize('shape,axis', CASES)
def test_matches_reference_float64(shape, axis, x64):
  _check(shape, axis, jnp.float64)


@pytest.mark.parametrize('shape,axis', CASES[:6])
def test_second_order_reverse_mode(shape, axis, x64):
  # grad of a function of the gradient (reverse over reverse) against finite differences.
  v, g, gw = _inputs(shape, axis)
  v, g, gw = (jnp.asarray(a, jnp.float64) for a in (v, g, gw))
  inner = lambda v: jnp.sum(jax.grad(lambda v: jnp.sum(wn_jax.normalize(v, g, axis) * gw))(v) ** 2)
  d = jnp.asarray(np.random.default_rng(3).normal(size=v.shape))
  h = 1e-6
  fd = (inner(v + h * d) - inner(v - h * d)) / (2 * h)
  np.testing.assert_allclose(jnp.sum(jax.grad(inner)(v) * d), fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('shape,axis', CASES)
def test_decompose_roundtrip_and_reference(shape, axis):
  w = jnp.asarray(_inputs(shape, axis)[0], jnp.float32)
  v, g = wn_jax.decompose(w, axis)
  assert v is w or np.array_equal(v, w)
  assert_close(g, ref.decompose(np.asarray(w, np.float64), axis)[1])
  assert_close(wn_jax.normalize(v, g, axis), np.asarray(w, np.float64))
  assert g.shape == wn_jax.scale_shape(w.shape, axis)


@pytest.mark.parametrize('dtype', [*LOW_DTYPES, jnp.float64], ids=lambda d: jnp.dtype(d).name)
def test_zero_slice_gives_zero_weight_and_finite_gradients(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    v = jnp.asarray([[1.0, 0.0, 2.0], [2.0, 0.0, -1.0]], dtype)
    g = jnp.asarray([1.5, 3.0, 0.5], dtype)
    w = wn_jax.normalize(v, g)
    assert np.all(np.asarray(w[:, 1], np.float32) == 0)
    assert_close(w, ref.normalize(np.asarray(v, np.float64), np.asarray(g, np.float64), -1), dtype)
    loss = lambda v, g: jnp.sum(
      wn_jax.normalize(v, g).astype(jnp.float32) ** 2 + wn_jax.normalize(v, g).astype(jnp.float32)
    )
    dv, dg = jax.grad(loss, argnums=(0, 1))(v, g)
    assert np.all(np.isfinite(np.asarray(dv, np.float32))) and np.all(
      np.isfinite(np.asarray(dg, np.float32))
    )
    # On the zero column, the weight is locally g * v: dL/dv = g * dL/dw, dL/dg = 0.
    np.testing.assert_allclose(np.asarray(dv[:, 1], np.float32), 3.0, rtol=1e-2)
    assert float(dg[1]) == 0.0
    # All-zero weight, whole-tensor axis.
    dz = jax.grad(
      lambda v: jnp.sum(wn_jax.normalize(v, jnp.asarray(2.0, dtype), None).astype(jnp.float32))
    )(jnp.zeros((3, 2), dtype))
    assert np.all(np.isfinite(np.asarray(dz, np.float32)))


def test_eps_bounds_the_norm_but_leaves_normal_slices_alone():
  v = jnp.asarray([[3.0, 1e-4], [4.0, 0.0]])
  g = jnp.asarray([1.0, 1.0])
  w = wn_jax.normalize(v, g, eps=1e-2)
  np.testing.assert_allclose(w[:, 0], [0.6, 0.8], rtol=1e-7)
  np.testing.assert_allclose(w[:, 1], [1e-2, 0.0], rtol=1e-6)
  dv = jax.grad(lambda v: wn_jax.normalize(v, g, eps=1e-2).sum())(v)
  np.testing.assert_allclose(dv[:, 1], [100.0, 100.0], rtol=1e-6)
  assert np.array_equal(
    wn_jax.normalize(v[:, :1], g[:1], eps=0.0), wn_jax.normalize(v[:, :1], g[:1])
  )


# XLA on CPU flushes float32 subnormals to zero, and a norm above float32's maximum
# (about 3.4e38) cannot be represented: the library's range ends there.
@pytest.mark.parametrize('scale', [1e30, 1e-30, 1e36])
def test_extreme_magnitudes_in_float32_are_exact(scale):
  rng = np.random.default_rng(1)
  base = rng.normal(size=(6, 4))
  base /= np.max(np.abs(base))
  v = jnp.asarray(base * scale, jnp.float32)
  g = jnp.asarray([1.0, 2.0, 3.0, 4.0], jnp.float32)
  w = wn_jax.normalize(v, g)
  assert np.all(np.isfinite(w))
  vr = np.asarray(v, np.float64)
  assert_close(w, ref.normalize(vr, np.asarray(g, np.float64), -1), factor=2)
  dv, dg = jax.grad(
    lambda v, g: jnp.sum(wn_jax.normalize(v, g) * jnp.arange(24.0).reshape(6, 4)), argnums=(0, 1)
  )(v, g)
  assert np.all(np.isfinite(dv)) and np.all(np.isfinite(dg))
  assert_close(
    dg, ref.grads(vr, np.asarray(g, np.float64), -1, np.arange(24.0).reshape(6, 4))[1], factor=4
  )
  assert_close(wn_jax.norm(v), ref.decompose(vr, -1)[1], factor=2, floor=0.0)


def test_at_1e36_a_factor_that_is_a_normal_float32_gives_w():
  # concepts.md: entries of 1e36 in a slice of 120 need |g| above about 0.13, so that
  # g / ||v|| stays above 1.2e-38 (a CPU flushes a subnormal factor to 0).
  v = jnp.full((120, 2), 1e36, jnp.float32)
  g = jnp.asarray([0.14, 1.0], jnp.float32)
  assert np.all(np.abs(g) / np.sqrt(120.0) / 1e36 > np.finfo(np.float32).tiny)
  w = wn_jax.normalize(v, g)
  assert_close(w, ref.normalize(np.asarray(v, np.float64), np.asarray(g, np.float64), -1), factor=2)


def test_both_backend_branches_of_the_norm_match_the_reference():
  # One array with a slice in range, one above it, one below it, one zero. A CPU takes the
  # plain sum and, since some slice is out of range, the scaled sums under a lax.cond;
  # other backends (`_ranged` alone) compute all three sums: the same result either way.
  rng = np.random.default_rng(2)
  base = rng.normal(size=(6, 4))
  v64 = base * np.array([1.0, 1e30, 1e-30, 0.0])
  v = jnp.asarray(v64, jnp.float32)
  vr = np.asarray(v, np.float64)
  expected = ref.decompose(vr, -1)[1]
  on_cpu = wn_jax.norm(v)
  ss = jnp.sum(v * v, axis=0, keepdims=True)
  elsewhere = _norm._ranged(v, ss, (0,)).reshape(4)
  for n in (on_cpu, elsewhere):
    assert_close(n, expected, factor=2, floor=0.0)
  # In range, both are the plain norm, bit for bit (all compiled alike, under jit).
  w = jnp.asarray(base, jnp.float32)
  plain = jax.jit(lambda w: jnp.sqrt(jnp.sum(w * w, axis=0)))(w)
  ranged = jax.jit(lambda w: _norm._ranged(w, jnp.sum(w * w, 0, keepdims=True), (0,))[0])(w)
  assert np.array_equal(jax.jit(wn_jax.norm)(w), plain)
  assert np.array_equal(ranged, plain)


@pytest.mark.parametrize('shape', [(1,), (1, 1), (1, 1, 1, 1)])
@pytest.mark.parametrize(
  'dtype, scale', [(jnp.float32, 1e-30), (jnp.float32, 1e30), (jnp.float64, 1e-200)]
)
def test_a_one_element_weight_out_of_the_plain_range_keeps_its_norm(shape, dtype, scale):
  # With one element, XLA's simplifier may fold (v k) * (v k) into (v v) * k^2, and k^2
  # overflows: NaN on both backend branches (a user's WNDense(1) got a NaN scale at init).
  with jax.enable_x64(dtype == jnp.float64):
    v = jnp.full(shape, -scale, dtype)
    ss = jnp.sum(v * v, keepdims=True)
    red = tuple(range(len(shape)))
    for n in (wn_jax.norm(v, None), jax.jit(lambda v: _norm._ranged(v, ss, red))(v)):
      assert_close(jnp.ravel(n), np.full(1, scale), factor=2, floor=0.0)
    w = wn_jax.normalize(v, jnp.full(shape[-1:], 2.0, dtype))
    assert_close(w, np.full(shape, -2.0), factor=2)
    assert_close(wn_jax.decompose(v)[1], np.full(shape[-1:], scale), factor=2, floor=0.0)


def test_the_cpu_branch_scales_only_under_a_cond():
  # The CPU lowering reads v with one plain sum outside the cond; other backends get no
  # cond, and all three sums side by side (which XLA fuses into one pass over v).
  spec = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  cpu = jax.jit(wn_jax.norm).trace(spec).lower(lowering_platforms=('cpu',)).as_text()
  gpu = jax.export.export(jax.jit(wn_jax.norm), platforms=['cuda'])(spec).mlir_module()
  assert 'stablehlo.if' in cpu or cpu.count('stablehlo.case') > gpu.count('stablehlo.case')
  assert gpu.count('stablehlo.reduce(') == 3 and cpu.count('stablehlo.reduce(') == 4


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_nan_and_inf_propagate_to_their_slice_only(bad):
  v = jnp.asarray([[1.0, bad], [2.0, 1.0]])
  w = wn_jax.normalize(v, jnp.ones(2))
  assert not np.any(np.isfinite(w[:, 1])) and np.all(np.isfinite(w[:, 0]))


def test_mixed_dtypes_promote_and_reduce_in_float32():
  v = jnp.asarray(np.random.default_rng(0).normal(size=(64, 8)), jnp.bfloat16)
  g = jnp.ones(8, jnp.float32)
  w = wn_jax.normalize(v, g)
  assert w.dtype == jnp.float32
  assert_close(
    w,
    ref.normalize(np.asarray(v.astype(jnp.float32), np.float64), np.ones(8), -1),
    jnp.float32,
    factor=4,
  )


def test_numpy_inputs_are_not_modified():
  v = np.arange(6.0, dtype=np.float32).reshape(3, 2)
  g = np.ones(2, np.float32)
  v0, g0 = v.copy(), g.copy()
  wn_jax.normalize(v, g)
  wn_jax.decompose(v)
  assert np.array_equal(v, v0) and np.array_equal(g, g0)


def test_jit_vmap_scan_checkpoint_compose():
  v = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4, 3)), jnp.float32)
  g = jnp.ones((5, 3))
  per = jax.vmap(lambda v, g: wn_jax.normalize(v, g))(v, g)
  loop = jnp.stack([wn_jax.normalize(v[i], g[i]) for i in range(5)])
  np.testing.assert_allclose(per, loop, rtol=1e-6)
  _, scanned = jax.lax.scan(lambda c, vg: (c, wn_jax.normalize(*vg)), 0, (v, g))
  np.testing.assert_allclose(scanned, loop, rtol=1e-6)
  f = lambda v, g: jnp.sum(jax.checkpoint(wn_jax.normalize)(v, g) ** 3)
  a = jax.jit(jax.grad(f, argnums=(0, 1)))(v[0], g[0])
  b = jax.grad(lambda v, g: jnp.sum(wn_jax.normalize(v, g) ** 3), argnums=(0, 1))(v[0], g[0])
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  np.testing.assert_allclose(a[1], b[1], rtol=1e-5)
  # vmap of grad, with per-example zero slices.
  vz = v.at[2].set(0.0)
  grads = jax.vmap(jax.grad(lambda v, g: jnp.sum(wn_jax.normalize(v, g))))(vz, g)
  assert np.all(np.isfinite(grads))


def test_same_configuration_compiles_once():
  traces = 0

  @jax.jit
  def f(v, g):
    nonlocal traces
    traces += 1
    return wn_jax.normalize(v, g, (0, 1))

  for seed in range(3):
    rng = np.random.default_rng(seed)
    f(jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32), jnp.ones((2, 3)))
  assert traces == 1


@pytest.mark.parametrize(
  'call,message',
  [
    (lambda: wn_jax.normalize(jnp.ones((2, 3)), jnp.ones(3), axis=2), 'out of range'),
    (lambda: wn_jax.normalize(jnp.ones((2, 3)), jnp.ones(3), axis=-3), 'out of range'),
    (lambda: wn_jax.normalize(jnp.ones((2, 3)), jnp.ones((2, 3)), axis=(0, -2)), 'repeats'),
    (lambda: wn_jax.normalize(jnp.ones((2, 3)), jnp.ones(2)), r'g must have the shape.*\(3,\)'),
    (lambda: wn_jax.normalize(jnp.ones((2, 3)), jnp.ones(3), axis=None), r'\(\)'),
    (lambda: wn_jax.normalize(jnp.ones((2, 3), jnp.int32), jnp.ones(3)), 'floating'),
    (lambda: wn_jax.normalize(jnp.ones((2, 3), jnp.complex64), jnp.ones(3)), 'floating'),
    (lambda: wn_jax.normalize(jnp.ones((2, 3)), jnp.ones(3, jnp.int32)), 'floating'),
    (lambda: wn_jax.normalize(jnp.ones((2, 3)), jnp.ones(3), eps=-1.0), 'eps'),
    (lambda: wn_jax.normalize(jnp.ones((2, 3)), jnp.ones(3), axis=1.5), 'axis must be'),
    (lambda: wn_jax.decompose(jnp.ones((2, 3)), axis=5), 'wn_jax.decompose'),
    (lambda: wn_jax.decompose(jnp.ones(3, jnp.int8)), 'floating'),
    (lambda: wn_jax.normalize(jnp.asarray(1.0), jnp.asarray(1.0)), 'rank 0'),
    (
      lambda: wn_jax.decompose(jnp.float32(3.0)),
      r'rank 0 \(a scalar has no axis to keep\); pass axis=None',
    ),
    # Not an array (a parameter dict, a string): said so, not a NumPy conversion error.
    (
      lambda: wn_jax.decompose({'w': jnp.ones((2, 3))}),
      r'wn_jax.decompose: w must be an arr.*dict.*wn_jax.weight_norm',
    ),
    (lambda: wn_jax.norm('kernel'), r'wn_jax.norm: w must be an array.*str'),
    (
      lambda: wn_jax.normalize(jnp.ones((2, 3)), None),
      r'wn_jax.normalize: g must be an array.*NoneType',
    ),
  ],
)
def test_bad_input_raises_at_trace_time(call, message):
  with pytest.raises(ValueError, match=message):
    call()


@pytest.mark.parametrize('shape', [jnp.ones((4, 3)), (4, -1), 5, (4.0, 3), '43'])
def test_scale_shape_refuses_what_is_not_a_shape(shape):
  # An array in place of its shape gave a tuple holding the array's last row; (4, -1) gave
  # (-1,): silently.
  with pytest.raises(
    ValueError, match=r'wn_jax.scale_shape: shape must be a sequence of .*\.shape'
  ):
    wn_jax.scale_shape(shape, -1)


def test_pure_functions_export_with_a_symbolic_weight_shape():
  # jax.export with the weight's shape symbolic: scale_shape keeps symbolic dimensions.
  a, b = jax.export.symbolic_shape('a, b')
  v, g = jax.ShapeDtypeStruct((a, b), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.float32)
  exported = jax.export.export(jax.jit(wn_jax.normalize))(v, g)
  assert exported.out_avals[0].shape == (a, b)
  assert jax.export.export(jax.jit(wn_jax.norm))(v).out_avals[0].shape == (b,)
  assert wn_jax.scale_shape((a, b), -1) == (b,)
  w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
  assert_close(exported.call(w, jnp.ones(3)), ref.normalize(w, np.ones(3), -1), jnp.float32)


def test_scale_shape_takes_numpy_ints():
  assert wn_jax.scale_shape((np.int64(4), 3), 0) == (4,)
  assert wn_jax.scale_shape(np.array([2, 5]), -1) == (5,)


def test_errors_raise_under_jit_before_running():
  f = jax.jit(lambda v, g: wn_jax.normalize(v, g))
  with pytest.raises(ValueError, match='wn_jax.normalize'):
    f.lower(jax.ShapeDtypeStruct((2, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32))


# --- invariants (hypothesis) ---


@functools.partial(jax.jit, static_argnums=4)
def _invariant_values(v, g, gw, c, axis):
  w = wn_jax.normalize(v, g, axis)
  dv = jax.grad(lambda v: jnp.sum(wn_jax.normalize(v, g, axis) * gw))(v)
  return (
    w,
    wn_jax.norm(w, axis),
    wn_jax.normalize(c * v, g, axis),
    wn_jax.normalize(*wn_jax.decompose(w, axis), axis),
    dv,
  )


@settings(max_examples=30, deadline=None)
@given(shape_and_axis(max_rank=4, max_size=5), st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
def test_invariants(sa, seed, c):
  shape, axis = sa
  rng = np.random.default_rng(seed)
  v = jnp.asarray(rng.normal(size=shape) + 0.1, jnp.float32)
  g = jnp.asarray(rng.normal(size=wn_jax.scale_shape(shape, axis)), jnp.float32)
  gw = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w, norm_w, w_scaled, w_round, dv = _invariant_values(v, g, gw, jnp.float32(c), axis)
  w64 = np.asarray(w, np.float64)
  # ||w|| along the reduced axes is |g|.
  assert_close(norm_w, np.abs(np.asarray(g, np.float64)), factor=4)
  # Invariant to positive rescaling of v.
  assert_close(w_scaled, w64, factor=4)
  # decompose is the inverse.
  assert_close(w_round, w64, factor=4)
  # The gradient with respect to v is orthogonal to v, slice by slice (section 2.1).
  kept = ref.kept(len(shape), axis)
  red = tuple(i for i in range(len(shape)) if i not in kept)
  dv, v = np.asarray(dv, np.float64), np.asarray(v, np.float64)
  dots = np.sum(dv * v, axis=red)
  # <dv, v> is of the size of |g| ||gw|| (dv ~ g / ||v|| gw): that sets the rounding.
  scale = np.abs(np.asarray(g, np.float64)) * np.sqrt(
    np.sum(np.asarray(gw, np.float64) ** 2, axis=red)
  )
  assert np.all(np.abs(dots) <= 1e-5 * scale + 1e-30)


def test_eps_takes_numpy_floats_and_refuses_non_finite():
  v, g = jnp.ones((3, 2)), jnp.ones(2)
  np.testing.assert_array_equal(
    wn_jax.normalize(v, g, eps=np.float32(1e-3)), wn_jax.normalize(v, g, eps=1e-3)
  )
  for bad in (float('inf'), float('nan'), -1.0, True):
    with pytest.raises(ValueError, match='eps must be a finite non-negative number'):
      wn_jax.normalize(v, g, eps=bad)


def test_a_python_float_g_gives_w_the_dtype_of_v():
  # Found by a user trial: a Python float g promoted a bfloat16 v to float32 (JAX's weak types
  # keep bfloat16: v * 2.0 is bfloat16). A review of the first fix (g cast to v's dtype): a
  # complex g lost its imaginary part, and g = 1e5 overflowed float16 where w fits. w is formed
  # in float32 and rounded once to v's dtype.
  v = jnp.ones((4, 3), jnp.bfloat16)
  assert wn_jax.normalize(v, 2.0, None).dtype == (v * 2.0).dtype == jnp.bfloat16
  assert wn_jax.materialize(wn_jax.WeightNormed(v, 1.0, None)).dtype == jnp.bfloat16
  assert jax.jit(lambda g: wn_jax.normalize(v, g, None))(2.0).dtype == jnp.bfloat16
  assert jax.jit(wn_jax.materialize)(wn_jax.WeightNormed(v, 2.0, None)).dtype == jnp.bfloat16
  assert wn_jax.normalize(v, jnp.asarray(2.0), None).dtype == jnp.bfloat16
  assert wn_jax.normalize(v, jnp.float32(2.0), None).dtype == jnp.float32  # a typed g: promoted
  w16 = wn_jax.normalize(jnp.ones((4, 4), jnp.float16), 1e5, None)
  assert w16.dtype == jnp.float16 and np.all(w16 == np.float16(25000.0))  # 24992: rounded once
  for g in (True, 2, 2 + 3j, jnp.asarray(2 + 3j)):  # still refused: not a real float
    with pytest.raises(ValueError, match='g must be a real floating array'):
      wn_jax.normalize(v, g, None)
  with pytest.raises(ValueError, match='g must be a real floating array'):
    jax.jit(lambda g: wn_jax.normalize(v, g, None))(2 + 3j)


def test_a_traced_axis_names_jits_static_argnames_first():
  # Found by a user trial: jax.jit(wn_jax.norm)(w, 0) blamed optax.inject_hyperparams, which a
  # plain JAX user never called.
  w = jnp.ones((4, 3))
  with pytest.raises(
    ValueError, match=r"axis is traced.*static_argnames='axis'.*inject_hyperparams"
  ):
    jax.jit(wn_jax.norm)(w, 0)


def test_a_users_callable_error_keeps_its_traceback():
  # Found by a user trial: a bug in the user's own where= callable came back relabelled, with
  # no frame of the callable in the traceback.
  def my_where(path, leaf):
    return int(path[-1].key) > 0

  with pytest.raises(ValueError, match='wn_jax.weight_norm: invalid literal') as info:
    wn_jax.weight_norm({'kernel': jnp.ones((3, 2))}, where=my_where)
  assert 'my_where' in [entry.name for entry in info.traceback]


def test_a_slice_with_an_infinite_entry_has_norm_nan_as_documented():
  # norm's docstring says so (a user trial expected inf): normalize then gives a NaN slice.
  w = jnp.array([[jnp.inf, 1.0], [1.0, 1.0]])
  n = np.asarray(wn_jax.norm(w))
  assert np.isnan(n[0]) and n[1] == np.float32(np.sqrt(2.0))
  assert np.all(np.isnan(np.asarray(wn_jax.normalize(w, jnp.ones(2)))[:, 0]))
