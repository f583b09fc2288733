"""Port a HiFi-GAN V1-style generator from PyTorch to Flax (linen and NNX) with wn_jax.

The Flax models below mirror the PyTorch generator of HiFi-GAN (Kong et al., 2020) in a
small configuration: ``conv_pre``, upsampling ``ups`` (``ConvTranspose1d``), multi-receptive
field ``resblocks`` (``ResBlock1``: ``convs1`` dilated, ``convs2``), ``conv_post``, every conv
weight-normed, named as in PyTorch with lists of submodules (``self.ups = [...]`` in linen's
``setup``, ``nnx.List`` in NNX). The port itself is a handful of lines in ``main()``:

    variables = pytorch.to_linen(torch_generator)                  # or its state dict
    y = Generator(CONFIG).apply(variables, mel_channels_last)
    torch_generator.load_state_dict(pytorch.to_torch(variables, like=torch_generator), strict=True)

Without torch, this script reads the PyTorch generator's state dict, an input and PyTorch's
output from ``tests/data/hifigan_oracle.npz`` (written by ``tests/data/make_model_oracle.py``,
which needs torch), converts, compares, and exports back::

    python examples/port_hifigan.py
"""

from __future__ import annotations

import dataclasses
import pathlib

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

import wn_jax
from wn_jax import pytorch

DATA = pathlib.Path(__file__).resolve().parent.parent / 'tests' / 'data' / 'hifigan_oracle.npz'
LRELU_SLOPE = 0.1


@dataclasses.dataclass(frozen=True)
class Config:
  """HiFi-GAN V1's hyperparameters (small: fewer channels and upsampling stages)."""

  num_mels: int = 8
  upsample_initial_channel: int = 32
  upsample_rates: tuple[int, ...] = (2, 2)
  upsample_kernel_sizes: tuple[int, ...] = (4, 4)
  resblock_kernel_sizes: tuple[int, ...] = (3, 7)
  resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))


CONFIG = Config()


def _same(kernel_size: int, dilation: int) -> list[tuple[int, int]]:
  """HiFi-GAN's ``get_padding``: PyTorch ``padding=d * (k - 1) // 2`` on both sides."""
  p = dilation * (kernel_size - 1) // 2
  return [(p, p)]


def _upsample_kwargs(cfg: Config, i: int) -> dict:
  """The Flax arguments of PyTorch's ``ConvTranspose1d(k, stride=u, padding=(k - u) // 2)``."""
  u, k = cfg.upsample_rates[i], cfg.upsample_kernel_sizes[i]
  kw = pytorch.conv_kwargs('ConvTranspose1d', k, stride=u, padding=(k - u) // 2)
  return {key: value for key, value in kw.items() if key != 'kernel_size'}


def _channels(cfg: Config, i: int) -> int:
  return cfg.upsample_initial_channel // 2 ** (i + 1)


# linen


class ResBlock1(nn.Module):
  """Two weight-normed convs per dilation, residual: HiFi-GAN's ``ResBlock1``."""

  channels: int
  kernel_size: int
  dilations: tuple[int, ...]

  def setup(self):
    k = self.kernel_size
    conv = wn_jax.linen.WNConv
    self.convs1 = [
      conv(self.channels, (k,), kernel_dilation=d, padding=_same(k, d)) for d in self.dilations
    ]
    self.convs2 = [conv(self.channels, (k,), padding=_same(k, 1)) for _ in self.dilations]

  def __call__(self, x):
    for c1, c2 in zip(self.convs1, self.convs2):
      x = x + c2(nn.leaky_relu(c1(nn.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
    return x


class Generator(nn.Module):
  """HiFi-GAN's generator: mel ``(N, T, num_mels)`` -> waveform ``(N, T * prod(rates), 1)``."""

  cfg: Config = CONFIG

  def setup(self):
    cfg = self.cfg
    n = len(cfg.upsample_rates)
    self.conv_pre = wn_jax.linen.WNConv(cfg.upsample_initial_channel, (7,), padding=[(3, 3)])
    self.ups = [
      wn_jax.linen.WNConvTranspose(_channels(cfg, i), (k,), **_upsample_kwargs(cfg, i))
      for i, k in enumerate(cfg.upsample_kernel_sizes)
    ]
    self.resblocks = [
      ResBlock1(_channels(cfg, i), k, d)
      for i in range(n)
      for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
    ]
    self.conv_post = wn_jax.linen.WNConv(1, (7,), padding=[(3, 3)])

  def __call__(self, x):
    kernels = len(self.cfg.resblock_kernel_sizes)
    x = self.conv_pre(x)
    for i, up in enumerate(self.ups):
      x = up(nn.leaky_relu(x, LRELU_SLOPE))
      x = sum(self.resblocks[i * kernels + j](x) for j in range(kernels)) / kernels
    return jax.numpy.tanh(self.conv_post(nn.leaky_relu(x)))  # PyTorch's default slope 0.01


# NNX


class NNXResBlock1(nnx.Module):
  """``ResBlock1`` in NNX: ``nnx.List`` where PyTorch has ``nn.ModuleList``."""

  def __init__(
    self, channels: int, kernel_size: int, dilations: tuple[int, ...], *, rngs: nnx.Rngs
  ):
    k = kernel_size

    def conv(d: int) -> wn_jax.nnx.WNConv:
      return wn_jax.nnx.WNConv(
        channels, channels, (k,), kernel_dilation=d, padding=_same(k, d), rngs=rngs
      )

    self.convs1 = nnx.List([conv(d) for d in dilations])
    self.convs2 = nnx.List([conv(1) for _ in dilations])

  def __call__(self, x):
    for c1, c2 in zip(self.convs1, self.convs2):
      x = x + c2(nnx.leaky_relu(c1(nnx.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
    return x


class NNXGenerator(nnx.Module):
  """HiFi-GAN's generator in NNX, the same computation as :class:`Generator`."""

  def __init__(self, cfg: Config = CONFIG, *, rngs: nnx.Rngs):
    self.kernels = len(cfg.resblock_kernel_sizes)
    ch = cfg.upsample_initial_channel
    self.conv_pre = wn_jax.nnx.WNConv(cfg.num_mels, ch, (7,), padding=[(3, 3)], rngs=rngs)
    self.ups = nnx.List(
      [
        wn_jax.nnx.WNConvTranspose(
          ch // 2**i, _channels(cfg, i), (k,), **_upsample_kwargs(cfg, i), rngs=rngs
        )
        for i, k in enumerate(cfg.upsample_kernel_sizes)
      ]
    )
    self.resblocks = nnx.List(
      [
        NNXResBlock1(_channels(cfg, i), k, d, rngs=rngs)
        for i in range(len(cfg.upsample_rates))
        for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
      ]
    )
    self.conv_post = wn_jax.nnx.WNConv(
      _channels(cfg, len(cfg.upsample_rates) - 1), 1, (7,), padding=[(3, 3)], rngs=rngs
    )

  def __call__(self, x):
    x = self.conv_pre(x)
    for i, up in enumerate(self.ups):
      x = up(nnx.leaky_relu(x, LRELU_SLOPE))
      x = sum(self.resblocks[i * self.kernels + j](x) for j in range(self.kernels)) / self.kernels
    return jax.numpy.tanh(self.conv_post(nnx.leaky_relu(x)))


def load_oracle(path: pathlib.Path = DATA) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """(PyTorch state dict, input mel, PyTorch's output), PyTorch layout ``(N, C, T)``."""
  data = np.load(path)
  state_dict = {k[len('sd:') :]: data[k] for k in data.files if k.startswith('sd:')}
  return state_dict, data['input'], data['output']


def main() -> None:
  state_dict, mel, expected = load_oracle()
  x = np.moveaxis(mel, 1, -1)  # PyTorch (N, C, T) -> Flax (N, T, C)
  expected = np.moveaxis(expected, 1, -1)
  weight_normed = pytorch.find_prefixes(state_dict)
  print(f'{len(state_dict)} tensors, {len(weight_normed)} weight-normed layers')

  # linen: the state dict (or the torch module itself) -> variables, checked against the model.
  model = Generator(CONFIG)
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  variables = pytorch.to_linen(state_dict, template=template)
  y = jax.jit(model.apply)(variables, x)
  err = np.max(np.abs(np.asarray(y) - expected)) / np.max(np.abs(expected))
  print(f'linen: output {y.shape}, max |wn_jax - PyTorch| / max |PyTorch| = {err:.1e}')

  # NNX: the same tensors into a model with nnx.List where PyTorch has nn.ModuleList.
  generator = NNXGenerator(CONFIG, rngs=nnx.Rngs(0))
  state = nnx.state(generator)
  nnx.replace_by_pure_dict(state, pytorch.to_nnx(state_dict, template=state))
  nnx.update(generator, state)
  y_nnx = nnx.jit(lambda g, x: g(x))(generator, x)
  err_nnx = np.max(np.abs(np.asarray(y_nnx) - expected)) / np.max(np.abs(expected))
  print(f'NNX:   max |wn_jax - PyTorch| / max |PyTorch| = {err_nnx:.1e}')

  # And back: the state dict PyTorch's load_state_dict(strict=True) takes (torch tensors when
  # like= is the torch module), bit for bit.
  back = pytorch.to_torch(variables, like=state_dict)
  exact = list(back) == list(state_dict) and all(
    np.array_equal(back[k], state_dict[k]) for k in back
  )
  back_nnx = pytorch.to_torch(nnx.state(generator), like=state_dict)
  exact_nnx = all(np.array_equal(back_nnx[k], state_dict[k]) for k in state_dict)
  print(f'export: {len(back)} keys, bit for bit from linen: {exact}, from NNX: {exact_nnx}')
  assert err < 1e-5 and err_nnx < 1e-5 and exact and exact_nnx


if __name__ == '__main__':
  main()
