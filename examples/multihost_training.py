"""Train a weight-normalized MLP across processes: one JAX process per host.

On one machine, two processes of 4 CPU devices each stand in for two hosts:

    python examples/multihost_training.py --local 2

which starts this script twice, as

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/multihost_training.py \\
      --coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0    # and --process-id 1

On real hosts, run the same script once per host; only the coordinator address (host 0's
address, reachable from every host) and each host's process id change:

    python examples/multihost_training.py --coordinator 10.0.0.1:1234 --num-processes 4 --process-id I

(On Cloud TPU, or under SLURM or Open MPI, ``jax.distributed.initialize()`` finds all three by
itself: run the script with no arguments.) Everything after ``initialize`` is the same code
on one process or many: the mesh spans every process's devices, each process loads only its
part of the global batch, and wn_jax needs nothing else. tests/test_multiprocess.py runs
``train`` in two processes.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wn_jax import linen as wl

GLOBAL_BATCH = 64


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    # Output features over 'model'; `scale` (one g per output feature) follows automatically.
    shard_out = nn.with_partitioning(nn.initializers.lecun_normal(), (None, 'model'))
    x = nn.relu(wl.WNDense(256, kernel_init=shard_out)(x))
    x = nn.relu(wl.WNDense(256, kernel_init=shard_out)(x))
    return wl.WNDense(10)(x)


def local_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
  """This process's rows of the global batch: what a per-host data loader yields."""
  n = GLOBAL_BATCH // jax.process_count()
  rng = np.random.default_rng([step, jax.process_index()])
  x = rng.standard_normal((n, 32)).astype(np.float32)
  return x, (x[:, :10].argmax(-1)).astype(np.int32)


def train(steps: int) -> list[float]:
  """``steps`` adam steps on a (data, model) mesh over every process's devices.

  Call after ``jax.distributed.initialize``; the same code runs on one process.
  """
  # 'data' across processes (hosts), 'model' within a host, where devices talk fastest.
  auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh(
    (jax.process_count(), jax.local_device_count()), ('data', 'model'), axis_types=(auto, auto)
  )
  batch = NamedSharding(mesh, P('data'))
  to_global = lambda a: jax.make_array_from_process_local_data(batch, a)

  model = MLP()
  x0, _ = local_batch(0)
  # Shardings from the partitioning metadata; init creates the parameters already sharded.
  shardings = nn.get_sharding(jax.eval_shape(model.init, jax.random.key(0), x0), mesh)
  variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), x0)
  # Data-dependent init on the global batch (every process's rows), under jit: global
  # arrays go in as arguments; a jitted function must never close over them.
  data_init = jax.jit(lambda v, x: wl.data_init(model, v, x), out_shardings=shardings)
  params = nn.unbox(data_init(variables, to_global(x0))['params'])
  param_shardings = jax.tree_util.tree_map(lambda a: a.sharding, params)

  tx = optax.adam(1e-3)
  opt_state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.lax.with_sharding_constraint(optax.apply_updates(params, updates), param_shardings)
    return params, opt_state, loss

  losses = []
  for i in range(steps):
    x, y = (to_global(a) for a in local_batch(i))
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(float(loss))  # a replicated scalar: every process can read it
    if jax.process_index() == 0:
      print(f'step {i}: loss {losses[-1]:.4f}', flush=True)
  if jax.process_index() == 0:
    scale = params['WNDense_0']['scale']
    print(f'mesh {dict(mesh.shape)}; scale of WNDense_0 sharded as {scale.sharding.spec}')
  return losses


def launch_local(n: int, steps: int) -> int:
  """Starts ``n`` processes of this script on this machine, 4 CPU devices each."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  args = [sys.executable, __file__, '--coordinator', f'127.0.0.1:{port}', '--num-processes']
  procs = [
    subprocess.Popen([*args, str(n), '--process-id', str(i), '--steps', str(steps)], env=env)
    for i in range(n)
  ]
  try:
    return max(p.wait(timeout=600) for p in procs)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--local', type=int, metavar='N', help='start N processes on this machine')
  parser.add_argument('--coordinator', help="process 0's host:port")
  parser.add_argument('--num-processes', type=int)
  parser.add_argument('--process-id', type=int)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  if args.local:
    sys.exit(launch_local(args.local, args.steps))
  # Collectives between CPU processes (only the CPU backend reads this; set before initialize).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  train(args.steps)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
