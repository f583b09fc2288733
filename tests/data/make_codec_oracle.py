"""Writes tests/data/codec_oracle.npz: a third-party-style codec and bfloat16 weight norm.

Needs PyTorch (never a dependency of wn_jax or of `make test`); run by hand, in a venv of its own
that sees wn_jax's (torch 2.13.0 is a local CPU wheel here):

    python3 -m venv /work/torchenv && /work/torchenv/bin/pip install -q torch==2.13.0 numpy safetensors
    PYTHONPATH=.:/work/torchenv/lib/python3.11/site-packages .venv/bin/python tests/data/make_codec_oracle.py

- codec (keys sd:, input, output): the PyTorch twin of examples/port_codec.py, written as a
  third-party model is: root buffers ``mean`` / ``scale`` (SpeechT5HifiGan), a reflect-padded
  Conv1d (parametrization weight norm), wav2vec2's positional Conv1d with ``dim=2`` (legacy
  weight norm, as many window taps as channels), EnCodec's ``nn.LSTM`` with its skip, an
  upsampling ConvTranspose1d, and a quantizer whose codebook buffers ``forward`` never runs; g
  perturbed away from ||v||. Its buffer keys are in ``buffer_keys``.
- bf16 (keys bf16:<case>:g, :v, :w): weight-normed layers in bfloat16 (stored as float32, exact)
  and the ``weight`` PyTorch computes from them in bfloat16, for ``dim`` = 0, 1, 2 and None.

Before writing, the script checks wn_jax's conversion of the live module against the state-dict
path the tests use, the Flax twins against PyTorch, and the export against strict loading.
"""

import json
import pathlib
import sys

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations
from torch.nn.utils import weight_norm as legacy_weight_norm

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'examples'))

import port_codec  # noqa: E402

from wn_jax import pytorch  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent


class Codebook(nn.Module):
  """EnCodec's EuclideanCodebook state: buffers only."""

  def __init__(self, dim, size):
    super().__init__()
    embed = torch.randn(size, dim)
    self.register_buffer('inited', torch.ones(1))
    self.register_buffer('cluster_size', torch.rand(size))
    self.register_buffer('embed', embed)
    self.register_buffer('embed_avg', embed * 0.5)


class Quantizer(nn.Module):
  def __init__(self, dim, size, n):
    super().__init__()
    self.layers = nn.ModuleList(
      [nn.ModuleDict({'codebook': Codebook(dim, size)}) for _ in range(n)]
    )


class Codec(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    c, h = cfg.channels, cfg.hidden
    self.register_buffer('mean', torch.randn(c))
    self.register_buffer('scale', torch.rand(c) + 0.5)
    self.conv_in = parametrizations.weight_norm(
      nn.Conv1d(c, h, 7, padding=3, padding_mode='reflect')
    )
    self.pos_conv = legacy_weight_norm(
      nn.Conv1d(h, h, cfg.window, padding=cfg.window // 2, groups=cfg.groups), dim=2
    )
    self.lstm = nn.LSTM(h, h, batch_first=True)
    self.ups = nn.ModuleList([legacy_weight_norm(nn.ConvTranspose1d(h, c, 4, stride=2, padding=1))])
    self.quantizer = Quantizer(h, 6, 2)

  def forward(self, x):
    h = self.conv_in((x - self.mean[:, None]) / self.scale[:, None])
    h = h + F.gelu(self.pos_conv(h)[..., :-1])
    y, _ = self.lstm(h.transpose(1, 2))
    h = h + y.transpose(1, 2)
    return self.ups[0](F.elu(h))


def perturb_g(model):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(('weight_g', 'original0')):
        p.mul_(torch.rand_like(p) + 0.5)


def bf16_cases():
  """{case: (g, v, w)} in bfloat16: PyTorch's own weight for each dim."""
  out = {}
  for name, layer, dim in [
    ('conv1d_dim0', nn.Conv1d(6, 8, 5), 0),
    ('conv1d_dim1', nn.Conv1d(6, 8, 5), 1),
    ('conv1d_dim2', nn.Conv1d(6, 8, 5), 2),
    ('conv1d_none', nn.Conv1d(6, 8, 5), None),
    ('linear_none', nn.Linear(16, 12), None),
  ]:
    layer = parametrizations.weight_norm(layer, dim=dim).to(torch.bfloat16)
    perturb_g(layer)
    with torch.no_grad():
      g = layer.parametrizations.weight.original0
      v = layer.parametrizations.weight.original1
      out[name] = (g.float().numpy(), v.float().numpy(), layer.weight.float().numpy(), dim)
  return out


def main():
  torch.manual_seed(0)
  cfg = port_codec.CONFIG
  model = Codec(cfg).eval()
  perturb_g(model)
  x = torch.randn(2, cfg.channels, 12)
  with torch.no_grad():
    expected = model(x).numpy()
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  buffers = sorted(name for name, _ in model.named_buffers())

  # The live module (buffers and kinds from it) against the state-dict path the tests take.
  xf = np.moveaxis(x.numpy(), 1, -1)
  kw = dict(rules=port_codec.RULES, drop=port_codec.DROP)
  live = pytorch.to_linen(model, twin=(port_codec.Codec(), xf), **kw)
  offline = pytorch.to_linen(sd, buffer_keys=port_codec.BUFFER_KEYS, **kw)
  import jax

  assert jax.tree.structure(live) == jax.tree.structure(offline)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(live), jax.tree.leaves(offline)))
  y = port_codec.Codec().apply(live, xf)
  err = np.max(np.abs(np.moveaxis(np.asarray(y), -1, 1) - expected)) / np.max(np.abs(expected))
  print(f'linen vs torch: {err:.1e}')
  assert err < 1e-5
  back = pytorch.to_torch(live, like=model, **kw)
  model.load_state_dict(back, strict=True)
  assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())

  arrays = {f'sd:{k}': v for k, v in sd.items()}
  arrays.update(input=x.numpy(), output=expected, buffer_keys=json.dumps(buffers))
  dims = {}
  for name, (g, v, w, dim) in bf16_cases().items():
    arrays.update({f'bf16:{name}:g': g, f'bf16:{name}:v': v, f'bf16:{name}:w': w})
    dims[name] = dim
  arrays['bf16_dims'] = json.dumps(dims)
  np.savez_compressed(DATA / 'codec_oracle.npz', **arrays)
  print(f'wrote {DATA / "codec_oracle.npz"}: {len(sd)} tensors, buffers {buffers}')


if __name__ == '__main__':
  main()
