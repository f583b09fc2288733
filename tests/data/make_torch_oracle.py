"""Writes tests/data/torch_oracle.npz: PyTorch weight-normed layers, inputs and outputs.

Needs PyTorch (never a dependency of wn_jax or of `make test`); run by hand:

    .venv/bin/pip install torch==2.13.0
    .venv/bin/python tests/data/make_torch_oracle.py

For every case: the state dict's tensors (key style as named), an input, PyTorch's
output, and the layer's constructor arguments (JSON). g is perturbed away from ||v||
(at PyTorch's init g = ||v||, so an implementation that ignored g would pass).
"""

import json
import pathlib

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import weight_norm as legacy_weight_norm

OUT = pathlib.Path(__file__).with_name('torch_oracle.npz')

# name, style, constructor, kwargs, dim, input shape (PyTorch layout)
CASES = [
  ('linear_dim0', 'legacy', 'Linear', dict(in_features=6, out_features=4), 0, (5, 6)),
  ('linear_dim1', 'parametrization', 'Linear', dict(in_features=6, out_features=4), 1, (5, 6)),
  ('linear_dimNone', 'legacy', 'Linear', dict(in_features=6, out_features=4), None, (5, 6)),
  (
    'conv1d',
    'parametrization',
    'Conv1d',
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    0,
    (2, 3, 11),
  ),
  (
    'conv1d_grouped_strided',
    'legacy',
    'Conv1d',
    dict(in_channels=4, out_channels=6, kernel_size=5, stride=2, padding=2, groups=2),
    0,
    (2, 4, 13),
  ),
  (
    'conv2d_k1',
    'parametrization',
    'Conv2d',
    dict(in_channels=2, out_channels=4, kernel_size=(5, 1), stride=(3, 1), padding=(2, 0)),
    0,
    (2, 2, 12, 3),
  ),
  (
    'conv3d_groups',
    'legacy',
    'Conv3d',
    dict(in_channels=4, out_channels=4, kernel_size=2, groups=2, dilation=(1, 2, 1)),
    0,
    (1, 4, 4, 5, 4),
  ),
  (
    'convtranspose1d_output_padding',
    'parametrization',
    'ConvTranspose1d',
    dict(in_channels=4, out_channels=3, kernel_size=5, stride=3, padding=1, output_padding=2),
    0,
    (2, 4, 7),
  ),
  (
    'convtranspose1d_hifigan',
    'legacy',
    'ConvTranspose1d',
    dict(in_channels=6, out_channels=3, kernel_size=16, stride=8, padding=4),
    0,
    (1, 6, 5),
  ),
  (
    'convtranspose2d',
    'legacy',
    'ConvTranspose2d',
    dict(
      in_channels=3,
      out_channels=2,
      kernel_size=(3, 4),
      stride=(2, 2),
      padding=(1, 1),
      dilation=(1, 2),
    ),
    0,
    (1, 3, 4, 5),
  ),
  (
    'wav2vec2_posconv',
    'legacy',
    'Conv1d',
    dict(in_channels=16, out_channels=16, kernel_size=8, padding=4, groups=4),
    2,
    (2, 16, 20),
  ),
  (
    'wav2vec2_posconv_param',
    'parametrization',
    'Conv1d',
    dict(in_channels=16, out_channels=16, kernel_size=8, padding=4, groups=4),
    2,
    (2, 16, 20),
  ),
]


def _wn(module, style, dim):
  if style == 'legacy':
    return legacy_weight_norm(module, dim=dim)
  return parametrizations.weight_norm(module, dim=dim)


def _perturb(module, style, gen):
  with torch.no_grad():
    g = module.weight_g if style == 'legacy' else module.parametrizations.weight.original0
    g.mul_(0.5 + 1.5 * torch.rand(g.shape, generator=gen, dtype=g.dtype))
    if getattr(module, 'bias', None) is not None:
      module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=gen))


class HiFiGANLike(nn.Module):
  """conv_pre -> leaky_relu -> upsample -> resblock (dilated, residual) -> conv_post -> tanh."""

  def __init__(self):
    super().__init__()
    self.conv_pre = legacy_weight_norm(nn.Conv1d(8, 12, 7, padding=3))
    self.ups = nn.ModuleList(
      [legacy_weight_norm(nn.ConvTranspose1d(12, 6, 4, stride=2, padding=1))]
    )
    self.res = nn.ModuleList(
      [parametrizations.weight_norm(nn.Conv1d(6, 6, 3, dilation=3, padding=3))]
    )
    self.conv_post = legacy_weight_norm(nn.Conv1d(6, 1, 7, padding=3))

  def forward(self, x):
    x = nn.functional.leaky_relu(self.conv_pre(x), 0.1)
    x = nn.functional.leaky_relu(self.ups[0](x), 0.1)
    x = x + self.res[0](nn.functional.leaky_relu(x, 0.1))
    return torch.tanh(self.conv_post(nn.functional.leaky_relu(x)))


HIFIGAN_LAYERS = {
  'conv_pre': dict(kind='Conv1d', kernel_size=7, padding=3),
  'ups.0': dict(kind='ConvTranspose1d', kernel_size=4, stride=2, padding=1),
  'res.0': dict(kind='Conv1d', kernel_size=3, dilation=3, padding=3),
  'conv_post': dict(kind='Conv1d', kernel_size=7, padding=3),
}


def main():
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(1)
  arrays, meta = {}, {}
  for name, style, ctor, kwargs, dim, in_shape in CASES:
    module = _wn(getattr(nn, ctor)(**kwargs), style, dim)
    _perturb(module, style, gen)
    x = torch.randn(in_shape, generator=gen)
    with torch.no_grad():
      y = module(x)
    for k, v in module.state_dict().items():
      arrays[f'{name}:sd:{k}'] = v.numpy()
    arrays[f'{name}:input'] = x.numpy()
    arrays[f'{name}:output'] = y.numpy()
    meta[name] = dict(style=style, kind=ctor, kwargs=kwargs, dim=dim)
  model = HiFiGANLike()
  for m in (model.conv_pre, model.ups[0], model.conv_post):
    _perturb(m, 'legacy', gen)
  _perturb(model.res[0], 'parametrization', gen)
  x = torch.randn((2, 8, 9), generator=gen)
  with torch.no_grad():
    y = model(x)
  for k, v in model.state_dict().items():
    arrays[f'hifigan:sd:{k}'] = v.numpy()
  arrays['hifigan:input'] = x.numpy()
  arrays['hifigan:output'] = y.numpy()
  meta['hifigan'] = dict(layers=HIFIGAN_LAYERS)
  arrays['meta'] = np.array(json.dumps(dict(torch=torch.__version__, cases=meta)))
  np.savez_compressed(OUT, **arrays)
  print(f'wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays)')


if __name__ == '__main__':
  main()
