"""Compile time of a deep MLP train step: wn_jax against the plain model and flax.linen.WeightNorm.

A 20-layer MLP (Dense or its weight-normed counterpart, relu between), one jitted train
step (forward, backward, optax adam update). Each measurement builds a fresh step
function, so nothing is cached, and times ``jax.jit(step).lower(...)`` (tracing and
lowering) and ``.compile()`` (XLA) separately. Arms are interleaved (a fresh random order
each round) and each arm's median over rounds is reported, with its ratio to the plain
model's median, and the size of the optimized HLO: its instruction count (every
instruction of every computation) and its number of ``conditional`` instructions.

    python benchmarks/compile_time.py            # writes benchmarks/results/compile_time_cpu.md
    python benchmarks/compile_time.py --quick    # fewer rounds, prints only

Nothing here is a test: timings never are.
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import wn_jax

DEPTH = 20
WIDTH = 64
BATCH = 32


def _linen_arm(make_layer: Callable[[], nn.Module]) -> Callable[[], tuple]:
  def build():
    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        for i in range(DEPTH):
          x = make_layer()(x)
          if i < DEPTH - 1:
            x = nn.relu(x)
        return x

    model = MLP()
    x = jnp.ones((BATCH, WIDTH))
    params = model.init(jax.random.key(0), x)['params']
    tx = optax.adam(1e-3)

    def step(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
      )(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    return step, (params, tx.init(params), x, x)

  return build


def _nnx_arm() -> tuple:
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([wn_jax.nnx.WNLinear(WIDTH, WIDTH, rngs=rngs) for _ in range(DEPTH)])

    def __call__(self, x):
      for i, layer in enumerate(self.layers):
        x = layer(x)
        if i < DEPTH - 1:
          x = nnx.relu(x)
      return x

  model = MLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(1e-3)
  x = jnp.ones((BATCH, WIDTH))

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2))(
      params
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, (params, tx.init(params), x, x)


class _ScaledDense(nn.Module):
  """The floor of any weight normalization: nn.Dense plus one per-feature parameter.

  A WN layer has a third parameter (``scale``) per layer, which the optimizer updates too;
  this arm has that parameter and nothing else (its output is multiplied by it).
  """

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (WIDTH,))
    return nn.Dense(WIDTH)(x) * scale


ARMS: dict[str, Callable[[], tuple]] = {
  'plain nn.Dense': _linen_arm(lambda: nn.Dense(WIDTH)),
  'floor: nn.Dense + a per-feature scale parameter': _linen_arm(_ScaledDense),
  'wn_jax linen WNDense': _linen_arm(lambda: wn_jax.linen.WNDense(WIDTH)),
  'flax.linen.WeightNorm(nn.Dense)': _linen_arm(lambda: nn.WeightNorm(nn.Dense(WIDTH))),
  'wn_jax nnx WNLinear': _nnx_arm,
}

_INSTR = re.compile(r'^\s*(ROOT\s+)?%?[\w.\-]+\s*=\s', re.M)


def measure(build: Callable[[], tuple]) -> dict[str, float]:
  step, args = build()
  t0 = time.perf_counter()
  lowered = jax.jit(step).lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  text = compiled.as_text()
  return {
    'lower': t1 - t0,
    'compile': t2 - t1,
    'ops': len(_INSTR.findall(text)),
    'conditionals': text.count(' conditional('),
    'fusions': text.count(' fusion('),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--quick', action='store_true', help='3 rounds, print only')
  args = parser.parse_args()
  rounds = 3 if args.quick else args.rounds
  results: dict[str, list[dict[str, float]]] = {name: [] for name in ARMS}
  for build in ARMS.values():  # warm-up: imports, first-use caches of JAX itself
    measure(build)
  rng = random.Random(0)
  for r in range(rounds):
    order = list(ARMS)
    rng.shuffle(order)
    for name in order:
      results[name].append(measure(ARMS[name]))
    print(f'round {r + 1}/{rounds} done', flush=True)

  def med(name, key):
    return statistics.median(m[key] for m in results[name])

  base = med('plain nn.Dense', 'compile')
  base_total = base + med('plain nn.Dense', 'lower')
  lines = [
    f'# Compile time: {DEPTH}-layer MLP train step (width {WIDTH}, batch {BATCH}, adam)',
    '',
    f'`python benchmarks/compile_time.py`; {platform.machine()} CPU, jax {jax.__version__}, '
    f'backend {jax.default_backend()}; median of {rounds} fresh compiles per arm, arms '
    'interleaved in a random order each round.',
    '',
    '| arm | compile s | / plain | lower s | lower + compile / plain | optimized HLO ops | '
    'conditionals |',
    '|---|---|---|---|---|---|---|',
  ]
  for name in ARMS:
    c, lo = med(name, 'compile'), med(name, 'lower')
    lines.append(
      f'| {name} | {c:.3f} | {c / base:.2f} | {lo:.3f} | {(c + lo) / base_total:.2f} | '
      f'{int(med(name, "ops"))} | {int(med(name, "conditionals"))} |'
    )
  lines += [
    '',
    '`compile`: `jax.jit(step).lower(...).compile()` (XLA), `lower`: tracing and lowering to '
    'StableHLO. Optimized HLO ops: instructions of every computation of the compiled module.',
    'The floor arm adds to the plain layer only what every weight normalization must add, a',
    'third parameter per layer (and its optimizer state and update), and no arithmetic on the',
    'weight: it bounds from below what any WN layer with a trained `scale` can reach here.',
  ]
  text = '\n'.join(lines) + '\n'
  print(text)
  if not args.quick:
    out = Path(__file__).parent / 'results' / f'compile_time_{jax.default_backend()}.md'
    out.write_text(text)
    print(f'wrote {out}')


if __name__ == '__main__':
  main()
