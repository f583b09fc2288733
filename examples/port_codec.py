"""Port a third-party-style weight-normed codec from PyTorch to Flax (linen and NNX) with wn_jax.

The PyTorch model (``Codec`` in ``tests/data/make_codec_oracle.py``) holds what whole
third-party models hold and a layer-by-layer port trips on:

- buffers (``register_buffer``) on its root module, an input ``mean`` / ``scale`` as
  SpeechT5HifiGan has them: they go to a linen collection of their own, ``'buffers'``, so an
  optimizer of ``params`` never trains them (an NNX ``Buffer`` variable here);
- a weight-normed Conv1d with ``dim=2`` (wav2vec2's positional conv), whose ``g`` has as many
  entries as its output channels: a twin left at wn_jax's default ``axis=-1`` has the same
  shapes and computes wrong, which ``twin=`` catches;
- EnCodec's ``nn.LSTM``, whose ``(4H, ...)`` tensors become one Dense per gate through rules
  that give several leaves;
- a quantizer's codebooks (EnCodec's ``cluster_size``, ``embed``, ...) that ``forward`` never
  runs and the Flax model does not hold: ``drop=`` leaves them out, ``to_torch`` brings them
  back from ``like``.

The port itself, from the torch module (torch is duck typed, never imported by wn_jax)::

    variables = pytorch.to_linen(torch_codec, rules=RULES, drop=DROP, twin=(Codec(), x))
    y = Codec().apply(variables, x)
    torch_codec.load_state_dict(pytorch.to_torch(variables, like=torch_codec, rules=RULES,
                                                 drop=DROP), strict=True)

Without torch, this script reads the state dict (``BUFFER_KEYS`` says which keys are buffers,
which a state dict cannot tell), an input and PyTorch's output from
``tests/data/codec_oracle.npz`` (written by ``tests/data/make_codec_oracle.py``, which needs
torch), converts, compares, and exports back::

    python examples/port_codec.py
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wn_jax
from wn_jax import pytorch

DATA = pathlib.Path(__file__).resolve().parent.parent / 'tests' / 'data' / 'codec_oracle.npz'


@dataclasses.dataclass(frozen=True)
class Config:
  channels: int = 4
  hidden: int = 8
  groups: int = 2  # of the positional conv
  window: int = 8  # of the positional conv: as many taps as hidden channels


CONFIG = Config()


def lstm_rules(prefix: str) -> dict[str, pytorch.Rule]:
  """Rules for a one-layer torch ``nn.LSTM`` at ``prefix``: one Dense per gate.

  PyTorch stacks the gates ``i, f, g, o`` in the rows of ``weight_ih_l0`` ``(4H, in)``,
  ``weight_hh_l0`` ``(4H, H)``, ``bias_ih_l0`` and ``bias_hh_l0``; each becomes four leaves
  ``ih.<gate>.kernel`` ... (a list of Dense: linen's ``ih_0``, NNX's ``ih[0]``), and back.
  """

  def split(part: str, name: str) -> pytorch.Rule:
    def forward(a: np.ndarray) -> dict[str, np.ndarray]:
      return {f'{part}.{k}.{name}': p.T if p.ndim == 2 else p for k, p in enumerate(np.split(a, 4))}

    def inverse(leaves: dict[str, np.ndarray]) -> np.ndarray:
      parts = [leaves[f'{part}.{k}.{name}'] for k in range(4)]
      return np.concatenate([p.T if p.ndim == 2 else p for p in parts])

    return forward, inverse

  p = re.escape(prefix)
  return {
    rf'{p}\.weight_ih_l0': split('ih', 'kernel'),
    rf'{p}\.weight_hh_l0': split('hh', 'kernel'),
    rf'{p}\.bias_ih_l0': split('ih', 'bias'),
    rf'{p}\.bias_hh_l0': split('hh', 'bias'),
  }


RULES = lstm_rules('lstm')
DROP = r'quantizer\..*'  # codebooks forward never runs
BUFFER_KEYS = r'mean|scale'  # a state dict cannot tell buffers; the torch module can
POS_AXIS = -3  # PyTorch dim=2 of (out, in/groups, k) is the window: Flax (k, in/groups, out)


def _conv(kind: str, kernel_size: int, **torch_args) -> dict:
  return pytorch.conv_kwargs(kind, kernel_size, **torch_args)


def _lstm_step(gates, c):
  i, f, g, o = gates
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


# linen


class LSTM(nn.Module):
  """PyTorch's one-layer ``nn.LSTM(batch_first=True)``, one Dense per gate (i, f, g, o)."""

  features: int

  def setup(self):
    self.ih = [nn.Dense(self.features) for _ in range(4)]
    self.hh = [nn.Dense(self.features) for _ in range(4)]

  def __call__(self, x):  # (N, T, C); a short T, unrolled (nn.scan for long ones)
    h = c = jnp.zeros((x.shape[0], self.features), x.dtype)
    out = []
    for t in range(x.shape[1]):
      h, c = _lstm_step([ih(x[:, t]) + hh(h) for ih, hh in zip(self.ih, self.hh)], c)
      out.append(h)
    return jnp.stack(out, 1)


class Codec(nn.Module):
  """The codec's encoder-decoder path, channels-last, named as the PyTorch modules."""

  cfg: Config = CONFIG
  pos_axis: int = POS_AXIS

  def setup(self):
    cfg = self.cfg
    self.mean = self.variable('buffers', 'mean', jnp.zeros, (cfg.channels,))
    self.scale = self.variable('buffers', 'scale', jnp.ones, (cfg.channels,))
    self.conv_in = wn_jax.linen.WNConv(
      cfg.hidden, **_conv('Conv1d', 7, padding=3, padding_mode='reflect')
    )
    self.pos_conv = wn_jax.linen.WNConv(
      cfg.hidden,
      axis=self.pos_axis,
      **_conv('Conv1d', cfg.window, padding=cfg.window // 2, groups=cfg.groups),
    )
    self.lstm = LSTM(cfg.hidden)
    self.ups = [
      wn_jax.linen.WNConvTranspose(cfg.channels, **_conv('ConvTranspose1d', 4, stride=2, padding=1))
    ]

  def __call__(self, x):  # (N, T, C)
    h = self.conv_in((x - self.mean.value) / self.scale.value)
    h = h + nn.gelu(self.pos_conv(h)[:, :-1], approximate=False)
    h = h + self.lstm(h)
    return self.ups[0](nn.elu(h))


# NNX


class Buffer(nnx.Variable):
  """A torch buffer: not an ``nnx.Param``, so ``nnx.Optimizer(..., wrt=nnx.Param)`` skips it."""


class NNXLSTM(nnx.Module):
  def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs):
    self.ih = nnx.List([nnx.Linear(features, hidden, rngs=rngs) for _ in range(4)])
    self.hh = nnx.List([nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(4)])

  def __call__(self, x):
    h = c = jnp.zeros((x.shape[0], self.hh[0].in_features), x.dtype)
    out = []
    for t in range(x.shape[1]):
      h, c = _lstm_step([ih(x[:, t]) + hh(h) for ih, hh in zip(self.ih, self.hh)], c)
      out.append(h)
    return jnp.stack(out, 1)


class NNXCodec(nnx.Module):
  """:class:`Codec` in NNX."""

  def __init__(self, cfg: Config = CONFIG, *, rngs: nnx.Rngs, pos_axis: int = POS_AXIS):
    c, h = cfg.channels, cfg.hidden
    self.mean = Buffer(jnp.zeros(c))
    self.scale = Buffer(jnp.ones(c))
    self.conv_in = wn_jax.nnx.WNConv(
      c, h, rngs=rngs, **_conv('Conv1d', 7, padding=3, padding_mode='reflect')
    )
    pos = _conv('Conv1d', cfg.window, padding=cfg.window // 2, groups=cfg.groups)
    self.pos_conv = wn_jax.nnx.WNConv(h, h, axis=pos_axis, rngs=rngs, **pos)
    self.lstm = NNXLSTM(h, h, rngs=rngs)
    up = _conv('ConvTranspose1d', 4, stride=2, padding=1)
    self.ups = nnx.List([wn_jax.nnx.WNConvTranspose(h, c, rngs=rngs, **up)])

  def __call__(self, x):
    h = self.conv_in((x - self.mean[...]) / self.scale[...])
    h = h + nnx.gelu(self.pos_conv(h)[:, :-1], approximate=False)
    h = h + self.lstm(h)
    return self.ups[0](nnx.elu(h))


def load_nnx(state_dict, cfg: Config = CONFIG) -> NNXCodec:
  """The NNX twin with PyTorch's tensors: built abstractly (no initializer runs), then filled."""
  abstract = nnx.eval_shape(lambda: NNXCodec(cfg, rngs=nnx.Rngs(0)))
  tree = pytorch.to_nnx(state_dict, rules=RULES, drop=DROP, twin=abstract)
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, tree)
  return nnx.merge(graphdef, state)


def load_oracle(path: pathlib.Path = DATA) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """(PyTorch state dict, input, PyTorch's output), PyTorch layout ``(N, C, T)``."""
  data = np.load(path)
  state_dict = {k[len('sd:') :]: data[k] for k in data.files if k.startswith('sd:')}
  return state_dict, data['input'], data['output']


def main() -> None:
  state_dict, audio, expected = load_oracle()
  x = np.moveaxis(audio, 1, -1)  # PyTorch (N, C, T) -> Flax (N, T, C)
  expected = np.moveaxis(expected, 1, -1)
  print(f'{len(state_dict)} tensors, {len(pytorch.find_prefixes(state_dict))} weight-normed')

  # The twin's own axes are checked: left at axis=-1, the dim=2 conv has the same shapes.
  try:
    pytorch.to_linen(state_dict, rules=RULES, drop=DROP, twin=(Codec(pos_axis=-1), x))
  except ValueError as e:
    print('a twin at axis=-1:', str(e).split(': ', 1)[1][:72], '...')

  kw = dict(rules=RULES, drop=DROP, buffer_keys=BUFFER_KEYS)
  model = Codec()
  variables = pytorch.to_linen(state_dict, twin=(model, x), **kw)
  print('linen collections:', sorted(variables), 'buffers:', sorted(variables['buffers']))
  y = jax.jit(model.apply)(variables, x)
  err = np.max(np.abs(np.asarray(y) - expected)) / np.max(np.abs(expected))
  print(f'linen: max |wn_jax - PyTorch| / max |PyTorch| = {err:.1e}')

  codec = load_nnx(state_dict)
  y_nnx = nnx.jit(lambda m, x: m(x))(codec, x)
  err_nnx = np.max(np.abs(np.asarray(y_nnx) - expected)) / np.max(np.abs(expected))
  print(f'NNX:   max |wn_jax - PyTorch| / max |PyTorch| = {err_nnx:.1e}')

  # Back, with the same rules, drop and buffer_keys: the codebooks come from like.
  back = pytorch.to_torch(variables, like=state_dict, **kw)
  back_nnx = pytorch.to_torch(nnx.state(codec), like=state_dict, **kw)
  exact = all(
    list(b) == list(state_dict) and all(np.array_equal(b[k], state_dict[k]) for k in b)
    for b in (back, back_nnx)
  )
  print(f'export: {len(back)} keys, bit for bit from linen and NNX: {exact}')
  assert err < 1e-5 and err_nnx < 1e-5 and exact


if __name__ == '__main__':
  main()
