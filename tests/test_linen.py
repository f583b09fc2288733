"""Flax linen layers against the reference and against the plain Flax layers."""

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

KEY = jax.random.key(0)


def _rand(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def _perturb_scale(variables, seed=7):
  """Moves g away from ||v|| so a layer that ignored g would fail."""
  p = dict(variables['params'])
  p['scale'] = p['scale'] * jax.random.uniform(
    jax.random.key(seed), p['scale'].shape, minval=0.5, maxval=2.0
  )
  return {**variables, 'params': p}


def _check_against_plain(wn_layer, plain_layer, x, axis):
  variables = _perturb_scale(wn_layer.init(KEY, x))
  p = variables['params']
  v, g = np.asarray(p['kernel'], np.float64), np.asarray(p['scale'], np.float64)
  w = ref.normalize(v, g, axis)
  plain_params = {'kernel': jnp.asarray(w, jnp.float32)}
  if 'bias' in p:
    plain_params['bias'] = p['bias'] + 0.1
    variables['params']['bias'] = plain_params['bias']
  y = wn_layer.apply(variables, x)
  y_plain = plain_layer.apply({'params': plain_params}, x)
  assert_close(y, np.asarray(y_plain, np.float64), factor=8)
  # Gradients: the layer's (kernel, scale) gradients are the paper's formulas applied
  # to the plain layer's kernel gradient.
  r = _rand(y.shape, seed=3)
  gp = jax.grad(lambda p: jnp.sum(wn_layer.apply({'params': p}, x) * r))(variables['params'])
  gw = jax.grad(lambda p: jnp.sum(plain_layer.apply({'params': p}, x) * r))(plain_params)
  ev, eg = ref.grads(v, g, axis, np.asarray(gw['kernel'], np.float64))
  assert_close(gp['kernel'], ev, factor=16)
  assert_close(gp['scale'], eg, factor=16)
  if 'bias' in p:
    assert_close(gp['bias'], np.asarray(gw['bias'], np.float64), factor=8)


@pytest.mark.parametrize('axis', [-1, 0, None, (0, 1)])
@pytest.mark.parametrize('use_bias', [True, False])
def test_dense(axis, use_bias):
  x = _rand((5, 6))
  _check_against_plain(
    wl.WNDense(4, axis=axis, use_bias=use_bias), nn.Dense(4, use_bias=use_bias), x, axis
  )


CONV_CASES = [
  dict(kernel_size=(3,), padding='SAME'),
  dict(kernel_size=(3,), padding='VALID', strides=(2,)),
  dict(kernel_size=(4,), padding='CIRCULAR'),
  dict(kernel_size=(3,), padding='CAUSAL', kernel_dilation=(2,)),
  dict(kernel_size=(3,), padding=[(2, 1)], input_dilation=(2,)),
  dict(kernel_size=(5,), padding='SAME', feature_group_count=2, strides=(2,)),
  dict(kernel_size=(3, 3), padding='SAME'),
  dict(kernel_size=(3, 1), padding=((1, 1), (0, 0)), strides=(1, 2), use_bias=False),
  dict(kernel_size=(2, 2), padding='VALID', kernel_dilation=(2, 1), feature_group_count=4),
  dict(kernel_size=(2, 2, 2), padding='SAME'),
]


def _conv_input(kernel_size):
  return _rand((2, *([9] * len(kernel_size)), 4))


@pytest.mark.parametrize(
  'kw', CONV_CASES, ids=lambda kw: '-'.join(f'{k}={v}' for k, v in kw.items())
)
@pytest.mark.parametrize('axis', [-1, -2])
def test_conv(kw, axis):
  x = _conv_input(kw['kernel_size'])
  _check_against_plain(wl.WNConv(8, axis=axis, **kw), nn.Conv(8, **kw), x, axis)


def test_conv_mask_applies_to_the_normalized_weight():
  mask = jnp.ones((3, 4, 8)).at[2].set(0.0)
  x = _conv_input((3,))
  _check_against_plain(wl.WNConv(8, (3,), mask=mask), nn.Conv(8, (3,), mask=mask), x, -1)


@pytest.mark.parametrize('kind', ['Conv', 'ConvTranspose'])
def test_a_masked_kernel_starts_at_zero_where_the_mask_is(kind):
  # A user's trial: the masked-out entries of v counted in ||v||, so ||w|| != g, they moved
  # the output and got gradients (a plain masked layer's get none). Zeroed at init, they
  # count in no norm and their gradient is 0 while they are 0: they stay there.
  mask = jnp.ones((3, 4, 8)).at[2].set(0.0).at[0, 1].set(0.0)
  x = _conv_input((3,))
  layer = getattr(wl, f'WN{kind}')(8, (3,), mask=mask)
  plain = getattr(nn, kind)(8, (3,), mask=mask)
  p = layer.init(KEY, x)['params']
  assert not np.any(np.asarray(p['kernel'])[np.asarray(mask) == 0])
  assert_close(wn_jax.norm(wn_jax.normalize(p['kernel'], p['scale']) * mask), p['scale'])
  assert_close(layer.apply({'params': p}, x), np.asarray(plain.apply(plain.init(KEY, x), x)))
  grads = jax.grad(lambda q: jnp.sum(layer.apply({'params': q}, x) ** 2))(p)
  assert not np.any(np.asarray(grads['kernel'])[np.asarray(mask) == 0])
  # A plain checkpoint given its scale by a mutable apply (a review trial: only init zeroed).
  plain_params = plain.init(KEY, x)['params']
  y, made = layer.apply({'params': plain_params}, x, mutable=['params'])
  assert not np.any(np.asarray(made['params']['kernel'])[np.asarray(mask) == 0])
  assert_close(y, np.asarray(plain.apply({'params': plain_params}, x)))


@pytest.mark.parametrize(
  'kw',
  [
    dict(kernel_size=(4,), strides=(2,)),
    dict(kernel_size=(4,), strides=(2,), transpose_kernel=True),
    dict(kernel_size=(3,), strides=(3,), padding='VALID', kernel_dilation=(2,)),
    dict(kernel_size=(3, 3), strides=(2, 2), padding='SAME', use_bias=False),
    dict(kernel_size=(4, 2), strides=(2, 1), transpose_kernel=True, padding=((1, 2), (0, 1))),
  ],
  ids=str,
)
@pytest.mark.parametrize('axis', [-1, -2])
def test_conv_transpose(kw, axis):
  x = _conv_input(kw['kernel_size'])
  _check_against_plain(wl.WNConvTranspose(6, axis=axis, **kw), nn.ConvTranspose(6, **kw), x, axis)


@pytest.mark.parametrize(
  'wn,plain,shape',
  [
    (wl.WNDense(7), nn.Dense(7), (3, 5)),
    (wl.WNConv(6, (3, 3)), nn.Conv(6, (3, 3)), (2, 8, 8, 3)),
    (wl.WNConvTranspose(6, (3,)), nn.ConvTranspose(6, (3,)), (2, 8, 3)),
  ],
)
def test_function_preserving_init(wn, plain, shape):
  x = _rand(shape)
  vw = wn.init(KEY, x)
  vp = plain.init(KEY, x)
  np.testing.assert_array_equal(vw['params']['kernel'], vp['params']['kernel'])
  np.testing.assert_allclose(vw['params']['scale'], wn_jax.norm(vp['params']['kernel']), rtol=1e-6)
  np.testing.assert_allclose(wn.apply(vw, x), plain.apply(vp, x), rtol=1e-5, atol=1e-6)


def test_scale_init_is_any_flax_initializer():
  x = _rand((3, 5))
  variables = wl.WNDense(4, scale_init=nn.initializers.ones).init(KEY, x)
  np.testing.assert_array_equal(variables['params']['scale'], jnp.ones(4))
  w = wn_jax.normalize(variables['params']['kernel'], variables['params']['scale'])
  np.testing.assert_allclose(wn_jax.norm(w), jnp.ones(4), rtol=1e-6)


@pytest.mark.parametrize('param_dtype', [jnp.float32, jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16], ids=str)
def test_mixed_precision(dtype, param_dtype):
  x = _rand((4, 16)).astype(dtype)
  layer = wl.WNDense(8, dtype=dtype, param_dtype=param_dtype)
  variables = layer.init(KEY, x)
  assert variables['params']['scale'].dtype == param_dtype
  y = layer.apply(variables, x)
  assert y.dtype == dtype and np.all(np.isfinite(np.asarray(y, np.float32)))
  p = jax.tree_util.tree_map(
    lambda a: np.asarray(a.astype(jnp.float32), np.float64), variables['params']
  )
  expected = ref.dense(
    np.asarray(x.astype(jnp.float32)), ref.normalize(p['kernel'], p['scale'], -1), p['bias']
  )
  assert_close(y, expected, dtype=dtype if dtype != jnp.float32 else param_dtype, factor=8)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x).astype(jnp.float32)))(
    variables['params']
  )
  assert all(
    np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree_util.tree_leaves(grads)
  )


def test_zero_kernel_column_is_safe_in_a_layer():
  x = _rand((4, 3))
  variables = wl.WNDense(2).init(KEY, x)
  variables['params']['kernel'] = variables['params']['kernel'].at[:, 1].set(0.0)
  grads = jax.grad(lambda p: jnp.sum(wl.WNDense(2).apply({'params': p}, x) ** 2))(
    variables['params']
  )
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_partitioning_propagates_to_scale():
  layer = wl.WNDense(
    8, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, 'model'))
  )
  variables = layer.init(KEY, jnp.ones((2, 4)))
  assert isinstance(variables['params']['scale'], nn.Partitioned)
  assert variables['params']['scale'].names == ('model',)
  spec = nn.get_partition_spec(variables)
  assert spec['params']['scale'] == jax.sharding.PartitionSpec('model')
  logical = wl.WNConv(
    8,
    (3,),
    kernel_init=nn.with_logical_partitioning(
      nn.initializers.lecun_normal(), ('width', 'embed', 'mlp')
    ),
  )
  lv = logical.init(KEY, jnp.ones((1, 5, 4)))
  assert isinstance(lv['params']['scale'], nn.LogicallyPartitioned)
  assert lv['params']['scale'].names == ('mlp',)
  y = logical.apply(lv, jnp.ones((1, 5, 4)))
  assert y.shape == (1, 5, 8)


class TwoKernels(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], 5))
    sub = nn.Dense(3, name='proj')
    return sub(jnp.tanh(x @ a))


@pytest.mark.parametrize(
  'layer,shape',
  [
    (nn.Dense(4), (3, 5)),
    (nn.Conv(4, (3,)), (2, 7, 3)),
    (TwoKernels(), (3, 4)),
    (nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8), (2, 5, 4)),
  ],
  ids=['Dense', 'Conv', 'TwoKernels', 'Attention'],
)
def test_weight_norm_wrapper(layer, shape):
  x = _rand(shape)
  model = wl.WeightNorm(layer)
  variables = model.init(KEY, x)
  params = variables['params']
  # Readable names: the scale tree mirrors the layer's params, biases left alone.
  paths = [
    wn_jax._tree.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params['scale'])[0]
  ]
  assert paths and all(p.endswith('kernel') for p in paths)
  # Function-preserving at init.
  np.testing.assert_allclose(
    model.apply(variables, x), layer.apply({'params': params['layer']}, x), rtol=1e-5, atol=1e-6
  )
  # With g perturbed, it is the layer with materialized weights.
  scale = jax.tree_util.tree_map(lambda g: 1.5 * g, params['scale'])
  moved = {'params': {'layer': params['layer'], 'scale': scale}}
  wn_tree = wn_jax.weight_norm(params['layer'], where=r'(^|/)kernel$')
  wn_tree = jax.tree_util.tree_map(
    lambda x: (
      wn_jax.WeightNormed(x.v, 1.5 * x.g, x.axis) if isinstance(x, wn_jax.WeightNormed) else x
    ),
    wn_tree,
    is_leaf=lambda x: isinstance(x, wn_jax.WeightNormed),
  )
  np.testing.assert_allclose(
    model.apply(moved, x),
    layer.apply({'params': wn_jax.materialize(wn_tree)}, x),
    rtol=1e-5,
    atol=1e-6,
  )
  grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2))(moved['params'])
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads['scale']))


def test_weight_norm_wrapper_in_a_model_and_scale_init():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = wl.WeightNorm(nn.Dense(6), scale_init=nn.initializers.ones)(x)
      return wl.WeightNorm(nn.Dense(2), where='bias', axis=None)(nn.relu(x))

  variables = Model().init(KEY, jnp.ones((2, 3)))
  p = variables['params']
  np.testing.assert_array_equal(p['WeightNorm_0']['scale']['kernel'], jnp.ones(6))
  assert (
    set(p['WeightNorm_1']['scale']) == {'bias'} and p['WeightNorm_1']['scale']['bias'].shape == ()
  )


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    block = nn.scan(
      nn.remat(Block),
      variable_axes={'params': 0},
      split_rngs={'params': True},
      length=3,
    )
    x, _ = block()(x, None)
    return x


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(wl.WNDense(x.shape[-1])(x)), None


def test_scan_remat_vmap_and_train_step_compile_once():
  x = _rand((4, 6))
  model = Stack()
  variables = model.init(KEY, x)
  (block,) = variables['params']
  assert variables['params'][block]['WNDense_0']['scale'].shape == (3, 6)
  vm = nn.vmap(wl.WNDense, variable_axes={'params': 0}, split_rngs={'params': True}, in_axes=0)(5)
  vv = vm.init(KEY, _rand((2, 4, 6)))
  assert vv['params']['scale'].shape == (2, 5)
  with jax.numpy_dtype_promotion('standard'):
    opt = optax.adam(1e-2)
    traces = 0

    @jax.jit
    def step(params, state, x):
      nonlocal traces
      traces += 1
      loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((model.apply({'params': p}, x) - 0.5) ** 2)
      )(params)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    params, state = variables['params'], opt.init(variables['params'])
    losses = []
    for i in range(20):
      params, state, loss = step(params, state, _rand((4, 6), seed=i % 2))
      losses.append(float(loss))
  assert traces == 1
  assert losses[-1] < losses[0]
  for name in ('kernel', 'scale', 'bias'):
    before = variables['params'][block]['WNDense_0'][name]
    assert not np.allclose(before, params[block]['WNDense_0'][name])


@pytest.mark.parametrize(
  'call,message',
  [
    (lambda: wl.WNConv(4, (3, 3)).init(KEY, jnp.ones((5, 3))), r"WNConv at '/'.*rank >= 3"),
    (
      lambda: wl.WNConv(4, (3,), feature_group_count=2).init(KEY, jnp.ones((1, 5, 3))),
      'feature_group_count=2',
    ),
    (lambda: wl.WNDense(4, axis=3).init(KEY, jnp.ones((1, 3))), r'WNDense.*axis 3 is out of range'),
    (
      lambda: wl.WNDense(4).apply(
        {'params': {'kernel': jnp.ones((3, 4)), 'scale': jnp.ones(3), 'bias': jnp.ones(4)}},
        jnp.ones((1, 3)),
      ),
      r'WNDense.*loaded scale has shape \(3,\).*needs \(4,\)',
    ),
  ],
)
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_mean_only_batch_norm_of_another_feature_count_is_refused_by_name():
  # Found by a user trial: variables built for 16 features, an input of 12 gave JAX's
  # "add got incompatible shapes" TypeError (NNX's layer named itself and the fix).
  bn = wl.MeanOnlyBatchNorm(use_running_average=False)
  variables = bn.init(KEY, jnp.ones((2, 16)))
  with pytest.raises(ValueError, match=r"MeanOnlyBatchNorm at '/': the input has 12 features"):
    bn.apply(variables, jnp.ones((2, 12)), mutable=['batch_stats'])


def test_mean_only_batch_norm():
  x = _rand((8, 5)) * 3 + 2
  bn = wl.MeanOnlyBatchNorm(momentum=0.5)
  variables = bn.init(KEY, x, use_running_average=False)
  assert set(variables) == {'params', 'batch_stats'}
  y, updates = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
  xr = np.asarray(x, np.float64)
  assert_close(y, xr - xr.mean(0))
  assert_close(updates['batch_stats']['mean'], 0.5 * xr.mean(0))
  # Evaluation uses the running mean; the bias is added.
  state = {'params': {'bias': jnp.ones(5)}, 'batch_stats': updates['batch_stats']}
  y_eval = bn.apply(state, x, use_running_average=True)
  assert_close(y_eval, xr - 0.5 * xr.mean(0) + 1)
  # Conv activations: the mean runs over batch and spatial axes.
  xc = _rand((2, 4, 4, 3)) + 1
  yc, _ = bn.apply(
    bn.init(KEY, xc, use_running_average=False),
    xc,
    use_running_average=False,
    mutable=['batch_stats'],
  )
  np.testing.assert_allclose(np.asarray(yc).mean((0, 1, 2)), 0, atol=1e-6)
  # bf16 activations keep their dtype; the mean is taken in float32.
  yb, _ = bn.apply(
    variables, x.astype(jnp.bfloat16), use_running_average=False, mutable=['batch_stats']
  )
  assert yb.dtype == jnp.bfloat16


def test_mean_only_batch_norm_axis_name_matches_global_mean():
  x = _rand((4, 6, 3))
  bn = wl.MeanOnlyBatchNorm(axis_name='batch')
  variables = bn.init(KEY, x[0], use_running_average=False)
  y, _ = jax.vmap(
    lambda xi: bn.apply(variables, xi, use_running_average=False, mutable=['batch_stats']),
    axis_name='batch',
  )(x)
  xr = np.asarray(x, np.float64)
  assert_close(y, xr - xr.mean((0, 1)))


@pytest.mark.parametrize('param_dtype', MP_DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize('dtype', MP_DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize('wrapped', [False, True], ids=['WNDense', 'WeightNorm'])
def test_mixed_precision_within_2x_of_plain_flax(wrapped, dtype, param_dtype):
  x = mp_input(dtype)
  plain = nn.Dense(48, dtype=dtype, param_dtype=param_dtype)
  layer = wl.WeightNorm(plain) if wrapped else wl.WNDense(48, dtype=dtype, param_dtype=param_dtype)
  p = layer.init(KEY, x)['params']
  if wrapped:
    p['scale']['kernel'] = mp_scale(p['scale']['kernel'])
    kernel, scale, bias = p['layer']['kernel'], p['scale']['kernel'], p['layer']['bias']
  else:
    p['scale'] = mp_scale(p['scale'])
    kernel, scale, bias = p['kernel'], p['scale'], p['bias']
  assert kernel.dtype == scale.dtype == param_dtype
  y = jax.jit(layer.apply)({'params': p}, x)
  assert_mixed_precision(
    y,
    x,
    kernel,
    scale,
    bias,
    lambda k: plain.apply({'params': {'kernel': k, 'bias': bias}}, x),
    param_dtype,
    dtype,
  )


def test_weight_norm_wrapper_keeps_partitioning():
  dense = nn.Dense(
    8, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, 'model'))
  )
  variables = wl.WeightNorm(dense).init(KEY, jnp.ones((2, 4)))
  p = variables['params']
  assert isinstance(p['layer']['kernel'], nn.Partitioned)
  assert isinstance(p['scale']['kernel'], nn.Partitioned)
  spec = nn.get_partition_spec(variables)['params']
  assert spec['layer']['kernel'] == jax.sharding.PartitionSpec(None, 'model')
  assert spec['scale']['kernel'] == jax.sharding.PartitionSpec('model')
  conv = nn.Conv(
    8,
    (3,),
    kernel_init=nn.with_logical_partitioning(
      nn.initializers.lecun_normal(), ('width', 'embed', 'mlp')
    ),
  )
  x = _rand((1, 5, 4))
  lv = wl.WeightNorm(conv).init(KEY, x)
  assert isinstance(lv['params']['scale']['kernel'], nn.LogicallyPartitioned)
  assert lv['params']['scale']['kernel'].names == ('mlp',)
  assert lv['params']['layer']['kernel'].names == ('width', 'embed', 'mlp')
  # Boxed variables apply, and compute what the unboxed ones compute.
  np.testing.assert_allclose(
    wl.WeightNorm(conv).apply(lv, x),
    conv.apply({'params': nn.unbox(lv['params']['layer'])}, x),
    rtol=1e-5,
    atol=1e-6,
  )


class _Named(nn.Module):
  @nn.compact
  def __call__(self, x):
    return wl.WNDense(4, param_dtype=jnp.complex64, name='head')(x)


@pytest.mark.parametrize(
  'model,message',
  [
    (wl.WNDense(4, param_dtype=jnp.complex64), r"WNDense at '/'.*real floating.*complex64"),
    (_Named(), r"WNDense at '/head'.*real floating"),
    (wl.WNConv(4, (3,), param_dtype=jnp.complex64), r"WNConv at '/'.*real floating"),
    (
      wl.WeightNorm(nn.Dense(4, param_dtype=jnp.complex64)),
      r"WeightNorm\(Dense\) at '/'.*'kernel'.*real floating",
    ),
  ],
  ids=['WNDense', 'nested', 'WNConv', 'WeightNorm'],
)
def test_complex_kernel_error_names_the_layer(model, message):
  x = jnp.ones((2, 5, 3), jnp.complex64)
  with pytest.raises(ValueError, match=message):
    model.init(KEY, x)


class _Block(nn.Module):
  wn: bool = True

  @nn.compact
  def __call__(self, x):
    if not self.wn:
      return nn.Conv(4, (4,), padding='SAME', name='conv')(x)
    # PyTorch's weight_norm(nn.Conv1d(4, 4, 4), dim=2) keeps the window: axis -3 in Flax layout.
    return wl.WNConv(4, (4,), axis=-3, padding='SAME', name='conv')(x)


class _MixedAxes(nn.Module):
  wn: bool = True

  @nn.compact
  def __call__(self, x):
    if not self.wn:
      h = _Block(wn=False, name='block')(x)
      h = nn.Dense(4, name='square')(nn.relu(h))
      return nn.Dense(3, name='head')(h)
    h = _Block(name='block')(x)
    h = wl.WNDense(4, axis=0, name='square')(nn.relu(h))  # square kernel, axis 0
    return wl.WNDense(3, name='head')(h)


def _trained(params, seed=9):
  """g moved away from ||v||, as after training."""
  keys = iter(jax.random.split(jax.random.key(seed), 16))
  return jax.tree_util.tree_map_with_path(
    lambda p, a: (
      a * jax.random.uniform(next(keys), a.shape, minval=0.5, maxval=2.0)
      if wn_jax._tree.path_str(p).endswith('scale')
      else a
    ),
    params,
  )


def test_fold_uses_each_layers_own_axis():
  x = _rand((2, 6, 4))
  model = _MixedAxes()
  params = _trained(model.init(KEY, x)['params'])
  axes = wl.layer_axes(model, x)
  assert axes == {'block/conv': -3, 'head': -1, 'square': 0}
  expected = model.apply({'params': params}, x)
  plain = _MixedAxes(wn=False)
  for axis in (axes, {'block/conv': -3, 'square': 0, 'head': -1}, lambda path: axes[path]):
    folded = wl.fold(params, axis)
    assert jax.tree_util.tree_structure(folded) == jax.tree_util.tree_structure(
      plain.init(KEY, x)['params']
    )
    np.testing.assert_allclose(plain.apply({'params': folded}, x), expected, rtol=1e-5, atol=1e-5)
  # The folded kernels are the reference's, each with its own axis.
  folded = wl.fold(params, axes)
  for path, axis in axes.items():
    layer = params['block']['conv'] if path == 'block/conv' else params[path]
    out = folded['block']['conv'] if path == 'block/conv' else folded[path]
    assert_close(out['kernel'], ref.normalize(layer['kernel'], layer['scale'], axis))
  # Abstract inputs are enough.
  assert wl.layer_axes(model, jax.ShapeDtypeStruct(x.shape, x.dtype)) == axes


def test_fold_refuses_where_it_cannot_know():
  x = _rand((2, 6, 4))
  params = _trained(_MixedAxes().init(KEY, x)['params'])
  with pytest.raises(ValueError, match=r"layer 'head' has a kernel and a scale, but no axis"):
    wl.fold(params, {'block/conv': -3, 'square': 0})
  # A scale that fits only another axis: the layer is named, with the axes that fit.
  xn = _rand((2, 5))
  narrow = {'params': _trained(wl.WNDense(4, axis=0, name='fc').init(KEY, xn)['params'])}
  with pytest.raises(
    ValueError,
    match=r'wn_jax.linen.fold: the root layer \(the model itself\): .*shape \(5,\).*\[-2\]',
  ):
    wl.fold(narrow['params'], axis=-1)
  # By default the axis is read from the scale's shape where only one choice fits ...
  folded = wl.fold(narrow['params'])
  assert_close(
    folded['kernel'], ref.normalize(narrow['params']['kernel'], narrow['params']['scale'], 0)
  )
  # ... and a square kernel built with axis=0 (once folded silently wrong) is refused, named.
  square = {'sq': _trained(wl.WNDense(5, axis=0).init(KEY, xn)['params'])}
  with pytest.raises(ValueError, match=r"layer 'sq': .*fits several kept axes.*axis=-1"):
    wl.fold(square)
  folded = wl.fold(square, {'sq': 0})
  assert_close(
    folded['sq']['kernel'], ref.normalize(square['sq']['kernel'], square['sq']['scale'], 0)
  )
  with pytest.raises(ValueError, match=r"axis must be 'infer'"):
    wl.fold(square, 'guess')
  with pytest.raises(ValueError, match=r"layer 'fc'.*axis 3 is out of range"):
    wl.fold({'fc': narrow['params']}, {'fc': 3})


def test_fold_folds_stacked_layers_with_their_layer_axes():
  # fold refused a stacked layer outright, and layer_axes gave it its per-step axis, which
  # fold refused too. layer_axes now keeps the layer axis, and fold takes it.
  x = _rand((4, 6))
  params = Stack().init(KEY, x)['params']
  (block,) = params
  path = f'{block}/WNDense_0'
  axes = wl.layer_axes(Stack(), x)
  assert axes == {path: (0, -1)}
  folded = wl.fold(params, axes)[block]['WNDense_0']
  layer = params[block]['WNDense_0']
  for i in range(3):
    assert_close(folded['kernel'][i], ref.normalize(layer['kernel'][i], layer['scale'][i], -1))
  assert set(folded) == {'kernel', 'bias'}
  # Without the axes (inferred, or one axis for all), the shapes alone do not say which:
  # refused, with the fix.
  for given in ({}, {'axis': -1}):
    with pytest.raises(
      ValueError, match=rf"layer '{path}': its scale of shape \(3, 6\).*stacked layer"
    ) as e:
      wl.fold(params, **given)
    assert 'axis=layer_axes(model, ...)' in str(e.value)
    assert f"{{'{path}': (0, -1)}}" in str(e.value)


@pytest.mark.standard_promotion
@pytest.mark.parametrize('wrapped', [False, True], ids=['WNDense', 'WeightNorm'])
def test_dtype_none_forms_w_in_the_promotion_with_the_inputs(wrapped):
  # Flax's dtype=None computes in the promotion of inputs and parameters: float32 here.
  x = mp_input(jnp.float32)
  plain = nn.Dense(48, param_dtype=jnp.bfloat16)
  layer = wl.WeightNorm(plain) if wrapped else wl.WNDense(48, param_dtype=jnp.bfloat16)
  p = layer.init(KEY, x)['params']
  if wrapped:
    kernel, scale, bias = p['layer']['kernel'], p['scale']['kernel'], p['layer']['bias']
  else:
    kernel, scale, bias = p['kernel'], p['scale'], p['bias']
  y = layer.apply({'params': p}, x)
  assert_mixed_precision(
    y,
    x,
    kernel,
    scale,
    bias,
    lambda k: plain.apply({'params': {'kernel': k, 'bias': bias}}, x),
    jnp.bfloat16,
    jnp.float32,
  )


def test_fold_refuses_a_weight_norm_wrapper_and_names_it():
  class P(nn.Module):
    @nn.compact
    def __call__(self, x):
      return wl.WeightNorm(nn.Dense(4, name='inner'))(x)

  x = jax.random.normal(jax.random.key(0), (4, 3))
  p = P().init(jax.random.key(0), x)['params']
  with pytest.raises(ValueError, match=r"'WeightNorm_0/scale' is a WeightNorm wrapper.*by hand"):
    wl.fold(p)
  inside = wl.WeightNorm(nn.Dense(4)).init(jax.random.key(0), x)['params']
  with pytest.raises(ValueError, match=r"'scale' is a WeightNorm wrapper"):
    wl.fold(inside)


def _misplaced_arguments():
  model = wl.WNDense(3)
  x = jnp.ones((4, 3))
  variables = model.init(jax.random.key(0), x)
  nnx_model = wn_jax.nnx.WNLinear(3, 3, rngs=nnx.Rngs(0))
  return {
    'data_init without variables': (
      lambda: wl.data_init(model, x),
      r"data_init: expected the model's variables, a dict with 'params'.*Array\w* of shape \(4, 3\)",
    ),
    'data_init, variables first': (
      lambda: wl.data_init(variables, model, x),
      r'data_init: expected the model, a flax.linen.Module; got builtins.dict',
    ),
    'layer_axes of the variables': (
      lambda: wl.layer_axes(variables, x),
      r'layer_axes: expected the model, a flax.linen.Module; got builtins.dict',
    ),
    'layer_axes given the variables as the input': (
      lambda: wl.layer_axes(model, variables),
      r"layer_axes: expected example inputs, as model.init takes them.*'params'",
    ),
    'fold of the model': (
      lambda: wl.fold(model),
      r'fold: expected the parameters.*WNDense',
    ),
    'fold of an NNX state': (
      lambda: wl.fold(nnx.state(nnx_model, nnx.Param)),
      r'fold: expected the parameters.*State.*nnx.to_pure_dict',
    ),
    'fold of an NNX model': (
      lambda: wl.fold(nnx_model),
      r'fold: expected the parameters.*WNLinear.*wn_jax.nnx.fold',
    ),
  }


def test_layer_axes_keeps_a_python_flag_static():
  # layer_axes(model, x, False) traced the flag and failed (TracerBoolConversionError), where
  # data_init(model, variables, x, False) runs.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return wl.WNDense(3, axis=0 if train else -1)(x)

  x = jnp.ones((2, 3))
  assert wl.layer_axes(Net(), x, False) == {'WNDense_0': -1}
  assert wl.layer_axes(Net(), x, True) == {'WNDense_0': 0}


def test_layer_axes_takes_a_dict_input_with_a_params_entry():
  # The variables check must not refuse a model whose input dict has an array at 'params'.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, batch):
      return wl.WNDense(3)(batch['params'] + batch['x'])

  x = jnp.ones((2, 4))
  assert wl.layer_axes(Net(), {'params': x, 'x': x}) == {'WNDense_0': -1}


def test_layer_axes_of_an_nn_jit_model_initialized_before():
  # nn.jit reuses its body's trace for the same shapes and mutable filter: after the user's
  # model.init, layer_axes' own init ran no layer's Python and returned {}, silently.
  class Net(nn.Module):
    @nn.jit
    @nn.compact
    def __call__(self, x):
      return wl.WNDense(3, axis=0, name='out')(x)

  x = jnp.ones((2, 3))
  Net().init(jax.random.key(0), x)
  assert wl.layer_axes(Net(), x) == {'out': 0}


@pytest.mark.parametrize('case', list(_misplaced_arguments()))
def test_model_tools_refuse_misplaced_arguments(case):
  # A user's mistakes: fold of the model returned the model, unchanged; the others failed
  # inside Flax or JAX ("Array.__contains__", "'dict' object has no attribute 'apply'").
  call, message = _misplaced_arguments()[case]
  with pytest.raises(TypeError, match=rf'wn_jax.linen.{message}'):
    call()


def test_fold_keeps_a_plain_submodule_named_scale():
  class Mod(nn.Module):
    @nn.compact
    def __call__(self, x, c):
      return x * nn.Dense(4, name='scale')(c)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, c):
      return wl.WNDense(4, name='out')(Mod(name='ada')(x, c))

  x, c = jnp.ones((2, 4)), jax.random.normal(jax.random.key(1), (2, 4))
  p = Net().init(jax.random.key(0), x, c)['params']
  folded = wl.fold(p, axis=-1)
  assert folded['ada'] == p['ada']
  assert set(folded['out']) == {'kernel', 'bias'}


@pytest.mark.parametrize('shape,scaled', DENSE_PATHS)
def test_dense_scales_its_output_when_rows_are_fewer_than_inputs(shape, scaled):
  x = _rand(shape)
  layer = wl.WNDense(24)
  params = _perturb_scale(layer.init(KEY, x))['params']
  params['bias'] = params['bias'] + 0.1
  check_dense_path(lambda p, x: layer.apply({'params': p}, x), params, x, scaled)


@pytest.mark.parametrize('layer', ['WNDense', 'WNConv', 'WNConvTranspose'])
@pytest.mark.parametrize('shape', [(2, 48), (64, 48)])  # Dense: scaled output, w formed
def test_each_call_is_captured_and_intercepted_once_with_its_output(layer, shape):
  # WNDense recorded two outputs per call (its own and nn.Dense's inside it): on the scaled
  # path the first was x @ v, without the factor or the bias; interceptors saw both calls.
  x = _rand(shape if layer == 'WNDense' else (2, *shape))
  model = {'WNDense': wl.WNDense(24), 'WNConv': wl.WNConv(24, (3,))}.get(
    layer, wl.WNConvTranspose(24, (3,))
  )
  params = _perturb_scale(model.init(KEY, x))['params']
  params['bias'] = params['bias'] + 0.1
  y, state = model.apply({'params': params}, x, capture_intermediates=True, mutable=True)
  (captured,) = state['intermediates']['__call__']
  np.testing.assert_array_equal(captured, y)
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    seen.append((type(context.module).__name__, context.method_name, out))
    return out

  with nn.intercept_methods(interceptor):
    y = model.apply({'params': params}, x)
  assert [(m, n) for m, n, _ in seen] == [(layer, '__call__')]
  np.testing.assert_array_equal(seen[0][2], y)


def test_dense_forms_w_for_a_custom_dot_general_and_for_float16():
  check_dense_forms_w(
    lambda p, x: wl.WNDense(4, dot_general=fake_int8_dot).apply({'params': p}, x),
    lambda p, x: wl.WNDense(4, dtype=jnp.float16).apply({'params': p}, x),
  )


def test_a_dense_layer_with_no_output_features():
  params = wl.WNDense(0, kernel_init=nn.initializers.zeros).init(KEY, jnp.ones((1, 4)))['params']
  assert params['scale'].shape == (0,)
  assert wn_jax.norm(jnp.zeros((3, 0))).shape == (0,)
  assert wn_jax.norm(jnp.zeros((0, 0))).shape == (0,)


@pytest.mark.parametrize('batch_axes', [('b',), ('b', 'l')], ids=['(b, 64)', '(b, l, 64)'])
def test_dense_exports_with_a_symbolic_batch(batch_axes):
  # Serving code exports with a symbolic batch: the layer decides whether to scale its
  # output without comparing the symbolic row count with the input features.
  layer = wl.WNDense(8)
  variables = _perturb_scale(layer.init(KEY, jnp.ones((2, 64))))
  shape = jax.export.symbolic_shape(', '.join((*batch_axes, '64')))
  spec = jax.ShapeDtypeStruct(shape, jnp.float32)
  exported = jax.export.export(jax.jit(layer.apply))(variables, spec)
  for rows in (3, 100):  # eagerly: the output scaled, w formed
    x = _rand((rows, 64) if len(batch_axes) == 1 else (1, rows, 64), seed=rows)
    assert_close(exported.call(variables, x), np.asarray(layer.apply(variables, x)), factor=8)


@pytest.mark.parametrize(
  'layer,shape',
  [('Dense', (3, 5)), ('Conv', (2, 8, 8, 3)), ('ConvTranspose', (2, 8, 3))],
)
def test_same_key_same_parameters_as_the_plain_layer_with_a_random_bias_init(layer, shape):
  # Creating scale used to draw a key before the bias: a random bias_init then gave another
  # bias than the plain layer's, and another output.
  kw = dict(bias_init=nn.initializers.normal(1.0))
  if layer != 'Dense':
    kw['kernel_size'] = (3,) * (len(shape) - 2)
  wn, plain = getattr(wl, 'WN' + layer)(6, **kw), getattr(nn, layer)(6, **kw)
  x = _rand(shape)
  vw, vp = wn.init(KEY, x)['params'], plain.init(KEY, x)['params']
  assert set(vw) == {*vp, 'scale'}
  for name in vp:  # bit for bit
    np.testing.assert_array_equal(vw[name], vp[name], err_msg=name)
  np.testing.assert_allclose(
    wn.apply({'params': vw}, x), plain.apply({'params': vp}, x), 1e-5, 1e-5
  )


@pytest.mark.parametrize('names', [('x',), ()], ids=['one-name', 'no-name'])
@pytest.mark.parametrize('wrapped', [False, True], ids=['WNDense', 'WeightNorm'])
def test_partition_names_shorter_than_the_kernel_leave_the_rest_unsharded(wrapped, names):
  # As in nn.Dense (and Flax's WeightNorm test): missing trailing names are unsharded. They
  # used to raise IndexError in every WN layer and wrapper.
  init = nn.with_partitioning(nn.initializers.lecun_normal(), names)
  x = _rand((10, 10))
  model = (
    wl.WeightNorm(nn.Dense(10, kernel_init=init)) if wrapped else wl.WNDense(10, kernel_init=init)
  )
  variables = model.init(KEY, x)
  p = variables['params']
  scale = p['scale']['kernel'] if wrapped else p['scale']
  assert scale.names == (None,)
  plain = {'params': p['layer']} if wrapped else nn.Dense(10, kernel_init=init).init(KEY, x)
  np.testing.assert_allclose(model.apply(variables, x), nn.Dense(10).apply(plain, x), 1e-5, 1e-5)


def test_mean_only_batch_norm_of_an_int_input_is_float():
  # As flax.linen.BatchNorm: an int input is promoted to float. The mean and the output
  # used to be cast to int, silently truncated.
  xi = jnp.array([[0, 1, 2], [3, 4, 6]])
  bn = wl.MeanOnlyBatchNorm(use_running_average=False)
  y, _ = bn.apply(bn.init(KEY, xi), xi, mutable=['batch_stats'])
  assert y.dtype == jnp.float32
  assert_close(y, np.array([[-1.5, -1.5, -2.0], [1.5, 1.5, 2.0]]))


def test_fold_of_the_whole_variables_says_to_pass_their_params():
  # The layers' paths then start with 'params/': neither layer_axes' mapping nor the advice
  # matched, and no message said why (a user trial).
  model = nn.Sequential([wl.WNDense(4), wl.WNDense(4)])
  x = _rand((2, 4))
  variables = model.init(KEY, x)
  hint = r"(?s)'params/layers_0'.*pass variables\['params'\], not the variables"
  for call in (
    lambda: wl.fold(variables),
    lambda: wl.fold(variables, wl.layer_axes(model, x)),
    lambda: wn_jax.optim.direction_stats(variables, axis=wl.layer_axes(model, x)),
  ):
    with pytest.raises(ValueError, match=hint):
      call()
  assert wl.fold(variables['params'], wl.layer_axes(model, x))
