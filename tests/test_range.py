"""The concepts page's range claim, on every path of every layer.

Weights (the direction ``v``) from about 1e-30 to 1e36 in float32 give correct values and
first derivatives (w.r.t. kernel, scale, bias and input): tested at the ends of that
range and between, for each layer on each of its paths (a Dense layer that scales its
output, one that forms ``w``), the wrappers, the pytree route and the core functions.

The reference: ``w``, ``dL/dv`` and ``dL/dg`` from ``tests/reference.py`` in float64;
the linear map the layer applies to ``w`` (Dense, Conv, ConvTranspose) is the plain Flax
layer run in float64, which also gives ``y``, ``dL/dw``, ``dL/db`` and ``dL/dx``. The
kernel is scaled by ``c`` and the scale kept, so ``w`` (and everything but ``dL/dv``,
which goes as ``1 / c``) is the same at every ``c``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wn_jax
from tests import reference as ref
from tests.helpers import RTOL
from wn_jax import _core as core
from wn_jax import _kernel
from wn_jax import linen as wl
from wn_jax import nnx as wx

SCALES = [1e-30, 1e-19, 1.0, 1e19, 1e36]
FEW, MANY = (4, 32), (64, 32)  # rows < input features: the output is scaled; else w formed
SEQ = (2, 6, 3)  # (batch, length, channels) for the convolutions


def _linen(module, x_shape, wrap=False):
  x = jnp.ones(x_shape)
  params = module.init(jax.random.key(0), x)['params']
  if wrap:  # wl.WeightNorm: {'layer': {'kernel', 'bias'}, 'scale': {'kernel'}}
    flat = {**params['layer'], 'scale': params['scale']['kernel']}
    unflat = lambda p: {
      'layer': {'kernel': p['kernel'], 'bias': p['bias']},
      'scale': {'kernel': p['scale']},
    }
  else:
    flat, unflat = dict(params), lambda p: p
  return lambda p, x: module.apply({'params': unflat(p)}, x), flat


def _nnx(module, wrap=False):
  graphdef, state = nnx.split(module, nnx.Param)
  params = nnx.to_pure_dict(state)
  if wrap:  # wx.WeightNorm: {'layer': {'kernel', 'bias'}, 'scale': {'kernel'}}
    flat = {**params['layer'], 'scale': params['scale']['kernel']}
    unflat = lambda p: {
      'layer': {'kernel': p['kernel'], 'bias': p['bias']},
      'scale': {'kernel': p['scale']},
    }
  else:
    flat, unflat = dict(params), lambda p: p

  def apply(p, x):
    s = jax.tree_util.tree_map(lambda a: a, state)
    nnx.replace_by_pure_dict(s, unflat(p))
    return nnx.merge(graphdef, s)(x)

  return apply, flat


def _pytree():
  k = jax.random.normal(jax.random.key(0), (32, 8)) / 6.0
  wn = wn_jax.weight_norm({'kernel': k, 'bias': jnp.zeros(8)})
  flat = {'kernel': wn['kernel'].v, 'scale': wn['kernel'].g, 'bias': wn['bias']}

  def apply(p, x):
    tree = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(wn), [p['bias'], p['kernel'], p['scale']]
    )
    params = wn_jax.materialize(tree)
    return x @ params['kernel'] + params['bias']

  return apply, flat


def _core(use_factor):
  k = jax.random.normal(jax.random.key(0), (32, 8)) / 6.0
  flat = {'kernel': k, 'scale': wn_jax.decompose(k)[1], 'bias': jnp.zeros(8)}
  if use_factor:
    return lambda p, x: (x @ p['kernel']) * core.factor(p['kernel'], p['scale']) + p['bias'], flat
  return lambda p, x: x @ wn_jax.normalize(p['kernel'], p['scale']) + p['bias'], flat


DENSE, CONV, CONV_T = nn.Dense(8), nn.Conv(8, (3,)), nn.ConvTranspose(8, (3,))
# name: (build () -> (apply, {'kernel', 'scale', 'bias'}), input shape, plain layer)
PATHS = {
  'linen.WNDense/scaled': (lambda: _linen(wl.WNDense(8), FEW), FEW, DENSE),
  'linen.WNDense/formed': (lambda: _linen(wl.WNDense(8), MANY), MANY, DENSE),
  'linen.WNConv': (lambda: _linen(wl.WNConv(8, (3,)), SEQ), SEQ, CONV),
  'linen.WNConvTranspose': (lambda: _linen(wl.WNConvTranspose(8, (3,)), SEQ), SEQ, CONV_T),
  'linen.WeightNorm': (lambda: _linen(wl.WeightNorm(nn.Dense(8)), FEW, wrap=True), FEW, DENSE),
  'nnx.WNLinear/scaled': (lambda: _nnx(wx.WNLinear(32, 8, rngs=nnx.Rngs(0))), FEW, DENSE),
  'nnx.WNLinear/formed': (lambda: _nnx(wx.WNLinear(32, 8, rngs=nnx.Rngs(0))), MANY, DENSE),
  'nnx.WNConv': (lambda: _nnx(wx.WNConv(3, 8, (3,), rngs=nnx.Rngs(0))), SEQ, CONV),
  'nnx.WNConvTranspose': (
    lambda: _nnx(wx.WNConvTranspose(3, 8, (3,), rngs=nnx.Rngs(0))),
    SEQ,
    CONV_T,
  ),
  'nnx.WeightNorm': (
    lambda: _nnx(wx.WeightNorm(nnx.Linear(32, 8, rngs=nnx.Rngs(0))), wrap=True),
    FEW,
    DENSE,
  ),
  'weight_norm+materialize': (_pytree, FEW, DENSE),
  'normalize': (lambda: _core(False), FEW, DENSE),
  '_core.factor': (lambda: _core(True), FEW, DENSE),
}


TINY = float(jnp.finfo(jnp.float32).tiny)  # float32's smallest normal number, 1.2e-38


def _assert_close(actual, expected):
  """Equal to float32 rounding relative to the largest entry, give or take a few ``TINY``:
  a term of the answer below ``TINY`` is subnormal in float32 (0 on a CPU, which flushes
  subnormals). ``dL/dv`` goes as ``1 / c``: from about ``c = 1e35`` its projection term
  (``v`` times ``g <grad_w, v> / ||v||^3``) has entries down there."""
  expected = np.asarray(expected, np.float64)
  atol = 16 * RTOL[jnp.dtype(jnp.float32)] * float(np.max(np.abs(expected))) + 4 * TINY
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0, atol=atol)


def test_the_dense_paths_are_the_ones_named():
  assert _kernel.scales_output(2, (1,), jnp.ones(FEW), lambda: jnp.float32, True)
  assert not _kernel.scales_output(2, (1,), jnp.ones(MANY), lambda: jnp.float32, True)


def _reference(plain, v, g, b, x, r):
  """``y`` and ``dL/d(v, g, b, x)`` for ``L = sum(y * r)``, in float64."""
  w = ref.normalize(v, g, -1)
  with jax.enable_x64(True):
    f = lambda w, b, x: jnp.sum(plain.apply({'params': {'kernel': w, 'bias': b}}, x) * r)
    y = plain.apply({'params': {'kernel': w, 'bias': b}}, x)
    gw, gb, gx = jax.grad(f, argnums=(0, 1, 2))(w, b, x)
    y, gw, gb, gx = (np.asarray(a, np.float64) for a in (y, gw, gb, gx))
  gv, gg = ref.grads(v, g, -1, gw)
  return y, {'kernel': gv, 'scale': gg, 'bias': gb}, gx


@functools.cache
def _compiled(name):
  """A path's layer, its parameters, and its jitted forward and gradient functions: built
  once per path, so every scale runs the same compiled functions (the shapes are the same)."""
  apply, params = PATHS[name][0]()
  loss = lambda p, x, r: jnp.sum(apply(p, x) * r)
  return params, jax.jit(apply), jax.jit(jax.grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize('c', SCALES, ids=lambda c: f'{c:g}')
@pytest.mark.parametrize('name', list(PATHS))
def test_values_and_first_derivatives_across_the_range(name, c):
  _, x_shape, plain = PATHS[name]
  params, forward, gradient = _compiled(name)
  params = dict(params)
  g = params['scale'] * jax.random.uniform(jax.random.key(7), params['scale'].shape, minval=0.5)
  params.update(kernel=params['kernel'] * c, scale=g, bias=params['bias'] + 0.1)
  x = jax.random.normal(jax.random.key(1), x_shape)
  y = forward(params, x)
  r = jax.random.normal(jax.random.key(3), y.shape)
  grads, gx = gradient(params, x, r)
  p64 = {k: np.asarray(a, np.float64) for k, a in params.items()}
  ey, egrads, egx = _reference(
    plain,
    p64['kernel'],
    p64['scale'],
    p64['bias'],
    np.asarray(x, np.float64),
    np.asarray(r, np.float64),
  )
  _assert_close(y, ey)
  for k in ('kernel', 'scale', 'bias'):
    _assert_close(grads[k], egrads[k])
  _assert_close(gx, egx)
