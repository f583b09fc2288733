"""Where the adam step's compile goes on a CPU: the norm's range check against an unsafe norm.

The train step of ``startup.py`` (a 20-layer linen MLP, width 256, adam) compiled with the
norm of every wn_jax layer swapped for a variant, against the floor arm (``nn.Dense`` plus
a trained per-feature output scale, no norm at all):

- ``unsafe``: ``sqrt(sum(v * v))``, no range safety (what the norm is where every slice is
  in range, and what a norm without the guarantee compiles to);
- ``check only``: wn_jax's range check, the slice minimum and the ``lax.cond``, with
  branches that both take the plain square root (the check's cost without the scaled sums);
- ``wn_jax``: the norm as shipped (``wn_jax._norm.norm_keepdims``).

Every variant keeps the norm's derivative rule, so the backward pass is the same. Each
sample builds a fresh step and times ``jax.jit(step).lower(...)`` (trace + lower) and
``.compile()`` (XLA) apart; arms are interleaved, medians reported, with the number of
fusions and conditionals in the compiled step. A diagnostic: it swaps an internal function,
and the variants are not safe to use.

    python benchmarks/compile_norm.py            # writes benchmarks/results/compile_norm_cpu.md
    python benchmarks/compile_norm.py --quick    # fewer rounds, prints only

Nothing here is a test: timings never are.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

import wn_jax._core
import wn_jax._norm
from wn_jax._axes import reduced

sys.path.insert(0, str(Path(__file__).parent))
from compile_time import measure  # noqa: E402
from startup import DEPTH  # noqa: E402
from startup import STEP_WIDTH  # noqa: E402
from startup import _linen_step  # noqa: E402
from startup import _load  # noqa: E402
from startup import interleaved  # noqa: E402
from startup import machine  # noqa: E402

SHIPPED = wn_jax._core.norm_keepdims


def _variant(body: Callable[[jax.Array, tuple[int, ...]], jax.Array]) -> Callable:
  """A norm with ``body`` as its primal and the shipped norm's derivative rule."""

  @functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
  def norm_keepdims(v, kept):
    return body(v, reduced(v.ndim, kept))

  @norm_keepdims.defjvp
  def _jvp(kept, primals, tangents):
    (v,), (dv,) = primals, tangents
    n = norm_keepdims(v, kept)
    inv_n = 1.0 / jnp.where(n > 0, n, 1.0)
    return n, wn_jax._norm._norm_tangent(v, inv_n, dv, reduced(v.ndim, kept))

  return norm_keepdims


def _unsafe(v, red):
  return jnp.sqrt(jnp.sum(v * v, axis=red, keepdims=True))


def _check_only(v, red):
  lo = wn_jax._norm._RANGE[jnp.dtype(v.dtype)][0]
  ss = jnp.sum(v * v, axis=red, keepdims=True)
  out = ~(jnp.min(jnp.where(ss < jnp.inf, ss, -1.0)) >= lo)  # the shipped check
  return jax.lax.cond(out, lambda ss: jnp.sqrt(ss), lambda ss: jnp.sqrt(ss), ss)


NORMS = {'unsafe': _variant(_unsafe), 'check only': _variant(_check_only), 'wn_jax': SHIPPED}


def _arm(norm: Callable | None) -> Callable[[], dict[str, float]]:
  build = _linen_step('floor' if norm is None else 'wn_jax')

  def sample():
    if norm is not None:
      wn_jax._core.norm_keepdims = norm
    try:
      return measure(build)
    finally:
      wn_jax._core.norm_keepdims = SHIPPED

  return sample


def _sample(arm: Callable[[], dict[str, float]]) -> tuple[float, float]:
  """One sample's (trace + lower, compile) seconds, JAX's caches cleared first."""
  jax.clear_caches()
  m = arm()
  return m['lower'], m['compile']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--quick', action='store_true', help='3 rounds, print only')
  args = parser.parse_args()
  rounds = 3 if args.quick else args.rounds
  load_start = _load()
  t_start = time.perf_counter()
  arms = {'floor: nn.Dense + scale': _arm(None), **{k: _arm(n) for k, n in NORMS.items()}}
  counts = {}
  for name, arm in arms.items():  # warm-up, and the compiled step's size
    jax.clear_caches()  # the nested jits of the norm are cached per configuration
    first = arm()
    counts[name] = (first['fusions'], first['conditionals'])
  samplers = {name: functools.partial(_sample, arm) for name, arm in arms.items()}
  times = interleaved(samplers, rounds, t_start)
  load_end = _load()

  def med(name: str, i: int | None) -> float:
    return statistics.median(sum(t) if i is None else t[i] for t in times[name])

  floor = 'floor: nn.Dense + scale'
  command = ' '.join(['python', 'benchmarks/compile_norm.py', *sys.argv[1:]])
  lines = [
    f'# Where the adam step compile goes ({DEPTH}-layer linen MLP, width {STEP_WIDTH})',
    '',
    f'`{command}`; {machine()}, jax {jax.__version__}, backend {jax.default_backend()}; '
    f'median of {rounds} samples per arm, arms interleaved in a random order each round. '
    f'Load average (1, 5, 15 min): {load_start} at start, {load_end} at end; '
    f'{time.perf_counter() - t_start:.0f} s in all.',
    '',
    '| norm | fusions | conditionals | trace + lower ms | compile ms | all ms | compile / floor '
    '| all / floor |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for name in arms:
    lines.append(
      f'| {name} | {counts[name][0]} | {counts[name][1]} | {1e3 * med(name, 0):.0f} | '
      f'{1e3 * med(name, 1):.0f} | {1e3 * med(name, None):.0f} | '
      f'{med(name, 1) / med(floor, 1):.2f} | '
      f'{med(name, None) / med(floor, None):.2f} |'
    )
  lines += [
    '',
    'Each column is a median over the samples (all: of trace + lower + compile per sample). '
    'jax.clear_caches() before every sample, so each one traces and compiles the norm anew '
    "(startup.py keeps JAX's caches warm, as after a user's first model: its trace rows "
    'are the lower).',
  ]
  report = '\n'.join(lines) + '\n'
  print(report)
  if not args.quick:
    out = Path(__file__).parent / 'results' / 'compile_norm_cpu.md'
    out.write_text(report)
    print(f'wrote {out}')


if __name__ == '__main__':
  main()
