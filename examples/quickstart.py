"""A first look: decompose a weight, train a few steps, see g and v move."""

import jax
import jax.numpy as jnp
import optax

import wn_jax


def main() -> None:
  key_w, key_x = jax.random.split(jax.random.key(0))
  w = jax.random.normal(key_w, (4, 3))
  v, g = wn_jax.decompose(w)
  print('w = g * v / ||v||, one g per output feature (axis=-1):')
  print('  g =', g)
  print('  max |normalize(v, g) - w| =', float(jnp.max(jnp.abs(wn_jax.normalize(v, g) - w))))

  x = jax.random.normal(key_x, (64, 4))
  y = x @ jnp.array([[1.0, 0.0, -1.0]] * 4)
  params = wn_jax.weight_norm({'w': w})
  opt = optax.adam(0.05)
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((x @ wn_jax.materialize(p)['w'] - y) ** 2))(
      p
    )
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  for i in range(101):
    params, state, loss = step(params, state)
    if i % 25 == 0:
      print(f'  step {i:3d}  loss {float(loss):.4f}  g = {params["w"].g}')


if __name__ == '__main__':
  main()
