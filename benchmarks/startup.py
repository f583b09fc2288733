"""What users wait for outside a jitted step: wn_jax against plain Flax and flax.linen.WeightNorm.

Everything a user runs before (or instead of) a compiled train step: eager calls of the
pure functions, eager ``init`` / ``apply`` of a linen model, constructing and calling an
NNX model, the data-dependent initialization, tracing and lowering a jitted gradient,
and tracing, lowering and compiling an adam train step. The models are 20-layer MLPs
(width 64, batch 32, relu between layers; width 256 for the train step) of a plain layer
(``nn.Dense``, ``nnx.Linear``), its wn_jax counterpart (``WNDense``, ``WNLinear``) or
``nn.WeightNorm(nn.Dense)``; the eager rows also time wn_jax's ``WeightNorm`` wrappers
around the plain layer, an eager call and a ``data_init`` on a batch shape no call had
before (compiles included; also for a stack of 8 1-D convolutions, ``WNConv`` against
``nn.Conv``), and eager calls at batch 256: rows at least the input features,
where a WN Dense forms ``w`` (at batch 32 it scales its output instead). Flax's NNX
``WeightNorm`` is left out: its scales are not ``nnx.Param`` (not trained) and it overwrites
the wrapped kernel on every call, so it is not the same computation.

Two kinds of measurement. Eager rows (the pure functions, init / apply, construct /
forward, ``data_init``) are the steady state: every arm runs once before timing (its first
call compiles what it dispatches), then a sample is many calls in a row, each blocked on
(``jax.block_until_ready``), and reports the time per call. Trace rows build a fresh
function for every sample (a new model class and a new closure, so no cache of JAX or
Flax holds it) and time ``jax.jit(f).lower(...)`` (tracing and lowering), and for the
train step ``.compile()`` (XLA) too; only the caches that outlive one model (JAX's own,
wn_jax's module-level jitted kernels) are warm, as after a user's first model.

Arms are interleaved: each round runs every arm of every row once, in a fresh random
order. Reported: each arm's median over rounds, and a row's ratio of the wn_jax arm's
median to the plain arm's (the floor arm's for the train step: nn.Dense, or nnx.Linear,
plus a trained per-feature output scale, the least any weight normalization adds), with
the target it should meet.

    python benchmarks/startup.py            # writes benchmarks/results/startup_cpu.md
    python benchmarks/startup.py --quick    # fewer rounds, shorter samples, prints only

Nothing here is a test: timings never are.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import wn_jax

DEPTH = 20
WIDTH = 64
BATCH = 32
WIDE_BATCH = 256  # rows >= the input features: a WN Dense forms w instead of scaling its output
MATRIX = 256  # rows and columns of the pure functions' weight
STEP_WIDTH = 256  # width of the adam train step's MLP
CONV_DEPTH = 8  # layers of the 1-D convolution stack (data_init at a new batch shape)


def _x(width: int = WIDTH, batch: int = BATCH) -> jax.Array:
  # Random, not ones: data_init's per-feature statistics need a batch that varies.
  return jax.random.normal(jax.random.key(1), (batch, width))


# Models. Every call of a factory defines a new class, so a trace row's samples share nothing.


def _linen_mlp(make_layer: Callable[[int], nn.Module], width: int = WIDTH) -> nn.Module:
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(DEPTH):
        x = make_layer(width)(x)
        if i < DEPTH - 1:
          x = nn.relu(x)
      return x

  return MLP()


def _nnx_mlp_class(make_layer: Callable[[int, nnx.Rngs], nnx.Module], width: int = WIDTH) -> type:
  class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.layers = nnx.List([make_layer(width, rngs) for _ in range(DEPTH)])

    def __call__(self, x):
      for i, layer in enumerate(self.layers):
        x = layer(x)
        if i < DEPTH - 1:
          x = nnx.relu(x)
      return x

  return MLP


class _ScaledDense(nn.Module):
  """The floor of any weight normalization: nn.Dense plus one trained per-feature scale.

  As in ``compile_time.py``, with the width an attribute: the output is multiplied by the
  scale, and nothing touches the weight.
  """

  features: int

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (self.features,))
    return nn.Dense(self.features)(x) * scale


class _ScaledLinear(nnx.Module):
  """The NNX floor: nnx.Linear plus one trained per-feature scale (an ``nnx.Param``)."""

  def __init__(self, features: int, rngs: nnx.Rngs):
    self.linear = nnx.Linear(features, features, rngs=rngs)
    self.scale = nnx.Param(jnp.ones((features,)))

  def __call__(self, x):
    return self.linear(x) * self.scale[...]


LINEN_LAYERS: dict[str, Callable[[int], nn.Module]] = {
  'plain': lambda w: nn.Dense(w),
  'floor': lambda w: _ScaledDense(w),
  'wn_jax': lambda w: wn_jax.linen.WNDense(w),
  'flax': lambda w: nn.WeightNorm(nn.Dense(w)),
  'wrapper': lambda w: wn_jax.linen.WeightNorm(nn.Dense(w)),  # eager rows only
}
NNX_LAYERS: dict[str, Callable[[int, nnx.Rngs], nnx.Module]] = {
  'plain': lambda w, rngs: nnx.Linear(w, w, rngs=rngs),
  'floor': lambda w, rngs: _ScaledLinear(w, rngs),
  'wn_jax': lambda w, rngs: wn_jax.nnx.WNLinear(w, w, rngs=rngs),
  'wrapper': lambda w, rngs: wn_jax.nnx.WeightNorm(nnx.Linear(w, w, rngs=rngs)),
}
LINEN_NAMES = {
  'plain': 'nn.Dense',
  'floor': 'floor: nn.Dense + scale',
  'wn_jax': 'WNDense',
  'flax': 'nn.WeightNorm(nn.Dense)',
  'wrapper': 'wn_jax.linen.WeightNorm(nn.Dense)',
}
NNX_NAMES = {
  'plain': 'nnx.Linear',
  'floor': 'floor: nnx.Linear + scale',
  'wn_jax': 'WNLinear',
  'wrapper': 'wn_jax.nnx.WeightNorm(nnx.Linear)',
}


# Arms. An arm is prepared once (warm_up), then sampled once per round; a sample is seconds.


class _Eager:
  """The steady-state time of one eager call: ``n`` calls per sample, each blocked on.

  ``make`` builds the call (models, variables, inputs: untimed); the first call, in
  warm-up, compiles what it dispatches; ``n`` is then set so that a sample lasts about
  ``target`` seconds.
  """

  def __init__(self, make: Callable[[], Callable[[], Any]]):
    self.make = make
    self.n = 1

  def warm_up(self, target: float) -> None:
    self.call = self.make()
    jax.block_until_ready(self.call())
    n = 1
    while (t := self._time(n)) * n < target / 10:
      n *= 4
    self.n = max(1, math.ceil(target / t))

  def _time(self, n: int) -> float:
    call = self.call
    t0 = time.perf_counter()
    for _ in range(n):
      jax.block_until_ready(call())
    return (time.perf_counter() - t0) / n

  def sample(self) -> float:
    return self._time(self.n)


class _Fresh:
  """One fresh trace and lowering (and compile, if ``and_compile``) per sample.

  ``build`` returns a new function and its arguments on every call (untimed); the sample
  times ``jax.jit(f).lower(*args)`` and, if ``and_compile``, ``.compile()``.
  """

  n = 1

  def __init__(self, build: Callable[[], tuple[Callable, tuple]], and_compile: bool):
    self.build = build
    self.and_compile = and_compile

  def warm_up(self, target: float) -> None:
    self.sample()

  def sample(self) -> float:
    f, args = self.build()
    t0 = time.perf_counter()
    lowered = jax.jit(f).lower(*args)
    if self.and_compile:
      lowered.compile()
    return time.perf_counter() - t0


def _new_shapes():
  """Input shapes ``(a, b, WIDTH)``, then ``(a, b, c, WIDTH)``, with fewer rows than
  ``WIDTH`` (so a WN Dense scales its output), each handed out once: no arm's sample finds
  another's compiled for its shape. The 273 of three axes cover nine of the eleven new-shape
  arms at 25 rounds and a warm-up each; the rest go on to four axes (a convolution's input
  ``(batch, batch, length, WIDTH)``)."""
  for a in range(1, WIDTH):
    for b in range(1, (WIDTH - 1) // a + 1):
      yield (a, b, WIDTH)
  for a in range(1, WIDTH):
    for b in range(1, (WIDTH - 1) // a + 1):
      for c in range(1, (WIDTH - 1) // (a * b) + 1):
        yield (a, b, c, WIDTH)


_SHAPES = _new_shapes()


class _NewShape:
  """An eager call of a built model on an input of a shape no call has had before: what
  evaluating on another batch size costs, its compilations included (one call per sample)."""

  n = 1

  def __init__(self, make: Callable[[], Callable[[jax.Array], Any]], min_rows: int = 1):
    self.make = make
    self.min_rows = min_rows

  def warm_up(self, target: float) -> None:
    self.call = self.make()
    self.sample()

  def sample(self) -> float:
    shape = next(s for s in _SHAPES if s[0] * s[1] >= self.min_rows)
    x = jax.random.normal(jax.random.key(1), shape)  # varies: data_init's statistics need it
    jax.block_until_ready(x)
    t0 = time.perf_counter()
    jax.block_until_ready(self.call(x))
    return time.perf_counter() - t0


# Row 1: the pure functions, eagerly, on a 256 x 256 float32 weight.


def _matrix() -> tuple[jax.Array, jax.Array]:
  v = jax.random.normal(jax.random.key(0), (MATRIX, MATRIX))
  return v, jax.random.uniform(jax.random.key(2), (MATRIX,), minval=0.5, maxval=2.0)


def _normalize_wn():
  v, g = _matrix()
  return lambda: wn_jax.normalize(v, g)


def _normalize_jnp():
  v, g = _matrix()
  return lambda: g * v / jnp.linalg.norm(v, axis=0)


def _decompose_wn():
  w, _ = _matrix()
  return lambda: wn_jax.decompose(w)


def _decompose_jnp():
  w, _ = _matrix()
  return lambda: (w, jnp.linalg.norm(w, axis=0))


# Rows 2 and 4 (linen): init, apply, data_init.


def _linen_init(kind: str):
  def make():
    model, x = _linen_mlp(LINEN_LAYERS[kind]), _x()
    return lambda: model.init(jax.random.key(0), x)

  return make


def _linen_apply(kind: str, batch: int = BATCH):
  def make():
    model, x = _linen_mlp(LINEN_LAYERS[kind]), _x(batch=batch)
    variables = model.init(jax.random.key(0), x)
    return lambda: model.apply(variables, x)

  return make


def _linen_new_shape(kind: str):
  def make():
    model = _linen_mlp(LINEN_LAYERS[kind])
    variables = model.init(jax.random.key(0), _x())
    return lambda x: model.apply(variables, x)

  return make


def _linen_data_init_of():
  model = _linen_mlp(LINEN_LAYERS['wn_jax'])
  variables = model.init(jax.random.key(0), _x())
  return lambda x: wn_jax.linen.data_init(model, variables, x)


def _linen_init_apply_of():
  model = _linen_mlp(LINEN_LAYERS['plain'])
  return lambda x: model.apply(model.init(jax.random.key(0), x), x)


def _linen_convs(conv: type) -> nn.Module:
  """``CONV_DEPTH`` 1-D convolutions (kernel 3, ``WIDTH`` features, relu between): its
  activations take the input's shape, so a new batch shape is new to every layer."""

  class Convs(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(CONV_DEPTH):
        x = conv(WIDTH, (3,))(x)
        if i < CONV_DEPTH - 1:
          x = nn.relu(x)
      return x

  return Convs()


def _linen_conv_data_init_of():
  model = _linen_convs(wn_jax.linen.WNConv)
  variables = model.init(jax.random.key(0), _x()[None])
  return lambda x: wn_jax.linen.data_init(model, variables, x)


def _linen_conv_init_apply_of():
  model = _linen_convs(nn.Conv)
  return lambda x: model.apply(model.init(jax.random.key(0), x), x)


def _at_x(make: Callable[[], Callable[[jax.Array], Any]]) -> Callable[[], Callable[[], Any]]:
  """``make``'s call on the model's usual input: an eager arm of a new-shape arm's call."""

  def bound():
    call, x = make(), _x()
    return lambda: call(x)

  return bound


# Rows 3 and 4 (NNX): construct, forward, data_init.


def _nnx_construct(kind: str):
  def make():
    mlp = _nnx_mlp_class(NNX_LAYERS[kind])
    # Blocked on every array of the model (nnx.state walks the 20 layers: a fraction of a
    # millisecond, in both arms).
    return lambda: nnx.state(mlp(nnx.Rngs(0)))

  return make


def _nnx_forward(kind: str, batch: int = BATCH):
  def make():
    model, x = _nnx_mlp_class(NNX_LAYERS[kind])(nnx.Rngs(0)), _x(batch=batch)
    return lambda: model(x)

  return make


def _nnx_new_shape(kind: str):
  def make():
    return _nnx_mlp_class(NNX_LAYERS[kind])(nnx.Rngs(0))

  return make


def _nnx_data_init_of():
  model = _nnx_mlp_class(NNX_LAYERS['wn_jax'])(nnx.Rngs(0))
  return lambda x: wn_jax.nnx.data_init(model, x)


def _nnx_construct_call_of():
  mlp = _nnx_mlp_class(NNX_LAYERS['plain'])
  return lambda x: mlp(nnx.Rngs(0))(x)


# Rows 5 and 6: fresh traces. Arguments are made once per arm (linen params are a dict any
# fresh class of the same structure applies; NNX's come from nnx.eval_shape of the fresh
# class, abstract, which lowers to the same program as concrete arrays).


def _linen_grad(kind: str):
  x = _x()
  params = _linen_mlp(LINEN_LAYERS[kind]).init(jax.random.key(0), x)['params']

  def build():
    model = _linen_mlp(LINEN_LAYERS[kind])

    def loss(p, x):
      return jnp.mean(model.apply({'params': p}, x) ** 2)

    return jax.grad(loss), (params, x)

  return build


def _nnx_split(kind: str, width: int) -> tuple[Any, Any, Any]:
  mlp = _nnx_mlp_class(NNX_LAYERS[kind], width)
  return nnx.split(nnx.eval_shape(lambda: mlp(nnx.Rngs(0))), nnx.Param, ...)


def _nnx_grad(kind: str):
  x = _x()

  def build():
    graphdef, params, rest = _nnx_split(kind, WIDTH)

    def loss(p, rest, x):
      return jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2)

    return jax.grad(loss), (params, rest, x)

  return build


def _adam_step(apply: Callable, tx: optax.GradientTransformation) -> Callable:
  def step(params, opt_state, rest, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((apply(p, rest, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def _linen_step(kind: str):
  x = _x(STEP_WIDTH)
  params = _linen_mlp(LINEN_LAYERS[kind], STEP_WIDTH).init(jax.random.key(0), x)['params']
  opt_state = optax.adam(1e-3).init(params)

  def build():
    model = _linen_mlp(LINEN_LAYERS[kind], STEP_WIDTH)
    step = _adam_step(lambda p, _, x: model.apply({'params': p}, x), optax.adam(1e-3))
    return step, (params, opt_state, None, x, x)

  return build


def _nnx_step(kind: str):
  x = _x(STEP_WIDTH)

  def build():
    graphdef, params, rest = _nnx_split(kind, STEP_WIDTH)
    tx = optax.adam(1e-3)
    step = _adam_step(lambda p, rest, x: nnx.merge(graphdef, p, rest)(x), tx)
    return step, (params, jax.eval_shape(tx.init, params), rest, x, x)

  return build


def _arms() -> dict[str, _Eager | _Fresh | _NewShape]:
  arms: dict[str, _Eager | _Fresh | _NewShape] = {
    'normalize: wn_jax.normalize': _Eager(_normalize_wn),
    'normalize: g * v / jnp.linalg.norm(v, axis=0)': _Eager(_normalize_jnp),
    'decompose: wn_jax.decompose': _Eager(_decompose_wn),
    'decompose: (w, jnp.linalg.norm(w, axis=0))': _Eager(_decompose_jnp),
  }
  for kind in ('wn_jax', 'plain', 'flax', 'wrapper'):
    arms[f'linen init: {LINEN_NAMES[kind]}'] = _Eager(_linen_init(kind))
    arms[f'linen apply: {LINEN_NAMES[kind]}'] = _Eager(_linen_apply(kind))
  for kind in ('wn_jax', 'plain', 'flax'):
    arms[f'linen new shape: {LINEN_NAMES[kind]}'] = _NewShape(_linen_new_shape(kind))
  for kind in ('wn_jax', 'plain'):
    arms[f'linen apply, batch {WIDE_BATCH}: {LINEN_NAMES[kind]}'] = _Eager(
      _linen_apply(kind, WIDE_BATCH)
    )
    arms[f'nnx forward, batch {WIDE_BATCH}: {NNX_NAMES[kind]}'] = _Eager(
      _nnx_forward(kind, WIDE_BATCH)
    )
  for kind in ('wn_jax', 'plain', 'wrapper'):
    arms[f'nnx construct: {NNX_NAMES[kind]}'] = _Eager(_nnx_construct(kind))
    arms[f'nnx forward: {NNX_NAMES[kind]}'] = _Eager(_nnx_forward(kind))
  for kind in ('wn_jax', 'plain'):
    arms[f'nnx new shape: {NNX_NAMES[kind]}'] = _NewShape(_nnx_new_shape(kind))
  for name, make in (
    ('linen data_init: wn_jax.linen.data_init', _linen_data_init_of),
    ('linen data_init: nn.Dense init + apply', _linen_init_apply_of),
    ('nnx data_init: wn_jax.nnx.data_init', _nnx_data_init_of),
    ('nnx data_init: nnx.Linear construct + call', _nnx_construct_call_of),
  ):
    arms[name] = _Eager(_at_x(make))
    # data_init needs two rows at least (a standard deviation per feature)
    arms[name.replace('data_init:', 'data_init, new shape:')] = _NewShape(make, min_rows=2)
  arms['linen conv data_init, new shape: wn_jax.linen.data_init'] = _NewShape(
    _linen_conv_data_init_of, min_rows=2
  )
  arms['linen conv data_init, new shape: nn.Conv init + apply'] = _NewShape(
    _linen_conv_init_apply_of, min_rows=2
  )
  for kind in ('wn_jax', 'plain', 'flax'):
    arms[f'linen grad: {LINEN_NAMES[kind]}'] = _Fresh(_linen_grad(kind), and_compile=False)
  for kind in ('wn_jax', 'plain'):
    arms[f'nnx grad: {NNX_NAMES[kind]}'] = _Fresh(_nnx_grad(kind), and_compile=False)
  for kind in ('wn_jax', 'plain', 'floor', 'flax'):
    arms[f'linen step: {LINEN_NAMES[kind]}'] = _Fresh(_linen_step(kind), and_compile=True)
  for kind in ('wn_jax', 'plain', 'floor'):
    arms[f'nnx step: {NNX_NAMES[kind]}'] = _Fresh(_nnx_step(kind), and_compile=True)
  return arms


@dataclasses.dataclass(frozen=True)
class Row:
  label: str
  wn: str  # the wn_jax arm
  plain: str  # what the ratio divides by
  target: float | None  # the most wn / plain (wn / floor where floor is set) may be; None: none
  target_text: str
  flax: str | None = None  # flax.linen.WeightNorm's arm, where one exists
  floor: str | None = None  # the floor arm, for the train step


ROWS = (
  Row(
    f'eager `normalize`, {MATRIX}x{MATRIX} f32',
    'normalize: wn_jax.normalize',
    'normalize: g * v / jnp.linalg.norm(v, axis=0)',
    3.0,
    '<= 3x the jnp expression',
  ),
  Row(
    f'eager `decompose`, {MATRIX}x{MATRIX} f32',
    'decompose: wn_jax.decompose',
    'decompose: (w, jnp.linalg.norm(w, axis=0))',
    3.0,
    '<= 3x the jnp expression',
  ),
  Row(
    'linen eager `init`',
    'linen init: WNDense',
    'linen init: nn.Dense',
    1.5,
    '<= 1.5x plain',
    flax='linen init: nn.WeightNorm(nn.Dense)',
  ),
  Row(
    'linen eager `apply`',
    'linen apply: WNDense',
    'linen apply: nn.Dense',
    1.5,
    '<= 1.5x plain',
    flax='linen apply: nn.WeightNorm(nn.Dense)',
  ),
  Row(
    f'linen eager `apply`, batch {WIDE_BATCH} (forms w)',
    f'linen apply, batch {WIDE_BATCH}: WNDense',
    f'linen apply, batch {WIDE_BATCH}: nn.Dense',
    1.5,
    '<= 1.5x plain',
  ),
  Row(
    'linen eager `apply`, a new batch shape (compiles)',
    'linen new shape: WNDense',
    'linen new shape: nn.Dense',
    None,
    '-',
    flax='linen new shape: nn.WeightNorm(nn.Dense)',
  ),
  Row(
    'linen eager `init`, `wn_jax.linen.WeightNorm(nn.Dense)`',
    'linen init: wn_jax.linen.WeightNorm(nn.Dense)',
    'linen init: nn.Dense',
    None,
    '-',
    flax='linen init: nn.WeightNorm(nn.Dense)',
  ),
  Row(
    'linen eager `apply`, `wn_jax.linen.WeightNorm(nn.Dense)`',
    'linen apply: wn_jax.linen.WeightNorm(nn.Dense)',
    'linen apply: nn.Dense',
    None,
    '-',
    flax='linen apply: nn.WeightNorm(nn.Dense)',
  ),
  Row(
    'NNX construct', 'nnx construct: WNLinear', 'nnx construct: nnx.Linear', 1.5, '<= 1.5x plain'
  ),
  Row(
    'NNX eager forward', 'nnx forward: WNLinear', 'nnx forward: nnx.Linear', 1.5, '<= 1.5x plain'
  ),
  Row(
    f'NNX eager forward, batch {WIDE_BATCH} (forms w)',
    f'nnx forward, batch {WIDE_BATCH}: WNLinear',
    f'nnx forward, batch {WIDE_BATCH}: nnx.Linear',
    1.5,
    '<= 1.5x plain',
  ),
  Row(
    'NNX eager forward, a new batch shape (compiles)',
    'nnx new shape: WNLinear',
    'nnx new shape: nnx.Linear',
    None,
    '-',
  ),
  Row(
    'NNX construct, `wn_jax.nnx.WeightNorm(nnx.Linear)`',
    'nnx construct: wn_jax.nnx.WeightNorm(nnx.Linear)',
    'nnx construct: nnx.Linear',
    None,
    '-',
  ),
  Row(
    'NNX eager forward, `wn_jax.nnx.WeightNorm(nnx.Linear)`',
    'nnx forward: wn_jax.nnx.WeightNorm(nnx.Linear)',
    'nnx forward: nnx.Linear',
    None,
    '-',
  ),
  Row(
    'linen `data_init`',
    'linen data_init: wn_jax.linen.data_init',
    'linen data_init: nn.Dense init + apply',
    3.0,
    '<= 3x one plain init + apply',
  ),
  Row(
    'NNX `data_init`',
    'nnx data_init: wn_jax.nnx.data_init',
    'nnx data_init: nnx.Linear construct + call',
    3.0,
    '<= 3x one plain construct + call',
  ),
  Row(
    'linen `data_init`, a new batch shape (compiles)',
    'linen data_init, new shape: wn_jax.linen.data_init',
    'linen data_init, new shape: nn.Dense init + apply',
    None,
    '-',
  ),
  Row(
    'NNX `data_init`, a new batch shape (compiles)',
    'nnx data_init, new shape: wn_jax.nnx.data_init',
    'nnx data_init, new shape: nnx.Linear construct + call',
    None,
    '-',
  ),
  Row(
    f'linen `data_init` of {CONV_DEPTH} 1-D convolutions, a new batch shape (compiles)',
    'linen conv data_init, new shape: wn_jax.linen.data_init',
    'linen conv data_init, new shape: nn.Conv init + apply',
    None,
    '-',
  ),
  Row(
    'linen trace + lower `jit(grad(loss))`',
    'linen grad: WNDense',
    'linen grad: nn.Dense',
    1.5,
    '<= 1.5x plain',
    flax='linen grad: nn.WeightNorm(nn.Dense)',
  ),
  Row(
    'NNX trace + lower `jit(grad(loss))`',
    'nnx grad: WNLinear',
    'nnx grad: nnx.Linear',
    1.5,
    '<= 1.5x plain',
  ),
  Row(
    f'linen trace + lower + compile, adam step (width {STEP_WIDTH})',
    'linen step: WNDense',
    'linen step: nn.Dense',
    1.3,
    '<= 1.3x floor',
    flax='linen step: nn.WeightNorm(nn.Dense)',
    floor='linen step: floor: nn.Dense + scale',
  ),
  Row(
    f'NNX trace + lower + compile, adam step (width {STEP_WIDTH})',
    'nnx step: WNLinear',
    'nnx step: nnx.Linear',
    1.3,
    '<= 1.3x floor',
    floor='nnx step: floor: nnx.Linear + scale',
  ),
)


def _met(ratio: float, target: float | None) -> str:
  if target is None:
    return '-'
  return 'met' if ratio <= target else 'MISSED'


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  return f'{platform.machine()} CPU [{cpu}], {os.cpu_count()} cores'


def _load() -> str:
  return ', '.join(f'{x:.2f}' for x in os.getloadavg())


def interleaved(samplers: dict[str, Callable[[], Any]], rounds: int, t_start: float) -> dict:
  """``rounds`` samples of each arm, the arms in a random order each round (seeded)."""
  results: dict[str, list] = {name: [] for name in samplers}
  rng = random.Random(0)
  for r in range(rounds):
    order = list(samplers)
    rng.shuffle(order)
    for name in order:
      gc.collect()
      results[name].append(samplers[name]())
    print(f'round {r + 1}/{rounds} done ({time.perf_counter() - t_start:.0f} s)', flush=True)
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=25)
  parser.add_argument('--quick', action='store_true', help='5 rounds, shorter samples, print only')
  args = parser.parse_args()
  rounds = 5 if args.quick else args.rounds
  target = 0.02 if args.quick else 0.06  # seconds per eager sample
  load_start = _load()
  t_start = time.perf_counter()
  arms = _arms()
  for arm in arms.values():  # warm-up: first calls compile; sets eager calls per sample
    arm.warm_up(target)
  print(f'warm-up done in {time.perf_counter() - t_start:.0f} s', flush=True)
  results = interleaved({name: arm.sample for name, arm in arms.items()}, rounds, t_start)
  load_end = _load()

  def med(name: str | None) -> float:
    return statistics.median(results[name]) if name else math.nan

  def ms(t: float) -> str:
    return f'{1e3 * t:.3f}' if t < 0.01 else f'{1e3 * t:.1f}'

  command = ' '.join(['python', 'benchmarks/startup.py', *sys.argv[1:]])
  lines = [
    f'# Startup: what users wait for outside a jitted step ({DEPTH}-layer MLPs, batch {BATCH}; '
    f'{WIDE_BATCH} where named)',
    '',
    f'`{command}`; {machine()}, jax {jax.__version__}, flax {flax.__version__}, '
    f'optax {optax.__version__}, backend {jax.default_backend()}; median of {rounds} samples '
    'per arm, arms interleaved in a random order each round. Load average (1, 5, 15 min): '
    f'{load_start} at start, {load_end} at end; {time.perf_counter() - t_start:.0f} s in all.',
    '',
    '| measurement | wn_jax ms | plain ms | wn_jax / plain | flax WeightNorm / plain | '
    'wn_jax / floor | target | met |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for row in ROWS:
    wn, plain = med(row.wn), med(row.plain)
    ratio = wn / (med(row.floor) if row.floor else plain)
    flax_ratio = f'{med(row.flax) / plain:.2f}' if row.flax else '-'
    floor_ratio = f'{ratio:.2f}' if row.floor else '-'
    lines.append(
      f'| {row.label} | {ms(wn)} | {ms(plain)} | {wn / plain:.2f} | {flax_ratio} | '
      f'{floor_ratio} | {row.target_text} | {_met(ratio, row.target)} |'
    )
  lines += [
    '',
    '| arm | median ms | min ms | calls per sample |',
    '|---|---|---|---|',
  ]
  for name, arm in arms.items():
    calls = {_Eager: str(arm.n), _Fresh: 'fresh', _NewShape: '1, new shape'}[type(arm)]
    lines.append(f'| {name} | {ms(med(name))} | {ms(min(results[name]))} | {calls} |')
  lines += [
    '',
    'Eager rows: the time of one call after warm-up (already compiled), many calls per',
    'sample, each blocked on. `data_init` is compared with ONE eager init + apply of the',
    'plain model (linen: `model.init` then `model.apply`; NNX: construct then call). Trace',
    'rows: a new model class and a new function per sample, `jax.jit(f).lower(...)` timed',
    '(and `.compile()` for the adam step); the loss is the mean squared output. The floor',
    'arms add to the plain layer a trained per-feature output scale and nothing else: the',
    'least any weight normalization with a trained `scale` adds to the train step.',
    'New-shape rows: one eager call of a built model on an input of a shape no call had',
    'before (`(a, b, 64)` with fewer rows than features), its compilations included: what',
    'evaluating on another batch size costs. Rows without a target are not in the issue;',
    'they show the wrappers and the new-shape case beside the layers.',
  ]
  text = '\n'.join(lines) + '\n'
  print(text)
  if not args.quick:
    out = Path(__file__).parent / 'results' / f'startup_{jax.default_backend()}.md'
    out.write_text(text)
    print(f'wrote {out}')


if __name__ == '__main__':
  main()
