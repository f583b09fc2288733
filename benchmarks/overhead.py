"""What weight normalization costs per train step, wn_jax against every peer.

One process, arms interleaved (A B C ... A B C ..., a fresh random order each round),
each timing a full jitted train step (forward, backward, optax adam update) after
warm-up and compilation. Reported: the median over rounds of each arm's time divided by
its baseline's time in the same round, and each arm's absolute median milliseconds per
step. The baseline of a JAX layer arm is the faster of the framework's plain layer and
the same computation in raw jnp/lax ("the plain layer"); torch arms are compared with
torch's plain layer. Cases: single layers (Dense, Conv) and whole models (a deep MLP
tower, a HiFi-GAN-like generator with every conv weight-normed).

Also, per JAX arm: the number of kernels of the compiled step (top-level instructions of
the optimized HLO, fusions and library calls; what a GPU launches one by one) and XLA's
estimate of the bytes it accesses; and per layer case: inference with the weight
materialized once (folded), compile time and peak memory (XLA's memory analysis), and the
floor: the extra bytes weight normalization must move per step over the measured memory
bandwidth.

Dtypes. ``--dtype bfloat16`` computes in bfloat16 with float32 parameters in every arm:
the Flax and wn_jax layers by ``dtype=bfloat16`` (``param_dtype`` stays float32), raw
jnp/lax by casting the parameters at the call, Equinox (which has no dtype policy) by
casting its float32 parameters before the call, torch by ``torch.autocast`` (float32
parameters, bfloat16 matmuls and convolutions). ``--torch-cast`` converts the whole torch
module to bfloat16 instead (bfloat16 parameters and optimizer state: less work, not the
same computation as the JAX arms).

Threads. On a CPU, torch runs one intra-op thread unless ``--torch-threads`` says more:
its OpenMP threads spin, and on a shared 2-core machine two of them made a Dense 256 step
40x slower (104 ms against 2.7 ms with one, measured under load). XLA uses every core, so
on a CPU compare torch's ratios with JAX's, not torch's milliseconds with JAX's.

    python benchmarks/overhead.py               # full run, writes benchmarks/results/
    python benchmarks/overhead.py --quick       # about two minutes, prints only
    python benchmarks/overhead.py --hlo-only    # kernel counts only, no timing
    python benchmarks/overhead.py --dtype bfloat16 --gpu-shapes   # on a GPU

Nothing here is a test: timings never are.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import random
import re
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import wn_jax
from wn_jax import linen as wl
from wn_jax import nnx as wx

try:
  import torch
except (ImportError, OSError):  # torch is optional (OSError: a broken install)
  torch = None

RESULTS = Path(__file__).parent / 'results'


@dataclasses.dataclass(frozen=True)
class Shape:
  """A single layer: Dense, or a 'SAME' Conv of odd window ``kernel``."""

  name: str
  kind: str  # 'dense', 'conv1d', 'conv2d'
  batch: int
  cin: int
  cout: int
  spatial: tuple[int, ...] = ()
  kernel: int = 1


@dataclasses.dataclass(frozen=True)
class Model:
  """A whole model: 'mlp' (a Dense tower) or 'hifigan' (a HiFi-GAN-like generator)."""

  name: str
  kind: str
  batch: int
  width: int  # MLP width; generator channels after conv_pre
  depth: int = 0  # MLP layers
  frames: int = 0  # generator input frames (80 mel bins each)
  rates: tuple[int, ...] = ()  # generator upsampling rates

  @property
  def layers(self) -> int:
    """How many layers are weight-normed."""
    return self.depth if self.kind == 'mlp' else 2 + 3 * len(self.rates)


CPU_SHAPES = [
  Shape('Dense B=32 256->256', 'dense', 32, 256, 256),
  Shape('Dense B=256 1024->1024', 'dense', 256, 1024, 1024),
  Shape('Dense B=1024 2048->2048', 'dense', 1024, 2048, 2048),
  Shape('Conv2d B=16 32x32 64->64 3x3', 'conv2d', 16, 64, 64, (32, 32), 3),
  Shape('Conv1d B=4 L=8192 128->128 k7', 'conv1d', 4, 128, 128, (8192,), 7),
]
GPU_SHAPES = [
  *CPU_SHAPES,
  Shape('Dense B=4096 4096->4096', 'dense', 4096, 4096, 4096),
  Shape('Conv1d B=16 L=8192 512->512 k7', 'conv1d', 16, 512, 512, (8192,), 7),
]
CPU_MODELS = [
  Model('MLP tower 8x Dense B=128 512', 'mlp', 128, 512, depth=8),
  Model(
    'HiFi-GAN-like generator B=1 T=16 C=128 x256', 'hifigan', 1, 128, frames=16, rates=(8, 8, 4)
  ),
]
GPU_MODELS = [
  Model('MLP tower 8x Dense B=1024 2048', 'mlp', 1024, 2048, depth=8),
  Model(
    'HiFi-GAN-like generator B=16 T=64 C=512 x256',
    'hifigan',
    16,
    512,
    frames=64,
    rates=(8, 8, 2, 2),
  ),
]
QUICK = [CPU_SHAPES[0], CPU_SHAPES[1], CPU_MODELS[0]]

# --- the models, once per framework, from a layer factory ---


class LinenTower(nn.Module):
  dense: Callable[[int], nn.Module]
  depth: int
  width: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = self.dense(self.width)(x)
      if i < self.depth - 1:
        x = nn.gelu(x)
    return x


class LinenGenerator(nn.Module):
  """HiFi-GAN's generator, smaller: conv_pre, per rate a transposed conv and a residual
  block of two dilated convs (type 2), conv_post. Input (batch, frames, 80)."""

  conv: Callable[[int, int, int], nn.Module]  # (features, kernel, dilation)
  conv_t: Callable[[int, int, int], nn.Module]  # (features, kernel, stride)
  width: int
  rates: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.width, 7, 1)(x)
    for i, u in enumerate(self.rates):
      x = self.conv_t(self.width >> (i + 1), 2 * u, u)(nn.leaky_relu(x, 0.1))
      for d in (1, 3):
        x = x + self.conv(self.width >> (i + 1), 3, d)(nn.leaky_relu(x, 0.1))
    return jnp.tanh(self.conv(1, 7, 1)(nn.leaky_relu(x, 0.1)))


class OutputScaledDense(nn.Module):
  """A reference point, not wn_jax's code: the paper's output-scaled Dense,
  ``y = (x v) * (g / ||v||) + b``, in plain autodiff with a plain norm (no zero-slice,
  overflow or mixed-precision handling). wn_jax's WNDense takes the same form where the
  rows are fewer than the input features; the gap between the two is the cost of its
  guarantees."""

  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    v = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    n = jnp.sqrt(jnp.sum(v * v, axis=0))
    g = self.param('scale', lambda key, shape: n, (self.features,))
    b = self.param('bias', nn.initializers.zeros, (self.features,))
    dt = self.dtype or x.dtype
    return (x @ v.astype(dt)) * (g / n).astype(dt) + b.astype(dt)


def linen_model(m: Model, wn: bool, dtype) -> nn.Module:
  dense, conv, conv_t = (
    (wl.WNDense, wl.WNConv, wl.WNConvTranspose)
    if wn
    else (
      nn.Dense,
      nn.Conv,
      nn.ConvTranspose,
    )
  )
  if m.kind == 'mlp':
    return LinenTower(lambda f: dense(f, dtype=dtype), m.depth, m.width)
  return LinenGenerator(
    lambda f, k, d: conv(f, (k,), kernel_dilation=(d,), padding='SAME', dtype=dtype),
    lambda f, k, s: conv_t(f, (k,), strides=(s,), padding='SAME', dtype=dtype),
    m.width,
    m.rates,
  )


class NNXTower(nnx.Module):
  def __init__(self, dense: Callable[[int, int], nnx.Module], m: Model):
    self.layers = nnx.List([dense(m.width, m.width) for _ in range(m.depth)])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = nnx.gelu(x)
    return x


class NNXGenerator(nnx.Module):
  def __init__(self, conv: Callable, conv_t: Callable, m: Model):
    c = m.width
    self.pre = conv(80, c, 7, 1)
    self.ups = nnx.List([])
    self.res = nnx.List([])
    for i, u in enumerate(m.rates):
      self.ups.append(conv_t(c >> i, c >> (i + 1), 2 * u, u))
      self.res.append(nnx.List([conv(c >> (i + 1), c >> (i + 1), 3, d) for d in (1, 3)]))
    self.post = conv(c >> len(m.rates), 1, 7, 1)

  def __call__(self, x):
    x = self.pre(x)
    for up, res in zip(self.ups, self.res):
      x = up(nnx.leaky_relu(x, 0.1))
      for conv in res:
        x = x + conv(nnx.leaky_relu(x, 0.1))
    return jnp.tanh(self.post(nnx.leaky_relu(x, 0.1)))


def nnx_model(m: Model, flavor: str, dtype) -> nnx.Module:
  """``flavor``: 'plain', 'wn_jax' (wn_jax.nnx layers) or 'flax' (nnx.WeightNorm-wrapped)."""
  rngs = nnx.Rngs(0)
  cls = {
    'plain': (nnx.Linear, nnx.Conv, nnx.ConvTranspose),
    'flax': (nnx.Linear, nnx.Conv, nnx.ConvTranspose),
    'wn_jax': (wx.WNLinear, wx.WNConv, wx.WNConvTranspose),
  }[flavor]
  wrap = (lambda layer: nnx.WeightNorm(layer, rngs=rngs)) if flavor == 'flax' else (lambda x: x)
  dense = lambda i, o: wrap(cls[0](i, o, dtype=dtype, rngs=rngs))
  conv = lambda i, o, k, d: wrap(
    cls[1](i, o, (k,), kernel_dilation=(d,), padding='SAME', dtype=dtype, rngs=rngs)
  )
  conv_t = lambda i, o, k, s: wrap(
    cls[2](i, o, (k,), strides=(s,), padding='SAME', dtype=dtype, rngs=rngs)
  )
  return NNXTower(dense, m) if m.kind == 'mlp' else NNXGenerator(conv, conv_t, m)


def torch_model(m: Model):
  tnn = torch.nn
  if m.kind == 'mlp':
    layers: list[Any] = []
    for i in range(m.depth):
      layers.append(tnn.Linear(m.width, m.width))
      if i < m.depth - 1:
        layers.append(tnn.GELU())
    return tnn.Sequential(*layers)

  class Generator(tnn.Module):
    def __init__(self):
      super().__init__()
      c = m.width
      self.pre = tnn.Conv1d(80, c, 7, padding=3)
      self.ups = tnn.ModuleList(
        tnn.ConvTranspose1d(c >> i, c >> (i + 1), 2 * u, u, padding=u // 2)
        for i, u in enumerate(m.rates)
      )
      self.res = tnn.ModuleList(
        tnn.ModuleList(
          tnn.Conv1d(c >> (i + 1), c >> (i + 1), 3, dilation=d, padding=d) for d in (1, 3)
        )
        for i in range(len(m.rates))
      )
      self.post = tnn.Conv1d(c >> len(m.rates), 1, 7, padding=3)

    def forward(self, x):
      act = lambda t: tnn.functional.leaky_relu(t, 0.1)
      x = self.pre(x)
      for up, res in zip(self.ups, self.res):
        x = up(act(x))
        for conv in res:
          x = x + conv(act(x))
      return torch.tanh(self.post(act(x)))

  return Generator()


# --- the arms: each returns (step, state) with step(state) -> state, all jitted ---


def _loss(y):
  return jnp.mean(jnp.square(y.astype(jnp.float32)))


@dataclasses.dataclass
class Arm:
  step: Callable  # state -> state
  state: Any
  jitted: Any = None  # the jax.jit of step, for the HLO statistics; None for torch
  x: Any = None  # the input, the jitted step's second argument


def _jax_step(apply: Callable, params, x, tx) -> Arm:
  """A jitted train step of loss(apply(params, x)) with optax ``tx``; state = (params, opt).

  ``x`` is an argument of the compiled step, not a constant folded into it.
  """

  def step(state, x):
    params, opt_state = state
    grads = jax.grad(lambda p: _loss(apply(p, x)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree_util.tree_map(jnp.copy, params)  # each arm owns (and donates) its buffers
  jitted = jax.jit(step, donate_argnums=0)
  return Arm(lambda state: jitted(state, x), (params, tx.init(params)), jitted, x)


def _flax_layer(shape: Shape, cls_dense, cls_conv, **kw):
  if shape.kind == 'dense':
    return cls_dense(shape.cout, **kw)
  return cls_conv(shape.cout, (shape.kernel,) * len(shape.spatial), padding='SAME', **kw)


def _input(case: Shape | Model, dtype, layout='nhwc'):
  key = jax.random.key(0)
  if isinstance(case, Model):
    if case.kind == 'mlp':
      return jax.random.normal(key, (case.batch, case.width), dtype)
    shape = (case.batch, 80, case.frames) if layout == 'nchw' else (case.batch, case.frames, 80)
    return jax.random.normal(key, shape, dtype)
  if case.kind == 'dense':
    return jax.random.normal(key, (case.batch, case.cin), dtype)
  if layout == 'nchw':
    return jax.random.normal(key, (case.batch, case.cin, *case.spatial), dtype)
  return jax.random.normal(key, (case.batch, *case.spatial, case.cin), dtype)


def _raw_apply(shape: Shape):
  n = len(shape.spatial)
  dims = (
    jax.lax.conv_dimension_numbers(
      (1,) * (n + 2),
      (1,) * (n + 2),
      ('N' + 'HWD'[:n] + 'C', 'HWD'[:n] + 'IO', 'N' + 'HWD'[:n] + 'C'),
    )
    if n
    else None
  )

  def apply(p, x):
    # Parameters are float32; compute in the input's dtype, as Flax's `dtype=` does.
    kernel, bias = p['kernel'].astype(x.dtype), p['bias'].astype(x.dtype)
    if shape.kind == 'dense':
      return x @ kernel + bias
    y = jax.lax.conv_general_dilated(x, kernel, (1,) * n, 'SAME', dimension_numbers=dims)
    return y + bias

  return apply


def _nnx_arm(module, x, tx) -> Arm:
  """Functional steps through split/merge, so no arm pays nnx.jit's Python overhead."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  return _jax_step(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, x, tx)


def _linen_arms(plain, wn, x, tx, key) -> dict[str, Arm]:
  """The linen-based arms: plain, wn_jax linen, pytree, optim, flax.linen.WeightNorm."""
  plain_params = plain.init(key, x)['params']
  flax_wn = nn.WeightNorm(plain)
  return {
    'flax linen (plain)': _jax_step(
      lambda p, x: plain.apply({'params': p}, x), plain_params, x, tx
    ),
    'wn_jax linen': _jax_step(
      lambda p, x: wn.apply({'params': p}, x), wn.init(key, x)['params'], x, tx
    ),
    'wn_jax pytree': _jax_step(
      lambda p, x: plain.apply({'params': wn_jax.materialize(p)}, x),
      wn_jax.weight_norm(plain_params),
      x,
      tx,
    ),
    'wn_jax optim': _jax_step(
      lambda p, x: plain.apply({'params': p}, x), plain_params, x, wn_jax.optim.weight_norm(tx)
    ),
    'flax.linen.WeightNorm': _jax_step(
      lambda p, x: flax_wn.apply({'params': p}, x), flax_wn.init(key, x)['params'], x, tx
    ),
  }


def jax_arms(case: Shape | Model, dtype, tx) -> dict[str, Arm]:
  x = _input(case, dtype)
  key = jax.random.key(1)
  if isinstance(case, Model):
    arms = _linen_arms(linen_model(case, False, dtype), linen_model(case, True, dtype), x, tx, key)
    arms['flax nnx (plain)'] = _nnx_arm(nnx_model(case, 'plain', dtype), x, tx)
    arms['wn_jax nnx'] = _nnx_arm(nnx_model(case, 'wn_jax', dtype), x, tx)
    arms['flax.nnx.WeightNorm'] = _nnx_arm(nnx_model(case, 'flax', dtype), x, tx)
    if case.kind == 'mlp':
      proto = LinenTower(lambda f: OutputScaledDense(f, dtype), case.depth, case.width)
      arms[PROTO] = _jax_step(
        lambda p, x: proto.apply({'params': p}, x), proto.init(key, x)['params'], x, tx
      )
    return arms
  shape = case
  plain = _flax_layer(shape, nn.Dense, nn.Conv, dtype=dtype)
  arms = {
    'raw jnp/lax': _jax_step(_raw_apply(shape), plain.init(key, x)['params'], x, tx),
    **_linen_arms(plain, _flax_layer(shape, wl.WNDense, wl.WNConv, dtype=dtype), x, tx, key),
  }
  if shape.kind == 'dense':
    proto = OutputScaledDense(shape.cout, dtype)
    arms[PROTO] = _jax_step(
      lambda p, x: proto.apply({'params': p}, x), proto.init(key, x)['params'], x, tx
    )
  rngs = lambda: nnx.Rngs(0)
  if shape.kind == 'dense':
    make = lambda cls: cls(shape.cin, shape.cout, dtype=dtype, rngs=rngs())
    nnx_plain, nnx_wn = nnx.Linear, wx.WNLinear
  else:
    ks = (shape.kernel,) * len(shape.spatial)
    make = lambda cls: cls(shape.cin, shape.cout, ks, dtype=dtype, rngs=rngs())
    nnx_plain, nnx_wn = nnx.Conv, wx.WNConv
  arms['flax nnx (plain)'] = _nnx_arm(make(nnx_plain), x, tx)
  arms['wn_jax nnx'] = _nnx_arm(make(nnx_wn), x, tx)
  arms['flax.nnx.WeightNorm'] = _nnx_arm(nnx.WeightNorm(make(nnx_plain), rngs=rngs()), x, tx)

  # Equinox: per-example layers under vmap, channels-first convs, float32 parameters
  # cast to the compute dtype at the call (Equinox has no dtype policy).
  k = jax.random.key(2)
  if shape.kind == 'dense':
    eq_plain = eqx.nn.Linear(shape.cin, shape.cout, key=k)
    ex = x
  else:
    n = len(shape.spatial)
    eq_plain = eqx.nn.Conv(n, shape.cin, shape.cout, shape.kernel, padding='SAME', key=k)
    ex = _input(shape, dtype, 'nchw')

  def eqx_arm(model):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply(p, x):
      p = jax.tree_util.tree_map(lambda a: a.astype(dtype), p)
      return jax.vmap(eqx.combine(p, static))(x)

    return _jax_step(apply, params, ex, tx)

  arms['equinox (plain)'] = eqx_arm(eq_plain)
  arms['equinox.nn.WeightNorm'] = eqx_arm(eqx.nn.WeightNorm(eq_plain))
  return arms


def torch_arms(case: Shape | Model, dtype_name: str, cast: bool) -> dict[str, Arm]:
  if torch is None:
    return {}
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  bf16 = dtype_name == 'bfloat16'
  from torch.nn.utils import parametrizations
  from torch.nn.utils import weight_norm as legacy

  def make():
    torch.manual_seed(0)
    if isinstance(case, Model):
      return torch_model(case)
    if case.kind == 'dense':
      return torch.nn.Linear(case.cin, case.cout)
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d}[len(case.spatial)]
    return conv(case.cin, case.cout, case.kernel, padding='same')

  x = torch.from_numpy(np.array(_input(case, jnp.float32, 'nchw'))).to(device)
  if bf16:
    x = x.to(torch.bfloat16)

  def weight_normed(module, fn):
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose1d)
    if isinstance(module, layers):
      return fn(module)
    for m in list(module.modules()):
      if isinstance(m, layers):
        fn(m)
    return module

  def arm(module):
    module = module.to(device)
    if bf16 and cast:
      module = module.to(torch.bfloat16)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    autocast = bf16 and not cast

    def step(state):
      opt.zero_grad(set_to_none=True)
      with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        y = module(x)
      y.float().square().mean().backward()
      opt.step()
      if device == 'cuda':
        torch.cuda.synchronize()
      return state

    return Arm(step, None)

  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return {
      'torch (plain)': arm(make()),
      'torch weight_norm (legacy)': arm(weight_normed(make(), legacy)),
      'torch parametrizations.weight_norm': arm(
        weight_normed(make(), parametrizations.weight_norm)
      ),
    }


PROTO = 'output-scaled Dense, plain autodiff (reference)'
BASELINE = {
  'wn_jax linen': ('flax linen (plain)', 'raw jnp/lax'),
  'wn_jax nnx': ('flax nnx (plain)', 'raw jnp/lax'),
  'wn_jax pytree': ('flax linen (plain)', 'raw jnp/lax'),
  'wn_jax optim': ('flax linen (plain)', 'raw jnp/lax'),
  'flax.linen.WeightNorm': ('flax linen (plain)', 'raw jnp/lax'),
  'flax.nnx.WeightNorm': ('flax nnx (plain)', 'raw jnp/lax'),
  'equinox.nn.WeightNorm': ('equinox (plain)',),
  'torch weight_norm (legacy)': ('torch (plain)',),
  'torch parametrizations.weight_norm': ('torch (plain)',),
  PROTO: ('flax linen (plain)', 'raw jnp/lax'),
}
COLUMNS = list(BASELINE)
PLAINS = [
  'raw jnp/lax',
  'flax linen (plain)',
  'flax nnx (plain)',
  'equinox (plain)',
  'torch (plain)',
]


def _block(state):
  return jax.block_until_ready(state) if state is not None else None


def measure(arms: dict[str, Arm], rounds: int, min_time: float) -> dict[str, list[float]]:
  """Per-round seconds per step, arms interleaved in a shuffled order each round."""
  steps = {}
  for name, arm in arms.items():
    state = _block(arm.step(arm.state))  # compile and warm up
    state = _block(arm.step(state))
    steps[name] = [arm.step, state, 1]
  for entry in steps.values():  # enough calls per sample to reach min_time
    fn, state, _ = entry
    t = time.perf_counter()
    state = _block(fn(state))
    dt = time.perf_counter() - t
    entry[1], entry[2] = state, max(1, int(min_time / max(dt, 1e-6)))
  times: dict[str, list[float]] = {name: [] for name in steps}
  order = list(steps)
  for _ in range(rounds):
    random.shuffle(order)
    for name in order:
      entry = steps[name]
      fn, state, n = entry
      t = time.perf_counter()
      for _ in range(n):
        state = fn(state)
      _block(state)
      times[name].append((time.perf_counter() - t) / n)
      entry[1] = state
  return times


def _baseline(arm: str, times: dict[str, list[float]]) -> str:
  bases = [b for b in BASELINE[arm] if b in times]
  return min(bases, key=lambda b: statistics.median(times[b]))


def ratios(times: dict[str, list[float]], stat: str = 'median') -> dict[str, float]:
  """Median over rounds of arm / baseline in the same round; baseline = the faster plain.

  ``stat='min'``: the arm's fastest round over the baseline's fastest round instead (less
  sensitive to other processes, which only ever add time).
  """
  out = {}
  for arm in BASELINE:
    if arm in times:
      base = times[_baseline(arm, times)]
      if stat == 'min':
        out[arm] = min(times[arm]) / min(base)
      else:
        out[arm] = statistics.median(a / b for a, b in zip(times[arm], base))
  return out


# Instructions of an optimized HLO's entry computation that launch no kernel.
_FREE_OPS = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all'}
_OP = re.compile(r'=\s.*?\s([a-z][\w-]*)\(')


def host_us(state) -> float:
  """Microseconds of the pytree work a jitted call does on the host for ``state``:
  flattening the arguments and unflattening the results (median of many)."""
  ts = []
  for _ in range(501):
    t = time.perf_counter()
    leaves, treedef = jax.tree_util.tree_flatten(state)
    jax.tree_util.tree_unflatten(treedef, leaves)
    ts.append(time.perf_counter() - t)
  return 1e6 * statistics.median(ts)


def hlo_stats(arm: Arm) -> dict[str, float]:
  """Kernels (top-level instructions of the optimized HLO's entry that do work),
  conditionals among them, XLA's estimate of the bytes the step accesses, and the
  host's pytree work per call."""
  compiled = arm.jitted.lower(arm.state, arm.x).compile()
  text = compiled.as_text()
  entry = text[text.index('\nENTRY') :]
  entry = entry[: entry.index('\n}')]
  ops = [m.group(1) for line in entry.splitlines()[1:] if (m := _OP.search(line))]
  kernels = [op for op in ops if op not in _FREE_OPS]
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return {
    'kernels': len(kernels),
    'conditionals': kernels.count('conditional'),
    'bytes': float(cost.get('bytes accessed', float('nan'))),
    'host_us': host_us(arm.state),
  }


def compile_and_memory(shape: Shape, dtype, tx) -> dict[str, float]:
  x = _input(shape, dtype)
  key = jax.random.key(1)
  plain = _flax_layer(shape, nn.Dense, nn.Conv, dtype=dtype)
  wn = _flax_layer(shape, wl.WNDense, wl.WNConv, dtype=dtype)
  out = {}
  for name, module in (('plain', plain), ('wn', wn)):
    params = module.init(key, x)['params']
    arm = _jax_step(lambda p, x, m=module: m.apply({'params': p}, x), params, x, tx)
    t = []
    for _ in range(3):
      jax.clear_caches()
      t0 = time.perf_counter()
      compiled = arm.jitted.lower(arm.state, arm.x).compile()
      t.append(time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    peak = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
    out[f'{name}_compile'] = min(t)
    out[f'{name}_peak'] = peak
  return out


def inference(shape: Shape, dtype, rounds: int, min_time: float) -> dict[str, float]:
  x = _input(shape, dtype)
  key = jax.random.key(1)
  plain = _flax_layer(shape, nn.Dense, nn.Conv, dtype=dtype)
  wn = _flax_layer(shape, wl.WNDense, wl.WNConv, dtype=dtype)
  pp = plain.init(key, x)['params']
  wp = wn.init(key, x)['params']
  folded = {'kernel': wn_jax.normalize(wp['kernel'], wp['scale']), 'bias': wp['bias']}
  plain_fwd = jax.jit(lambda p, x: plain.apply({'params': p}, x))
  wn_fwd = jax.jit(lambda p, x: wn.apply({'params': p}, x))
  # The state a forward "step" passes on is its output, so measure() blocks on it.
  arms = {
    'plain': Arm(lambda _: plain_fwd(pp, x), None),
    'folded': Arm(lambda _: plain_fwd(folded, x), None),
    'unfolded': Arm(lambda _: wn_fwd(wp, x), None),
  }
  times = measure(arms, rounds, min_time)
  return {
    k: statistics.median(a / b for a, b in zip(times[k], times['plain']))
    for k in ('folded', 'unfolded')
  }


def bandwidth(nbytes: int) -> float:
  """Measured bytes/s of passes over an array of ``nbytes`` (read + write, in a loop)."""
  a = jnp.ones((max(nbytes // 4, 1024),), jnp.float32)
  passes = 20
  # The barrier keeps XLA from fusing the iterations into one pass.
  body = lambda i, a: jax.lax.optimization_barrier(a * 1.0001)
  f = jax.jit(lambda a: jax.lax.fori_loop(0, passes, body, a))
  f(a).block_until_ready()
  ts = []
  for _ in range(10):
    t = time.perf_counter()
    f(a).block_until_ready()
    ts.append(time.perf_counter() - t)
  return 2 * a.nbytes * passes / min(ts)  # the fastest: other processes only add time


def weight_bytes(shape: Shape) -> int:
  """Bytes of the float32 weight (parameters stay float32 in every dtype)."""
  return 4 * shape.cin * shape.cout * shape.kernel ** len(shape.spatial)


# Weight-sized transfers that weight normalization adds to a train step, at best:
# forward: read v for ||v||, read v and write w; backward: read dL/dw and v for
# dL/dg, read dL/dw and v and write dL/dv. (g's are tiny.)
EXTRA_PASSES = 8


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  dev = jax.devices()[0]
  return (
    f'{dev.platform.upper()} ({dev.device_kind}), {os.cpu_count()} cores [{cpu}], '
    f'jax {jax.__version__}, flax {__import__("flax").__version__}, optax {optax.__version__}, '
    f'equinox {eqx.__version__}' + (f', torch {torch.__version__}' if torch is not None else '')
  )


def run_case(case: Shape | Model, dtype, tx, args) -> dict[str, Any]:
  gc.collect()
  t0 = time.perf_counter()
  arms = jax_arms(case, dtype, tx)
  hlo = {name: hlo_stats(arm) for name, arm in arms.items()}
  row: dict[str, Any] = {'case': case, 'hlo': hlo}
  if args.hlo_only:
    print(f'{case.name}: kernels ' + ', '.join(f'{k} {v["kernels"]}' for k, v in hlo.items()))
    return row
  arms.update(torch_arms(case, args.dtype, args.torch_cast))
  if isinstance(case, Shape):
    heavy = case.batch * case.cin * case.cout * case.kernel ** len(case.spatial)
    heavy *= int(np.prod(case.spatial or (1,)))
  else:
    heavy = 0
  rounds = args.rounds or (7 if args.quick else (15 if heavy > 2e9 else 31))
  times = measure(arms, rounds, min_time=0.02 if args.quick else 0.05)
  row['ratio'] = ratios(times)
  row['ratio_min'] = ratios(times, 'min')
  row['load'] = os.getloadavg()[0]
  row['ms'] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
  row['base'] = {k: _baseline(k, times) for k in row['ratio']}
  jax_plains = [p for p in ('raw jnp/lax', 'flax linen (plain)') if p in times]
  row['plain_ms'] = min(row['ms'][p] for p in jax_plains)
  if isinstance(case, Shape):
    extra = inference(case, dtype, rounds=5 if args.quick else 21, min_time=0.02)
    row['folded'], row['wn_inference'] = extra['folded'], extra['unfolded']
    if not args.quick:
      cm = compile_and_memory(case, dtype, tx)
      row['compile'] = cm['wn_compile'] / cm['plain_compile']
      row['memory'] = cm['wn_peak'] / cm['plain_peak']
    row['bandwidth'] = bandwidth(weight_bytes(case))
    row['floor'] = EXTRA_PASSES * weight_bytes(case) / row['bandwidth'] / (row['plain_ms'] / 1e3)
  print(
    f'{case.name}: {time.perf_counter() - t0:.0f}s, plain step {row["plain_ms"]:.3f} ms, '
    + ', '.join(f'{k} {v:.3f}' for k, v in row['ratio'].items()),
    flush=True,
  )
  return row


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='few shapes and rounds; prints only')
  parser.add_argument('--hlo-only', action='store_true', help='kernel counts only, no timing')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--gpu-shapes', action='store_true', help='add larger shapes (for a GPU)')
  parser.add_argument(
    '--torch-cast',
    action='store_true',
    help='bfloat16: cast the torch modules to bfloat16 instead of autocast',
  )
  parser.add_argument('--only', default=None, help='run only cases whose name contains this')
  parser.add_argument('--rounds', type=int, default=None)
  parser.add_argument(
    '--torch-threads',
    type=int,
    default=None,
    help='intra-op threads of torch (default: 1 on CPU, see the module docstring)',
  )
  parser.add_argument(
    '--out', default=None, help='results file stem (default: overhead_<platform>_<dtype>)'
  )
  args = parser.parse_args()
  if torch is not None:
    torch.set_num_threads(args.torch_threads or (1 if jax.devices()[0].platform == 'cpu' else 4))
  dtype = jnp.dtype(args.dtype)
  if args.quick:
    cases: list[Shape | Model] = list(QUICK)
  elif args.gpu_shapes:
    cases = [*GPU_SHAPES, *CPU_MODELS, *GPU_MODELS]
  else:
    cases = [*CPU_SHAPES, *CPU_MODELS]
  if args.only:
    cases = [c for c in cases if args.only in c.name]
  tx = optax.adam(1e-3)
  print(machine())
  rows = [run_case(case, dtype, tx, args) for case in cases]
  text = render(rows, args)
  print()
  print(text)
  if args.quick or args.hlo_only or args.only:
    return
  stem = args.out or f'overhead_{jax.devices()[0].platform}_{args.dtype}'
  RESULTS.mkdir(exist_ok=True)
  flags = (' --dtype ' + args.dtype if args.dtype != 'float32' else '') + (
    ' --torch-cast' if args.torch_cast else ''
  )
  header = (
    f'# Weight-normalization overhead per train step ({args.dtype})\n\n'
    f'Machine: {machine()}. Load average (1 min) while each case ran: '
    + ', '.join(f'{r["load"]:.1f}' for r in rows if 'load' in r)
    + '.\n\n'
    f'Reproduce: `python benchmarks/overhead.py{flags}`. {DTYPE_NOTE[args.dtype]}\n\n' + EXPLAIN
  )
  (RESULTS / f'{stem}.md').write_text(header + '\n' + text + '\n')
  plot(rows, RESULTS / f'{stem}.png', args.dtype)
  print(f'wrote {RESULTS / (stem + ".md")} and .png')


DTYPE_NOTE = {
  'float32': 'Every arm computes in float32.',
  'bfloat16': (
    'Every arm keeps float32 parameters and computes in bfloat16: Flax and wn_jax by '
    '`dtype=bfloat16`, raw jnp/lax and Equinox by casting the parameters at the call, torch '
    'by `torch.autocast` (with `--torch-cast`, torch modules are converted to bfloat16 '
    'instead).'
  ),
}
EXPLAIN = (
  'Train step = forward + backward + optax adam update, jitted. Ratio: median over rounds '
  'of (arm time / baseline time in the same round), arms interleaved in a shuffled order '
  "each round. JAX baseline: the faster of the framework's plain layer and raw jnp/lax "
  "(models: the framework's plain model); torch: torch's plain layer or model. Single runs "
  'of a ratio move by several percent on a shared 2-core machine.\n\n'
  "Kernels: top-level instructions of the compiled step's optimized HLO (fusions, "
  'matmuls, convolutions, copies; a GPU launches each as at least one kernel), extra over '
  "the plain arm, per weight-normed layer. Bytes: XLA's cost analysis of the whole step, "
  "over the plain arm's. These counts are of this machine's backend (CPU unless the run "
  'says otherwise); a GPU compiles its own fusions, but each weight-sized pass and each '
  'reduction counted here is one there too. Host: the pytree work of one call of the '
  'jitted step on the host (flatten the state, unflatten the result), which a launch-bound '
  'GPU step waits on.\n\n'
  'Layers only: `folded`: inference with the weight materialized once, over plain '
  "inference; `wn inference`: the WN layer's forward. `compile`, `memory`: wn_jax linen "
  'over plain linen (compile time, XLA peak memory of the train step). `floor`: '
  f'{EXTRA_PASSES} weight-sized passes (forward: the norm, the scaling; backward: the '
  'reduction for dL/dg, the elementwise dL/dv) over the bandwidth measured for passes over '
  "an array of the weight's size (`GB/s`), as a fraction of the plain step: an estimate "
  'of what no implementation goes under without fusing into the matmul.\n'
)


def _fmt(v, digits=3):
  return '–' if v is None or (isinstance(v, float) and np.isnan(v)) else f'{v:.{digits}f}'


def _table(head: list[str], lines: list[list[str]]) -> str:
  out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  out += ['| ' + ' | '.join(cells) + ' |' for cells in lines]
  return '\n'.join(out)


def render(rows: list[dict], args) -> str:
  parts = []
  timed = [r for r in rows if 'ratio' in r]
  if timed:
    present = [c for c in COLUMNS if any(c in r['ratio'] for r in timed)]
    parts.append('## Train step, ratio over the plain layer or model\n')
    parts.append(
      _table(
        ['case', 'plain JAX step (ms)', *present],
        [
          [r['case'].name, _fmt(r['plain_ms'], 3), *[_fmt(r['ratio'].get(c)) for c in present]]
          for r in timed
        ],
      )
    )
    parts.append(
      "\n## Train step, fastest round over the baseline's fastest round (robust to load)\n"
    )
    parts.append(
      _table(
        ['case', *present],
        [[r['case'].name, *[_fmt(r['ratio_min'].get(c)) for c in present]] for r in timed],
      )
    )
    arms = [a for a in PLAINS + COLUMNS if any(a in r['ms'] for r in timed)]
    parts.append('\n## Train step, milliseconds (median over rounds)\n')
    parts.append(
      _table(
        ['case', *arms],
        [[r['case'].name, *[_fmt(r['ms'].get(a), 3) for a in arms]] for r in timed],
      )
    )
    layers = [r for r in timed if isinstance(r['case'], Shape)]
    if layers:
      parts.append('\n## Layers: inference, compile time, memory, bandwidth floor\n')
      parts.append(
        _table(
          ['case', 'folded', 'wn inference', 'compile', 'memory', 'GB/s', 'floor'],
          [
            [
              r['case'].name,
              _fmt(r['folded']),
              _fmt(r['wn_inference']),
              _fmt(r.get('compile'), 2),
              _fmt(r.get('memory'), 2),
              f'{r["bandwidth"] / 1e9:.0f}',
              f'+{r["floor"]:.3f}',
            ]
            for r in layers
          ],
        )
      )
  jax_cols = [c for c in COLUMNS if not c.startswith('torch')]
  present = [c for c in jax_cols if any(c in r['hlo'] for r in rows)]
  parts.append(
    '\n## Compiled step: kernels (extra per WN layer over the plain arm) and bytes accessed '
    '(over the plain arm)\n'
  )
  lines = []
  for r in rows:
    hlo, case = r['hlo'], r['case']
    n_layers = case.layers if isinstance(case, Model) else 1
    plain = hlo.get('flax linen (plain)')
    cells = [case.name, str(plain['kernels']) if plain else '–']
    for c in present:
      if c not in hlo:
        cells.append('–')
        continue
      base = hlo[
        {
          'wn_jax nnx': 'flax nnx (plain)',
          'flax.nnx.WeightNorm': 'flax nnx (plain)',
          'equinox.nn.WeightNorm': 'equinox (plain)',
        }.get(c, 'flax linen (plain)')
      ]
      extra = (hlo[c]['kernels'] - base['kernels']) / n_layers
      cond = f' ({hlo[c]["conditionals"]} cond)' if hlo[c]['conditionals'] else ''
      cells.append(
        f'{hlo[c]["kernels"]} (+{extra:.3g}){cond}, {hlo[c]["bytes"] / base["bytes"]:.2f}x'
      )
    lines.append(cells)
  parts.append(_table(['case', 'plain linen kernels', *present], lines))
  arms = [a for a in PLAINS + jax_cols if any(a in r['hlo'] for r in rows)]
  parts.append(
    "\n## Host work per call: flattening the step's state and unflattening its result "
    '(microseconds)\n'
  )
  parts.append(
    _table(
      ['case', *arms],
      [
        [r['case'].name, *[_fmt(r['hlo'].get(a, {}).get('host_us'), 1) for a in arms]] for r in rows
      ],
    )
  )
  return '\n'.join(parts)


def plot(rows: list[dict], path: Path, dtype: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  timed = [r for r in rows if 'ratio' in r]
  present = [c for c in COLUMNS if any(c in r['ratio'] for r in timed)]
  fig, ax = plt.subplots(figsize=(13, 5))
  width = 0.8 / len(present)
  xs = np.arange(len(timed))
  for i, c in enumerate(present):
    vals = [r['ratio'].get(c, np.nan) - 1 for r in timed]
    ax.bar(xs + i * width, vals, width, label=c)
  ax.axhline(0, color='black', linewidth=0.8)
  labels = [r['case'].name.replace(' B=', '\nB=', 1) for r in timed]
  ax.set_xticks(xs + 0.4 - width / 2, labels, fontsize=7)
  ax.set_ylabel('train-step overhead (ratio - 1) vs plain')
  ax.set_title(f'Weight-normalization overhead per train step ({dtype}, lower is better)')
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == '__main__':
  main()
