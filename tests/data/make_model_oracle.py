"""Writes the whole-model PyTorch oracles: tests/data/hifigan_oracle.npz, hifigan_bf16.safetensors,
mixed_oracle.npz.

Needs PyTorch (never a dependency of wn_jax or of `make test`); run by hand, isolated from the
shared environment:

    .venv/bin/python -m pip install -q --target /work/torchlib torch==2.13.0
    PYTHONPATH=/work/torchlib .venv/bin/python tests/data/make_model_oracle.py

- hifigan: a HiFi-GAN V1-style generator (the configuration of examples/port_hifigan.py),
  every conv weight-normed, the resblocks' convs2 in the parametrization key style and the rest
  legacy, as HiFi-GAN ships it; g perturbed away from ||v|| (a converter ignoring g fails).
  State dict, an input mel, PyTorch's output; and the state dict in bfloat16 as a .safetensors
  file with PyTorch's output for those bfloat16 weights computed in float32.
- mixed: weight norm next to everything else a model holds: Embedding, a plain Linear,
  LayerNorm, a reflect-padded WN Conv1d, a WN ConvTranspose1d with as many input as output
  channels (its shape looks like a Conv's), a Snake activation's alpha (1, C, 1), BatchNorm1d
  running statistics (eval mode) and a WN Linear with dim=None; and, alone, a WN
  ConvTranspose3d (keys ct3d:...).

Before writing, the script checks wn_jax's conversion of the live modules (no kinds=, no layer
arguments) against the state-dict path the tests use, and the export against strict loading.
"""

import json
import pathlib
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import weight_norm as legacy_weight_norm

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'examples'))

import port_hifigan  # noqa: E402

from wn_jax import pytorch  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent
LRELU_SLOPE = 0.1


def get_padding(kernel_size, dilation=1):
  return dilation * (kernel_size - 1) // 2


class ResBlock1(nn.Module):
  def __init__(self, channels, kernel_size, dilations):
    super().__init__()
    self.convs1 = nn.ModuleList(
      [
        legacy_weight_norm(
          nn.Conv1d(
            channels, channels, kernel_size, dilation=d, padding=get_padding(kernel_size, d)
          )
        )
        for d in dilations
      ]
    )
    self.convs2 = nn.ModuleList(
      [
        parametrizations.weight_norm(
          nn.Conv1d(channels, channels, kernel_size, padding=get_padding(kernel_size))
        )
        for _ in dilations
      ]
    )

  def forward(self, x):
    for c1, c2 in zip(self.convs1, self.convs2):
      xt = c1(nn.functional.leaky_relu(x, LRELU_SLOPE))
      x = c2(nn.functional.leaky_relu(xt, LRELU_SLOPE)) + x
    return x


class Generator(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.num_kernels = len(cfg.resblock_kernel_sizes)
    ch = cfg.upsample_initial_channel
    self.conv_pre = legacy_weight_norm(nn.Conv1d(cfg.num_mels, ch, 7, 1, padding=3))
    self.ups = nn.ModuleList(
      [
        legacy_weight_norm(
          nn.ConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), k, u, padding=(k - u) // 2)
        )
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
      ]
    )
    self.resblocks = nn.ModuleList(
      [
        ResBlock1(ch // 2 ** (i + 1), k, d)
        for i in range(len(self.ups))
        for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
      ]
    )
    self.conv_post = legacy_weight_norm(nn.Conv1d(ch // 2 ** len(self.ups), 1, 7, 1, padding=3))

  def forward(self, x):
    x = self.conv_pre(x)
    for i, up in enumerate(self.ups):
      x = up(nn.functional.leaky_relu(x, LRELU_SLOPE))
      xs = sum(self.resblocks[i * self.num_kernels + j](x) for j in range(self.num_kernels))
      x = xs / self.num_kernels
    return torch.tanh(self.conv_post(nn.functional.leaky_relu(x)))


class Snake(nn.Module):
  def __init__(self, channels):
    super().__init__()
    self.alpha = nn.Parameter(torch.ones(1, channels, 1))

  def forward(self, x):
    return x + torch.sin(self.alpha * x) ** 2 / self.alpha


class Mixed(nn.Module):
  def __init__(self):
    super().__init__()
    self.embed = nn.Embedding(10, 6)
    self.proj = nn.Linear(6, 8)
    self.norm = nn.LayerNorm(8)
    self.convs = nn.ModuleList(
      [
        legacy_weight_norm(nn.Conv1d(8, 8, 5, padding=2, padding_mode='reflect')),
        parametrizations.weight_norm(
          nn.ConvTranspose1d(8, 8, 3, stride=2, padding=1, output_padding=1)
        ),
      ]
    )
    self.act = Snake(8)
    self.bn = nn.BatchNorm1d(8)
    self.head = legacy_weight_norm(nn.Linear(8, 3), dim=None)

  def forward(self, tokens):
    h = self.norm(self.proj(self.embed(tokens))).transpose(1, 2)
    h = self.convs[1](self.act(self.convs[0](h)))
    return self.head(self.bn(h).transpose(1, 2))


def perturb(model, gen):
  """g away from ||v||, biases, alphas and running statistics away from their init."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(('weight_g', 'original0', 'alpha')):
        p.mul_(0.5 + 1.5 * torch.rand(p.shape, generator=gen))
      elif name.endswith('bias') or (name.endswith('weight') and p.ndim == 1):
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(0.1 * torch.randn(b.shape, generator=gen))
      elif name.endswith('running_var'):
        b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def state_dict_numpy(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def check_live(model, sd, **kwargs):
  """The module path equals the state-dict path; the export loads strictly, bit for bit."""
  live, offline = pytorch.to_linen(model, **kwargs), pytorch.to_linen(sd, **kwargs)
  flat = lambda t: {'/'.join(map(str, p)): np.asarray(v) for p, v in _flat(t)}  # noqa: E731
  assert flat(live).keys() == flat(offline).keys()
  assert all(np.array_equal(a, flat(offline)[k]) for k, a in flat(live).items())
  back = pytorch.to_torch(live, like=model, **{k: v for k, v in kwargs.items() if k != 'kinds'})
  before = {k: v.clone() for k, v in model.state_dict().items()}
  model.load_state_dict(back, strict=True)
  assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _flat(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, (*prefix, k))
    else:
      yield (*prefix, k), v


def main():
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(1)
  cfg = port_hifigan.CONFIG

  model = Generator(cfg).eval()
  perturb(model, gen)
  mel = torch.randn((2, cfg.num_mels, 10), generator=gen)
  with torch.no_grad():
    y = model(mel)
  sd = state_dict_numpy(model)
  check_live(model, sd)
  bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
  rounded = Generator(cfg).eval()
  rounded.load_state_dict({k: v.float() for k, v in bf16.items()})
  with torch.no_grad():
    y_bf16 = rounded(mel)
  meta = dict(torch=torch.__version__, config=str(cfg))
  np.savez_compressed(
    DATA / 'hifigan_oracle.npz',
    **{f'sd:{k}': v for k, v in sd.items()},
    input=mel.numpy(),
    output=y.numpy(),
    output_bf16_weights=y_bf16.numpy(),
    meta=np.array(json.dumps(meta)),
  )
  save_file(bf16, str(DATA / 'hifigan_bf16.safetensors'))

  mixed = Mixed().eval()
  perturb(mixed, gen)
  tokens = torch.randint(0, 10, (2, 7), generator=gen)
  with torch.no_grad():
    out = mixed(tokens)
  msd = state_dict_numpy(mixed)
  snake = {r'.*\.alpha': (lambda a: a.reshape(-1), lambda a: a.reshape(1, -1, 1))}
  check_live(mixed, msd, rules=snake, kinds={'embed': 'Embedding'})
  # A ConvTranspose3d, alone (the key prefix is empty), converted from the module in the test.
  args = dict(stride=(2, 1, 2), padding=(0, 1, 0), output_padding=(1, 0, 0))
  ct3d = parametrizations.weight_norm(nn.ConvTranspose3d(3, 2, (2, 3, 2), **args))
  perturb(ct3d, gen)
  x3 = torch.randn((1, 3, 3, 4, 3), generator=gen)
  with torch.no_grad():
    y3 = ct3d(x3)
  (layer,) = pytorch.from_torch(ct3d).values()
  assert layer.kind == 'ConvTranspose3d' and {k: layer.args[k] for k in args} == args
  module, variables = layer.linen()
  got = np.moveaxis(np.asarray(module.apply(variables, np.moveaxis(x3.numpy(), 1, -1))), -1, 1)
  assert np.allclose(got, y3.numpy(), rtol=1e-5, atol=1e-5)
  np.savez_compressed(
    DATA / 'mixed_oracle.npz',
    **{f'sd:{k}': v for k, v in msd.items()},
    **{f'ct3d:sd:{k}': v for k, v in state_dict_numpy(ct3d).items()},
    **{
      'ct3d:input': x3.numpy(),
      'ct3d:output': y3.numpy(),
      'ct3d:args': np.array(json.dumps(args)),
    },
    input=tokens.numpy(),
    output=out.numpy(),
    meta=np.array(json.dumps(dict(torch=torch.__version__))),
  )
  for name in ('hifigan_oracle.npz', 'hifigan_bf16.safetensors', 'mixed_oracle.npz'):
    print(f'wrote {DATA / name} ({(DATA / name).stat().st_size} bytes)')


if __name__ == '__main__':
  main()
