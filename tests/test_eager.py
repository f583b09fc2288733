"""Outside jit: a repeated eager call compiles nothing (counted, never timed)."""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import wn_jax

_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


@contextlib.contextmanager
def count_compiles():
  """Counts XLA compilations in the block (``jax.monitoring``'s backend-compile event, also
  recorded for a program retrieved from the persistent compilation cache the suite uses)."""
  seen: list[str] = []

  def listener(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE_EVENT:
      seen.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_counter_sees_a_compile():
  # The counter itself: a new function compiles once.
  with count_compiles() as seen:
    jax.jit(lambda a: a * 3.0 + 1.0)(jnp.ones(3)).block_until_ready()
  assert len(seen) >= 1


def test_counter_sees_a_program_retrieved_from_the_persistent_cache():
  # The suite shares compiled programs between its processes through JAX's persistent cache
  # (tests/conftest.py). A program built again, with JAX's in-memory caches cleared, comes
  # from there: the counter must count it as a compilation, or a repeated call that lowers
  # anew would pass the tests below.
  hits: list[str] = []

  def on_event(event: str, **kwargs) -> None:
    if event == '/jax/compilation_cache/cache_hits':
      hits.append(event)

  def f(a):
    return a * 5.0 - 2.0

  jax.jit(f)(jnp.ones(5)).block_until_ready()
  jax.clear_caches()
  jax.monitoring.register_event_listener(on_event)
  try:
    with count_compiles() as seen:
      jax.jit(f)(jnp.ones(5)).block_until_ready()
  finally:
    jax.monitoring.unregister_event_listener(on_event)
  assert hits and len(seen) >= len(hits), (hits, seen)


def _linen_mlp(layer):
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(3):
        x = nn.relu(layer()(x))
      return x

  return MLP()


class _NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([wn_jax.nnx.WNLinear(16, 16, rngs=rngs) for _ in range(3)])

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return x


@functools.cache
def _cases():
  """name -> a call to repeat; built on first use (not at collection, which every worker
  of a parallel run repeats)."""
  key = jax.random.key(0)
  v = jax.random.normal(key, (16, 8))
  g = jnp.linspace(0.5, 2.0, 8)
  few, many = jnp.ones((4, 16)), jnp.ones((32, 16))  # output-scaled and forming w
  conv_x = jnp.ones((2, 10, 16))
  cases = {
    'normalize': lambda: wn_jax.normalize(v, g),
    'normalize axis=None': lambda: wn_jax.normalize(v, jnp.float32(2.0), None),
    'decompose': lambda: wn_jax.decompose(v),
    'norm': lambda: wn_jax.norm(v, axis=0),
    'weight_norm + materialize': lambda: wn_jax.materialize(wn_jax.weight_norm({'w': v})),
  }
  for name, x in (('rows < features', few), ('rows >= features', many)):
    model = _linen_mlp(lambda: wn_jax.linen.WNDense(16))
    variables = model.init(key, x)
    cases[f'linen apply, {name}'] = lambda m=model, p=variables, x=x: m.apply(p, x)
    cases[f'linen init, {name}'] = lambda m=model, x=x: m.init(key, x)
    cases[f'linen data_init, {name}'] = lambda m=model, p=variables, x=x: wn_jax.linen.data_init(
      m, p, x
    )
    nnx_model = _NNXMLP(nnx.Rngs(0))
    cases[f'nnx call, {name}'] = lambda m=nnx_model, x=x: m(x)
    cases[f'nnx data_init, {name}'] = lambda m=nnx_model, x=x: wn_jax.nnx.data_init(m, x)
  conv = wn_jax.linen.WNConv(8, (3,))
  conv_vars = conv.init(key, conv_x)
  cases['linen WNConv apply'] = lambda: conv.apply(conv_vars, conv_x)
  wrapped = wn_jax.linen.WeightNorm(nn.Dense(8))
  wrapped_vars = wrapped.init(key, few)
  cases['linen WeightNorm apply'] = lambda: wrapped.apply(wrapped_vars, few)
  cases['nnx construction'] = lambda: _NNXMLP(nnx.Rngs(1))
  cases['nnx WNConv construction'] = lambda: wn_jax.nnx.WNConv(16, 8, (3,), rngs=nnx.Rngs(0))
  nnx_wrapped = wn_jax.nnx.WeightNorm(nnx.Linear(16, 8, rngs=nnx.Rngs(0)))
  cases['nnx WeightNorm call'] = lambda: nnx_wrapped(few)
  cases['nnx WeightNorm construction'] = lambda: wn_jax.nnx.WeightNorm(
    nnx.Linear(16, 8, rngs=nnx.Rngs(0))
  )
  cases['linen fold'] = lambda: wn_jax.linen.fold(conv_vars['params'])
  return cases


_NAMES = [
  'linen WNConv apply',
  'linen WeightNorm apply',
  'linen fold',
  'nnx construction',
  'nnx WNConv construction',
  'nnx WeightNorm call',
  'nnx WeightNorm construction',
  'normalize',
  'normalize axis=None',
  'decompose',
  'norm',
  'weight_norm + materialize',
  *(
    f'{what}, {rows}'
    for what in ('linen apply', 'linen init', 'linen data_init', 'nnx call', 'nnx data_init')
    for rows in ('rows < features', 'rows >= features')
  ),
]


def test_every_case_is_named():
  assert sorted(_NAMES) == sorted(_cases())


@pytest.mark.parametrize('name', _NAMES)
def test_repeated_eager_call_compiles_nothing(name):
  call = _cases()[name]
  jax.block_until_ready(call())  # the first call may compile
  with count_compiles() as seen:
    jax.block_until_ready(call())
    jax.block_until_ready(call())
  assert not seen, f'{name}: {len(seen)} compilation(s) on a repeated eager call'


@pytest.mark.standard_promotion
def test_repeated_eager_optimizer_update_compiles_nothing():
  params = wn_jax.weight_norm({'w': jnp.ones((8, 4)) + jnp.arange(4.0)})
  plain = wn_jax.materialize(params)
  tx = wn_jax.optim.weight_norm(optax.adam(1e-2))
  state = tx.init(plain)
  grads = jax.tree.map(jnp.ones_like, plain)

  def step():
    return tx.update(grads, state, plain)

  jax.block_until_ready(step())
  with count_compiles() as seen:
    jax.block_until_ready(step())
  assert not seen


def _scanned(layer):
  class Step(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.relu(layer(16)(x)), None

  return nn.scan(Step, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)()


def test_a_loop_flax_rebuilds_per_call_compiles_no_more_than_the_plain_one():
  # Flax's nn.scan (and nn.RNN, optax.MultiSteps) builds its loop body anew on every eager
  # call, so a repeated call recompiles, plain or weight-normed (a user trial): wn_jax adds no
  # program of its own there.
  x = jnp.ones((4, 16))
  counts = []
  for layer in (wn_jax.linen.WNDense, nn.Dense):
    model = _scanned(layer)
    variables = model.init(jax.random.key(0), x, None)
    jax.block_until_ready(model.apply(variables, x, None))
    with count_compiles() as seen:
      jax.block_until_ready(model.apply(variables, x, None))
    counts.append(len(seen))
  assert counts[0] <= counts[1], counts
