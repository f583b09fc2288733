"""examples/port_codec.py against PyTorch's committed outputs (no torch needed), and back."""

import importlib.util
import json
import pathlib
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from tests import reference
from wn_jax import pytorch

ROOT = pathlib.Path(__file__).resolve().parent.parent
ORACLE = np.load(ROOT / 'tests' / 'data' / 'codec_oracle.npz')


def _example():
  """examples/port_codec.py, imported once."""
  if 'port_codec' not in sys.modules:
    spec = importlib.util.spec_from_file_location('port_codec', ROOT / 'examples' / 'port_codec.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules['port_codec'] = module  # its dataclass resolves annotations there
    spec.loader.exec_module(module)
  return sys.modules['port_codec']


def _oracle():
  ex = _example()
  sd, audio, expected = ex.load_oracle()
  return ex, sd, np.moveaxis(audio, 1, -1), np.moveaxis(expected, 1, -1)


def _close(y, expected):
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _same_state_dict(back, sd):
  assert list(back) == list(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
    assert np.asarray(back[k]).tobytes() == np.asarray(sd[k]).tobytes(), k


def test_linen_port_matches_pytorch_and_exports_bit_for_bit():
  ex, sd, x, expected = _oracle()
  kw = dict(rules=ex.RULES, drop=ex.DROP, buffer_keys=ex.BUFFER_KEYS)
  variables = pytorch.to_linen(sd, twin=(ex.Codec(), x), **kw)
  assert sorted(variables) == ['buffers', 'params']  # an optimizer of params never trains them
  assert set(variables['buffers']) == {'mean', 'scale'}
  assert set(variables['params']['lstm']) == {f'{s}_{k}' for s in ('ih', 'hh') for k in range(4)}
  assert 'quantizer' not in variables['params']  # dropped: the Flax model does not hold it
  _close(jax.jit(ex.Codec().apply)(variables, x), expected)
  _same_state_dict(pytorch.to_torch(variables, like=sd, **kw), sd)
  # The buffers' keys are the torch module's (the oracle script reads them from named_buffers).
  buffers = json.loads(str(ORACLE['buffer_keys']))
  assert [k for k in buffers if not k.startswith('quantizer.')] == ['mean', 'scale']


def test_nnx_port_matches_pytorch_and_exports_bit_for_bit():
  ex, sd, x, expected = _oracle()
  codec = ex.load_nnx(sd)  # built abstractly, then filled
  assert isinstance(codec.mean, ex.Buffer) and not isinstance(codec.mean, nnx.Param)
  _close(nnx.jit(lambda m, x: m(x))(codec, x), expected)
  kw = dict(rules=ex.RULES, drop=ex.DROP, buffer_keys=ex.BUFFER_KEYS)
  _same_state_dict(pytorch.to_torch(nnx.state(codec), like=sd, **kw), sd)


def test_a_twin_left_at_the_default_axis_is_refused():
  # pos_conv is torch dim=2 with as many window taps as channels: every shape agrees.
  ex, sd, x, _ = _oracle()
  kw = dict(rules=ex.RULES, drop=ex.DROP, buffer_keys=ex.BUFFER_KEYS)
  with pytest.raises(ValueError, match=r"unexpected \['params/mean'.*buffer_keys="):
    pytorch.to_linen(sd, twin=(ex.Codec(), x), rules=ex.RULES, drop=ex.DROP)
  wrong = ex.Codec(pos_axis=-1)
  pytorch.to_linen(sd, template=jax.eval_shape(wrong.init, jax.random.key(0), x), **kw)
  with pytest.raises(ValueError, match=r"'pos_conv'.*axis -1.*dim=2.*axis=-3"):
    pytorch.to_linen(sd, twin=(wrong, x), **kw)
  abstract = nnx.eval_shape(lambda: ex.NNXCodec(rngs=nnx.Rngs(0), pos_axis=-1))
  with pytest.raises(ValueError, match=r"'pos_conv'.*axis -1.*dim=2.*axis=-3"):
    pytorch.to_nnx(sd, twin=abstract, **kw)


def test_example_runs(capsys):
  _example().main()
  assert 'bit for bit from linen and NNX: True' in capsys.readouterr().out


# bfloat16: what "exact" covers (docs/guides/pytorch.md).


def _ulps(a, b):
  """Distance in bfloat16 steps between same-signed bfloat16 arrays."""
  return np.abs(a.view(np.int16).astype(np.int64) - b.view(np.int16).astype(np.int64))


@pytest.mark.parametrize('case', sorted(json.loads(str(ORACLE['bf16_dims']))))
def test_bfloat16_weight_against_pytorch(case):
  dim = json.loads(str(ORACLE['bf16_dims']))[case]
  g, v, torch_w = (ORACLE[f'bf16:{case}:{k}'].astype(ml_dtypes.bfloat16) for k in 'gvw')
  sd = {'parametrizations.weight.original0': g, 'parametrizations.weight.original1': v}
  layers = pytorch.from_torch(sd, {'': 'Linear' if case.startswith('linear') else 'Conv1d'})
  assert layers[''].dim == dim
  ours = pytorch.to_torch(layers, style='plain')['weight']  # w = g v / ||v||, PyTorch layout
  assert ours.dtype == ml_dtypes.bfloat16
  # The parameters go back bit for bit, whatever the dim.
  _same_state_dict(pytorch.to_torch(layers), sd)
  # wn_jax's w is the float64 reference rounded once to bfloat16 ...
  axis = None if dim is None else dim
  exact = reference.normalize(v.astype(np.float64), g.astype(np.float64), axis)
  np.testing.assert_array_equal(_ulps(ours, exact.astype(ml_dtypes.bfloat16)), 0)
  # ... PyTorch's equals it for dim=0 and the last dim, and is within two bfloat16 steps
  # (it reduces in bfloat16) for dim=None and dim=1 of a Conv1d.
  steps = _ulps(ours, torch_w)
  if dim in (0, v.ndim - 1):
    assert steps.max() == 0
  else:
    assert 0 < steps.max() <= 2
