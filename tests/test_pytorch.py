"""PyTorch checkpoints: committed oracle data (no torch needed), round trips, bad input."""

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from wn_jax import pytorch as wt

ORACLE = np.load(pathlib.Path(__file__).parent / 'data' / 'torch_oracle.npz')
META = json.loads(str(ORACLE['meta']))['cases']
SINGLE = [name for name in META if name != 'hifigan']


def _state_dict(case):
  prefix = f'{case}:sd:'
  return {k[len(prefix) :]: ORACLE[k] for k in ORACLE.files if k.startswith(prefix)}


def _channels_last(x):
  return np.moveaxis(x, 1, -1) if x.ndim > 2 else x


def _torch_args(kwargs):
  keep = ('stride', 'padding', 'dilation', 'groups', 'output_padding')
  return {k: v for k, v in kwargs.items() if k in keep}


def _assert_matches_torch(y, expected):
  expected = _channels_last(expected)
  np.testing.assert_allclose(
    np.asarray(y), expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected))
  )


@pytest.mark.parametrize('case', SINGLE)
def test_each_layer_matches_pytorch(case):
  meta = META[case]
  sd = _state_dict(case)
  kinds = {'': meta['kind']} if meta['kind'].startswith('ConvTranspose') else None
  (layer,) = wt.from_torch(sd, kinds).values()
  assert layer.style == meta['style']
  assert layer.dim == meta['dim']
  # g was perturbed: it is not ||v||, so a converter that ignored g would fail.
  module, variables = layer.linen(**_torch_args(meta['kwargs']))
  x = _channels_last(ORACLE[f'{case}:input'])
  _assert_matches_torch(module.apply(variables, x), ORACLE[f'{case}:output'])
  # The NNX twin too.
  _assert_matches_torch(layer.nnx(**_torch_args(meta['kwargs']))(x), ORACLE[f'{case}:output'])


def test_conv_transpose_keeps_input_channels():
  (layer,) = wt.from_torch(_state_dict('convtranspose1d_hifigan'), {'': 'ConvTranspose1d'}).values()
  assert layer.transpose_kernel and layer.axis == -1
  assert layer.params['kernel'].shape == (16, 3, 6)  # (*window, out, in)
  assert layer.params['scale'].shape == (6,)  # one g per INPUT channel, as PyTorch


def test_wav2vec2_dim2_keeps_a_window_axis():
  (layer,) = wt.from_torch(_state_dict('wav2vec2_posconv')).values()
  assert layer.dim == 2 and layer.axis == -3  # Flax kernel (k, in/groups, out): the window axis
  assert layer.params['scale'].shape == (8,)


def test_hifigan_like_stack_matches_pytorch():
  spec = META['hifigan']['layers']
  converted = wt.from_torch(_state_dict('hifigan'), {p: s['kind'] for p, s in spec.items()})
  assert set(converted) == set(spec)

  def run(prefix, x):
    args = {k: v for k, v in spec[prefix].items() if k not in ('kind', 'kernel_size')}
    module, variables = converted[prefix].linen(**args)
    return module.apply(variables, x)

  x = _channels_last(ORACLE['hifigan:input'])
  x = nn.leaky_relu(run('conv_pre', x), 0.1)
  x = nn.leaky_relu(run('ups.0', x), 0.1)
  x = x + run('res.0', nn.leaky_relu(x, 0.1))
  y = jnp.tanh(run('conv_post', nn.leaky_relu(x)))
  _assert_matches_torch(y, ORACLE['hifigan:output'])


@pytest.mark.parametrize('case', [*SINGLE, 'hifigan'])
@pytest.mark.parametrize('style', [None, 'legacy', 'parametrization'])
def test_round_trip_is_bit_exact(case, style):
  sd = _state_dict(case)
  kinds = {
    p: k
    for p, k in {'': META.get(case, {}).get('kind', ''), 'ups.0': 'ConvTranspose1d'}.items()
    if k.startswith('ConvTranspose') and p in wt.find_prefixes(sd)
  }
  back = wt.to_torch(wt.from_torch(sd, kinds), style=style)
  if style is None:
    assert set(back) == set(sd)
    for k in sd:
      assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape
      np.testing.assert_array_equal(back[k], sd[k])
  else:
    again = wt.to_torch(wt.from_torch(back, kinds))
    assert set(again) == set(back)
    for k in back:
      np.testing.assert_array_equal(again[k], back[k])


def test_trained_params_export():
  sd = _state_dict('linear_dim0')
  (layer,) = wt.from_torch(sd).values()
  trained = dataclasses.replace(layer, params={**layer.params, 'scale': layer.params['scale'] * 2})
  out = wt.to_torch({'fc': trained}, style='parametrization')
  np.testing.assert_array_equal(out['fc.parametrizations.weight.original0'], 2 * sd['weight_g'])
  np.testing.assert_array_equal(out['fc.parametrizations.weight.original1'], sd['weight_v'])


def test_safetensors_file(tmp_path):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  sd = _state_dict('conv1d')
  path = tmp_path / 'model.safetensors'
  safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
  a = wt.from_torch(path)['']
  b = wt.from_torch(sd)['']
  for k in a.params:
    np.testing.assert_array_equal(a.params[k], b.params[k])


def test_conv_kwargs_table():
  assert wt.conv_kwargs('Conv1d', 5, stride=2, padding=2, groups=2) == {
    'kernel_size': (5,),
    'strides': (2,),
    'padding': ((2, 2),),
    'kernel_dilation': (1,),
    'feature_group_count': 2,
  }
  assert wt.conv_kwargs('Conv2d', (3, 3), padding='same')['padding'] == 'SAME'
  kw = wt.conv_kwargs('ConvTranspose1d', 5, stride=3, padding=1, output_padding=2)
  assert kw['padding'] == ((3, 5),) and kw['transpose_kernel']


V = np.ones((3, 2), np.float32)
G = np.ones((3, 1), np.float32)


@pytest.mark.parametrize(
  'sd,kinds,message',
  [
    ({'fc.weight_v': V}, None, r"'fc.weight_g' is missing"),
    ({'fc.weight_g': G}, None, r"'fc.weight_v' is missing"),
    ({'fc.parametrizations.weight.original1': V}, None, r'original0.*is missing'),
    (
      {'fc.weight_g': np.ones((2, 1), np.float32), 'fc.weight_v': V},
      None,
      r"'fc.weight_g'.*does not fit",
    ),
    (
      {'fc.weight_g': np.ones((3, 2), np.float32), 'fc.weight_v': V},
      None,
      r"'fc.weight_g'.*does not fit",
    ),
    ({'fc.weight_g': G, 'fc.weight_v': V}, {'fc': 'Dense'}, r"unknown kind 'Dense'"),
    ({'fc.weight_g': G, 'fc.weight_v': V}, {'fx': 'Linear'}, r"prefix 'fx'.*matches no"),
    ({'fc.weight_g': G, 'fc.weight_v': V}, {'fc': 'Conv1d'}, r'not a Conv1d weight'),
    ('not a mapping' * 0 or 3, None, 'expected a state dict'),
  ],
)
def test_bad_input(sd, kinds, message):
  with pytest.raises(ValueError, match=message):
    wt.from_torch(sd, kinds)


def test_live_against_torch():
  torch = pytest.importorskip('torch')
  from torch.nn.utils import parametrizations

  torch.manual_seed(3)
  conv = parametrizations.weight_norm(
    torch.nn.ConvTranspose1d(5, 4, 6, stride=3, padding=2, output_padding=1)
  )
  with torch.no_grad():
    conv.parametrizations.weight.original0.mul_(1.7)
  x = torch.randn(2, 5, 9)
  with torch.no_grad():
    expected = conv(x).numpy()
  sd = {k: v.numpy() for k, v in conv.state_dict().items()}
  (layer,) = wt.from_torch(sd, {'': 'ConvTranspose1d'}).values()
  module, variables = layer.linen(stride=3, padding=2, output_padding=1)
  _assert_matches_torch(module.apply(variables, _channels_last(x.numpy())), expected)
  fresh = parametrizations.weight_norm(
    torch.nn.ConvTranspose1d(5, 4, 6, stride=3, padding=2, output_padding=1)
  )
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in wt.to_torch({'': layer}).items()})
  with torch.no_grad():
    np.testing.assert_array_equal(fresh(x).numpy(), expected)


# Bugs of v0.1 (issue 16), each reproduced first.


@pytest.mark.parametrize('dtype', [ml_dtypes.bfloat16, np.float16])
def test_half_precision_checkpoints_load_and_export_bit_for_bit(dtype):
  # Bug 1: safetensors/ml_dtypes bfloat16 was refused as "not floating".
  sd = {k: v.astype(dtype) for k, v in _state_dict('conv1d_grouped_strided').items()}
  (layer,) = wt.from_torch(sd).values()
  assert all(p.dtype == dtype for p in layer.params.values())
  back = wt.to_torch({'': layer})
  for k in sd:
    assert back[k].dtype == dtype
    np.testing.assert_array_equal(back[k].view(np.uint16), sd[k].view(np.uint16))
  module, variables = layer.linen(stride=2, padding=2, groups=2)
  x = _channels_last(ORACLE['conv1d_grouped_strided:input']).astype(dtype)
  assert module.apply(variables, x).dtype == dtype
  (as_f32,) = wt.from_torch(sd, dtype=np.float32).values()
  assert all(p.dtype == np.float32 for p in as_f32.params.values())


def test_converted_parameters_own_their_memory():
  # Bug 2: the bias and g aliased the caller's arrays; .nnx() held NumPy arrays.
  sd = {k: v.copy() for k, v in _state_dict('conv1d').items()}
  (layer,) = wt.from_torch(sd).values()
  _, variables = layer.linen(padding=1)
  nnx_layer = layer.nnx(padding=1)
  before = {k: np.array(v) for k, v in layer.params.items()}
  for v in sd.values():
    v *= 0
  for k in before:
    np.testing.assert_array_equal(layer.params[k], before[k])
    np.testing.assert_array_equal(variables['params'][k], before[k])
    assert isinstance(getattr(nnx_layer, k)[...], jax.Array)
    np.testing.assert_array_equal(getattr(nnx_layer, k)[...], before[k])


@pytest.mark.parametrize('arg', [dict(output_padding=1)])
def test_transposed_only_arguments_are_refused_for_a_conv(arg):
  # Bug 3: a ConvTranspose taken for a Conv (no kinds=) silently became a strided Conv.
  with pytest.raises(ValueError, match=r'output_padding.*ConvTranspose.*kinds='):
    wt.conv_kwargs('Conv1d', 3, **arg)
  (layer,) = wt.from_torch(_state_dict('conv1d')).values()
  with pytest.raises(ValueError, match=r'kinds='):
    layer.linen(stride=2, **arg)


def test_documented_load_state_dict_path_without_torch():
  # Bug 5: to_torch held only the weight-normed keys; like= gives the whole state dict.
  sd = {**_state_dict('conv1d'), 'norm.weight': np.ones(5, np.float32)}
  back = wt.to_torch(wt.from_torch(sd), like=sd)
  assert list(back) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


def test_flax_arguments_pass_through():
  # Bug 6: name=, dtype=, param_dtype=, precision= were refused with a conv_kwargs() error.
  (layer,) = wt.from_torch(_state_dict('conv1d')).values()
  module, variables = layer.linen(
    padding=1, name='conv', dtype=jnp.float32, param_dtype=jnp.float32, precision='highest'
  )
  assert module.name == 'conv' and module.precision == 'highest'
  x = _channels_last(ORACLE['conv1d:input'])
  _assert_matches_torch(module.apply(variables, x), ORACLE['conv1d:output'])
  nnx_layer = layer.nnx(padding=1, dtype=jnp.float32, precision='highest')
  _assert_matches_torch(nnx_layer(x), ORACLE['conv1d:output'])
  (dense,) = wt.from_torch(_state_dict('linear_dim0')).values()
  module, _ = dense.linen(name='fc', dtype=jnp.float32)
  assert module.name == 'fc'
