"""Train a small weight-normalized MLP on a 2 x 4 ('data', 'model') device mesh.

Runs on a laptop CPU by pretending to have 8 devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_training.py

The batch is split over 'data'; each WN kernel is split over 'model' along its output
features, and its `scale` (one g per output feature) follows it automatically, because
the kernel_init carries the partitioning (nn.with_partitioning). XLA inserts the
collectives; wn_jax's code is plain jnp.
"""

import argparse
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from wn_jax import linen as wl  # noqa: E402


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    shard_out = nn.with_partitioning(nn.initializers.lecun_normal(), (None, 'model'))
    shard_in = nn.with_partitioning(nn.initializers.lecun_normal(), ('model', None))
    x = nn.relu(wl.WNDense(256, kernel_init=shard_out)(x))  # out-features on 'model'
    x = nn.relu(wl.WNDense(256, kernel_init=shard_in)(x))  # in-features: the norm crosses devices
    return wl.WNDense(10)(x)


def main(steps: int) -> None:
  n = jax.device_count()
  mesh = jax.make_mesh((2, n // 2), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  print(f'{n} devices, mesh {dict(mesh.shape)}')
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (64, 32))
  y = jax.random.randint(jax.random.key(1), (64,), 0, 10)

  # Shardings from the partitioning metadata, without materializing anything.
  abstract = jax.eval_shape(model.init, jax.random.key(2), x)
  param_shardings = jax.tree_util.tree_map(
    lambda s: NamedSharding(mesh, s), nn.get_partition_spec(abstract)
  )
  variables = jax.jit(model.init, out_shardings=param_shardings)(jax.random.key(2), x)
  params = nn.unbox(variables)['params']
  shardings = jax.tree_util.tree_map(lambda a: a.sharding, params)
  for name in ('WNDense_0', 'WNDense_1'):
    for leaf in ('kernel', 'scale'):
      print(f'  {name}/{leaf:6s} {params[name][leaf].shape} -> {shardings[name][leaf].spec}')

  tx = optax.adam(1e-3)
  opt_state = jax.jit(tx.init)(params)
  batch = NamedSharding(mesh, P('data'))
  x, y = jax.device_put(x, batch), jax.device_put(y, batch)

  def loss_fn(p):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return jax.lax.with_sharding_constraint(p, shardings), s, loss

  for i in range(steps):
    params, opt_state, loss = step(params, opt_state)
    print(f'step {i}: loss {float(loss):.4f}')
  print('scale of WNDense_0 stays sharded:', params['WNDense_0']['scale'].sharding.spec)


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=20)
  main(parser.parse_args().steps)
