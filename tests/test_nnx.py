"""Flax NNX layers: equal to their linen twins and the reference; train with nnx.Optimizer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import wn_jax
from tests import reference as ref
from tests.helpers import DENSE_PATHS
from tests.helpers import MP_DTYPES
from tests.helpers import assert_close
from tests.helpers import assert_mixed_precision
from tests.helpers import check_dense_forms_w
from tests.helpers import check_dense_path
from tests.helpers import fake_int8_dot
from tests.helpers import mp_input
from tests.helpers import mp_scale
from wn_jax import linen as wl
from wn_jax import nnx as wx


def _rand(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


TWINS = [
  (lambda: wx.WNLinear(6, 4, rngs=nnx.Rngs(0)), wl.WNDense(4), (5, 6)),
  (
    lambda: wx.WNLinear(6, 4, axis=0, use_bias=False, rngs=nnx.Rngs(0)),
    wl.WNDense(4, axis=0, use_bias=False),
    (5, 6),
  ),
  (
    lambda: wx.WNConv(4, 8, (3,), strides=(2,), rngs=nnx.Rngs(0)),
    wl.WNConv(8, (3,), strides=(2,)),
    (2, 9, 4),
  ),
  (
    lambda: wx.WNConv(4, 8, (3, 3), padding='VALID', feature_group_count=2, rngs=nnx.Rngs(0)),
    wl.WNConv(8, (3, 3), padding='VALID', feature_group_count=2),
    (2, 7, 7, 4),
  ),
  (
    lambda: wx.WNConvTranspose(4, 6, (4,), strides=(2,), rngs=nnx.Rngs(0)),
    wl.WNConvTranspose(6, (4,), strides=(2,)),
    (2, 5, 4),
  ),
  (
    lambda: wx.WNConvTranspose(4, 6, (3,), transpose_kernel=True, rngs=nnx.Rngs(0)),
    wl.WNConvTranspose(6, (3,), transpose_kernel=True),
    (2, 5, 4),
  ),
]


@pytest.mark.parametrize('make,twin,shape', TWINS)
def test_equals_linen_twin_and_reference(make, twin, shape):
  layer = make()
  layer.scale[...] = layer.scale[...] * jnp.linspace(0.5, 2.0, layer.scale.shape[0])
  params = {'kernel': layer.kernel[...], 'scale': layer.scale[...]}
  if layer.bias is not None:
    layer.bias[...] = layer.bias[...] + 0.25
    params['bias'] = layer.bias[...]
  x = _rand(shape)
  y = layer(x)
  np.testing.assert_allclose(y, twin.apply({'params': params}, x), rtol=1e-5, atol=1e-6)
  if isinstance(layer, wx.WNLinear):
    w = ref.normalize(
      np.asarray(params['kernel'], np.float64), np.asarray(params['scale'], np.float64), layer.axis
    )
    assert_close(y, ref.dense(np.asarray(x), w, params.get('bias')), factor=8)
  # Gradients equal the linen twin's.
  r = _rand(y.shape, seed=2)
  graphdef, state = nnx.split(layer)
  g_nnx = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x) * r))(state)
  g_linen = jax.grad(lambda p: jnp.sum(twin.apply({'params': p}, x) * r))(params)
  for name in params:
    np.testing.assert_allclose(g_nnx[name][...], g_linen[name], rtol=1e-5, atol=1e-6)


def test_function_preserving_init():
  x = _rand((3, 6))
  np.testing.assert_allclose(
    wx.WNLinear(6, 4, rngs=nnx.Rngs(3))(x),
    nnx.Linear(6, 4, rngs=nnx.Rngs(3))(x),
    rtol=1e-5,
    atol=1e-6,
  )
  xc = _rand((2, 8, 3))
  np.testing.assert_allclose(
    wx.WNConv(3, 5, (3,), rngs=nnx.Rngs(3))(xc),
    nnx.Conv(3, 5, (3,), rngs=nnx.Rngs(3))(xc),
    rtol=1e-5,
    atol=1e-6,
  )


@pytest.mark.parametrize('kind', ['Conv', 'ConvTranspose'])
def test_a_masked_kernel_starts_at_zero_where_the_mask_is(kind):
  # As in linen (a user's trial): the masked-out entries of v counted in ||v||.
  mask = jnp.ones((3, 4, 8)).at[2].set(0.0).at[0, 1].set(0.0)
  x = _rand((2, 9, 4))
  layer = getattr(wx, f'WN{kind}')(4, 8, (3,), mask=mask, rngs=nnx.Rngs(3))
  plain = getattr(nnx, kind)(4, 8, (3,), mask=mask, rngs=nnx.Rngs(3))
  v, g = layer.kernel[...], layer.scale[...]
  assert not np.any(np.asarray(v)[np.asarray(mask) == 0])
  assert_close(wn_jax.norm(wn_jax.normalize(v, g) * mask), g)
  assert_close(layer(x), np.asarray(plain(x)))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  assert not np.any(np.asarray(grads['kernel'][...])[np.asarray(mask) == 0])


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.a = wx.WNLinear(4, 16, rngs=rngs)
    self.b = wx.WNLinear(16, 2, rngs=rngs)

  def __call__(self, x):
    return self.b(nnx.relu(self.a(x)))


@pytest.mark.standard_promotion
def test_optimizer_trains_kernel_scale_and_bias():
  model = MLP(nnx.Rngs(0))
  before = nnx.clone(model)
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x, y = _rand((32, 4)), _rand((32, 2), seed=5)
  traces = 0

  @nnx.jit
  def step(model, opt, x, y):
    nonlocal traces
    traces += 1
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, x, y)) for _ in range(30)]
  assert traces == 1 and losses[-1] < 0.7 * losses[0]
  for name in ('kernel', 'scale', 'bias'):
    assert not np.allclose(getattr(before.a, name)[...], getattr(model.a, name)[...])
  # The stored kernel is the direction v, never the normalized weight.
  w = wn_jax.normalize(model.a.kernel[...], model.a.scale[...])
  assert not np.allclose(model.a.kernel[...], w)
  np.testing.assert_allclose(wn_jax.norm(w), jnp.abs(model.a.scale[...]), rtol=1e-5)


def test_forward_never_mutates_parameters():
  layer = wx.WNLinear(3, 2, rngs=nnx.Rngs(0))
  state = nnx.state(layer)
  layer(_rand((4, 3)))
  after = nnx.state(layer)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_split_merge_vmap_scan_remat():
  x = _rand((3, 5))
  layer = wx.WNLinear(5, 5, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  np.testing.assert_allclose(nnx.merge(graphdef, state)(x), layer(x), rtol=1e-6)

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return wx.WNLinear(5, 5, rngs=nnx.Rngs(key))

  stack = make(jax.random.split(jax.random.key(0), 4))
  assert stack.scale.shape == (4, 5)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def run(h, layer):
    return jnp.tanh(nnx.remat(lambda lyr, h: lyr(h))(layer, h))

  out = run(x, stack)
  expected = x
  for i in range(4):
    sub = nnx.merge(
      *nnx.split(wx.WNLinear(5, 5, rngs=nnx.Rngs(jax.random.split(jax.random.key(0), 4)[i])))
    )
    expected = jnp.tanh(sub(expected))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  grads = nnx.grad(lambda s: jnp.sum(run(x, s)))(stack)
  assert grads['scale'][...].shape == (4, 5)


def test_weight_norm_wrapper():
  inner = nnx.Sequential(
    nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(4, 2, rngs=nnx.Rngs(1))
  )
  model = wx.WeightNorm(inner)
  x = _rand((5, 3))
  np.testing.assert_allclose(model(x), inner(x), rtol=1e-5, atol=1e-6)
  assert model.scale['layers']['0']['kernel'].shape == (4,)
  assert 'bias' not in model.scale['layers']['0']
  kernel_before = inner.layers[0].kernel[...]
  model.scale['layers']['0']['kernel'][...] = model.scale['layers']['0']['kernel'][...] * 2.0
  y = model(x)
  np.testing.assert_array_equal(inner.layers[0].kernel[...], kernel_before)
  h = jnp.maximum(x @ (2 * kernel_before) + inner.layers[0].bias[...], 0)
  np.testing.assert_allclose(y, inner.layers[2](h), rtol=1e-5, atol=1e-5)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  assert np.any(grads['scale']['layers']['0']['kernel'][...] != 0)


def test_weight_norm_wrapper_carries_batch_stats_and_scale_init():
  inner = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
  model = wx.WeightNorm(inner, scale_init=nnx.initializers.ones, rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(model.scale['layers']['0']['kernel'][...], jnp.ones(4))
  model(_rand((8, 3)) + 3.0)
  assert not np.allclose(inner.layers[1].mean[...], 0)


@pytest.mark.parametrize('axis', [-1, 1])
def test_mean_only_batch_norm_matches_linen(axis):
  x = _rand((8, 3, 3)) + 2 if axis == 1 else _rand((8, 4, 3)) + 2
  bn = wx.MeanOnlyBatchNorm(3, axis=axis, momentum=0.5, rngs=nnx.Rngs(0))
  y = bn(x)
  twin = wl.MeanOnlyBatchNorm(axis=axis, momentum=0.5)
  yl, upd = twin.apply(
    twin.init(jax.random.key(0), x, use_running_average=False),
    x,
    use_running_average=False,
    mutable=['batch_stats'],
  )
  np.testing.assert_allclose(y, yl, rtol=1e-6)
  np.testing.assert_allclose(bn.mean[...], upd['batch_stats']['mean'], rtol=1e-6)
  bn.eval()
  assert bn.use_running_average
  shape = [1, 1, 1]
  shape[axis] = 3
  np.testing.assert_allclose(bn(x), x - bn.mean[...].reshape(shape), rtol=1e-6)


def test_mean_only_batch_norm_takes_axis_index_groups_as_linen_does():
  # Found by a user: the NNX layer had no axis_index_groups (linen's and nnx.BatchNorm's
  # have). Only pmap's collectives take groups; the suite runs on the host's devices.
  n = jax.local_device_count()
  x = _rand((n, 8, 3)) + 2
  groups = [list(range(n // 2)), list(range(n // 2, n))] if n % 2 == 0 else [list(range(n))]
  bn = wx.MeanOnlyBatchNorm(3, axis_name='d', axis_index_groups=groups, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(bn)

  def nnx_call(xi, state):
    layer = nnx.merge(graphdef, state)
    return layer(xi), layer.mean[...]

  twin = wl.MeanOnlyBatchNorm(axis_name='d', axis_index_groups=groups)
  variables = twin.init(jax.random.key(0), x[0], use_running_average=False)
  y, mean = jax.pmap(nnx_call, axis_name='d', in_axes=(0, None))(x, state)
  yl, upd = jax.pmap(
    lambda xi: twin.apply(variables, xi, use_running_average=False, mutable=['batch_stats']),
    axis_name='d',
  )(x)
  np.testing.assert_allclose(y, yl, rtol=1e-6)
  np.testing.assert_allclose(mean, upd['batch_stats']['mean'], rtol=1e-6)
  xr = np.asarray(x, np.float64)
  for group in groups:
    assert_close(np.asarray(y)[group], xr[group] - xr[group].mean((0, 1)))


@pytest.mark.parametrize(
  'axis, features, match',
  [
    (4, 3, r'axis must be one int, the feature axis of the input \(-4..3'),
    (None, 3, r'axis must be one int.*got None'),
    ((1, 2), 3, r'axis must be one int.*got \(1, 2\)'),
    (1, 5, r'the input has 3 features along axis 1.*num_features=5. Build it with num_features=3'),
  ],
)
def test_mean_only_batch_norm_refuses_a_bad_axis_with_the_fix(axis, features, match):
  bn = wx.MeanOnlyBatchNorm(features, axis=axis, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'wn_jax.nnx.MeanOnlyBatchNorm: ' + match):
    bn(jnp.ones((2, 3, 4, 5)))
  twin = wl.MeanOnlyBatchNorm(axis=axis, use_running_average=False)
  if features == 3:  # linen takes the features from the input
    with pytest.raises(ValueError, match=r"MeanOnlyBatchNorm at '/': " + match):
      twin.init(jax.random.key(0), jnp.ones((2, 3, 4, 5)))


@pytest.mark.parametrize('layer', [wx.WNConv, wx.WNConvTranspose])
def test_conv_of_an_input_of_too_low_rank_is_refused_by_name(layer):
  # Found by a user trial: "operands could not be broadcast together with shapes (0,) (2,)",
  # where linen's layer names itself and the shape it needs.
  conv = layer(4, 6, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=rf'{layer.__name__}.*2-D convolution.*rank >= 3'):
    conv(jnp.ones((5, 4)))


def test_partitioning_propagates_to_scale():
  mesh = jax.make_mesh((1,), ('model',))
  with jax.set_mesh(mesh):
    layer = wx.WNLinear(
      4,
      8,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, 'model')),
      rngs=nnx.Rngs(0),
    )
  assert layer.scale.get_metadata()['out_sharding'] == ('model',)
  spec = nnx.get_partition_spec(nnx.state(layer))['scale']
  spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
  assert spec == jax.sharding.PartitionSpec('model')


@pytest.mark.parametrize(
  'call,message',
  [
    (lambda: wx.WNLinear(3, 4, axis=2, rngs=nnx.Rngs(0)), r'WNLinear.*axis 2 is out of range'),
    (
      lambda: wx.WNConv(3, 4, (3,), feature_group_count=2, rngs=nnx.Rngs(0)),
      'WNConv.*feature_group_count=2',
    ),
    (
      lambda: wx.WeightNorm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), where='nothing'),
      'selected no leaf',
    ),
  ],
)
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_wrong_scale_shape_names_the_layer():
  layer = wx.WNLinear(3, 4, rngs=nnx.Rngs(0))
  layer.scale.set_value(jnp.ones(3))
  with pytest.raises(
    ValueError, match=r'WNLinear\(kernel \(3, 4\)\): the loaded scale has shape \(3,\)'
  ):
    layer(jnp.ones((1, 3)))


def test_linen_twin_parity_of_attribute_vocabulary():
  # The NNX layers accept the NNX parents' keyword arguments unchanged.
  layer = wx.WNConv(
    2,
    4,
    (3,),
    padding='CAUSAL',
    kernel_dilation=2,
    use_bias=False,
    dtype=jnp.bfloat16,
    rngs=nnx.Rngs(0),
  )
  assert layer(jnp.ones((1, 6, 2))).dtype == jnp.bfloat16
  assert isinstance(nn.Dense, type)


@pytest.mark.parametrize('param_dtype', MP_DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize('dtype', MP_DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize('wrapped', [False, True], ids=['WNLinear', 'WeightNorm'])
def test_mixed_precision_within_2x_of_plain_flax(wrapped, dtype, param_dtype):
  x = mp_input(dtype)
  kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  if wrapped:
    layer = wx.WeightNorm(nnx.Linear(64, 48, **kw))
    layer.scale['kernel'][...] = mp_scale(layer.scale['kernel'][...])
    kernel, scale = layer.layer.kernel[...], layer.scale['kernel'][...]
    bias = layer.layer.bias[...]
  else:
    layer = wx.WNLinear(64, 48, **kw)
    layer.scale[...] = mp_scale(layer.scale[...])
    kernel, scale, bias = layer.kernel[...], layer.scale[...], layer.bias[...]
  assert kernel.dtype == scale.dtype == param_dtype
  plain = nnx.Linear(64, 48, **kw)
  plain.bias[...] = bias

  def plain_apply(k):
    plain.kernel[...] = k
    return plain(x)

  y = nnx.jit(lambda m, x: m(x))(layer, x)
  assert_mixed_precision(y, x, kernel, scale, bias, plain_apply, param_dtype, dtype)


def test_weight_norm_wrapper_scale_carries_the_kernel_sharding():
  mesh = jax.make_mesh((1,), ('model',))
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, 'model'))
  with jax.set_mesh(mesh):
    inner = nnx.Sequential(
      nnx.Linear(4, 8, kernel_init=init, rngs=nnx.Rngs(0)),
      nnx.Linear(8, 2, rngs=nnx.Rngs(1)),
    )
    model = wx.WeightNorm(inner)
  assert model.scale['layers']['0']['kernel'].get_metadata()['out_sharding'] == ('model',)
  assert model.scale['layers']['1']['kernel'].get_metadata().get('out_sharding') is None
  spec = nnx.get_partition_spec(nnx.state(model))
  got = spec['scale']['layers']['0']['kernel']
  got = got.get_value() if isinstance(got, nnx.Variable) else got
  assert got == jax.sharding.PartitionSpec('model')
  kernel = spec['layer']['layers'][0]['kernel']
  kernel = kernel.get_value() if isinstance(kernel, nnx.Variable) else kernel
  assert kernel == jax.sharding.PartitionSpec(None, 'model')


@pytest.mark.parametrize(
  'make,message',
  [
    (
      lambda: wx.WNLinear(3, 4, param_dtype=jnp.complex64, rngs=nnx.Rngs(0)),
      r'WNLinear\(kernel \(3, 4\)\).*real floating.*complex64',
    ),
    (
      lambda: wx.WNConv(3, 4, (3,), param_dtype=jnp.complex64, rngs=nnx.Rngs(0)),
      r'WNConv\(kernel \(3, 3, 4\)\).*real floating',
    ),
    (
      lambda: wx.WeightNorm(nnx.Linear(3, 4, param_dtype=jnp.complex64, rngs=nnx.Rngs(0))),
      r"WeightNorm\(Linear\).*'kernel'.*real floating",
    ),
  ],
  ids=['WNLinear', 'WNConv', 'WeightNorm'],
)
def test_complex_kernel_error_names_the_layer(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_linear_exports_with_a_symbolic_batch():
  # As linen's WNDense: a symbolic row count is never compared with the input features.
  layer = wx.WNLinear(64, 8, rngs=nnx.Rngs(0))
  layer.scale[...] = layer.scale[...] * jnp.linspace(0.5, 2.0, 8)
  graphdef, state = nnx.split(layer)
  apply = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape('b, 64'), jnp.float32)
  exported = jax.export.export(apply)(state, spec)
  for rows in (3, 100):  # eagerly: the output scaled, w formed
    x = _rand((rows, 64), seed=rows)
    assert_close(exported.call(state, x), np.asarray(layer(x)), factor=8)


@pytest.mark.parametrize('layer', ['Linear', 'Conv', 'ConvTranspose'])
def test_same_rngs_same_parameters_as_the_plain_layer_with_a_random_bias_init(layer):
  kw = dict(bias_init=nnx.initializers.normal(1.0))
  args = (3, 6) if layer == 'Linear' else (3, 6, (3,))
  wn = getattr(wx, 'WN' + layer)(*args, rngs=nnx.Rngs(0), **kw)
  plain = getattr(nnx, layer)(*args, rngs=nnx.Rngs(0), **kw)
  for name in ('kernel', 'bias'):  # bit for bit
    np.testing.assert_array_equal(getattr(wn, name)[...], getattr(plain, name)[...])
  x = _rand((2, 8, 3))
  np.testing.assert_allclose(wn(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('wrapped', [False, True], ids=['WNLinear', 'WeightNorm'])
def test_partition_names_shorter_than_the_kernel_leave_the_rest_unsharded(wrapped):
  # As in nnx.Linear: the missing trailing names are unsharded (was: IndexError).
  mesh = jax.make_mesh((1,), ('x',))
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ('x',))
  with jax.set_mesh(mesh):
    if wrapped:
      model = wx.WeightNorm(nnx.Linear(10, 10, kernel_init=init, rngs=nnx.Rngs(0)))
      scale = model.scale['kernel']
    else:
      model = wx.WNLinear(10, 10, kernel_init=init, rngs=nnx.Rngs(0))
      scale = model.scale
    y = model(_rand((4, 10)))
    plain = nnx.Linear(10, 10, kernel_init=init, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(y, plain(_rand((4, 10))), rtol=1e-5, atol=1e-5)
  assert scale.get_metadata()['out_sharding'] == (None,)


def test_fold_nnx_state_with_each_layers_axis():
  wn_model = nnx.Sequential(
    wx.WNConv(4, 4, (4,), axis=-3, padding='SAME', rngs=nnx.Rngs(0)),
    wx.WNLinear(4, 4, axis=0, rngs=nnx.Rngs(1)),
    wx.WNLinear(4, 3, rngs=nnx.Rngs(2)),
  )
  for layer in wn_model.layers:
    layer.scale[...] = layer.scale[...] * jnp.linspace(0.5, 2.0, layer.scale.shape[0])
  assert wx.layer_axes(wn_model) == {'layers/0': -3, 'layers/1': 0, 'layers/2': -1}
  plain = nnx.Sequential(
    nnx.Conv(4, 4, (4,), padding='SAME', rngs=nnx.Rngs(5)),
    nnx.Linear(4, 4, rngs=nnx.Rngs(6)),
    nnx.Linear(4, 3, rngs=nnx.Rngs(7)),
  )
  x = _rand((2, 6, 4))
  pure = nnx.to_pure_dict(nnx.state(wn_model, nnx.Param))
  for folded in (wx.fold(wn_model), wl.fold(pure, wx.layer_axes(wn_model))):
    state = nnx.state(plain, nnx.Param)
    nnx.replace_by_pure_dict(state, folded)
    nnx.update(plain, state)
    np.testing.assert_allclose(plain(x), wn_model(x), rtol=1e-5, atol=1e-5)


def test_nnx_fold_folds_each_layer_of_a_vmap_stacked_layer():
  # nnx.fold refused a stacked layer; it reads each layer's axes from the model, and a
  # stacked one keeps its layer axis too.
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return wn_jax.nnx.WNLinear(6, 6, axis=0, rngs=nnx.Rngs(key))

  layer = make(jax.random.split(jax.random.key(0), 3))
  assert wx.layer_axes(layer) == {'': (0, 1)}
  folded = wx.fold(layer)
  for i in range(3):
    want = ref.normalize(layer.kernel[...][i], layer.scale[...][i], 0)
    assert_close(folded['kernel'][i], want)

  @nnx.vmap(in_axes=0, out_axes=1)  # stacked along another axis: refused, with the fix
  def make_inner(key):
    return wn_jax.nnx.WNLinear(6, 6, rngs=nnx.Rngs(key))

  layer = make_inner(jax.random.split(jax.random.key(0), 3))
  with pytest.raises(ValueError, match=r'the root layer \(the model itself\).*along a middle axis'):
    wn_jax.nnx.fold(layer)


@pytest.mark.parametrize('tool', ['fold', 'layer_axes', 'data_init'])
@pytest.mark.parametrize('given', ['state', 'pure dict'])
def test_nnx_model_tools_refuse_a_state_for_the_model(tool, given):
  # A user's mistake: the model's state, not the model. fold of a pure dict returned {}
  # and layer_axes of either returned {} (silently: the plain model kept its weights).
  model = wx.WNLinear(3, 3, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  arg = state if given == 'state' else nnx.to_pure_dict(state)
  before = jax.tree.map(jnp.copy, nnx.to_pure_dict(state))
  call = {
    'fold': lambda: wx.fold(arg),
    'layer_axes': lambda: wx.layer_axes(arg),
    'data_init': lambda: wx.data_init(arg, _rand((4, 3))),
  }[tool]
  with pytest.raises(TypeError, match=rf'wn_jax.nnx.{tool}: expected the model, a flax.nnx.Module'):
    call()
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)), before)


@pytest.mark.parametrize('shape,scaled', DENSE_PATHS)
def test_dense_scales_its_output_when_rows_are_fewer_than_inputs(shape, scaled):
  graphdef, state = nnx.split(wx.WNLinear(48, 24, rngs=nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(state)
  params['scale'] = params['scale'] * jnp.linspace(0.5, 2.0, 24)
  params['bias'] = params['bias'] + 0.1

  def apply(p, x):
    s = jax.tree_util.tree_map(lambda a: a, state)
    nnx.replace_by_pure_dict(s, p)
    return nnx.merge(graphdef, s)(x)

  check_dense_path(apply, params, _rand(shape), scaled)


def test_dense_forms_w_for_a_custom_dot_general_and_for_float16():
  def int8(p, x):
    layer = wx.WNLinear(16, 4, dot_general=fake_int8_dot, rngs=nnx.Rngs(0))
    layer.kernel[...], layer.scale[...] = p['kernel'], p['scale']
    return layer(x)

  def float16(p, x):
    layer = wx.WNLinear(16, 4, dtype=jnp.float16, rngs=nnx.Rngs(0))
    layer.kernel[...], layer.scale[...], layer.bias[...] = p['kernel'], p['scale'], p['bias']
    return layer(x)

  check_dense_forms_w(int8, float16)


@pytest.mark.parametrize('rows', [2, 16])
@pytest.mark.parametrize('element', [jnp.bfloat16, jnp.float16])
def test_dense_with_a_preferred_element_type_forms_w(rows, element):
  # Found by a user trial: with preferred_element_type, the output-scaled path (rows < inputs)
  # returned the dot's dtype (nnx.Linear adds its float32 bias: float32), so the dtype
  # followed the batch size, and x @ v in float16 overflowed where x @ w is fine.
  x = _rand((rows, 16))
  layer = wx.WNLinear(16, 8, preferred_element_type=element, rngs=nnx.Rngs(0))
  plain = nnx.Linear(16, 8, preferred_element_type=element, rngs=nnx.Rngs(0))
  with jax.numpy_dtype_promotion('standard'):  # nnx.Linear adds a float32 bias to the dot's
    y = layer(x)
    assert y.dtype == plain(x).dtype == jnp.float32
    layer.kernel[...] = layer.kernel[...] * 1e5  # the same w, a larger ||v||
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(y), rtol=1e-2, atol=1e-2)


def test_mean_only_batch_norm_of_an_int_input_is_float():
  xi = jnp.array([[0, 1, 2], [3, 4, 6]])
  y = wx.MeanOnlyBatchNorm(3)(xi)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, [[-1.5, -1.5, -2.0], [1.5, 1.5, 2.0]])
