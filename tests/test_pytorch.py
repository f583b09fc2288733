"""PyTorch checkpoints: committed oracle data (no torch needed), round trips, bad input."""

import dataclasses
import importlib.util
import json
import pathlib
import re
import sys
import types
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests.helpers import assert_trees_equal
from wn_jax import linen as wn_linen
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


def _assert_matches_torch(y, expected, channels_first=True):
  expected = _channels_last(expected) if channels_first else expected
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
    (3, None, 'expected a state dict'),
  ],
)
def test_bad_input(sd, kinds, message):
  with pytest.raises(ValueError, match=message):
    wt.from_torch(sd, kinds)


@pytest.mark.parametrize('convert', ['from_torch', 'to_linen', 'to_nnx'])
def test_nested_variables_are_not_a_state_dict(convert):
  # wn_jax's own variables handed to the torch -> JAX direction: to_linen failed with
  # "'dict' object has no attribute 'shape'", from_torch found "no weight-normed layer".
  variables = {'params': {'fc': {'kernel': V.T, 'scale': np.ones(3, np.float32)}}}
  with pytest.raises(ValueError, match=r"flat keys.*'params' holds a dict.*to_torch"):
    getattr(wt, convert)(variables)


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


# Whole models (issue 16): the HiFi-GAN example, and a model with everything else a model holds.

DATA = pathlib.Path(__file__).parent / 'data'
SNAKE = {r'.*\.alpha': (lambda a: a.reshape(-1), lambda a: a.reshape(1, -1, 1))}


def _example():
  """examples/port_hifigan.py, imported once."""
  if 'port_hifigan' not in sys.modules:
    spec = importlib.util.spec_from_file_location(
      'port_hifigan', DATA.parent.parent / 'examples' / 'port_hifigan.py'
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules['port_hifigan'] = module  # its dataclass resolves annotations there
    spec.loader.exec_module(module)
  return sys.modules['port_hifigan']


def _same_state_dict(back, sd):
  assert list(back) == list(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
    assert np.asarray(back[k]).tobytes() == np.asarray(sd[k]).tobytes(), k


def test_hifigan_generator_linen_matches_pytorch_and_exports_bit_for_bit():
  ex = _example()
  sd, mel, expected = ex.load_oracle()
  x = _channels_last(mel)
  model = ex.Generator(ex.CONFIG)
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  # No kinds=, no layer arguments: the ConvTranspose1d's layout is the Conv's, and the model
  # says transpose_kernel=True.
  variables = wt.to_linen(sd, template=template)
  assert set(variables['params']) == {
    'conv_pre',
    'ups_0',
    'ups_1',
    *(f'resblocks_{i}' for i in range(4)),
    'conv_post',
  }
  assert set(variables['params']['resblocks_3']) == {
    f'convs{a}_{i}' for a in (1, 2) for i in range(3)
  }
  _assert_matches_torch(jax.jit(model.apply)(variables, x), expected)
  _same_state_dict(wt.to_torch(variables, like=sd), sd)


def test_hifigan_generator_nnx_matches_pytorch_and_exports_bit_for_bit():
  from flax import nnx

  ex = _example()
  sd, mel, expected = ex.load_oracle()
  generator = ex.NNXGenerator(ex.CONFIG, rngs=nnx.Rngs(0))
  state = nnx.state(generator)
  tree = wt.to_nnx(sd, template=state)
  assert set(tree['resblocks'][3]['convs2']) == {0, 1, 2}  # nnx.List indices
  nnx.replace_by_pure_dict(state, tree)
  nnx.update(generator, state)
  _assert_matches_torch(nnx.jit(lambda g, x: g(x))(generator, _channels_last(mel)), expected)
  _same_state_dict(wt.to_torch(nnx.state(generator), like=sd), sd)
  _same_state_dict(wt.to_torch(tree, like=sd), sd)


def test_hifigan_example_runs(capsys):
  _example().main()
  assert 'bit for bit from linen: True, from NNX: True' in capsys.readouterr().out


def test_bfloat16_safetensors_from_pytorch():
  # Bug 1 on a file PyTorch wrote: bfloat16 is kept, and goes back bit for bit.
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  path = DATA / 'hifigan_bf16.safetensors'
  ex = _example()
  _, mel, _ = ex.load_oracle()
  expected = np.load(DATA / 'hifigan_oracle.npz')['output_bf16_weights']
  variables = wt.to_linen(path)
  assert {v.dtype for v in jax.tree.leaves(variables)} == {np.dtype(jnp.bfloat16)}
  _same_state_dict(wt.to_torch(variables, like=path), safetensors_numpy.load_file(str(path)))
  as_f32 = wt.to_linen(path, dtype=np.float32)
  _assert_matches_torch(
    jax.jit(ex.Generator(ex.CONFIG).apply)(as_f32, _channels_last(mel)), expected
  )


def test_plain_checkpoint_decomposes_and_folds_back():
  ex = _example()
  sd, mel, expected = ex.load_oracle()
  plain = wt.to_torch(wt.from_torch(sd), style='plain')  # as after remove_weight_norm
  assert not wt.find_prefixes(plain) and 'ups.0.weight' in plain
  with pytest.raises(ValueError, match=r'no weight-normed layer.*decompose=True'):
    wt.from_torch(plain)
  variables = wt.to_linen(plain, decompose=True)
  _assert_matches_torch(
    jax.jit(ex.Generator(ex.CONFIG).apply)(variables, _channels_last(mel)), expected
  )
  back = wt.to_torch(variables, like=plain, decompose=True)  # plain weights, folded
  assert list(back) == list(plain)
  for k in plain:
    np.testing.assert_allclose(back[k], plain[k], rtol=1e-6, atol=1e-6 * np.abs(plain[k]).max())
  layers = wt.from_torch(plain, decompose=r'^ups')
  assert sorted(layers) == ['ups.0', 'ups.1'] and layers['ups.0'].style == 'plain'


class _Snake(nn.Module):
  @nn.compact
  def __call__(self, x):
    alpha = self.param('alpha', nn.initializers.ones, (x.shape[-1],))
    return x + jnp.sin(alpha * x) ** 2 / alpha


class _Mixed(nn.Module):
  """The Flax twin of make_model_oracle.py's Mixed (channels-last)."""

  def setup(self):
    self.embed = nn.Embed(10, 6)
    self.proj = nn.Dense(8)
    self.norm = nn.LayerNorm(epsilon=1e-5)
    transposed = wt.conv_kwargs('ConvTranspose1d', 3, stride=2, padding=1, output_padding=1)
    self.convs = [
      wn_linen.WNConv(8, **wt.conv_kwargs('Conv1d', 5, padding=2, padding_mode='reflect')),
      wn_linen.WNConvTranspose(8, **transposed),
    ]
    self.act = _Snake()
    self.bn = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
    self.head = wn_linen.WNDense(3, axis=None)

  def __call__(self, tokens):
    h = self.norm(self.proj(self.embed(tokens)))
    return self.head(self.bn(self.convs[1](self.act(self.convs[0](h)))))


def _mixed_oracle():
  data = np.load(DATA / 'mixed_oracle.npz')
  return {k[3:]: data[k] for k in data.files if k.startswith('sd:')}, data['input'], data['output']


def test_whole_model_with_plain_layers_buffers_and_a_rule():
  sd, tokens, expected = _mixed_oracle()
  model = _Mixed()
  template = jax.eval_shape(model.init, jax.random.key(0), tokens)
  variables = wt.to_linen(sd, {'embed': 'Embedding'}, rules=SNAKE, template=template)
  assert variables['params']['act']['alpha'].shape == (8,)
  assert set(variables['batch_stats']['bn']) == {'mean', 'var'}
  assert variables['params']['proj']['kernel'].shape == (6, 8)  # plain Linear, Flax layout
  assert variables['params']['head']['scale'].shape == ()  # dim=None
  _assert_matches_torch(model.apply(variables, tokens), expected, channels_first=False)
  back = wt.to_torch(variables, like=sd, kinds={'embed': 'Embedding'}, rules=SNAKE)
  _same_state_dict(back, sd)  # num_batches_tracked, which Flax has no place for, from like
  # Without kinds=, a state dict cannot tell an Embedding from a Linear: the template says so.
  with pytest.raises(
    ValueError, match=r"missing \['params/embed/embedding'\].*'params/embed/kernel'"
  ):
    wt.to_linen(sd, rules=SNAKE, template=template)
  # ... and without the rule, alpha keeps PyTorch's (1, C, 1).
  with pytest.raises(ValueError, match=r'act/alpha: \(1, 8, 1\) vs \(8,\)'):
    wt.to_linen(sd, {'embed': 'Embedding'}, template=template)


def test_tree_errors_name_the_paths():
  sd, _, _ = _mixed_oracle()
  variables = wt.to_linen(sd, {'embed': 'Embedding'}, rules=SNAKE)
  with pytest.raises(ValueError, match=r'like='):
    wt.to_torch(variables)
  del variables['params']['convs_1']['scale']
  with pytest.raises(ValueError, match=r"lacks \['params/convs_1/scale'\]"):
    wt.to_torch(variables, like=sd, kinds={'embed': 'Embedding'}, rules=SNAKE)
  with pytest.raises(ValueError, match=r'both convert to params/a_0/w'):
    wt.to_linen({'a.0.w': np.ones(2, np.float32), 'a_0.w': np.ones(2, np.float32)})


class _Hook:  # what a duck-typed module walk sees of torch's parametrization
  def __init__(self, dim):
    self.dim = dim


class _WeightNorm(_Hook):
  pass


class _FakeModule:
  def __init__(self, children=(), state=None, buffers=None):
    self._children, self._state = dict(children), dict(state or {})
    self._buffers = dict(buffers or {})  # in the state dict too, as torch's persistent buffers
    self._state.update(self._buffers)

  def named_buffers(self):
    for name, module in self.named_modules():
      yield from (((f'{name}.{k}' if name else k), v) for k, v in module._buffers.items())

  def named_modules(self, prefix=''):
    yield prefix, self
    for name, child in self._children.items():
      yield from child.named_modules(f'{prefix}.{name}' if prefix else name)

  def state_dict(self):
    out = {}
    for name, module in self.named_modules():
      out.update({(f'{name}.{k}' if name else k): v for k, v in module._state.items()})
    return out


class ConvTranspose1d(_FakeModule):
  pass


class ParametrizedConvTranspose1d(ConvTranspose1d):
  pass


def test_walker_reads_kinds_arguments_and_dim_from_the_module():
  # Duck typed, without torch: a ConvTranspose1d (taken for a Conv1d by its shape) in a list.
  case = 'convtranspose1d_output_padding'
  sd = _state_dict(case)
  layer_module = ParametrizedConvTranspose1d(state={'bias': sd['bias']})
  layer_module.__dict__.update(
    stride=(3,), padding=(1,), dilation=(1,), groups=1, output_padding=(2,), padding_mode='zeros'
  )
  layer_module.parametrizations = types.SimpleNamespace(weight=[_WeightNorm(0)])
  weights = {k.split('weight.')[1]: v for k, v in sd.items() if 'weight' in k}
  params = _FakeModule(
    {'weight': _FakeModule(state={f'original{i}': weights[f'original{i}'] for i in (0, 1)})}
  )
  layer_module._children = {'parametrizations': params}
  model = _FakeModule({'ups': _FakeModule({'0': layer_module})})
  (layer,) = wt.from_torch(model).values()
  assert layer.kind == 'ConvTranspose1d' and layer.dim == 0
  assert layer.args == dict(
    stride=(3,), padding=(1,), dilation=(1,), groups=1, output_padding=(2,), padding_mode='zeros'
  )
  module, variables = layer.linen()  # no kinds=, no arguments
  x = _channels_last(ORACLE[f'{case}:input'])
  _assert_matches_torch(module.apply(variables, x), ORACLE[f'{case}:output'])
  _assert_matches_torch(layer.nnx()(x), ORACLE[f'{case}:output'])
  assert set(wt.to_nnx(model)['ups'][0]) == {'kernel', 'scale', 'bias'}


def test_padding_modes():
  assert wt.conv_kwargs('Conv1d', 5, padding=4, dilation=2, padding_mode='circular')['padding'] == (
    'CIRCULAR'
  )
  assert wt.conv_kwargs('Conv2d', 3, padding='same', padding_mode='reflect')['padding'] == 'REFLECT'
  with pytest.raises(ValueError, match=r"'replicate' has no Flax equivalent.*mode='edge'"):
    wt.conv_kwargs('Conv1d', 3, padding=1, padding_mode='replicate')
  with pytest.raises(ValueError, match=r'pads \[\(2, 2\)\].*Flax pads'):
    wt.conv_kwargs('Conv1d', 3, padding=2, padding_mode='reflect')
  with pytest.raises(ValueError, match=r'zeros only'):
    wt.conv_kwargs('ConvTranspose1d', 3, padding_mode='reflect')


def test_live_whole_model():
  torch = pytest.importorskip('torch')
  sys.path.insert(0, str(DATA))
  try:
    import make_model_oracle as oracle
  finally:
    sys.path.remove(str(DATA))
  with warnings.catch_warnings():  # torch's own: its legacy weight_norm is deprecated
    warnings.simplefilter('ignore', FutureWarning)
    mixed = oracle.Mixed().eval()
    half = oracle.Generator(_example().CONFIG).to(torch.bfloat16)
  tokens = torch.randint(0, 10, (2, 7))
  with torch.no_grad():
    expected = mixed(tokens).numpy()
  variables = wt.to_linen(mixed, rules=SNAKE)  # kinds and arguments from the module
  _assert_matches_torch(_Mixed().apply(variables, tokens.numpy()), expected, channels_first=False)
  back = wt.to_torch(variables, like=mixed, rules=SNAKE)
  assert all(isinstance(v, torch.Tensor) for v in back.values())
  mixed.load_state_dict(back, strict=True)
  # Bug 1 with torch tensors; bug 2: changing the module afterwards changes nothing converted.
  layers = wt.from_torch(half)
  assert layers['ups.0'].kind == 'ConvTranspose1d' and layers['ups.0'].args['stride'] == (2,)
  kernel = np.array(layers['conv_pre'].params['kernel'])
  assert kernel.dtype == jnp.bfloat16
  with torch.no_grad():
    half.conv_pre.weight_v.mul_(2)
  np.testing.assert_array_equal(layers['conv_pre'].params['kernel'], kernel)
  back = wt.to_torch(layers, like=half)
  assert all(
    torch.equal(back[k], v) for k, v in half.state_dict().items() if k != 'conv_pre.weight_v'
  )


def test_conv_transpose_3d_matches_pytorch():
  data = np.load(DATA / 'mixed_oracle.npz')
  sd = {k[len('ct3d:sd:') :]: data[k] for k in data.files if k.startswith('ct3d:sd:')}
  args = {k: tuple(v) for k, v in json.loads(str(data['ct3d:args'])).items()}
  (layer,) = wt.from_torch(sd, {'': 'ConvTranspose3d'}).values()
  assert layer.params['kernel'].shape == (2, 3, 2, 2, 3)  # (*window, out, in)
  x = _channels_last(data['ct3d:input'])
  module, variables = layer.linen(**args)
  _assert_matches_torch(module.apply(variables, x), data['ct3d:output'])
  _same_state_dict(wt.to_torch({'': layer}, like=sd), sd)


# Issue 24: whole third-party models.


def _root_model():
  """An NNX model with a tensor on its root module beside a WN layer (SpeechT5HifiGan's mean)."""
  from flax import nnx

  from wn_jax import nnx as wn_nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.mean = nnx.Param(jnp.zeros(3))
      self.fc = wn_nnx.WNLinear(3, 4, rngs=rngs)

  return Model(nnx.Rngs(0))


def _root_sd():
  rng = np.random.default_rng(0)
  return {
    'mean': rng.normal(size=3).astype(np.float32),
    'fc.weight_g': rng.normal(size=(4, 1)).astype(np.float32),
    'fc.weight_v': rng.normal(size=(4, 3)).astype(np.float32),
    'fc.bias': rng.normal(size=4).astype(np.float32),
  }


def test_to_torch_takes_nnx_state_with_a_root_tensor():
  from flax import nnx

  sd, model = _root_sd(), _root_model()
  state = nnx.state(model)
  tree = wt.to_nnx(sd, template=state)
  _same_state_dict(wt.to_torch(tree, like=sd), sd)  # to_nnx's own output
  nnx.replace_by_pure_dict(state, tree)
  nnx.update(model, state)
  _same_state_dict(wt.to_torch(nnx.state(model), like=sd), sd)  # the live state
  with pytest.raises(ValueError, match=r'a PyTorch state dict.*to_linen'):
    wt.to_torch(sd, like=sd)  # a state dict is not a converted tree


class _PosConv(nn.Module):
  """wav2vec2's positional conv (torch dim=2), as a twin whose ``axis`` may be wrong."""

  features: int
  groups: int
  axis: int

  def setup(self):
    kw = wt.conv_kwargs('Conv1d', 8, padding=4, groups=self.groups)
    self.pos_conv = wn_linen.WNConv(self.features, axis=self.axis, **kw)

  def __call__(self, x):
    return self.pos_conv(x)


def _nnx_pos_conv(features, groups, axis):
  from flax import nnx

  from wn_jax import nnx as wn_nnx

  class Twin(nnx.Module):
    def __init__(self, rngs):
      kw = wt.conv_kwargs('Conv1d', 8, padding=4, groups=groups)
      self.pos_conv = wn_nnx.WNConv(features, features, rngs=rngs, axis=axis, **kw)

  return Twin(nnx.Rngs(0))


def test_twin_checks_the_kept_axis():
  # Conv1d(8, 8, 8, groups=2) with dim=2: g has 8 entries whichever axis the twin keeps, so the
  # template's shapes cannot tell a twin left at axis=-1; its outputs would be silently wrong.
  rng = np.random.default_rng(0)
  sd = {
    'pos_conv.weight_g': rng.normal(size=(1, 1, 8)).astype(np.float32),
    'pos_conv.weight_v': rng.normal(size=(8, 4, 8)).astype(np.float32),
    'pos_conv.bias': np.zeros(8, np.float32),
  }
  x = np.ones((1, 12, 8), np.float32)
  wrong = _PosConv(8, 2, -1)
  wt.to_linen(sd, template=jax.eval_shape(wrong.init, jax.random.key(0), x))  # shapes agree
  with pytest.raises(ValueError, match=r"'pos_conv'.*axis -1.*dim=2.*axis=-3"):
    wt.to_linen(sd, twin=(wrong, x))
  with pytest.raises(ValueError, match=r"'pos_conv'.*axis -1.*dim=2.*axis=-3"):
    wt.to_nnx(sd, twin=_nnx_pos_conv(8, 2, -1))
  assert set(wt.to_nnx(sd, twin=_nnx_pos_conv(8, 2, -3))['pos_conv']) == {'kernel', 'scale', 'bias'}
  # The right twin matches PyTorch (Conv1d(16, 16, 8, groups=4), dim=2).
  case = 'wav2vec2_posconv'
  sd = {f'pos_conv.{k}': v for k, v in _state_dict(case).items()}
  x = _channels_last(ORACLE[f'{case}:input'])
  variables = wt.to_linen(sd, twin=(_PosConv(16, 4, -3), x))
  _assert_matches_torch(_PosConv(16, 4, -3).apply(variables, x), ORACLE[f'{case}:output'])
  # Shapes that differ: the error names the axis to build the layer with.
  template = jax.eval_shape(_PosConv(16, 4, -1).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r'params/pos_conv/scale.*axis=-3 .*dim=2'):
    wt.to_linen(sd, template=template)
  with pytest.raises(TypeError, match=r'\(module, \*inputs\)'):
    wt.to_linen(sd, twin=_PosConv(16, 4, -3))


class _Custom(
  _FakeModule
):  # a module class wn_jax does not know (no Linear, Conv, norm in its MRO)
  pass


def test_unknown_module_weight_keeps_its_name_and_layout():
  weight = np.arange(6, dtype=np.float32).reshape(2, 3)
  model = _FakeModule({'proj': _Custom(state={'weight': weight})})
  np.testing.assert_array_equal(wt.to_linen(model)['params']['proj']['weight'], weight)
  assert 'kernel' in wt.to_linen(model.state_dict())['params']['proj']  # a state dict guesses
  _same_state_dict(wt.to_torch(wt.to_nnx(model), like=model), model.state_dict())


def test_buffers_go_to_a_collection_of_their_own():
  rng = np.random.default_rng(0)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  codebook = _Custom(buffers={'embed': f32(5, 3), 'inited': np.ones(1, np.float32)})
  model = _FakeModule(
    {'fc': _Custom(state={'w': f32(3)}), 'codebook': codebook},
    buffers={'mean': f32(3), 'scale': f32(3)},
  )
  variables = wt.to_linen(model)
  assert set(variables) == {'params', 'buffers'}  # an optimizer of params never trains them
  assert set(variables['buffers']) == {'mean', 'scale', 'codebook'}
  assert set(variables['params']) == {'fc'}
  assert set(wt.to_linen(model, buffers='constants')) == {'params', 'constants'}
  assert set(wt.to_linen(model, buffers='params')['params']) == {'mean', 'scale', 'fc', 'codebook'}
  sd = model.state_dict()
  _same_state_dict(wt.to_torch(variables, like=model), sd)
  _same_state_dict(wt.to_torch(variables, like=sd), sd)  # a state dict cannot tell: looked up
  _same_state_dict(wt.to_torch(wt.to_linen(sd), like=model), sd)
  marked = wt.to_linen(sd, buffer_keys=r'mean|scale|codebook\..*')  # a state dict, told
  assert jax.tree.structure(marked) == jax.tree.structure(variables)
  _same_state_dict(wt.to_torch(marked, like=sd, buffer_keys=r'mean|scale|codebook\..*'), sd)
  _same_state_dict(wt.to_torch(wt.to_nnx(model), like=model), sd)  # NNX: one tree
  with pytest.raises(ValueError, match=r'buffers=.*collection'):
    wt.to_linen(model, buffers='')


_GATES = 'ifgo'  # PyTorch's order of the LSTM gates in weight_ih_l0's rows


def _lstm_rule(side, name):
  """torch nn.LSTM's (4H, ...) tensor -> one leaf per gate of a Flax-style cell."""

  def forward(a):
    parts = np.split(a, 4)
    return {f'cell.{side}{g}.{name}': p.T if name == 'kernel' else p for g, p in zip(_GATES, parts)}

  def inverse(leaves):
    parts = [leaves[f'cell.{side}{g}.{name}'] for g in _GATES]
    return np.concatenate([p.T if name == 'kernel' else p for p in parts])

  return forward, inverse


LSTM_RULES = {
  r'lstm\.weight_ih_l0': _lstm_rule('i', 'kernel'),
  r'lstm\.weight_hh_l0': _lstm_rule('h', 'kernel'),
  r'lstm\.bias_ih_l0': _lstm_rule('i', 'bias'),
  r'lstm\.bias_hh_l0': _lstm_rule('h', 'bias'),
}


def _lstm_sd(hidden=3, features=2):
  rng = np.random.default_rng(0)
  shapes = {'weight_ih_l0': (4 * hidden, features), 'weight_hh_l0': (4 * hidden, hidden)}
  shapes |= {'bias_ih_l0': (4 * hidden,), 'bias_hh_l0': (4 * hidden,)}
  return {f'lstm.{k}': rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_a_rule_makes_several_leaves_and_inverts_them():
  sd = _lstm_sd()
  variables = wt.to_linen(sd, rules=LSTM_RULES)
  cell = variables['params']['lstm']['cell']
  assert sorted(cell) == sorted(f'{s}{g}' for s in 'ih' for g in _GATES)
  np.testing.assert_array_equal(cell['if']['kernel'], sd['lstm.weight_ih_l0'][3:6].T)
  np.testing.assert_array_equal(cell['ho']['bias'], sd['lstm.bias_hh_l0'][9:])
  _same_state_dict(wt.to_torch(variables, like=sd, rules=LSTM_RULES), sd)
  tree = wt.to_nnx(sd, rules=LSTM_RULES)
  assert tree['lstm']['cell']['ig']['kernel'].shape == (2, 3)
  _same_state_dict(wt.to_torch(tree, like=sd, rules=LSTM_RULES), sd)
  bad = {r'lstm\..*': (lambda a: [a, a], lambda a: a)}
  with pytest.raises(ValueError, match=r"rules=.*'lstm.weight_ih_l0'.*list.*an array or a dict"):
    wt.to_linen(sd, rules=bad)


def test_to_torch_without_the_same_rules_says_so():
  sd, _, _ = _mixed_oracle()
  variables = wt.to_linen(sd, {'embed': 'Embedding'}, rules=SNAKE)
  with pytest.raises(ValueError, match=r'act.alpha.*same rules='):
    wt.to_torch(variables, like=sd, kinds={'embed': 'Embedding'})
  with pytest.raises(ValueError, match=r'lstm/weight_ih_l0.*same rules='):
    wt.to_torch(wt.to_linen(_lstm_sd(), rules=LSTM_RULES), like=_lstm_sd())


def test_dropped_tensors_stay_out_and_come_back_from_like():
  # EnCodec's codebooks: the Flax model never holds what __call__ never runs.
  class Twin(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='proj')(x)

  rng = np.random.default_rng(0)
  sd = {
    'proj.weight': rng.normal(size=(3, 2)).astype(np.float32),
    'proj.bias': np.zeros(3, np.float32),
    'quantizer.layers.0.codebook.embed': rng.normal(size=(4, 3)).astype(np.float32),
    'quantizer.layers.0.codebook.inited': np.ones(1, np.float32),
  }
  template = jax.eval_shape(Twin().init, jax.random.key(0), np.ones((1, 2), np.float32))
  with pytest.raises(ValueError, match=r'unexpected.*quantizer.*drop='):
    wt.to_linen(sd, template=template)
  variables = wt.to_linen(sd, template=template, drop=r'quantizer\..*')
  assert set(variables['params']) == {'proj'}
  _same_state_dict(wt.to_torch(variables, like=sd, drop=r'quantizer\..*'), sd)
  with pytest.raises(ValueError, match=r'lacks.*quantizer.*same .*drop='):
    wt.to_torch(variables, like=sd)


def test_twin_axis_check_finds_layers_in_lists():
  from flax import nnx

  from wn_jax import nnx as wn_nnx

  rng = np.random.default_rng(0)
  sd = {
    f'blocks.{i}.weight_{n}': rng.normal(size=s).astype(np.float32)
    for i in range(2)
    for n, s in (('g', (1, 4)), ('v', (4, 4)))  # dim=1: the input axis, Flax axis=-2
  }

  class Twin(nn.Module):
    def setup(self):
      self.blocks = [wn_linen.WNDense(4, axis=a, use_bias=False) for a in (-2, -1)]

    def __call__(self, x):
      return self.blocks[1](self.blocks[0](x))

  class NNXTwin(nnx.Module):
    def __init__(self, rngs):
      layers = [wn_nnx.WNLinear(4, 4, axis=a, use_bias=False, rngs=rngs) for a in (-2, -1)]
      self.blocks = nnx.List(layers)

  with pytest.raises(ValueError, match=r"'blocks_1': the twin keeps axis -1.*dim=1"):
    wt.to_linen(sd, twin=(Twin(), np.ones((1, 4), np.float32)))
  with pytest.raises(ValueError, match=r"'blocks/1': the twin keeps axis -1.*dim=1"):
    wt.to_nnx(sd, twin=NNXTwin(nnx.Rngs(0)))


# Review of the porting (weight norm on other layers and tensors, hints, regexes, float64).


class Embedding(_FakeModule):
  pass


def _wn_fake(cls, v, g, name='weight', style='parametrization', dim=0):
  """A duck-typed module of class ``cls`` whose tensor ``name`` is weight-normed."""
  if style == 'legacy':
    module = cls(state={f'{name}_g': g, f'{name}_v': v})
    hook = type('WeightNorm', (), {})()
    hook.name, hook.dim = name, dim
    module._forward_pre_hooks = {0: hook}
    return module
  module = cls()
  module._children = {
    'parametrizations': _FakeModule({name: _FakeModule(state={'original0': g, 'original1': v})})
  }
  module.parametrizations = types.SimpleNamespace(**{name: [_WeightNorm(dim)]})
  return module


@pytest.mark.parametrize('style', ['legacy', 'parametrization'])
def test_weight_norm_on_an_unknown_layer_keeps_the_tensor_name_and_layout(style):
  # A weight-normed Embedding was read as a Linear (kernel (4, 10)), a 3-D weight of a class
  # wn_jax does not know (Bilinear) as a Conv1d (kernel permuted).
  rng = np.random.default_rng(0)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  model = _FakeModule(
    {
      'embed': _wn_fake(Embedding, f32(10, 4), f32(10, 1), style=style),
      'bil': _wn_fake(_Custom, f32(2, 3, 5), f32(2, 1, 1), style=style),
    }
  )
  model._children['bil']._state['bias'] = f32(2)
  sd = model.state_dict()
  layers = wt.from_torch(model)
  assert layers['embed'].kind == 'Embedding' and layers['bil'].kind == 'Tensor'
  assert layers['embed'].axis == -2 and layers['bil'].axis == -3  # torch's dim=0, same layout
  assert wt.layer_axes(model) == {}  # no kernel / scale for linen.fold
  variables = wt.to_linen(model)['params']
  assert {k: v.shape for k, v in variables['embed'].items()} == {
    'embedding': (10, 4),
    'embedding_scale': (10,),
  }
  assert {k: v.shape for k, v in variables['bil'].items()} == {
    'weight': (2, 3, 5),
    'weight_scale': (2,),
    'bias': (2,),
  }
  g = sd['embed.weight_g'] if style == 'legacy' else sd['embed.parametrizations.weight.original0']
  np.testing.assert_array_equal(variables['embed']['embedding_scale'], g.reshape(-1))
  _same_state_dict(wt.to_torch(wt.to_linen(model), like=model), sd)
  _same_state_dict(wt.to_torch(wt.to_nnx(model), like=model), sd)
  _same_state_dict(wt.to_torch(layers, like=model), sd)
  with pytest.raises(ValueError, match=r"kind 'Embedding' has no wn_jax layer.*axis is -2"):
    layers['embed'].linen()


@pytest.mark.parametrize('style', ['legacy', 'parametrization'])
def test_weight_norm_on_a_tensor_not_named_weight(style):
  # torch.nn.utils.weight_norm(lstm, name='weight_hh_l0'): was not recognized, and passed
  # through as raw weight_hh_l0_g / _v or a submodule 'parametrizations/weight_hh_l0'.
  rng = np.random.default_rng(0)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  lstm = _wn_fake(_Custom, f32(12, 3), f32(1, 3), name='weight_hh_l0', style=style, dim=1)
  lstm._state.update({'weight_ih_l0': f32(12, 2), 'bias_ih_l0': f32(12)})
  model = _FakeModule({'lstm': lstm})
  sd = model.state_dict()
  assert wt.find_prefixes(sd) == {'lstm.weight_hh_l0': style}
  for source in (model, sd):
    params = wt.to_linen(source)['params']
    assert {k: v.shape for k, v in params['lstm'].items()} == {
      'weight_hh_l0': (12, 3),
      'weight_hh_l0_scale': (3,),
      'weight_ih_l0': (12, 2),
      'bias_ih_l0': (12,),
    }
    _same_state_dict(wt.to_torch(wt.to_linen(source), like=source), sd)
    _same_state_dict(wt.to_torch(wt.to_nnx(source), like=source), sd)
  (layer,) = wt.from_torch(sd).values()
  assert layer.kind == 'Tensor' and layer.tensor == 'weight_hh_l0' and layer.axis == -1


def test_live_weight_norm_on_other_layers_and_tensors():
  torch = pytest.importorskip('torch')
  from torch.nn.utils import parametrizations

  torch.manual_seed(0)
  with warnings.catch_warnings():  # torch's own: its legacy weight_norm is deprecated
    warnings.simplefilter('ignore', FutureWarning)
    model = torch.nn.ModuleDict(
      {
        'embed': parametrizations.weight_norm(torch.nn.Embedding(10, 4)),
        'bil': parametrizations.weight_norm(torch.nn.Bilinear(3, 5, 2)),
        'lstm': torch.nn.utils.weight_norm(torch.nn.LSTM(2, 3), name='weight_hh_l0'),
        'gru': parametrizations.weight_norm(torch.nn.GRU(2, 3), name='weight_ih_l0', dim=1),
      }
    )
  params = wt.to_linen(model)['params']
  assert params['embed']['embedding'].shape == (10, 4)
  assert params['embed']['embedding_scale'].shape == (10,)
  assert params['bil']['weight'].shape == (2, 3, 5) and params['bil']['weight_scale'].shape == (2,)
  assert params['lstm']['weight_hh_l0_scale'].shape == (12,)
  assert params['gru']['weight_ih_l0'].shape == (9, 2)
  assert params['gru']['weight_ih_l0_scale'].shape == (2,)  # dim=1
  for tree in (wt.to_linen(model), wt.to_nnx(model)):
    back = wt.to_torch(tree, like=model)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    model.load_state_dict(back, strict=True)


def test_float64_needs_x64():
  # A float64 model with x64 off became float32 silently, and came back off by 1.9e-8.
  sd = {k: v.astype(np.float64) for k, v in _root_sd().items()}
  with pytest.raises(ValueError, match=r"'fc.kernel' is float64.*jax_enable_x64.*float32"):
    wt.to_linen(sd)
  with pytest.raises(ValueError, match=r'float64.*jax_enable_x64'):
    wt.to_nnx(sd)
  with pytest.raises(ValueError, match=r'float64.*jax_enable_x64'):
    wt.from_torch(sd)['fc'].linen()
  assert wt.to_linen(sd, dtype=np.float32)['params']['mean'].dtype == np.float32  # asked for
  back = wt.to_torch(wt.from_torch(sd), like=sd)  # NumPy all along: exact
  _same_state_dict(back, sd)


def test_float64_round_trip_with_x64(x64):
  sd = {k: v.astype(np.float64) for k, v in _root_sd().items()}
  variables = wt.to_linen(sd)
  assert variables['params']['mean'].dtype == np.float64
  _same_state_dict(wt.to_torch(variables, like=sd), sd)


def test_tree_errors_name_the_right_fix():
  rng = np.random.default_rng(0)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731

  class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(5, (3,), name='c')(x)

  sd = {'c.weight': f32(5, 4, 3), 'c.bias': f32(5)}
  x_nct = np.ones((2, 4, 9), np.float32)  # PyTorch's layout: the twin's init sees 9 channels
  with pytest.raises(ValueError, match=r'channels-last.*moveaxis\(x, 1, -1\)') as info:
    wt.to_linen(sd, twin=(Conv(), x_nct))
  assert 'rules=' not in str(info.value)
  variables = wt.to_linen(sd, twin=(Conv(), np.moveaxis(x_nct, 1, -1)))

  class Act(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x * self.param('alpha', nn.initializers.ones, (5,))

  class Snake(nn.Module):  # a channels-last input, and a tensor that does need a rule
    @nn.compact
    def __call__(self, x):
      return Act(name='act')(nn.Conv(5, (3,), name='c')(x))

  with pytest.raises(ValueError, match=r'act/alpha: \(1, 5, 1\) vs \(5,\)') as info:
    wt.to_linen({**sd, 'act.alpha': f32(1, 5, 1)}, twin=(Snake(), np.moveaxis(x_nct, 1, -1)))
  assert 'rules=' in str(info.value) and 'channels-last' not in str(info.value)
  # A permuted shape of a plain tensor: the layout, not a rule, is the likely fix.
  template = {'params': {'c': {'kernel': np.zeros((5, 4, 3)), 'bias': np.zeros(5)}}}
  with pytest.raises(ValueError, match=r'a permutation.*Flax layout'):
    wt.to_linen(sd, template=template)

  class Dense(nn.Module):  # a plain nn.Dense where PyTorch weight-normed the layer
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='l')(x)

  wn = {'l.weight_g': f32(3, 1), 'l.weight_v': f32(3, 2), 'l.bias': f32(3)}
  with pytest.raises(ValueError, match=r"build 'params/l' with a WN layer \(WNDense"):
    wt.to_linen(wn, twin=(Dense(), np.ones((1, 2), np.float32)))
  with pytest.raises(ValueError, match=r'twin= or template=, not both'):
    wt.to_linen(sd, twin=(Conv(), x_nct), template=variables)
  # variables['params'] of a model with buffers: a linen tree, lacking its buffers.
  model = _FakeModule({'fc': _Custom(state={'w': f32(3)})}, buffers={'mean': f32(3)})
  variables = wt.to_linen(model)
  with pytest.raises(ValueError, match=r"linen params.*\['buffers/mean'\].*whole variables"):
    wt.to_torch(variables['params'], like=model)
  # NNX state filtered to its params: it was taken for a linen params tree.
  from flax import nnx

  bn = {'bn.weight': f32(3), 'bn.bias': f32(3), 'bn.running_mean': f32(3), 'bn.running_var': f32(3)}

  class Net(nnx.Module):
    def __init__(self):
      self.bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))

  net = Net()
  state = nnx.state(net)
  nnx.replace_by_pure_dict(state, wt.to_nnx(bn, {'bn': 'BatchNorm1d'}, twin=net))
  with pytest.raises(ValueError, match=r"NNX state lacks \['bn/mean'.*whole nnx.state\(model\)"):
    wt.to_torch(nnx.state(net, nnx.Param), like=bn, kinds={'bn': 'BatchNorm1d'})


def test_patterns_that_match_nothing_are_refused():
  sd = _lstm_sd()
  with pytest.raises(
    ValueError, match=r"drop='quantizer\\\.\.\*' matches no key.*lstm.weight_ih_l0"
  ):
    wt.to_linen(sd, drop=r'quantizer\..*')
  with pytest.raises(ValueError, match=r"buffer_keys='mean' matches no key.*re.fullmatch"):
    wt.to_linen(sd, buffer_keys='mean')
  with pytest.raises(ValueError, match=r"rules= key 'weight_ih_l0' matches no key"):
    wt.to_nnx(sd, rules={'weight_ih_l0': (np.transpose, np.transpose)})  # fullmatch: no prefix
  with pytest.raises(ValueError, match=r"drop='x' matches no key"):
    wt.to_torch(wt.to_linen(sd), like=sd, drop='x')
  wn = {'l.weight_g': np.ones((3, 1), np.float32), 'l.weight_v': np.ones((3, 2), np.float32)}
  with pytest.raises(ValueError, match=r"rules= key 'l\\\.weight_v'.*weight-normed"):
    wt.to_linen(wn, rules={r'l\.weight_v': (np.transpose, np.transpose)})


def test_fold_a_converted_dim2_layer_whose_window_equals_its_channels():
  # Issue 16 bug 4: a PyTorch dim=2 Conv1d with window 4 and 4 channels has a kernel (4, 4, 4)
  # and a scale (4,) that fits axis=-1 as well as its own axis=-3; fold is told each axis.
  rng = np.random.default_rng(0)
  sd = {
    'pos_conv.weight_g': rng.uniform(0.5, 2.0, (1, 1, 4)).astype(np.float32),
    'pos_conv.weight_v': rng.normal(size=(4, 4, 4)).astype(np.float32),
    'pos_conv.bias': rng.normal(size=4).astype(np.float32),
  }
  assert wt.layer_axes(sd) == {'pos_conv': -3}
  params = wt.to_linen(sd)['params']
  module, _ = wt.from_torch(sd)['pos_conv'].linen(padding=2)
  x = rng.normal(size=(2, 9, 4)).astype(np.float32)
  expected = module.apply({'params': params['pos_conv']}, x)
  plain = wn_linen.fold(params, axis=wt.layer_axes(sd))
  y = nn.Conv(4, (4,), padding=[(2, 2)]).apply({'params': plain['pos_conv']}, x)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize('given', ['twin', 'template'])
def test_torch_sequential_loads_into_nnx_sequential(given):
  # torch's nn.Sequential names its children 0, 1, ...; nnx.Sequential keeps them under
  # 'layers' (a nested Sequential too). With the model (or its state) to fit, they land there.
  from flax import nnx

  from wn_jax import nnx as wx

  rng = np.random.default_rng(0)
  sd = {}
  for key, (o, i) in {'0': (4, 3), '2.0': (2, 4)}.items():
    sd.update(
      {
        f'{key}.weight_g': rng.uniform(1, 2, (o, 1)).astype(np.float32),
        f'{key}.weight_v': rng.normal(size=(o, i)).astype(np.float32),
        f'{key}.bias': rng.normal(size=o).astype(np.float32),
      }
    )
  model = nnx.Sequential(
    wx.WNLinear(3, 4, rngs=nnx.Rngs(0)),
    nnx.relu,
    nnx.Sequential(wx.WNLinear(4, 2, rngs=nnx.Rngs(1))),
  )
  state = nnx.state(model)
  tree = wt.to_nnx(sd, twin=model) if given == 'twin' else wt.to_nnx(sd, template=state)
  nnx.replace_by_pure_dict(state, tree)
  nnx.update(model, state)
  np.testing.assert_array_equal(model.layers[0].scale[...], sd['0.weight_g'][:, 0])
  np.testing.assert_array_equal(model.layers[2].layers[0].kernel[...], sd['2.0.weight_v'].T)
  np.testing.assert_array_equal(model.layers[2].layers[0].bias[...], sd['2.0.bias'])


def _wn_state(prefix, v_shape, dim=0, seed=0):
  """A legacy weight-normed layer's state dict: random g (along ``dim``) and v, zero bias."""
  rng = np.random.default_rng(seed)
  g_shape = tuple(n if i == dim else 1 for i, n in enumerate(v_shape))
  return {
    f'{prefix}.weight_g': rng.uniform(1, 2, g_shape).astype(np.float32),
    f'{prefix}.weight_v': rng.normal(size=v_shape).astype(np.float32),
    f'{prefix}.bias': np.zeros(v_shape[0], np.float32),
  }


def _grouped_conv_dim2():
  return _wn_state('0', (8, 4, 8), dim=2)


def test_twin_checks_the_kept_axis_inside_an_nnx_sequential():
  # The axis check looked the twin's layers up by torch's path, without nnx.Sequential's
  # 'layers': a twin left at axis=-1 passed, and computed wrong.
  from flax import nnx

  from wn_jax import nnx as wx

  def twin(axis):
    kw = wt.conv_kwargs('Conv1d', 8, padding=4, groups=2)
    return nnx.Sequential(wx.WNConv(8, 8, axis=axis, rngs=nnx.Rngs(0), **kw))

  with pytest.raises(ValueError, match=r"'layers/0'.*axis -1.*dim=2.*axis=-3"):
    wt.to_nnx(_grouped_conv_dim2(), twin=twin(-1))
  assert set(wt.to_nnx(_grouped_conv_dim2(), twin=twin(-3))['layers'][0]) == {
    'kernel',
    'scale',
    'bias',
  }


def test_twin_checks_the_layer_kind():
  # A ConvTranspose1d(6, 6, 4) fits the shapes of a WNConv and of a WNConvTranspose with
  # Flax's default transpose_kernel=False (in = out): both computed wrong, unchecked.
  from flax import nnx

  from wn_jax import nnx as wx

  sd = _wn_state('up', (6, 6, 4), seed=1)
  kinds = {'up': 'ConvTranspose1d'}
  x = np.ones((1, 5, 6), np.float32)

  def linen_twin(layer):
    class Up(nn.Module):
      @nn.compact
      def __call__(self, x):
        return layer(name='up')(x)

    return (Up(), x)

  for layer in (
    lambda **kw: wn_linen.WNConvTranspose(6, (4,), axis=-1, **kw),
    lambda **kw: wn_linen.WNConv(6, (4,), axis=-1, **kw),
  ):
    with pytest.raises(ValueError, match=r"'up'.*ConvTranspose1d.*transpose_kernel=True"):
      wt.to_linen(sd, kinds, twin=linen_twin(layer))
  right = lambda **kw: wn_linen.WNConvTranspose(6, (4,), axis=-1, transpose_kernel=True, **kw)
  assert 'up' in wt.to_linen(sd, kinds, twin=linen_twin(right))['params']
  # Without kinds=, a bare state dict's rank-3 weight is a Conv1d's or a ConvTranspose1d's
  # (they convert alike): either twin is taken, Flax's transpose_kernel=False never.
  assert 'up' in wt.to_linen(sd, twin=linen_twin(right))['params']
  with pytest.raises(ValueError, match=r"'up'.*Conv1d by its weight rank.*transpose_kernel=True"):
    wt.to_linen(sd, twin=linen_twin(lambda **kw: wn_linen.WNConvTranspose(6, (4,), axis=-1, **kw)))

  class NNXUp(nnx.Module):
    def __init__(self, transpose_kernel):
      self.up = wx.WNConvTranspose(
        6, 6, (4,), axis=-1, transpose_kernel=transpose_kernel, rngs=nnx.Rngs(0)
      )

  with pytest.raises(ValueError, match=r"'up'.*ConvTranspose1d.*transpose_kernel=True"):
    wt.to_nnx(sd, kinds, twin=NNXUp(False))
  assert set(wt.to_nnx(sd, kinds, twin=NNXUp(True))['up']) == {'kernel', 'scale', 'bias'}


def test_nnx_sequential_goes_back_to_torch():
  # to_torch looked for torch's 0, 1, ... at the root of an nnx.Sequential's state, which
  # keeps them under 'layers': the round trip failed ("the nnx tree lacks ['0/kernel', ...]").
  from flax import nnx

  from wn_jax import nnx as wx

  sd = _grouped_conv_dim2()
  kw = wt.conv_kwargs('Conv1d', 8, padding=4, groups=2)
  model = nnx.Sequential(wx.WNConv(8, 8, axis=-3, rngs=nnx.Rngs(0), **kw))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, wt.to_nnx(sd, twin=model))
  nnx.update(model, state)
  back = wt.to_torch(nnx.state(model), like=sd)
  assert list(back) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


class Linear(_FakeModule):
  pass


class _Double(_Hook):  # a parametrization of the user's, after weight_norm's
  pass


def test_another_parametrization_on_a_weight_normed_tensor_is_refused():
  # torch computes the weight through every parametrization of the tensor; wn_jax reads only
  # weight_norm's g and v. A second one used to be ignored: the outputs were silently wrong.
  rng = np.random.default_rng(0)
  module = _wn_fake(Linear, rng.normal(size=(3, 4)).astype(np.float32), np.ones((3, 1), np.float32))
  module.parametrizations.weight.append(_Double(None))
  model = _FakeModule({'fc': module})
  with pytest.raises(
    ValueError, match=r"'fc'.*'weight'.*_WeightNorm, _Double.*remove_parametrizations"
  ):
    wt.from_torch(model)
  with pytest.raises(ValueError, match=r"'fc'.*'weight'.*_WeightNorm, _Double"):
    wt.to_linen(model)


def test_tied_tensors_go_back_with_the_converted_values():
  # A module registered twice (m.dec = m.enc): like's state dict holds its tensors under both
  # names. With the twin's one layer and drop= for the alias, to_torch used to copy like's
  # old values for the alias, and loading them wrote over the trained ones.
  enc = {k.split('.', 1)[1]: v for k, v in _wn_state('enc', (3, 4)).items()}
  like = {**{f'enc.{k}': v for k, v in enc.items()}, **{f'dec.{k}': v for k, v in enc.items()}}

  class Tied(nn.Module):  # the Flax twin holds the layer once
    @nn.compact
    def __call__(self, x):
      enc = wn_linen.WNDense(3, name='enc')
      return enc(enc(x)[..., :1].repeat(4, -1))

  twin = (Tied(), np.ones((1, 4), np.float32))
  # The hint was to build 'params/dec' as a WN layer, which the twin does not hold at all.
  with pytest.raises(ValueError, match=r"unexpected \['params/dec/bias'.*drop=") as raised:
    wt.to_linen(like, twin=twin)
  assert 'with a WN layer' not in str(raised.value)
  tree = wt.to_linen(like, twin=twin, drop=r'dec\..*')
  tree['params']['enc']['scale'] = tree['params']['enc']['scale'] * 2  # trained
  back = wt.to_torch(tree, like=like, drop=r'dec\..*')
  np.testing.assert_array_equal(back['enc.weight_g'], 2 * enc['weight_g'])
  for k in enc:
    np.testing.assert_array_equal(back[f'dec.{k}'], back[f'enc.{k}'])


def test_to_torch_refuses_a_tree_of_other_shapes_than_like():
  # A kernel of another size failed inside NumPy's reshape, naming no key; a scale of 4
  # entries in another shape was reshaped silently.
  like = _wn_state('c', (4, 2, 3))
  tree = wt.to_linen(like)
  for name, bad in (
    ('kernel', np.ones((3, 2, 5), np.float32)),
    ('scale', np.ones((2, 2), np.float32)),
  ):
    params = {**tree['params']['c'], name: bad}
    shape = re.escape(str(bad.shape))
    with pytest.raises(ValueError, match=rf"params/c/{name} has shape {shape}.*like's 'c'"):
      wt.to_torch({'params': {'c': params}}, like=like)


class _TorchLikeModule(_FakeModule):
  def state_dict(self):  # every name, as torch's
    out = {}
    for name, module in self.named_modules(remove_duplicate=False):
      out.update({(f'{name}.{k}' if name else k): v for k, v in module._state.items()})
    return out

  def named_modules(self, prefix='', remove_duplicate=True, memo=None):
    # torch's: a module registered under two names is listed once unless remove_duplicate=False
    memo = set() if memo is None else memo
    if remove_duplicate and id(self) in memo:
      return
    memo.add(id(self))
    yield prefix, self
    for name, child in self._children.items():
      yield from child.named_modules(f'{prefix}.{name}' if prefix else name, remove_duplicate, memo)


class _TiedConvTranspose1d(_TorchLikeModule):
  pass


_TiedConvTranspose1d.__name__ = 'ConvTranspose1d'


def test_a_module_registered_twice_is_read_as_its_kind_under_both_names():
  # torch's named_modules lists a module once: its second name (m.dec = m.enc) had no kind,
  # so a ConvTranspose1d was guessed a Conv1d there, with no arguments.
  sd = _wn_state('', (6, 4, 3))
  layer = _TiedConvTranspose1d(state={k.lstrip('.'): v for k, v in sd.items()})
  layer.__dict__.update(
    stride=(2,), padding=(1,), dilation=(1,), groups=1, output_padding=(1,), padding_mode='zeros'
  )
  hook = type('WeightNorm', (), {})()
  hook.name, hook.dim = 'weight', 0
  layer._forward_pre_hooks = {0: hook}
  model = _TorchLikeModule({'enc': layer, 'dec': layer})
  layers = wt.from_torch(model)
  assert layers['dec'].kind == layers['enc'].kind == 'ConvTranspose1d'
  assert layers['dec'].args == layers['enc'].args and layers['dec'].args['stride'] == (2,)


def test_a_plain_tensor_named_weight_v_is_not_taken_for_weight_norm():
  # A module's own weight_v (an attention's q / k / v matrices) read as half of a legacy
  # weight norm: "'attn.weight_g' is missing", whatever drop= or rules= said.
  rng = np.random.default_rng(0)
  qkv = {f'weight_{n}': rng.normal(size=(4, 4)).astype(np.float32) for n in 'qkv'}
  out = _wn_state('', (4, 4))
  model = _FakeModule(
    {
      'attn': _FakeModule(state=qkv),
      'out': _wn_fake(Linear, out['.weight_v'], out['.weight_g'], style='legacy'),
    }
  )
  model._children['out']._state['bias'] = out['.bias']
  params = wt.to_linen(model)['params']  # the module tells which tensors are weight-normed
  np.testing.assert_array_equal(params['attn']['weight_v'], qkv['weight_v'])
  assert set(params['out']) == {'kernel', 'scale', 'bias'}
  sd = model.state_dict()  # a bare state dict cannot tell: drop= leaves them out
  with pytest.raises(ValueError, match=r"'attn.weight_g'.*pass the torch module.*drop="):
    wt.to_linen(sd)
  assert set(wt.to_linen(sd, drop=r'attn\..*')['params']) == {'out'}
  # The layers route back: like's own weight_v was taken for a layer the export lacked.
  layers = wt.from_torch(model)
  assert set(layers) == {'out'}
  back = wt.to_torch(layers, like=model)
  assert list(back) == list(sd)
  np.testing.assert_array_equal(back['attn.weight_v'], qkv['weight_v'])
  np.testing.assert_array_equal(back['out.weight_v'], sd['out.weight_v'])


def test_to_torch_refuses_tree_entries_like_has_no_place_for():
  # A layer that like lacks (a head added in Flax, or like of another model) was left out of
  # the result without a word: loading it gave a model without the trained weights.
  like = {**_wn_state('a', (3, 4)), 'b.weight': np.ones((2, 3), np.float32)}
  tree = wt.to_linen(like)
  extra = {'params': {**tree['params'], 'head': {'kernel': np.ones((3, 5), np.float32)}}}
  with pytest.raises(ValueError, match=r"\['params/head/kernel'\].*like's state dict has no"):
    wt.to_torch(extra, like=like)
  renamed = {'params': {'b': tree['params']['b'], 'aa': tree['params']['a']}}  # a misspelling
  with pytest.raises(ValueError, match=r"lacks \['params/a/kernel'.*holds \['params/aa/bias'"):
    wt.to_torch(renamed, like=like)
  nnx_tree = wt.to_nnx(like)
  with pytest.raises(ValueError, match=r"\['head/kernel'\]"):
    wt.to_torch({**nnx_tree, 'head': {'kernel': np.ones((3, 5), np.float32)}}, like=like)
  # Not extra: NNX's RNG state (a Dropout's key and count), and what drop= keeps from like.
  rngs = {'rngs': {'count': np.uint32(0), 'key': jax.random.key(0)}}
  back = wt.to_torch({**nnx_tree, 'dropout': rngs}, like=like)
  assert list(back) == list(like)
  kept = wt.to_torch(tree, like=like, drop=r'b\..*')
  np.testing.assert_array_equal(kept['b.weight'], like['b.weight'])
  # A key of the user's own beside a Flax-only entry: only the key (and an RNG stream's count
  # beside it) is exempt, not its siblings, which were left out without a word.
  own = {**nnx_tree, 'noise_key': jax.random.key(3), 'temperature': np.ones(())}
  with pytest.raises(ValueError, match=r"\['temperature'\]"):
    wt.to_torch(own, like=like)


class _Body(nn.Module):
  def setup(self):
    self.body = nn.Sequential([wn_linen.WNDense(3), nn.relu, wn_linen.WNDense(2)])

  def __call__(self, x):
    return self.body(x)


def test_linen_sequential_of_sequentials_at_the_root():
  # torch's 0.0 became linen's '0_0', whose leading 0 was read as a module name.
  sd = _wn_state('0.0', (6, 4))
  model = nn.Sequential([nn.Sequential([wn_linen.WNDense(6)])])
  x = np.ones((1, 4), np.float32)
  variables = wt.to_linen(sd, twin=(model, x))
  assert set(variables['params']['layers_0']['layers_0']) == {'kernel', 'scale', 'bias'}
  back = wt.to_torch(variables, like=sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


@pytest.mark.parametrize('nested', [False, True])
def test_linen_sequential_takes_torch_sequential_children(nested):
  # torch's nn.Sequential names its children 0, 1, ...; linen's names them layers_0, layers_1,
  # ... The children went to '0' (or 'body_0'), which the twin refused, and to_torch could not
  # read them back from a linen nn.Sequential's variables.
  prefix = 'body.' if nested else ''
  sd = {**_wn_state(f'{prefix}0', (3, 4)), **_wn_state(f'{prefix}2', (2, 3), seed=1)}
  model = _Body() if nested else nn.Sequential([wn_linen.WNDense(3), nn.relu, wn_linen.WNDense(2)])
  x = np.ones((1, 4), np.float32)
  variables = wt.to_linen(sd, twin=(model, x))
  params = variables['params']['body'] if nested else variables['params']
  assert set(params) == {'layers_0', 'layers_2'}
  np.testing.assert_array_equal(params['layers_2']['kernel'], sd[f'{prefix}2.weight_v'].T)
  model.apply(variables, x)
  back = wt.to_torch(variables, like=sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


def test_a_twin_of_other_sizes_is_told_so():
  # Misleading hints: a channels-last input was blamed as channels-first where the kernel size
  # differed; a bias torch lacks was blamed on submodule names; a bias of another size was
  # sent to rules=.
  rng = np.random.default_rng(0)
  sd = {**_wn_state('c', (8, 4, 3)), 'l.weight': rng.normal(size=(2, 8)).astype(np.float32)}

  def twin(kernel_size=3, features=8, use_bias=True):
    class Model(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = wn_linen.WNConv(features, (kernel_size,), use_bias=use_bias, name='c')(x)
        return nn.Dense(2, use_bias=False, name='l')(x)

    return Model()

  x = np.ones((1, 3, 4), np.float32)  # channels-last, 3 steps of 4 channels
  with pytest.raises(ValueError, match=r"'params/c'.*another size.*kernel_size") as info:
    wt.to_linen(sd, twin=(twin(kernel_size=4), x))
  assert 'channels-last' not in str(info.value) and 'rules=' not in str(info.value)
  with pytest.raises(ValueError, match=r"'params/c'.*another size") as info:
    wt.to_linen(sd, twin=(twin(features=6), x))
  assert 'rules=' not in str(info.value)
  no_bias = {k: v for k, v in sd.items() if k != 'c.bias'}
  with pytest.raises(ValueError, match=r"'params/c'.*use_bias=False") as info:
    wt.to_linen(no_bias, twin=(twin(), x))
  assert 'submodules' not in str(info.value)
  with pytest.raises(ValueError, match=r"'params/c'.*use_bias=True") as info:
    wt.to_linen(sd, twin=(twin(use_bias=False), x))
  assert 'submodules' not in str(info.value)


def test_to_nnx_takes_a_twin_with_rng_state():
  # A Dropout's RNG stream (its key and count) has no torch tensor: the twin check called it
  # missing, so no model with a Dropout could be ported with twin= or template=.
  from flax import nnx

  from wn_jax import nnx as wx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc = wx.WNLinear(4, 3, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)

  sd = _wn_state('fc', (3, 4))
  model = Net(nnx.Rngs(0))
  tree = wt.to_nnx(sd, twin=model)
  assert set(tree) == {'fc'}
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, tree)
  nnx.update(model, state)
  np.testing.assert_array_equal(model.fc.kernel[...], sd['fc.weight_v'].T)
  back = wt.to_torch(nnx.state(model), like=sd)
  np.testing.assert_array_equal(back['fc.weight_v'], sd['fc.weight_v'])


class Conv1d(_FakeModule):
  pass


def _fake_conv1d(seed, **args):
  """A weight-normed Conv1d(4, 4, 3) of the given torch arguments, duck typed."""
  rng = np.random.default_rng(seed)
  module = _wn_fake(
    Conv1d, rng.normal(size=(4, 4, 3)).astype(np.float32), np.ones((4, 1, 1), np.float32)
  )
  base = dict(stride=(1,), padding=(0,), dilation=(1,), groups=1, padding_mode='zeros')
  module.__dict__.update({**base, **args})
  return module


def test_the_twin_check_compares_conv_arguments():
  # A twin that forgot a dilation or reflect padding passed (the shapes match) and computed
  # 25-87% off PyTorch: the module tells its arguments, and the twin's are now checked. A
  # padding alone warns: a model may pad around the conv itself (F.pad, a slice after it).
  model = _FakeModule(
    {
      'c': _fake_conv1d(0, padding=(2,), dilation=(2,)),
      'r': _fake_conv1d(1, padding=(1,), padding_mode='reflect'),
    }
  )

  def twin(c, r):
    class Twin(nn.Module):
      @nn.compact
      def __call__(self, x):
        conv = lambda name, kw: wn_linen.WNConv(4, (3,), use_bias=False, name=name, **kw)  # noqa: E731
        return conv('c', c)(x), conv('r', r)(x)

    return Twin()

  x = np.ones((1, 12, 4), np.float32)
  with pytest.raises(ValueError, match=r"'c'.*kernel_dilation=1 \(PyTorch: \(2,\)\): build"):
    wt.to_linen(model, twin=(twin({'padding': 'SAME'}, {'padding': 'REFLECT'}), x))
  with pytest.warns(UserWarning, match=r"'r'.*padding=\(\(1, 1\),\) \(PyTorch: 'REFLECT'\).*F.pad"):
    wt.to_linen(model, twin=(twin({'padding': 2, 'kernel_dilation': 2}, {'padding': [(1, 1)]}), x))
  # Equivalent spellings pass: an int, pairs, 'SAME' at stride 1.
  for c in ({'padding': 2, 'kernel_dilation': 2}, {'padding': 'SAME', 'kernel_dilation': (2,)}):
    variables = wt.to_linen(model, twin=(twin(c, {'padding': 'REFLECT'}), x))
  assert set(variables['params']) == {'c', 'r'}
  wt.to_linen(model, template=jax.eval_shape(twin({}, {}).init, jax.random.key(0), x))
  with pytest.raises(ValueError, match=r"'c'.*input_dilation=2 \(PyTorch: \(1,\)\)"):
    wt.to_linen(
      model,
      twin=(
        twin({'padding': 2, 'kernel_dilation': 2, 'input_dilation': 2}, {'padding': 'REFLECT'}),
        x,
      ),
    )
  # A strided conv, and a padding no Flax layer does (the model pads its input itself): the
  # twin's 'VALID' is the zero pads it means (it was refused as a name).
  strided = _FakeModule(
    {
      'c': _fake_conv1d(0, stride=(2,)),
      'r': _fake_conv1d(1, padding=(1,), padding_mode='replicate'),
    }
  )
  valid = {'strides': 2, 'padding': 'VALID'}
  assert set(wt.to_linen(strided, twin=(twin(valid, {'padding': 'VALID'}), x))['params']) == {
    'c',
    'r',
  }
  with pytest.warns(UserWarning, match=r"'r'.*padding=1 \(PyTorch: \(1,\), which no Flax"):
    wt.to_linen(strided, twin=(twin(valid, {'padding': 1}), x))


def test_a_sequential_twin_without_the_activations_is_told_to_keep_them():
  sd = {**_wn_state('0', (3, 4)), **_wn_state('2', (2, 3), seed=1)}  # Linear, ReLU, Linear
  twin = nn.Sequential([wn_linen.WNDense(3), wn_linen.WNDense(2)])
  with pytest.raises(ValueError, match=r"child i is a Flax Sequential's layers_i.*activations"):
    wt.to_linen(sd, twin=(twin, np.ones((1, 4), np.float32)))


def test_a_twin_with_flax_automatic_names_is_told_to_name_its_layers():
  # A linen nn.Sequential built inside @nn.compact: its layers are the parent's, named by
  # class (WNDense_0, Dense_0), not net_0 / net_2; the hint only said to name submodules.
  sd = {**_wn_state('net.0', (3, 4)), 'net.2.weight': np.ones((2, 3), np.float32)}
  sd['net.2.bias'] = np.zeros(2, np.float32)

  class Twin(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Sequential([wn_linen.WNDense(3), nn.relu, nn.Dense(2)])(x)

  with pytest.raises(ValueError, match=r"'Dense_0', 'WNDense_0'.*Flax's own names.*name="):
    wt.to_linen(sd, twin=(Twin(), np.ones((1, 4), np.float32)))


def test_a_plain_layer_in_a_sequential_twin_is_told_to_be_a_wn_layer():
  # Inside a Sequential the hint to build a WN layer was lost (the weight-normed layers'
  # paths were not moved to the Sequential's names).
  sd = _wn_state('0', (3, 4))
  with pytest.raises(ValueError, match=r"'params/layers_0' with a WN layer"):
    wt.to_linen(sd, twin=(nn.Sequential([nn.Dense(3)]), np.ones((1, 4), np.float32)))


def test_the_twin_check_compares_plain_conv_arguments():
  # A plain (not weight-normed) conv's reflect padding forgotten in the twin passed, 57% off.
  rng = np.random.default_rng(0)
  plain = Conv1d(state={'weight': rng.normal(size=(4, 4, 3)).astype(np.float32)})
  plain.__dict__.update(stride=(1,), padding=(1,), dilation=(1,), groups=1, padding_mode='reflect')
  model = _FakeModule({'p': plain})

  def twin(padding):
    class Twin(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Conv(4, (3,), padding=padding, use_bias=False, name='p')(x)

    return Twin()

  x = np.ones((1, 12, 4), np.float32)
  with pytest.warns(
    UserWarning, match=r"'p': the twin's Conv has padding=1 \(PyTorch: 'REFLECT'\)"
  ):
    wt.to_linen(model, twin=(twin(1), x))
  assert set(wt.to_linen(model, twin=(twin('REFLECT'), x))['params']) == {'p'}


class ConvTranspose1dPlain(_FakeModule):
  pass


ConvTranspose1dPlain.__name__ = 'ConvTranspose1d'


def test_a_plain_conv_transpose_twin_needs_transpose_kernel():
  # A plain ConvTranspose twin left at Flax's transpose_kernel=False fits a torch
  # ConvTranspose1d(6, 6, ...) by shape and computed 134% off: refused, as for WN layers.
  rng = np.random.default_rng(0)
  up = ConvTranspose1dPlain(state={'weight': rng.normal(size=(6, 6, 4)).astype(np.float32)})
  up.__dict__.update(
    stride=(2,), padding=(1,), dilation=(1,), groups=1, output_padding=(0,), padding_mode='zeros'
  )
  model = _FakeModule({'up': up})
  kw = wt.conv_kwargs('ConvTranspose1d', 4, stride=2, padding=1)

  def twin(transpose_kernel):
    class Twin(nn.Module):
      @nn.compact
      def __call__(self, x):
        args = {**kw, 'transpose_kernel': transpose_kernel}
        return nn.ConvTranspose(6, use_bias=False, name='up', **args)(x)

    return Twin()

  x = np.ones((1, 10, 6), np.float32)
  with pytest.raises(ValueError, match=r"'up'.*transpose_kernel=False.*transpose_kernel=True"):
    wt.to_linen(model, twin=(twin(False), x))
  assert set(wt.to_linen(model, twin=(twin(True), x))['params']) == {'up'}


class _Unsaved(_FakeModule):
  """A module with a buffer registered persistent=False: listed by named_buffers, not saved."""

  def __init__(self, children=(), state=None, unsaved=None):
    super().__init__(children, state)
    self._unsaved = dict(unsaved or {})

  def named_buffers(self):
    yield from super().named_buffers()
    yield from self._unsaved.items()


def test_a_non_persistent_torch_buffer_the_twin_holds_is_named():
  # The twin's variable for a torch buffer registered persistent=False (not in the state dict)
  # was blamed on submodule names.
  from flax import nnx

  from wn_jax import nnx as wx

  model = _Unsaved(
    {'fc': _wn_fake(Linear, np.ones((3, 4), np.float32), np.ones((3, 1), np.float32))},
    unsaved={'window': np.ones(4, np.float32)},
  )

  class Net(nnx.Module):
    def __init__(self):
      self.fc = wx.WNLinear(4, 3, use_bias=False, rngs=nnx.Rngs(0))
      self.window = nnx.Variable(np.ones(4, np.float32))

  with pytest.raises(ValueError, match=r"\['window'\].*persistent=False.*set them by hand") as info:
    wt.to_nnx(model, twin=Net())
  assert 'submodules' not in str(info.value)


def test_a_module_with_two_weight_norm_pairs_or_a_plain_weight_beside_one_is_refused():
  # Found by a user: with both key styles on one module, the legacy pair was loaded and the
  # other dropped, silently (to_linen kept it as stray parametrizations leaves); a plain
  # 'weight' beside a pair raised "'a.kernel' and 'a.weight' both convert", naming a key the
  # state dict does not have. PyTorch's weight norm keeps one pair, and no plain weight.
  rng = np.random.default_rng(0)
  legacy = {'a.weight_g': rng.normal(size=(3, 1)), 'a.weight_v': rng.normal(size=(3, 2))}
  legacy = {k: v.astype(np.float32) for k, v in legacy.items()}
  both = {
    **legacy,
    'a.parametrizations.weight.original0': legacy['a.weight_g'],
    'a.parametrizations.weight.original1': legacy['a.weight_v'],
  }
  plain = {**legacy, 'a.weight': legacy['a.weight_v']}
  half = {k: v for k, v in both.items() if not k.endswith('original1')}
  styles = r"'a' has keys of both weight-norm styles, \['a.weight_g', 'a.weight_v', 'a.param"
  for sd, match in (
    (both, styles),
    (half, styles),
    (plain, r"'a.weight' is beside the weight-normed pair 'a.weight_g', 'a.weight_v'"),
  ):
    for convert in (wt.find_prefixes, wt.from_torch, wt.to_linen):
      with pytest.raises(ValueError, match=match):
        convert(sd)
  # drop= takes the keys that are not the weight, or the whole layer, before the check.
  expected = wt.to_linen(legacy)
  for sd, drop in (
    (both, r'a\.parametrizations\..*'),
    (half, r'.*original0'),
    (plain, r'a\.weight'),
  ):
    assert_trees_equal(wt.to_linen(sd, drop=drop), expected)
    assert wt.to_nnx(sd, drop=r'a\..*') == {}


def test_a_decompose_pattern_that_matches_no_plain_layer_says_so():
  # Found by a user: decompose='^zzz' said "no weight-normed layer in this checkpoint ...
  # converts with decompose=True", where the pattern matched nothing.
  sd = {'fc.weight': np.ones((3, 5), np.float32), 'head.weight': np.ones((2, 3), np.float32)}
  with pytest.raises(ValueError, match=r"decompose='\^zzz' matches no plain.*\['fc', 'head'\]"):
    wt.from_torch(sd, decompose='^zzz')
  assert set(wt.from_torch(sd, decompose='^fc')) == {'fc'}


def test_a_module_that_says_what_it_weight_norms_is_not_refused_a_second_weight():
  # Found by a review: the second-weight refusal overruled the module. An attention's own
  # weight, weight_g (a gate) and weight_v (values), no weight norm, was refused (it converted
  # before); beside a parametrized weight, its weight_v took the style and was refused.
  class Attention(_FakeModule):
    pass

  f = lambda *s: np.ones(s, np.float32)
  own = Attention(state={'weight': f(8, 8), 'weight_g': f(8, 8), 'weight_v': f(8, 8)})
  assert sorted(wt.to_linen(_FakeModule({'attn': own}))['params']['attn']) == [
    'weight',
    'weight_g',
    'weight_v',
  ]
  v = np.arange(16, dtype=np.float32).reshape(2, 8) + 1
  g = np.linalg.norm(v, axis=1, keepdims=True)
  both = Attention(state={'weight_v': f(8, 8)})
  both.parametrizations = types.SimpleNamespace(weight=[_WeightNorm(0)])
  both._children = {
    'parametrizations': _FakeModule({'weight': _FakeModule(state={'original0': g, 'original1': v})})
  }
  layer = wt.from_torch(_FakeModule({'attn': both}))['attn']
  assert layer.style == 'parametrization' and sorted(layer.params) == ['weight', 'weight_scale']
  np.testing.assert_allclose(np.ravel(layer.params['weight_scale']), np.ravel(g), rtol=1e-6)
  converted = wt.to_linen(_FakeModule({'attn': both}))['params']['attn']
  assert sorted(converted) == ['weight', 'weight_scale', 'weight_v']  # weight_v kept as it is
  with pytest.raises(ValueError, match='has keys of both weight-norm styles.*pass the torch'):
    wt.to_linen(both.state_dict())  # no module to say which: refused
  # Its own complete pair (a gate weight_g and weight_v) beside the parametrization: the
  # module's style wins (the first pair in key order took it, silently, with the gate as g).
  both._state['weight_g'] = f(8, 8)
  layer = wt.from_torch(_FakeModule({'attn': both}))['attn']
  assert layer.style == 'parametrization'
  np.testing.assert_allclose(np.ravel(layer.params['weight_scale']), np.ravel(g), rtol=1e-6)


def test_drop_of_half_a_pair_drops_the_whole_layer_whatever_its_tensor():
  # Found by a review: with the second-weight check after drop=, half of a dropped
  # weight_hh_l0 pair (a tensor not named weight) was no longer seen as a pair, and its other
  # half became a plain leaf; a weight's pair went whole.
  f = lambda *s: np.ones(s, np.float32)
  for a, b in (('weight_hh_l0_g', 'weight_hh_l0_v'), ('weight_g', 'weight_v')):
    sd = {f'm.{a}': f(12, 1), f'm.{b}': f(12, 3), 'm.weight_ih_l0': f(12, 2)}
    assert sorted(wt.to_linen(sd, drop=rf'm\.{a}')['params']['m']) == ['weight_ih_l0']
  # A whole pair taken drops its layer whole too, bias included (the bias was left alone).
  sd = {'c.bias': f(4), 'c.weight_g': f(4, 1), 'c.weight_v': f(4, 3), 'd.weight': f(2, 4)}
  for drop in (r'c\.weight_g', r'c\.weight_[gv]'):
    assert sorted(wt.to_linen(sd, drop=drop)['params']) == ['d']


def test_spectral_norms_weight_v_is_not_half_a_weight_norm_pair():
  # Found by a review: torch.nn.utils.spectral_norm keeps weight_orig and the buffers weight_u,
  # weight_v (HiFi-GAN's DiscriminatorS, beside weight-normed layers); as a bare state dict,
  # its weight_v was taken for half a weight-norm pair ("'sn.weight_g' is missing").
  f = lambda *s: np.ones(s, np.float32)
  sd = {
    'sn.bias': f(4),
    'sn.weight_orig': f(4, 3, 2),
    'sn.weight_u': f(4),
    'sn.weight_v': f(6),
    'wn.bias': f(4),
    'wn.weight_g': f(4, 1, 1),
    'wn.weight_v': f(4, 3, 2),
  }
  assert wt.find_prefixes(sd) == {'wn': 'legacy'}
  params = wt.to_linen(sd)['params']
  assert sorted(params['sn']) == ['bias', 'weight_orig', 'weight_u', 'weight_v']
  assert sorted(params['wn']) == ['bias', 'kernel', 'scale']


@pytest.mark.parametrize('dtype', [np.int64, np.uint64])
def test_a_64_bit_integer_beyond_32_bits_needs_x64(dtype):
  # A buffer of 2**40 (a seed, a step count) was wrapped to int32 silently and went back wrong.
  sd = {**_root_sd(), 'seed': np.array([2**40 + 1, 5], dtype)}
  for convert in (wt.to_linen, wt.to_nnx):
    with pytest.raises(ValueError, match=rf"'seed' is {np.dtype(dtype)}.*32.*x64.*drop="):
      convert(sd)
  variables = wt.to_linen(sd, drop='seed')  # left out, and back from like
  assert np.array_equal(wt.to_torch(variables, like=sd, drop='seed')['seed'], sd['seed'])
  small = {**_root_sd(), 'seed': np.array([3, -5 if dtype == np.int64 else 5], dtype)}
  variables = wt.to_linen(small)  # in range: 32 bits hold it, as before
  _same_state_dict(wt.to_torch(variables, like=small), small)


def test_a_64_bit_integer_beyond_32_bits_goes_both_ways_with_x64(x64):
  sd = {**_root_sd(), 'seed': np.array([2**40 + 1, -(2**35)], np.int64)}
  variables = wt.to_linen(sd)
  assert variables['params']['seed'].dtype == np.int64
  _same_state_dict(wt.to_torch(variables, like=sd), sd)


@pytest.mark.parametrize('prefix', ['fc.', ''])
@pytest.mark.parametrize('state', [['1.alpha'], ['1._u', '1._v']])
def test_a_state_dict_with_another_parametrization_after_weight_norm_is_refused(prefix, state):
  # weight_norm then a learned scale (or spectral_norm): the module was refused, its state dict
  # converted silently without the second parametrization (outputs 17-20% off).
  sd = _wn_state(prefix.rstrip('.'), (4, 3))
  sd = {
    k.lstrip('.').replace('weight_g', 'parametrizations.weight.original0'): v for k, v in sd.items()
  }
  sd = {k.replace('weight_v', 'parametrizations.weight.original1'): v for k, v in sd.items()}
  sd.update({f'{prefix}parametrizations.weight.{k}': np.ones((4, 1), np.float32) for k in state})
  name = repr(prefix.rstrip('.')) if prefix else 'the module'
  match = rf'{name}: its .weight. has .*parametrizations\.weight\.1\..*remove_parametrizations'
  for convert in (wt.from_torch, wt.find_prefixes, wt.to_linen, wt.to_nnx):
    with pytest.raises(ValueError, match=match):
      convert(sd)
  if prefix:  # the whole layer dropped: nothing of it converts, nothing is refused
    assert 'fc' not in wt.to_linen({**sd, 'b': np.ones(2, np.float32)}, drop=r'fc\..*')['params']


@pytest.mark.parametrize('style', ['legacy', 'parametrization'])
def test_a_weight_normed_bias_is_refused(style):
  # weight_norm(m, name='bias'): its v took the name of the layer's plain bias (a twin's WNDense
  # read the direction as the bias) and to_torch could not give it back.
  rng = np.random.default_rng(0)
  v, g = rng.normal(size=4).astype(np.float32), np.full(4, 2.0, np.float32)
  sd = {**_wn_state('fc', (4, 3)), 'fc.bias_g': g, 'fc.bias_v': v}
  del sd['fc.bias']
  module = _FakeModule({'fc': _wn_fake(Linear, v, g, name='bias', style=style)})
  if style == 'parametrization':
    sd = {k.replace('bias_g', 'parametrizations.bias.original0'): a for k, a in sd.items()}
    sd = {k.replace('bias_v', 'parametrizations.bias.original1'): a for k, a in sd.items()}
  match = r"'fc\.bias' is weight-normed.*not convert.*remove_weight_norm.*drop="
  for source in (sd, module):
    for convert in (wt.from_torch, wt.to_linen, wt.to_nnx, wt.layer_axes):
      with pytest.raises(ValueError, match=match):
        convert(source)
  drop = r'fc\.(bias_[gv]|parametrizations\.bias\..*)'
  variables = wt.to_linen(sd, drop=drop)  # left out: the layer has no bias in Flax
  assert sorted(variables['params']['fc']) == ['kernel', 'scale']
  _same_state_dict(wt.to_torch(variables, like=sd, drop=drop), sd)


def test_extra_state_is_refused_and_goes_back_from_like_as_it_is():
  # get_extra_state()'s object under '_extra_state': a raw AttributeError ('dict' object has no
  # attribute 'shape'), or, from a state dict, "linen variables or an NNX pure dict?"; with drop=
  # to_torch gave it back as a 0-d NumPy object array, which set_extra_state got.
  extra = {'version': 2, 'calib': [1.0, 2.0]}
  rng = np.random.default_rng(0)
  v, g = rng.normal(size=(4, 3)).astype(np.float32), np.ones((4, 1), np.float32)
  model = _FakeModule({'fc': _wn_fake(Linear, v, g)}, state={'_extra_state': extra})
  sd = {**_root_sd(), 'fc._extra_state': extra}
  for source, key in ((model, '_extra_state'), (sd, 'fc._extra_state')):
    for convert in (wt.to_linen, wt.to_nnx):
      with pytest.raises(ValueError, match=rf"'{key}' holds a dict.*get_extra_state.*drop="):
        convert(source)
    drop = r'(.*\.)?_extra_state'
    back = wt.to_torch(wt.to_linen(source, drop=drop), like=source, drop=drop)
    assert back[key] is extra  # like's object as it is, for set_extra_state
    assert wt.to_torch(wt.from_torch(source), like=source)[key] is extra
  # A review trial: another key's message spoke of set_extra_state too.
  with pytest.raises(ValueError, match=r"'lr' holds a float, not an array.*as it is\.$"):
    wt.to_linen({**_root_sd(), 'lr': 0.1})


class ScriptModule(_FakeModule):  # torch.jit's base class, as its subclasses have it
  pass


class RecursiveScriptModule(ScriptModule):
  pass


def test_a_torchscript_module_is_refused():
  # A traced or scripted module's submodules say no kind and no weight norm: to_linen gave
  # weight_g / weight_v as plain tensors and Linear weights untransposed, silently, or crashed.
  sd = _root_sd()
  scripted = RecursiveScriptModule(state=sd)
  match = r'TorchScript module \(RecursiveScriptModule.*original torch module.*state_dict\(\)'
  for convert in (wt.from_torch, wt.to_linen, wt.to_nnx, wt.layer_axes):
    with pytest.raises(ValueError, match=match):
      convert(scripted)
  # A review trial: one inside an ordinary module was read, silently wrong.
  holder = _FakeModule(children={'b': RecursiveScriptModule(state=sd)})
  with pytest.raises(ValueError, match=r"TorchScript module at 'b' \(RecursiveScriptModule"):
    wt.to_linen(holder)
  # One holding no tensors (a scripted activation) reads nothing wrong, and converted before.
  holder = _FakeModule(children={'act': RecursiveScriptModule()}, state=sd)
  assert_trees_equal(wt.to_linen(holder), wt.to_linen(sd))
  variables = wt.to_linen(dict(scripted.state_dict()))  # its state dict converts
  for tree in (variables, wt.from_torch(sd)):
    with pytest.raises(ValueError, match=match):
      wt.to_torch(tree, like=scripted)


class _MetaTensor:
  """What wn_jax sees of a torch tensor on the meta device: a shape and a dtype, no data."""

  is_meta = True

  def __init__(self, a):
    self.shape, self.dtype = a.shape, a.dtype

  def detach(self):
    raise NotImplementedError('Cannot copy out of meta tensor; no data!')

  def new_zeros(self, shape, device):
    return np.zeros(shape, self.dtype)

  def new_tensor(self, value, device=None):
    assert device == 'cpu'  # a meta tensor's new_tensor is meta: no data again
    return np.asarray(value).astype(self.dtype)

  clone = detach

  def data_ptr(self):
    return 0  # every meta tensor's: not a shared storage

  def numel(self):
    return int(np.prod(self.shape))

  def stride(self):
    return ()


def test_a_meta_like_needs_no_values_and_a_meta_source_is_refused():
  # like on the meta device (the skeleton of load_state_dict(assign=True)) crashed: its values
  # were read, though to_torch needs only its keys, shapes and dtypes.
  sd = {**_root_sd(), 'fc2.weight': np.ones((2, 4), np.float32)}
  meta = {k: _MetaTensor(v) for k, v in sd.items()}
  variables = wt.to_linen(sd)
  _same_state_dict(wt.to_torch(variables, like=meta), sd)
  assert wt.layer_axes(meta) == {'fc': -1}  # shapes only
  with pytest.raises(ValueError, match=r"like's \['fc2.weight'\] are on the meta device.*values"):
    wt.to_torch(variables, like=meta, drop=r'fc2\..*')  # copied from like: it has nothing
  with pytest.raises(ValueError, match=r"like's \['mean', 'fc2.weight'\] are on the meta device"):
    wt.to_torch(wt.from_torch(sd), like=meta)
  for convert in (wt.to_linen, wt.to_nnx, wt.from_torch):
    with pytest.raises(ValueError, match=r"'mean' and 4 more are on the meta device.*no values"):
      convert(meta)


def test_a_meta_like_module_with_torch():
  torch = pytest.importorskip('torch')
  wn = torch.nn.utils.parametrizations.weight_norm
  model = torch.nn.Sequential(wn(torch.nn.Linear(3, 4)), torch.nn.LayerNorm(4))
  with torch.device('meta'):
    skeleton = torch.nn.Sequential(wn(torch.nn.Linear(3, 4)), torch.nn.LayerNorm(4))
  skeleton.load_state_dict(wt.to_torch(wt.to_linen(model), like=skeleton), assign=True)
  x = torch.ones(2, 3)
  assert torch.equal(skeleton(x), model(x))


class DataParallel(_FakeModule):  # torch's wrappers, as wn_jax sees them: the model in .module
  pass


class OptimizedModule(_FakeModule):  # torch.compile's: the model in ._orig_mod
  pass


@pytest.mark.parametrize('cls, attr', [(DataParallel, 'module'), (OptimizedModule, '_orig_mod')])
def test_a_wrapped_module_is_unwrapped_and_a_wrapped_state_dict_is_named(cls, attr):
  # torch.compile's '_orig_mod.' and DataParallel's 'module.' became Flax module names: the
  # twin of the plain model was refused, and the error did not say why.
  rng = np.random.default_rng(0)
  v, g = rng.normal(size=(4, 3)).astype(np.float32), np.ones((4, 1), np.float32)
  inner = _FakeModule({'fc': _wn_fake(Linear, v, g)})
  wrapper = cls({attr: inner})
  setattr(wrapper, attr, inner)
  variables = wt.to_linen(inner)
  assert_trees_equal(wt.to_linen(wrapper, template=variables), variables)
  assert list(wt.from_torch(wrapper)) == ['fc'] and wt.layer_axes(wrapper) == {'fc': -1}
  sd = wrapper.state_dict()
  # back with the wrapper's keys; a review trial: from the wrapper's own state dict too (its
  # names hold the prefix), which round-tripped before the wrappers were unwrapped
  for tree in (variables, wt.from_torch(inner), wt.to_linen(sd), wt.from_torch(sd)):
    back = wt.to_torch(tree, like=wrapper)
    assert list(back) == list(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  hint = rf"every key of the state dict starts with '{attr}\.'.*strip it"
  with pytest.raises(ValueError, match=hint):
    wt.to_linen(sd, template=variables)
  with pytest.raises(ValueError, match=rf"Every key of like.*starts with '{attr}\.'"):
    wt.to_torch(variables, like=sd)


@pytest.mark.parametrize('convert', ['from_torch', 'to_linen', 'to_nnx'])
def test_a_training_checkpoint_is_told_to_pass_its_model_state_dict(convert):
  # {'model': state_dict, 'optimizer': ..., 'epoch': 3} was taken for linen variables, and sent
  # to to_torch, the other direction.
  ckpt = {'model': _root_sd(), 'optimizer': {'state': {}}, 'epoch': 3}
  with pytest.raises(ValueError, match=r"training checkpoint.*ckpt\['model'\]"):
    getattr(wt, convert)(ckpt)
  # A review trial: with the optimizer first, the old guess came back.
  with pytest.raises(ValueError, match=r"training checkpoint.*ckpt\['model'\]"):
    getattr(wt, convert)({'optimizer': {'state': {}}, 'model': _root_sd()})
  with pytest.raises(ValueError, match=r"training checkpoint.*ckpt\['model'\]"):  # not 'ema'
    getattr(wt, convert)({'ema': _root_sd(), 'model': _root_sd()})


def test_a_parametrized_weight_v_of_legacy_weight_norm_is_named():
  # weight_norm, then a parametrization on weight_v: "'weight_v' is missing ... pass the torch
  # module", though the module was passed.
  rng = np.random.default_rng(0)
  v, g = rng.normal(size=(4, 3)).astype(np.float32), np.ones((4, 1), np.float32)
  fc = _wn_fake(Linear, v, g, style='legacy')
  del fc._state['weight_v']
  fc._children = {'parametrizations': _FakeModule({'weight_v': _FakeModule(state={'original': v})})}
  fc.parametrizations = types.SimpleNamespace(weight_v=[_Double(None)])
  match = r"'fc.weight_v' is itself parametrized \(keys \['fc.parametrizations.weight_v.original'\]"
  for convert in (wt.from_torch, wt.to_linen):
    with pytest.raises(ValueError, match=match + r'.*remove_parametrizations'):
      convert(_FakeModule({'fc': fc}))


def test_a_rule_on_a_weight_normed_lstm_tensor_says_what_is_true():
  # The refusal said such keys "convert to kernel / scale"; an LSTM's keep their name and layout.
  sd = {
    'lstm.weight_hh_l0_g': np.ones((12, 1), np.float32),
    'lstm.weight_hh_l0_v': np.ones((12, 3), np.float32),
  }
  with pytest.raises(
    ValueError, match=r"\['weight_hh_l0', 'weight_hh_l0_scale'\].*not split.*remove_weight_norm"
  ):
    wt.to_linen(sd, rules={r'lstm\.weight_hh_l0_v': (np.asarray, np.asarray)})


def test_a_torch_module_dict_against_a_linen_dict_in_setup_is_told_so():
  # torch's nn.ModuleDict 'blocks.a' converts to 'blocks/a'; linen names a dict in setup
  # 'blocks_a'. The hint said only "name Flax submodules as the PyTorch ones".
  sd = {k.replace('fc.', 'blocks.a.'): v for k, v in _root_sd().items() if k != 'mean'}
  variables = wt.to_linen(sd)
  template = {'params': {'blocks_a': variables['params']['blocks']['a']}}
  with pytest.raises(ValueError, match=r"nn.ModuleDict.*'blocks_a'.*submodule named 'blocks'"):
    wt.to_linen(sd, template=template)
  # A review trial: under another module, the hint named that module ('0') as the parent.
  deep = {f'0.{k}': v for k, v in sd.items()}
  template = {'params': {'0': template['params']}}
  with pytest.raises(ValueError, match=r"'0/blocks/a'.*'0/blocks_a'.*submodule named 'blocks'"):
    wt.to_linen(deep, template=template)


def test_boxed_partitioned_variables_convert_both_ways():
  # Found by a user: a model sharded the Flax way (nn.with_partitioning) has its variables boxed
  # in nn.Partitioned; to_linen's twin= and template= then listed kernel/value as missing, and
  # to_torch said the tree lacked the kernel.
  part = nn.with_partitioning(nn.initializers.lecun_normal(), (None, 'model'))
  model = nn.Sequential([wn_linen.WNDense(16, kernel_init=part), nn.Dense(4, kernel_init=part)])
  x = np.ones((2, 8), np.float32)
  rng = np.random.default_rng(0)
  sd = {
    '0.weight_g': rng.random((16, 1), np.float32) + 0.5,
    '0.weight_v': rng.standard_normal((16, 8)).astype(np.float32),
    '0.bias': rng.standard_normal(16).astype(np.float32),
    '1.weight': rng.standard_normal((4, 16)).astype(np.float32),
    '1.bias': rng.standard_normal(4).astype(np.float32),
  }
  boxed = jax.eval_shape(model.init, jax.random.key(0), x)
  assert isinstance(boxed['params']['layers_0']['kernel'], nn.Partitioned)
  plain = wt.to_linen(sd, template=nn.unbox(boxed))
  for got in (wt.to_linen(sd, twin=(model, x)), wt.to_linen(sd, template=boxed)):
    np.testing.assert_array_equal(model.apply(got, x), model.apply(plain, x))
  boxed_values = jax.tree.map(
    lambda box, value: box.replace_boxed(value) if isinstance(box, nn.Partitioned) else value,
    model.init(jax.random.key(0), x),
    plain,
    is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned),
  )
  assert_trees_equal(wt.to_torch(boxed_values, like=sd), sd)


# A user trial of the port (v3): each finding reproduced first.


class _TorchDtype:
  def __init__(self, name):
    self.name = name

  def __repr__(self):
    return f'torch.{self.name}'


_TORCH_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'int16': np.int16}
_FAKE_TORCH = types.SimpleNamespace(**{name: _TorchDtype(name) for name in _TORCH_DTYPES})


class _Tensor:
  """What wn_jax sees of a CPU torch tensor, as torch 2.13 behaves: ``new_tensor`` copies a
  NumPy array keeping its strides (a transposed view stays one), and NumPy reads no bfloat16."""

  def __init__(self, a):
    self.a = a

  shape = property(lambda self: self.a.shape)
  dtype = property(
    lambda self: next(
      getattr(_FAKE_TORCH, n) for n, d in _TORCH_DTYPES.items() if self.a.dtype == d
    )
  )

  def detach(self):
    return self

  cpu = detach

  def numpy(self):
    if self.a.dtype == ml_dtypes.bfloat16:
      raise TypeError('Got unsupported ScalarType BFloat16')
    return self.a

  def float(self):
    return _Tensor(self.a.astype(np.float32))

  def view(self, dtype):
    return _Tensor(self.a.view(_TORCH_DTYPES[dtype.name]))

  def new_tensor(self, value, dtype=None, device=None):
    to = _TORCH_DTYPES[(dtype or self.dtype).name]
    return _Tensor(np.array(value, order='K').astype(to, order='K'))

  def is_contiguous(self):
    return self.a.flags.c_contiguous

  def clone(self):
    return _Tensor(self.a.copy())


def _plain_and_wn_sd():
  rng = np.random.default_rng(0)
  return {
    **_wn_state('a', (4, 3, 5)),
    'head.weight': rng.normal(size=(2, 4)).astype(np.float32),
    'conv.weight': rng.normal(size=(4, 4, 3)).astype(np.float32),
  }


def test_exported_torch_tensors_are_contiguous():
  # Found by a user trial: to_torch(..., like=module) gave plain Linear / Conv weights as
  # transposed views (torch.tensor keeps a NumPy array's strides); safetensors' save_file
  # refuses them. PyTorch's own state dict is contiguous.
  sd = _plain_and_wn_sd()
  like = {k: _Tensor(v) for k, v in sd.items()}
  for tree in (wt.to_linen(sd), wt.to_nnx(sd), wt.from_torch(sd, decompose=True)):
    back = wt.to_torch(tree, like=like)
    assert [k for k, t in back.items() if not t.is_contiguous()] == []
  assert_trees_equal({k: t.a for k, t in back.items()}, sd)  # the folded weights too, here


def test_bfloat16_torch_tensors_keep_every_bit(monkeypatch):
  # Found by a user trial: bfloat16 torch tensors went through float32 both ways; NumPy's cast
  # back dropped a NaN's payload, torch's turned NaN into 0xffff. Now 16-bit integer views.
  monkeypatch.setitem(sys.modules, 'torch', _FAKE_TORCH)  # where a torch tensor is, torch is
  sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in _plain_and_wn_sd().items()}
  sd['a.bias'] = np.array([0x7FC0, 0x7FC3, 0xFFC1, 0x0001], np.uint16).view(ml_dtypes.bfloat16)
  like = {k: _Tensor(v) for k, v in sd.items()}
  assert wt.from_torch(like)['a'].params['bias'].view(np.uint16).tolist() == [
    0x7FC0,
    0x7FC3,
    0xFFC1,
    0x0001,
  ]
  for tree in (wt.to_linen(like), wt.to_nnx(like), wt.from_torch(like)):
    back = wt.to_torch(tree, like=like)
    assert {k: str(t.dtype) for k, t in back.items()} == {k: 'torch.bfloat16' for k in sd}
    assert_trees_equal(
      {k: t.a.view(np.uint16) for k, t in back.items()},
      {k: v.view(np.uint16) for k, v in sd.items()},
    )


def test_dtype_takes_a_torch_dtype_and_refuses_a_non_floating_one():
  # Found by a user trial: dtype=torch.bfloat16 gave NumPy's bare TypeError.
  sd = _plain_and_wn_sd()
  params = lambda sd, **kw: {p: layer.params for p, layer in wt.from_torch(sd, **kw).items()}
  for convert in (wt.to_linen, wt.to_nnx, params):
    got = convert(sd, dtype=_FAKE_TORCH.bfloat16)
    assert {str(x.dtype) for x in jax.tree.leaves(got)} == {'bfloat16'}
    assert_trees_equal(got, convert(sd, dtype=ml_dtypes.bfloat16))
    for bad in (np.int32, 'torch.qint8', _FAKE_TORCH.int16):
      with pytest.raises(ValueError, match=rf'dtype= casts.*floating.*got {re.escape(repr(bad))}'):
        convert(sd, dtype=bad)


def test_find_prefixes_takes_what_from_torch_takes(tmp_path):
  # Found by a user trial: find_prefixes(module) raised torch's AttributeError, and
  # find_prefixes('m.safetensors') gave {}: it read its argument as a mapping.
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  rng = np.random.default_rng(0)
  out = _wn_state('', (4, 4))
  attn = {f'weight_{n}': rng.normal(size=(4, 4)).astype(np.float32) for n in 'gv'}
  model = _FakeModule(
    {
      'attn': _FakeModule(state=attn),  # its own weight_g / weight_v: no weight norm
      'out': _wn_fake(Linear, out['.weight_v'], out['.weight_g'], style='legacy'),
    }
  )
  assert wt.find_prefixes(model) == {'out': 'legacy'} == {p: 'legacy' for p in wt.from_torch(model)}
  wrapper = DataParallel({'module': model})
  wrapper.module = model
  assert wt.find_prefixes(wrapper) == {'out': 'legacy'}
  sd = _plain_and_wn_sd()
  path = tmp_path / 'model.safetensors'
  safetensors_numpy.save_file(sd, str(path))
  assert wt.find_prefixes(path) == wt.find_prefixes(str(path)) == wt.find_prefixes(sd)
  assert wt.find_prefixes(sd) == {'a': 'legacy'}
  with pytest.raises(ValueError, match=r'expected a state dict.*got int'):
    wt.find_prefixes(3)


class _UpTwin(nn.Module):
  @nn.compact
  def __call__(self, x):
    return wn_linen.WNConvTranspose(6, (3,), transpose_kernel=True, padding=[(2, 2)], name='up')(x)


def test_a_grouped_conv_transpose_is_refused_where_it_converts():
  # Found by a user trial: a ConvTranspose1d(4, 6, 3, groups=2) converted silently in to_linen
  # / from_torch, to a kernel (3, 3, 4) no Flax layer takes (Flax's ConvTranspose has no
  # groups); only TorchLayer.linen() refused, and a twin's error asked for another size.
  rng = np.random.default_rng(0)
  args = dict(stride=(1,), padding=(0,), dilation=(1,), groups=2, output_padding=(0,))
  v, g = rng.normal(size=(4, 3, 3)).astype(np.float32), np.ones((4, 1, 1), np.float32)
  normed = _wn_fake(ParametrizedConvTranspose1d, v, g)
  plain = ConvTranspose1dPlain(state={'weight': v})
  for layer in (normed, plain):
    layer.__dict__.update(args, padding_mode='zeros')
  x = np.ones((1, 5, 4), np.float32)
  twin = _UpTwin()  # the only WN twin there is, as in the trial
  message = r"'up': Flax's ConvTranspose has no groups.*groups=2.*only groups=1 converts"
  for model in (_FakeModule({'up': normed}), _FakeModule({'up': plain})):
    for convert in (wt.to_linen, wt.to_nnx, lambda m: wt.to_linen(m, twin=(twin, x))):
      with pytest.raises(ValueError, match=message):
        convert(model)
  with pytest.raises(ValueError, match=message):
    wt.from_torch(_FakeModule({'up': normed}))
  with pytest.raises(ValueError, match=message):
    wt.from_torch(_FakeModule({'up': plain}), decompose=True)
  with pytest.raises(ValueError, match=r"conv_kwargs: Flax's ConvTranspose has no groups"):
    wt.conv_kwargs('ConvTranspose1d', 3, groups=2)


def test_torch_layer_nnx_is_built_abstractly():
  # Found by a user trial: TorchLayer.nnx() ran every initializer, compiled for each new
  # shape (228 compiles, 71 s for 50 Conv1d layers), then overwrote the values.
  concrete = []

  def init(key, shape, dtype=jnp.float32):
    concrete.append(not isinstance(key, jax.core.Tracer))
    return jnp.zeros(shape, dtype)

  from tests.test_eager import count_compiles

  sd = _state_dict('conv1d')
  (layer,) = wt.from_torch(sd).values()
  nnx_layer = layer.nnx(padding=1, kernel_init=init, bias_init=init, scale_init=init)
  assert len(concrete) == 3 and not any(concrete)  # traced for the shapes, never run
  for name, value in layer.params.items():
    np.testing.assert_array_equal(getattr(nnx_layer, name)[...], value)
  x = _channels_last(ORACLE['conv1d:input'])
  _assert_matches_torch(nnx_layer(x), ORACLE['conv1d:output'])
  # Nothing compiles for a layer of a new shape (its parameters were copied by a program each).
  (odd,) = wt.from_torch(_wn_state('c', (13, 7, 5), seed=3)).values()
  with count_compiles() as seen:
    odd.nnx()
  assert seen == []


class _PlainTwinOfAWNTwin(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = wn_linen.WNConv(4, (3,), padding='VALID', name='c')(x)
    return wn_linen.WNDense(2, name='d')(x)


def test_a_wn_twin_of_a_plain_torch_layer_is_told_to_decompose():
  # Found by a user trial: a twin with WN layers where PyTorch's are plain (after
  # remove_weight_norm) was told to name the Flax submodules as PyTorch's, which they were.
  rng = np.random.default_rng(0)
  sd = {
    'c.weight': rng.normal(size=(4, 3, 3)).astype(np.float32),
    'c.bias': np.zeros(4, np.float32),
    'd.weight': rng.normal(size=(2, 4)).astype(np.float32),
    'd.bias': np.zeros(2, np.float32),
  }
  twin = (_PlainTwinOfAWNTwin(), np.ones((1, 7, 3), np.float32))
  with pytest.raises(ValueError, match=r"'params/c', 'params/d'.*plain.*decompose=True") as e:
    wt.to_linen(sd, twin=twin)
  assert 'name Flax submodules' not in str(e.value)
  assert set(wt.to_linen(sd, twin=twin, decompose=True)['params']['d']) == {
    'kernel',
    'scale',
    'bias',
  }


def test_a_plain_kernel_of_another_shape_is_named_by_its_tree_path():
  # Found by a user trial: a plain Dense kernel left in torch's layout, (2, 4) for (4, 2), got
  # "'head.weight': like has shape (2, 4), the converted value (4, 2)", the transposed value
  # and no tree path, as if the shapes agreed. A WN layer's kernel was named by its path.
  sd = _plain_and_wn_sd()
  for key, module, bad in [('head.weight', 'head', (2, 4)), ('conv.weight', 'conv', (4, 4, 4))]:
    tree = jax.tree.map(np.asarray, wt.to_linen(sd))
    want = tree['params'][module]['kernel'].shape
    tree['params'][module]['kernel'] = np.zeros(bad, np.float32)
    message = rf"params/{module}/kernel has shape {re.escape(str(bad))}, but like's '{key}' needs"
    with pytest.raises(ValueError, match=rf'{message} {re.escape(str(want))} \(in Flax layout\)'):
      wt.to_torch(tree, like=sd)
