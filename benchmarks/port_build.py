"""What a ported model's first build costs: the HiFi-GAN generator of ``examples/port_hifigan.py``.

A user porting a checkpoint runs a script: a fresh process, where every new layer shape compiles.
Each sample here is such a process, timed from after its imports and the example's loading to
the built model (the weights on the device), for:

- an eager build of the wn_jax model: NNX ``NNXGenerator(rngs=...)``, linen ``model.init``;
- the same model with the plain layers in place of the WN ones (``nnx.Conv`` /
  ``nnx.ConvTranspose``, ``nn.Conv`` / ``nn.ConvTranspose``): what the architecture costs;
- a second eager build in the same process (NNX), the compiled code cached;
- the port the PyTorch guide recommends: the twin built abstractly (``nnx.eval_shape``,
  ``jax.eval_shape(model.init)``), no initializer run, and the checkpoint's tensors converted into
  it (``pytorch.to_nnx`` and ``nnx.merge``, ``pytorch.to_linen``).

The arms run interleaved in a random order each round; the table gives medians::

    python benchmarks/port_build.py           # writes benchmarks/results/port_build_cpu.md
    python benchmarks/port_build.py --quick   # 2 rounds, printed only
"""

from __future__ import annotations

import argparse
import functools
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import numpy as np
from flax import nnx

import wn_jax
from wn_jax import pytorch

sys.path.insert(0, str(Path(__file__).parent))
from startup import _load  # noqa: E402
from startup import interleaved  # noqa: E402
from startup import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARMS = {
  'nnx, eager build: wn_jax': ('nnx', 'wn'),
  'nnx, eager build: plain layers': ('nnx', 'plain'),
  'nnx, abstract twin + to_nnx': ('nnx', 'port'),
  'nnx, a second eager build in the same process: wn_jax': ('nnx', 'again'),
  'linen, eager init: wn_jax': ('linen', 'wn'),
  'linen, eager init: plain layers': ('linen', 'plain'),
  'linen, abstract template + to_linen': ('linen', 'port'),
}


def _build(front: str, kind: str) -> float:
  """Seconds to build the generator in this (fresh) process, imports excluded."""
  if kind == 'plain':
    wn_jax.nnx.WNConv, wn_jax.nnx.WNConvTranspose = nnx.Conv, nnx.ConvTranspose
    wn_jax.linen.WNConv, wn_jax.linen.WNConvTranspose = nn.Conv, nn.ConvTranspose
  example = runpy.run_path(str(ROOT / 'examples' / 'port_hifigan.py'))
  state_dict, mel, _ = example['load_oracle']()
  x = np.moveaxis(mel, 1, -1)
  start = time.perf_counter()
  if front == 'nnx':
    build = lambda: example['NNXGenerator'](rngs=nnx.Rngs(0))  # noqa: E731
    if kind == 'again':  # the first build compiles; time the second
      jax.block_until_ready(nnx.state(build()))
      start = time.perf_counter()
    if kind == 'port':
      abstract = nnx.eval_shape(build)
      graphdef, state = nnx.split(abstract)
      nnx.replace_by_pure_dict(state, pytorch.to_nnx(state_dict, twin=abstract))
      built = nnx.state(nnx.merge(graphdef, state))
    else:
      built = nnx.state(build())
  else:
    model = example['Generator']()
    if kind == 'port':
      built = pytorch.to_linen(
        state_dict, template=jax.eval_shape(model.init, jax.random.key(0), x)
      )
    else:
      built = model.init(jax.random.key(0), x)
  jax.block_until_ready(built)
  return time.perf_counter() - start


def _sample(front: str, kind: str) -> float:
  out = subprocess.run(
    [sys.executable, __file__, '--child', front, kind], capture_output=True, text=True, cwd=ROOT
  )
  if out.returncode:
    raise RuntimeError(f'the {front} {kind} build failed:\n{out.stderr}')
  return float(out.stdout.split()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--quick', action='store_true', help='2 rounds, print only')
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(_build(*args.child))
    return
  rounds = 2 if args.quick else args.rounds
  load_start, t_start = _load(), time.perf_counter()
  samplers = {name: functools.partial(_sample, *spec) for name, spec in ARMS.items()}
  results = interleaved(samplers, rounds, t_start)
  med = {name: statistics.median(times) for name, times in results.items()}
  plain = {front: med[name] for name, (front, kind) in ARMS.items() if kind == 'plain'}
  lines = [
    "# A ported model's first build, in a fresh process (HiFi-GAN generator, 28 WN layers)",
    '',
    f'`python benchmarks/port_build.py`; {machine()}, jax {jax.__version__}, flax '
    f'{flax.__version__}; median of {rounds} processes per arm, arms interleaved in a random '
    f'order each round. Load average (1, 5, 15 min): {load_start} at start, {_load()} at end; '
    f'{time.perf_counter() - t_start:.0f} s in all.',
    '',
    '| arm | median s | min s | / plain layers, eager |',
    '|---|---|---|---|',
  ]
  for name, (front, _) in ARMS.items():
    ratio = med[name] / plain[front]
    lines.append(f'| {name} | {med[name]:.2f} | {min(results[name]):.2f} | {ratio:.2f} |')
  lines += [
    '',
    "Each sample is the time from after the imports and the example's loading to the built "
    "model's arrays, in a process of its own: every layer shape compiles, as in a user's script.",
  ]
  print('\n'.join(lines))
  if not args.quick:
    out = ROOT / 'benchmarks' / 'results' / 'port_build_cpu.md'
    out.write_text('\n'.join(lines) + '\n')
    print(f'\nwrote {out}')


if __name__ == '__main__':
  main()
