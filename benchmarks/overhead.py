"""What weight normalization costs per train step, wn_jax against every peer.

One process, arms interleaved (A B C ... A B C ..., a fresh random order each round),
each timing a full jitted train step (forward, backward, optax adam update) after
warm-up and compilation. Reported: the median over rounds of each arm's time divided by
its baseline's time in the same round. The baseline of a JAX arm is the faster of the
framework's plain layer and the same computation in raw jnp/lax ("the plain layer");
torch arms are compared with torch's plain layer. Also: inference with the weight
materialized once (folded), compile time and peak memory (XLA's memory analysis), and
the floor: the extra bytes weight normalization must move per step over the measured
memory bandwidth.

    python benchmarks/overhead.py            # full run, writes benchmarks/results/
    python benchmarks/overhead.py --quick    # under a minute, prints only
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
import statistics
import time
from collections.abc import Callable
from pathlib import Path

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
except ImportError:  # torch is optional
  torch = None

RESULTS = Path(__file__).parent / 'results'


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  kind: str  # 'dense', 'conv1d', 'conv2d'
  batch: int
  cin: int
  cout: int
  spatial: tuple[int, ...] = ()
  kernel: int = 1


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
QUICK_SHAPES = [CPU_SHAPES[0], CPU_SHAPES[1], CPU_SHAPES[3]]


# --- the arms: each returns (step, state) with step(state) -> state, all jitted ---


def _loss(y):
  return jnp.mean(jnp.square(y.astype(jnp.float32)))


def _jax_step(apply: Callable, params, x, tx):
  """A jitted train step of loss(apply(params, x)) with optax ``tx``; state = (params, opt)."""

  def step(state):
    params, opt_state = state
    grads = jax.grad(lambda p: _loss(apply(p, x)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree_util.tree_map(jnp.copy, params)  # each arm owns (and donates) its buffers
  return jax.jit(step, donate_argnums=0), (params, tx.init(params))


def _flax_layer(shape: Shape, cls_dense, cls_conv, **kw):
  if shape.kind == 'dense':
    return cls_dense(shape.cout, **kw)
  return cls_conv(shape.cout, (shape.kernel,) * len(shape.spatial), padding='SAME', **kw)


def _input(shape: Shape, dtype, layout='nhwc'):
  key = jax.random.key(0)
  if shape.kind == 'dense':
    return jax.random.normal(key, (shape.batch, shape.cin), dtype)
  if layout == 'nchw':
    return jax.random.normal(key, (shape.batch, shape.cin, *shape.spatial), dtype)
  return jax.random.normal(key, (shape.batch, *shape.spatial, shape.cin), dtype)


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
    if shape.kind == 'dense':
      return x @ p['kernel'] + p['bias']
    y = jax.lax.conv_general_dilated(x, p['kernel'], (1,) * n, 'SAME', dimension_numbers=dims)
    return y + p['bias']

  return apply


def jax_arms(shape: Shape, dtype, tx) -> dict[str, tuple]:
  x = _input(shape, dtype)
  key = jax.random.key(1)
  plain = _flax_layer(shape, nn.Dense, nn.Conv, dtype=dtype)
  plain_params = plain.init(key, x)['params']
  wn = _flax_layer(shape, wl.WNDense, wl.WNConv, dtype=dtype)
  wn_params = wn.init(key, x)['params']
  arms = {
    'raw jnp/lax': _jax_step(_raw_apply(shape), plain_params, x, tx),
    'flax linen (plain)': _jax_step(
      lambda p, x: plain.apply({'params': p}, x), plain_params, x, tx
    ),
    'wn_jax linen': _jax_step(lambda p, x: wn.apply({'params': p}, x), wn_params, x, tx),
    'wn_jax pytree': _jax_step(
      lambda p, x: plain.apply({'params': wn_jax.materialize(p)}, x),
      wn_jax.weight_norm(plain_params),
      x,
      tx,
    ),
  }
  opt_tx = wn_jax.optim.weight_norm(tx)
  arms['wn_jax optim'] = _jax_step(
    lambda p, x: plain.apply({'params': p}, x), plain_params, x, opt_tx
  )
  flax_wn = nn.WeightNorm(_flax_layer(shape, nn.Dense, nn.Conv, dtype=dtype))
  arms['flax.linen.WeightNorm'] = _jax_step(
    lambda p, x: flax_wn.apply({'params': p}, x), flax_wn.init(key, x)['params'], x, tx
  )

  # NNX: functional steps through split/merge, so no arm pays nnx.jit's Python overhead.
  def nnx_arm(module):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return _jax_step(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, x, tx)

  rngs = lambda: nnx.Rngs(0)
  if shape.kind == 'dense':
    arms['flax nnx (plain)'] = nnx_arm(nnx.Linear(shape.cin, shape.cout, dtype=dtype, rngs=rngs()))
    arms['wn_jax nnx'] = nnx_arm(wx.WNLinear(shape.cin, shape.cout, dtype=dtype, rngs=rngs()))
    arms['flax.nnx.WeightNorm'] = nnx_arm(
      nnx.WeightNorm(nnx.Linear(shape.cin, shape.cout, dtype=dtype, rngs=rngs()), rngs=rngs())
    )
  else:
    ks = (shape.kernel,) * len(shape.spatial)
    arms['flax nnx (plain)'] = nnx_arm(
      nnx.Conv(shape.cin, shape.cout, ks, dtype=dtype, rngs=rngs())
    )
    arms['wn_jax nnx'] = nnx_arm(wx.WNConv(shape.cin, shape.cout, ks, dtype=dtype, rngs=rngs()))
    arms['flax.nnx.WeightNorm'] = nnx_arm(
      nnx.WeightNorm(nnx.Conv(shape.cin, shape.cout, ks, dtype=dtype, rngs=rngs()), rngs=rngs())
    )

  # Equinox: per-example layers under vmap, channels-first convs.
  k = jax.random.key(2)
  if shape.kind == 'dense':
    eq_plain = eqx.nn.Linear(shape.cin, shape.cout, key=k, dtype=dtype)
    ex = x
  else:
    n = len(shape.spatial)
    eq_plain = eqx.nn.Conv(
      n, shape.cin, shape.cout, shape.kernel, padding='SAME', key=k, dtype=dtype
    )
    ex = _input(shape, dtype, 'nchw')
  eq_wn = eqx.nn.WeightNorm(eq_plain)

  def eqx_arm(model):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return _jax_step(lambda p, x: jax.vmap(eqx.combine(p, static))(x), params, ex, tx)

  arms['equinox (plain)'] = eqx_arm(eq_plain)
  arms['equinox.nn.WeightNorm'] = eqx_arm(eq_wn)
  return arms


def torch_arms(shape: Shape, dtype_name: str) -> dict[str, tuple]:
  if torch is None:
    return {}
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  tdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype_name]
  from torch.nn.utils import parametrizations
  from torch.nn.utils import weight_norm as legacy

  def make():
    torch.manual_seed(0)
    if shape.kind == 'dense':
      return torch.nn.Linear(shape.cin, shape.cout)
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d}[len(shape.spatial)]
    return conv(shape.cin, shape.cout, shape.kernel, padding='same')

  if shape.kind == 'dense':
    x = torch.randn(shape.batch, shape.cin)
  else:
    x = torch.randn(shape.batch, shape.cin, *shape.spatial)
  x = x.to(device, tdtype)

  def arm(module):
    module = module.to(device, tdtype)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)

    def step(state):
      opt.zero_grad(set_to_none=True)
      module(x).float().square().mean().backward()
      opt.step()
      if device == 'cuda':
        torch.cuda.synchronize()
      return state

    return step, None

  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return {
      'torch (plain)': arm(make()),
      'torch weight_norm (legacy)': arm(legacy(make())),
      'torch parametrizations.weight_norm': arm(parametrizations.weight_norm(make())),
    }


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
}


def _block(state):
  return jax.block_until_ready(state) if state is not None else None


def measure(arms: dict[str, tuple], rounds: int, min_time: float) -> dict[str, list[float]]:
  """Per-round seconds per step, arms interleaved in a shuffled order each round."""
  steps = {}
  for name, (fn, state) in arms.items():
    state = _block(fn(state))  # compile and warm up
    state = _block(fn(state))
    steps[name] = [fn, state, 1]
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


def ratios(times: dict[str, list[float]]) -> dict[str, float]:
  """Median over rounds of arm / baseline in the same round; baseline = the faster plain."""
  out = {}
  for arm, bases in BASELINE.items():
    if arm not in times:
      continue
    bases = [b for b in bases if b in times]
    base = min(bases, key=lambda b: statistics.median(times[b]))
    out[arm] = statistics.median(a / b for a, b in zip(times[arm], times[base]))
  return out


def compile_and_memory(shape: Shape, dtype, tx) -> dict[str, float]:
  x = _input(shape, dtype)
  key = jax.random.key(1)
  plain = _flax_layer(shape, nn.Dense, nn.Conv, dtype=dtype)
  wn = _flax_layer(shape, wl.WNDense, wl.WNConv, dtype=dtype)
  out = {}
  for name, module in (('plain', plain), ('wn', wn)):
    params = module.init(key, x)['params']
    step, state = _jax_step(lambda p, x, m=module: m.apply({'params': p}, x), params, x, tx)
    t = []
    for _ in range(3):
      jax.clear_caches()
      t0 = time.perf_counter()
      compiled = step.lower(state).compile()
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
    'plain': (lambda _: plain_fwd(pp, x), None),
    'folded': (lambda _: plain_fwd(folded, x), None),
    'unfolded': (lambda _: wn_fwd(wp, x), None),
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
  return 2 * a.nbytes * passes / statistics.median(ts)


def weight_bytes(shape: Shape, dtype) -> int:
  n = shape.cin * shape.cout * shape.kernel ** len(shape.spatial)
  return n * jnp.dtype(dtype).itemsize


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


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='3 shapes, few rounds; prints only')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--gpu-shapes', action='store_true', help='add larger shapes (for a GPU)')
  parser.add_argument('--rounds', type=int, default=None)
  parser.add_argument(
    '--out', default=None, help='results file stem (default: overhead_<platform>_<dtype>)'
  )
  args = parser.parse_args()
  if torch is not None:
    torch.set_num_threads(os.cpu_count() or 1)
  dtype = jnp.dtype(args.dtype)
  shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if args.gpu_shapes else CPU_SHAPES)
  tx = optax.adam(1e-3)
  print(machine())
  columns = [
    'wn_jax linen',
    'wn_jax nnx',
    'wn_jax pytree',
    'wn_jax optim',
    'flax.linen.WeightNorm',
    'flax.nnx.WeightNorm',
    'equinox.nn.WeightNorm',
    'torch weight_norm (legacy)',
    'torch parametrizations.weight_norm',
  ]
  rows = []
  for shape in shapes:
    gc.collect()
    arms = {**jax_arms(shape, dtype, tx), **torch_arms(shape, args.dtype)}
    heavy = (
      shape.batch
      * shape.cin
      * shape.cout
      * shape.kernel ** len(shape.spatial)
      * int(np.prod(shape.spatial or (1,)))
    )
    rounds = args.rounds or (5 if args.quick else (15 if heavy > 2e9 else 41))
    t0 = time.perf_counter()
    times = measure(arms, rounds, min_time=0.02 if args.quick else 0.05)
    r = ratios(times)
    extra = inference(shape, dtype, rounds=5 if args.quick else 21, min_time=0.02)
    cm = compile_and_memory(shape, dtype, tx) if not args.quick else {}
    base = min(
      statistics.median(times['flax linen (plain)']), statistics.median(times['raw jnp/lax'])
    )
    bw = bandwidth(weight_bytes(shape, dtype))
    floor = EXTRA_PASSES * weight_bytes(shape, dtype) / bw / base
    row = {
      'shape': shape.name,
      'plain_ms': 1e3 * base,
      **{c: r.get(c) for c in columns},
      'folded': extra['folded'],
      'wn_inference': extra['unfolded'],
      'compile': cm.get('wn_compile', float('nan')) / cm.get('plain_compile', float('nan'))
      if cm
      else None,
      'memory': cm['wn_peak'] / cm['plain_peak'] if cm else None,
      'floor': floor,
      'bandwidth': bw,
    }
    rows.append(row)
    print(
      f'{shape.name}: {time.perf_counter() - t0:.0f}s, plain step {row["plain_ms"]:.2f} ms, '
      + ', '.join(f'{k} {v:.3f}' for k, v in r.items()),
      flush=True,
    )
  table = render(rows, columns)
  print()
  print(table)
  if not args.quick:
    stem = args.out or f'overhead_{jax.devices()[0].platform}_{args.dtype}'
    RESULTS.mkdir(exist_ok=True)
    text = (
      f'# Weight-normalization overhead per train step ({args.dtype})\n\n'
      f'Machine: {machine()}.\n\n'
      'Train step = forward + backward + optax adam update, jitted. Each cell: median over '
      'rounds of (arm time / baseline time in the same round), arms interleaved in a shuffled '
      "order each round. JAX baseline: the faster of the framework's plain layer and raw "
      "jnp/lax; torch: torch's plain layer. `folded`: inference with the weight materialized "
      "once, over plain inference; `wn inference`: the WN layer's forward. `compile`, `memory`: "
      'wn_jax linen over plain linen (compile time, XLA peak memory of the train step). '
      f'`floor`: {EXTRA_PASSES} weight-sized passes (forward: the norm, the scaling; backward: '
      'the reduction for dL/dg, the elementwise dL/dv) over the bandwidth measured for passes '
      "over an array of the weight's size (`GB/s`), as a fraction of the plain step: an "
      'estimate of what no implementation goes under without fusing into the matmul.\n\n'
      f'Reproduce: `python benchmarks/overhead.py{" --dtype " + args.dtype if args.dtype != "float32" else ""}`.\n\n'
      + table
      + '\n'
    )
    (RESULTS / f'{stem}.md').write_text(text)
    plot(rows, columns, RESULTS / f'{stem}.png', args.dtype)
    print(f'wrote {RESULTS / (stem + ".md")} and .png')


def _fmt(v, digits=3):
  return '–' if v is None or (isinstance(v, float) and np.isnan(v)) else f'{v:.{digits}f}'


def render(rows, columns) -> str:
  head = [
    'shape',
    'plain step (ms)',
    *columns,
    'folded',
    'wn inference',
    'compile',
    'memory',
    'GB/s',
    'floor',
  ]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['shape'], _fmt(r['plain_ms'], 2), *[_fmt(r[c]) for c in columns]]
    cells += [
      _fmt(r['folded']),
      _fmt(r['wn_inference']),
      _fmt(r['compile'], 2),
      _fmt(r['memory'], 2),
      f'{r["bandwidth"] / 1e9:.0f}',
      f'+{r["floor"]:.3f}',
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(rows, columns, path: Path, dtype: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  present = [c for c in columns if any(r[c] is not None for r in rows)]
  fig, ax = plt.subplots(figsize=(12, 5))
  width = 0.8 / len(present)
  xs = np.arange(len(rows))
  for i, c in enumerate(present):
    vals = [(r[c] or np.nan) - 1 for r in rows]
    ax.bar(xs + i * width, vals, width, label=c)
  ax.axhline(0, color='black', linewidth=0.8)
  ax.set_xticks(xs + 0.4 - width / 2, [r['shape'] for r in rows], rotation=12, fontsize=8)
  ax.set_ylabel('train-step overhead (ratio - 1) vs plain layer')
  ax.set_title(f'Weight-normalization overhead per train step ({dtype}, lower is better)')
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == '__main__':
  main()
