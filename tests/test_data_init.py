"""The paper's data-dependent initialization, for linen and NNX models."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_eager import count_compiles
from wn_jax import linen as wl
from wn_jax import nnx as wx


def _batch(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape) * 2.0 + 0.5


class MLP(nn.Module):
  depth: int = 6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = wl.WNDense(
        16 if i < self.depth - 1 else 4, dtype=self.dtype, param_dtype=self.param_dtype
      )(x)
      if i < self.depth - 1:
        x = nn.relu(x)
    return x


class ResBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(wl.WNConv(8, (3, 3))(x))
    h = wl.WNConv(8, (3, 3))(h)
    return nn.relu(x + h)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(wl.WNConv(8, (3, 3))(x))
    x = nn.Conv(8, (1, 1), name='plain')(x)  # a plain layer: left untouched
    x = wl.MeanOnlyBatchNorm(use_running_average=True)(x)
    x = ResBlock()(x)
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return wl.WNDense(5)(x.reshape(x.shape[0], -1))


def _wn_outputs(model, variables, x):
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  outs = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state['intermediates'])[0]:
    keys = [getattr(k, 'key', str(k)) for k in path]
    if any(str(k).startswith('WN') for k in keys[-3:-2]):
      outs['/'.join(map(str, keys[:-2]))] = leaf
  return outs


def _assert_standardized(outs, scale, mean_tol=1e-5, std_tol=1e-4):
  assert outs
  for name, y in outs.items():
    y = np.asarray(y, np.float64).reshape(-1, y.shape[-1])
    assert np.max(np.abs(y.mean(0))) < mean_tol * max(1.0, scale), name
    assert np.max(np.abs(y.std(0) - scale)) < std_tol * max(1.0, scale), name


@pytest.mark.parametrize('init_scale', [1.0, 0.1])
def test_linen_mlp_every_layer_standardized(init_scale):
  x = _batch((512, 10))
  model = MLP()
  variables = model.init(jax.random.key(1), x)
  new = jax.jit(lambda v, x: wl.data_init(model, v, x, init_scale=init_scale))(variables, x)
  outs = _wn_outputs(model, new, x)
  assert len(outs) == 6
  _assert_standardized(outs, init_scale)
  # Nothing mutated.
  assert not np.allclose(
    variables['params']['WNDense_0']['scale'], new['params']['WNDense_0']['scale']
  )


@pytest.mark.standard_promotion  # nn.avg_pool divides by an int32 count
def test_linen_cnn_with_residual_plain_layer_and_mean_only_bn():
  x = _batch((32, 8, 8, 3))
  model = CNN()
  variables = model.init(jax.random.key(1), x)
  new = wl.data_init(model, variables, x)
  outs = _wn_outputs(model, new, x)
  assert set(outs) == {'WNConv_0', 'ResBlock_0/WNConv_0', 'ResBlock_0/WNConv_1', 'WNDense_0'}
  _assert_standardized(outs, 1.0)
  for name in ('plain', 'MeanOnlyBatchNorm_0'):
    for a, b in zip(
      jax.tree_util.tree_leaves(variables['params'][name]),
      jax.tree_util.tree_leaves(new['params'][name]),
    ):
      np.testing.assert_array_equal(a, b)
  assert new['batch_stats'] is variables['batch_stats']


def test_sequential_not_one_pass():
  """Initializing every layer from one pass of the un-initialized network is wrong."""
  x = _batch((512, 10))
  model = MLP(depth=3)
  variables = model.init(jax.random.key(1), x)
  good = wl.data_init(model, variables, x)
  # The naive variant: statistics of every layer from the un-initialized forward pass.
  outs = _wn_outputs(model, variables, x)
  naive = jax.tree_util.tree_map(lambda a: a, variables)
  for name, y in outs.items():
    p = variables['params'][name]
    t = np.asarray(y) - np.asarray(p['bias'])
    t = t / np.asarray(p['scale'])  # the pre-activation with g = 1
    mu, sigma = t.mean(0), t.std(0)
    naive['params'][name] = {
      **p,
      'scale': jnp.asarray(1.0 / sigma),
      'bias': jnp.asarray(-mu / sigma),
    }
  np.testing.assert_allclose(
    naive['params']['WNDense_0']['scale'], good['params']['WNDense_0']['scale'], rtol=1e-4
  )
  assert not np.allclose(
    naive['params']['WNDense_2']['scale'], good['params']['WNDense_2']['scale'], rtol=1e-2
  )
  with pytest.raises(AssertionError):
    _assert_standardized(_wn_outputs(model, naive, x), 1.0)
  _assert_standardized(_wn_outputs(model, good, x), 1.0)


def test_per_layer_init_scale_and_shared_layer():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = wl.WNDense(x.shape[-1], name='shared')
      return layer(nn.relu(layer(x)))

  x = _batch((256, 6))
  model = Shared()
  variables = model.init(jax.random.key(0), x)
  new = wl.data_init(model, variables, x, init_scale=lambda path: 2.0 if path == 'shared' else 1.0)
  # Initialized once, on the first use: its first output is standardized to 2.
  p = new['params']['shared']
  first = wl.WNDense(6).apply({'params': p}, x)
  np.testing.assert_allclose(np.std(first, 0), 2.0, rtol=1e-4)
  np.testing.assert_allclose(np.mean(first, 0), 0.0, atol=1e-4)


@pytest.mark.parametrize('transform', ['none', 'remat', 'jit'])
def test_nnx_shared_layer_initializes_on_its_first_use_when_a_later_use_is_transformed(transform):
  # A later use inside nnx.remat / nnx.jit runs on a copy of the layer (another id): it took
  # itself for a first use and initialized the layer again on its own input, silently.
  wrap = {'none': lambda f: f, 'remat': nnx.remat, 'jit': nnx.jit}[transform]

  class Shared(nnx.Module):
    def __init__(self):
      self.a = wx.WNLinear(6, 6, rngs=nnx.Rngs(0))

    def __call__(self, x):
      h = 5.0 * jnp.tanh(self.a(x))  # the first use
      return wrap(lambda layer, z: layer(z))(self.a, h)

  x = _batch((256, 6))
  model = Shared()
  wx.data_init(model, x)
  first = model.a(x)
  np.testing.assert_allclose(np.std(first, 0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(np.mean(first, 0), 0.0, atol=1e-4)


def _nnx_cond_model(before, branches):
  class Conditional(nnx.Module):
    def __init__(self):
      self.a = wx.WNLinear(6, 6, rngs=nnx.Rngs(0))

    def __call__(self, x, pred):
      if before:
        x = 5.0 * jnp.tanh(self.a(x))
      use = lambda a, x: a(x)  # noqa: E731
      skip = lambda a, x: x  # noqa: E731
      return nnx.cond(pred, use, use if branches == 2 else skip, self.a, x)

  return Conditional()


@pytest.mark.parametrize('pred', [True, False])
@pytest.mark.parametrize('branches', [1, 2])
def test_a_first_use_in_a_branch_of_a_cond_is_the_branch_that_runs(branches, pred):
  # JAX traces every branch: the first use was taken from the branch traced first (or, in
  # NNX, from each branch's copy), silently wrong for some predicate; then it was refused.
  # The first use is now the one that runs.
  x = _batch((256, 6))
  model = _nnx_cond_model(before=False, branches=branches)
  before = np.asarray(model.a.scale[...])
  wx.data_init(model, x, pred)
  if pred or branches == 2:  # the branch taken uses the layer: standardized there
    np.testing.assert_allclose(np.std(model.a(x), 0), 1.0, rtol=1e-4)
  else:  # no use ran: left as it was
    np.testing.assert_array_equal(model.a.scale[...], before)

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x, pred):
      a = wl.WNDense(6, name='a')
      return nn.cond(pred, lambda m, z: m(z), lambda m, z: m(2.0 * z), a, x)

  variables = Linen().init(jax.random.key(0), x, True)
  new = wl.data_init(Linen(), variables, x, pred)
  first = wl.WNDense(6).apply({'params': new['params']['a']}, x if pred else 2.0 * x)
  np.testing.assert_allclose(np.std(first, 0), 1.0, rtol=1e-4)


def _first_use_in(where):
  class Model(nnx.Module):
    def __init__(self):
      self.a = wx.WNLinear(6, 6, rngs=nnx.Rngs(0))

    def __call__(self, x):
      if where == 'custom_vjp in a branch':
        f = nnx.custom_vjp(lambda a, z: a(z))
        f.defvjp(lambda a, z: (f(a, z), None), lambda res, g: g)
        return nnx.cond(x[0, 0] > 0, f, lambda a, z: f(a, 10.0 * z), self.a, x)
      body = lambda c: (c[0], 3.0 * jnp.tanh(c[0](c[1])) + 1.0, c[2] + 1)  # noqa: E731
      return nnx.while_loop(lambda c: c[2] < 3, body, (self.a, x, 0))[1]

  return Model()


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('where', ['custom_vjp in a branch', 'while_loop body'])
def test_a_first_use_that_may_run_other_than_once_is_the_first_that_runs(where, jit):
  # Found by a user trial: a custom_vjp (or custom_jvp, shard_map) inside the branch hid the
  # cond from the check (std 12-31 for one predicate, silently); a while_loop body
  # re-initialized the layer on every iteration (g and b from the last one).
  x = _batch((256, 6))
  x = x.at[0, 0].set(jnp.abs(x[0, 0]))  # the branch without the factor 10 runs
  model = _first_use_in(where)
  (nnx.jit(wx.data_init) if jit else wx.data_init)(model, x)
  np.testing.assert_allclose(np.std(model.a(x), 0), 1.0, rtol=1e-4)  # the first iteration


@pytest.mark.parametrize('transform', ['jit', 'remat'])
def test_a_transformed_function_called_again_keeps_the_first_uses_initialization(transform):
  # JAX reuses the first call's trace, with the initialization in it: the layer ended
  # initialized from the last call's statistics (std 1.8-5 at its first use, a user trial).
  f = {'jit': nnx.jit, 'remat': nnx.remat}[transform](lambda layer, h: layer(h))

  class Twice(nnx.Module):
    def __init__(self):
      self.a = wx.WNLinear(6, 6, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return f(self.a, 3.0 * f(self.a, x) + 1.0)

  x = _batch((256, 6))
  model = Twice()
  wx.data_init(model, x)
  np.testing.assert_allclose(np.std(model.a(x), 0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(np.mean(model.a(x), 0), 0.0, atol=1e-4)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return wl.WNDense(6, name='a')(x)

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      block = nn.jit(Block)(name='block')
      return block(3.0 * block(x) + 1.0)

  variables = Linen().init(jax.random.key(0), x)
  new = wl.data_init(Linen(), variables, x)
  first = wl.WNDense(6).apply({'params': new['params']['block']['a']}, x)
  np.testing.assert_allclose(np.std(first, 0), 1.0, rtol=1e-4)


class _JitCall(nn.Module):
  """A model whose ``__call__`` is ``nn.jit``: Flax reuses its body's trace by shape."""

  @nn.jit
  @nn.compact
  def __call__(self, x):
    return wl.WNDense(6, name='a')(wl.WNDense(6, name='b')(x))


@pytest.mark.parametrize('applied_before', [False, True])
def test_a_linen_model_nn_jit_traced_before_is_initialized(applied_before):
  # nn.jit reuses its body's trace for the same shapes and mutable collections: data_init's
  # pass reused the one its own search for the layers made (or an earlier apply with
  # mutable=True), ran no layer's Python, and said "the call initialized no layer".
  x = _batch((64, 6)) + 1.0
  variables = _JitCall().init(jax.random.key(0), x)
  if applied_before:
    _JitCall().apply(variables, x, mutable=True)
  new = wl.data_init(_JitCall(), variables, x)
  h = wl.WNDense(6).apply({'params': new['params']['b']}, x)
  y = wl.WNDense(6).apply({'params': new['params']['a']}, h)
  _assert_standardized({'b': h, 'a': y}, 1.0)


@pytest.mark.parametrize('lifted', [True, 'params'])
def test_linen_nn_jit_blocks_of_equal_configuration_are_each_initialized(lifted):
  # nn.jit reuses the first block's trace for the others (their fields and shapes are
  # equal): the search for the layers found only the first, and data_init left the others
  # as they were, silently (a review); layer_axes named only the first.
  x = _batch((64, 6)) + 1.0

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return 3.0 * wl.WNDense(6, name='d')(x) + 1.0

  # One class, three modules: nn.jit traces the first only. Lifting only the parameters, it
  # does not see the marks data_init adds to tell them apart (a review).
  block = nn.jit(Block, variables=lifted)

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(3):
        x = block(name=f'b{i}')(x)
      return x

  # Each its own init_scale: the pass ran the first block's trace for the others, with its
  # init_scale (a review of a first fix, which found the others in the search only). Not
  # where nn.jit lifts only the parameters: the blocks still share the first one's trace.
  scales = {'b0/d': 1.0, 'b1/d': 0.5, 'b2/d': 2.0} if lifted is True else {}
  scale = lambda path: scales.get(path, 1.0)  # noqa: E731
  new = wl.data_init(Stack(), Stack().init(jax.random.key(0), x), x, init_scale=scale)
  h = x
  for i in range(3):
    y = wl.WNDense(6).apply({'params': new['params'][f'b{i}']['d']}, h)
    np.testing.assert_allclose(np.std(y, 0), scale(f'b{i}/d'), rtol=1e-4)
    h = 3.0 * y + 1.0
  assert wl.layer_axes(Stack(), x) == {f'b{i}/d': -1 for i in range(3)}


@pytest.mark.parametrize('transform', ['scan', 'vmap'])
def test_a_linen_transform_that_maps_every_collection_is_initialized(transform):
  # variable_axes={True: 0} splits every collection's leaves along an axis, so data_init
  # may add none of its own to the variables (a first version of its marks failed here).
  x = _batch((64, 6)) + 1.0

  class Every(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = wl.WNDense(6, name='s')
      if transform == 'scan':
        steps = nn.scan(
          lambda m, c, _: (m(c), None),
          variable_axes={True: 0},
          split_rngs={'params': True},
          length=2,
        )
        return steps(layer, x, None)[0]
      lifted = nn.vmap(
        lambda m, z: m(z), variable_axes={True: 0}, split_rngs={'params': True}, in_axes=0
      )
      return lifted(layer, x.reshape(2, 32, 6))

  new = wl.data_init(Every(), Every().init(jax.random.key(0), x), x)
  # The first step's (element's) parameters, on its input: the whole batch (the first half).
  seen = x if transform == 'scan' else x.reshape(2, 32, 6)[0]
  first = wl.WNDense(6).apply({'params': jax.tree.map(lambda a: a[0], new['params']['s'])}, seen)
  np.testing.assert_allclose(np.std(first, 0), 1.0, rtol=1e-4)


class _Later(nnx.Module):
  """One WN layer, then a later use of it where: a closure of a JAX loop, a vmap it is
  shared across, a scan that shares it (in_axes=None) as its first use, or one row."""

  def __init__(self, where):
    self.a, self.where = wx.WNLinear(6, 6, rngs=nnx.Rngs(0)), where

  def __call__(self, x):
    if self.where == 'scan first':  # the scan's writes are discarded; then a use outside
      nnx.scan(lambda a, z: a(z), in_axes=(None, 0), out_axes=0)(self.a, x[None])
      return self.a(3.0 * x)
    if self.where == 'one row first':  # the branch with the whole batch is not taken
      skip = lambda a, z: z  # noqa: E731
      h = nnx.cond(x[0, 0] > 1e9, lambda a, z: a(z), skip, self.a, x)
      return h + self.a(x[:1])
    if self.where == 'one row not run':  # traced first, not taken: the whole batch is first
      skip = lambda a, z: z[:1]  # noqa: E731
      h = nnx.cond(x[0, 0] > 1e9, lambda a, z: a(z[:1]), skip, self.a, x)
      return h + self.a(x)
    h = self.a(x)  # the first use
    if self.where == 'loop closure':
      return jax.lax.fori_loop(0, 2, lambda i, z: jnp.tanh(self.a(z)), h)
    return nnx.vmap(lambda a, z: a(z), in_axes=(None, 0))(self.a, h)  # shared, no axis_name


@pytest.mark.parametrize('where', ['loop closure', 'shared vmap', 'one row not run'])
def test_a_later_use_in_a_closure_or_a_shared_vmap_keeps_the_first(where):
  # Every use wrote the layer's scale back: NNX refused the write in a closure, and in a vmap
  # the layer is shared across it was refused for its per-element statistics (a user trial).
  x = _batch((64, 6))
  model = _Later(where)
  wx.data_init(model, x)
  np.testing.assert_allclose(np.std(model.a(x), 0), 1.0, rtol=1e-4)


@pytest.mark.parametrize('where', ['scan first', 'one row first'])
def test_a_first_use_that_cannot_initialize_is_refused_where_it_runs(where):
  # A scan sharing the layer discards its writes, and a later use outside initialized it
  # again; a branch not taken left the first use to one row, taken as constant (a trial).
  model = _Later(where)
  before = np.asarray(model.a.scale[...])
  match = r'discards its writes' if where == 'scan first' else r'at least 2 values'
  with pytest.raises(ValueError, match=match):
    wx.data_init(model, _batch((64, 6)))
  np.testing.assert_array_equal(model.a.scale[...], before)


def test_an_nnx_layer_outside_the_models_graph_is_initialized_on_its_first_use():
  # A layer the model closes over is not in its graph, so its scale was not marked fresh:
  # left as it was (output std 5.9-7.5, a user trial).
  head = wx.WNLinear(6, 6, rngs=nnx.Rngs(0))

  class Closes(nnx.Module):
    def __init__(self):
      self.b = wx.WNLinear(6, 6, rngs=nnx.Rngs(1))

    def __call__(self, x):
      return self.b(head(5.0 * x))

  x = _batch((64, 6))
  model = Closes()
  wx.data_init(model, x)
  np.testing.assert_allclose(np.std(head(5.0 * x), 0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(np.std(model(x), 0), 1.0, rtol=1e-4)

  # Passed into NNX transforms after its first use: each transform's copy took itself for a
  # first use (a user trial). Its first use, outside, marks it like the model's own layers.
  class Passes(nnx.Module):
    def __call__(self, x):
      h = head(x)
      return h + nnx.jit(lambda e, z: e(z))(head, 3.0 * x) + nnx.remat(lambda e, z: e(z))(head, x)

  wx.data_init(Passes(), x)
  np.testing.assert_allclose(np.std(head(x), 0), 1.0, rtol=1e-4)
  assert head.scale.get_metadata('wn_jax_data_init', None) is None  # no mark left behind
  # First met inside a transform (data_init under nnx.jit): refused, and left as it was.
  before = np.asarray(head.scale[...])
  with pytest.raises(ValueError, match=r"not in the model's graph.*attribute of the model"):
    nnx.jit(wx.data_init)(Closes(), x)
  np.testing.assert_array_equal(head.scale[...], before)


def test_linen_positional_flags_and_value_reads_reach_the_layers():
  # linen finds its WN layers by tracing the model abstractly first: a positional flag, a
  # string and a value the model reads (float(x.max())) broke that trace (a user trial).
  class Flags(nn.Module):
    @nn.compact
    def __call__(self, x, train, act):
      scale = 1.0 / float(jnp.abs(x).max())  # a value read in Python
      assert f'{jnp.abs(x).max():.2f}'  # a value formatted
      h = wl.WNDense(6)(x * scale)
      return getattr(nn, act)(h) if train else h

  x = _batch((64, 6))
  variables = Flags().init(jax.random.key(0), x, True, 'relu')
  new = wl.data_init(Flags(), variables, x, True, 'relu')
  scale = 1.0 / float(jnp.abs(x).max())
  h = wl.WNDense(6).apply({'params': new['params']['WNDense_0']}, x * scale)
  np.testing.assert_allclose(np.std(h, 0), 1.0, rtol=1e-4)


def test_data_init_runs_under_jax_debug_nans():
  # The fresh mark was NaN at first, and eager data_init stopped on it under
  # jax_debug_nans (a user trial): -inf, which no scale is.
  x = _batch((64, 6))
  model = MLP(depth=2)
  variables = model.init(jax.random.key(0), x)
  net = nnx.Sequential(wx.WNLinear(6, 6, rngs=nnx.Rngs(0)), wx.WNLinear(6, 6, rngs=nnx.Rngs(1)))
  with jax.debug_nans(True):
    new = wl.data_init(model, variables, x)
    wx.data_init(net, x)
  np.testing.assert_allclose(np.std(model.apply(new, x), 0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(np.std(net(x), 0), 1.0, rtol=1e-4)


def test_a_shape_probe_is_not_a_use():
  # nnx.eval_shape / jax.eval_shape of the layer before its real use: the probe's copy took
  # the first use, its writes were discarded, and data_init was refused (wrongly, as a scan).
  class Probed(nnx.Module):
    def __init__(self):
      self.a = wx.WNLinear(6, 6, rngs=nnx.Rngs(0))

    def __call__(self, x):
      nnx.eval_shape(lambda a, x: a(x), self.a, x)
      return self.a(x)

  x = _batch((256, 6))
  model = Probed()
  wx.data_init(model, x)
  np.testing.assert_allclose(np.std(model.a(x), 0), 1.0, rtol=1e-4)


def test_a_users_own_functions_named_like_jax_control_flow_are_not_taken_for_it(
  tmp_path, monkeypatch
):
  # Matched by file and function name, a user's loops.while_loop (a Python loop) was refused
  # as JAX's, and a model_api.eval_shape that runs the model was skipped as a probe.
  (tmp_path / 'loops.py').write_text(
    'def while_loop(cond, body, val):\n  while cond(val):\n    val = body(val)\n  return val\n'
  )
  (tmp_path / 'model_api.py').write_text('def eval_shape(f, x):\n  return f(x)\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  import loops
  import model_api

  class Helpers(nnx.Module):
    def __init__(self):
      self.a = wx.WNLinear(6, 6, rngs=nnx.Rngs(0))
      self.b = wx.WNLinear(6, 6, rngs=nnx.Rngs(1))

    def __call__(self, x):
      h = loops.while_loop(lambda c: c[1] < 1, lambda c: (self.a(c[0]), c[1] + 1), (x, 0))[0]
      return model_api.eval_shape(self.b, h)

  x = _batch((256, 6))
  model = Helpers()
  wx.data_init(model, x)
  for out in (model.a(x), model.b(model.a(x))):
    np.testing.assert_allclose(np.std(out, 0), 1.0, rtol=1e-4)


def test_data_init_itself_runs_under_eval_shape_and_without_jit():
  # Only what runs inside data_init counts: data_init under eval_shape (the abstract
  # variables, before a sharded jit) was refused as a probe that initialized nothing, and a
  # cond under jax.disable_jit (it runs the branch taken, in Python) as a traced branch.
  x = _batch((256, 6))
  model = MLP(depth=2)
  variables = model.init(jax.random.key(0), x)
  shapes = jax.eval_shape(lambda v: wl.data_init(model, v, x), variables)
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)

  def make():
    layer = wx.WNLinear(6, 6, rngs=nnx.Rngs(0))
    wx.data_init(layer, x)
    return layer

  assert nnx.eval_shape(make).scale.shape == (6,)

  class Eager(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = wl.WNDense(6, name='a')
      return jax.lax.cond(True, a, lambda h: a(-h), x)

  with jax.disable_jit():
    new = wl.data_init(Eager(), Eager().init(jax.random.key(1), x), x)
    first = wl.WNDense(6).apply({'params': new['params']['a']}, x)
  np.testing.assert_allclose(np.std(first, 0), 1.0, rtol=1e-4)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return wl.WNDense(6, name='a')(x)


def _closure_model(transform, first_use_outside=False):
  """A model whose ``transform`` body reaches WN layers through a closure, not as its module."""

  class Closure(nn.Module):
    @nn.compact
    def __call__(self, x):
      a, b = wl.WNDense(6, name='a'), wl.WNDense(6, name='b')
      if transform == 'cond, a block':
        a = _Block(name='blk')  # in data_init its layer's scope is made inside the branch
      if first_use_outside:
        x = a(x)
      elif self.is_initializing():  # a closure creates no parameter inside the transform
        a(x)
        b(x)
      if transform == 'while_loop':
        body = lambda m, c: (a(c[0]), c[1] + 1)  # noqa: E731
        return nn.while_loop(lambda m, c: c[1] < 2, body, self, (x, 0))[0]
      if transform == 'jax.checkpoint':
        return jax.checkpoint(lambda z: a(z))(x)
      if transform == 'remat':
        return nn.remat(lambda m, z: a(z))(self, x)
      if transform == 'switch':
        return nn.switch(jnp.int32(0), [lambda m, z: a(z), lambda m, z: b(z)], self, x)
      other = b if transform == 'cond, two layers' else a
      return nn.cond(x.mean() > 0, lambda m, z: a(z), lambda m, z: other(2.0 * z), self, x)

  return Closure()


_CLOSURES = ['cond, two layers', 'cond, one layer', 'cond, a block', 'switch', 'while_loop']


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('transform', [*_CLOSURES, 'jax.checkpoint', 'remat'])
def test_a_linen_layer_a_transform_reaches_through_a_closure_is_refused(transform, jit):
  # Found by a user trial: Flax drops the writes of a submodule a lifted transform's body
  # reaches through a closure (not passed as the transform's module). data_init returned the
  # layer unchanged, silently (std 2-3 after it), or leaked a tracer (one layer, both branches).
  x = _batch((64, 6)) + 1.0
  model = _closure_model(transform)
  run = functools.partial(wl.data_init, model)
  with pytest.raises(ValueError, match=r"WNDense at '/(a|blk/a)'.*closure.*Pass the layer"):
    (jax.jit(run) if jit else run)(model.init(jax.random.key(0), x), x)


@pytest.mark.parametrize('transform', ['cond, one layer', 'while_loop', 'remat'])
def test_a_linen_layer_used_before_a_closure_reaches_it_keeps_that_use(transform):
  # The review of the refusal above: a layer used first outside the transform (its write
  # lands), then through a closure, was refused, though the closure's use keeps what the
  # first set. It is initialized on the first use, as before the refusal.
  x = _batch((64, 6)) + 1.0
  model = _closure_model(transform, first_use_outside=True)
  new = jax.jit(functools.partial(wl.data_init, model))(model.init(jax.random.key(0), x), x)
  first = wl.WNDense(6).apply({'params': new['params']['a']}, x)
  np.testing.assert_allclose(np.std(first, 0), 1.0, rtol=1e-4)


@pytest.mark.parametrize('taken', [True, False])
def test_a_linen_layer_a_branch_was_passed_then_a_closure_reaches_is_refused(taken):
  # The re-review: a write in a branch of a cond that was passed the layer counted as landed
  # at trace time, so a later closure's write was skipped; with that branch not taken the
  # layer stayed as it was, silently (std 1.9-3.6). Only a write of the computation data_init
  # runs under now counts.
  x = _batch((64, 6)) + 1.0

  class Branch(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = wl.WNDense(6, name='a')
      if self.is_initializing():
        a(x)
      h = nn.cond(jnp.asarray(taken), lambda m, z: m(z), lambda m, z: z, a, x)
      return jax.checkpoint(lambda z: a(z))(h)

  with pytest.raises(ValueError, match=r"WNDense at '/a'.*closure"):
    wl.data_init(Branch(), Branch().init(jax.random.key(0), x), x)


@pytest.mark.parametrize('jit', [False, True])
def test_linen_layers_a_raw_vmap_reaches_with_an_axis_name_are_initialized(jit):
  # The review of the refusal above: layers run under jax.vmap(axis_name=...) inside the
  # model, data_init given the same name, write values the vmap does not batch (their
  # statistics are the global batch's): those writes land, and they were refused.
  xs = _batch((4, 32, 6)) + 1.0

  class Grouped(nn.Module):
    @nn.compact
    def __call__(self, xs):
      a = wl.WNDense(6, name='a')
      return jax.vmap(lambda z: a(z), axis_name='groups')(xs)

  run = functools.partial(wl.data_init, Grouped(), axis_name='groups')
  new = (jax.jit(run) if jit else run)(Grouped().init(jax.random.key(0), xs), xs)
  y = wl.WNDense(6).apply({'params': new['params']['a']}, xs).reshape(-1, 6)
  np.testing.assert_allclose(np.std(y, 0), 1.0, rtol=1e-4)


def _read_only_model(where, first=None):
  """A model whose layer ``a`` runs where a Flax transform makes its parameters read-only,
  after a use ``first`` (a plain call, or through ``nn.remat``, ``nn.jit``, ``nn.cond``)."""

  class ReadOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = wl.WNDense(6, name='first')(x)  # initialized: data_init has a layer to report
      if where == 'map_variables':
        lifted = nn.map_variables(wl.WNDense, 'params', lambda p: p, init=self.is_initializing())
        return lifted(6, name='a')(x)
      a = wl.WNDense(6, name='a')
      if self.is_initializing():  # a cond's branches must create the same parameters
        a(x)
      elif first == 'plain':
        x = a(x)
      elif first in ('remat', 'jit'):
        x = getattr(nn, first)(lambda m, z: m(z))(a, x)
      elif first is not None:  # 'cond, taken' or 'cond, not taken'
        taken = jnp.asarray(first == 'cond, taken')
        x = nn.cond(taken, lambda m, z: m(z), lambda m, z: 2.0 * z, a, x)
      carry = ('params',) if where == "while_loop, carry_variables='params'" else ()
      body = lambda m, c: (m(c[0]), c[1] + 1)  # noqa: E731
      if where == 'while_loop cond_fn':
        cond = lambda m, c: c[1] < 1.0 + 0.0 * jnp.mean(m(c[0]))  # noqa: E731
        return nn.while_loop(cond, lambda m, c: (c[0], c[1] + 1), a, (x, 0))[0]
      return nn.while_loop(lambda m, c: c[1] < 1, body, a, (x, 0), carry_variables=carry)[0]

  return ReadOnly()


_READ_ONLY = r"WNDense at '/a'.*parameters are read-only.*before any use set its scale"


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize(
  'where, first',
  [
    ('while_loop', None),
    ('while_loop cond_fn', None),
    ('map_variables', None),
    ('while_loop', 'cond, not taken'),
  ],
)
def test_a_linen_layer_a_transform_makes_read_only_before_any_write_is_refused(where, first, jit):
  # Passed the layer, nn.while_loop without carry_variables='params' (its cond_fn even with
  # it) and nn.map_variables without mutable=True hand it its parameters read-only: the layer
  # ran as a plain call, and data_init left it as it was, silently, when another layer was
  # initialized. Refused when the use runs (its scale still fresh: no use wrote it before).
  x = _batch((64, 6)) + 1.0
  model = _read_only_model(where, first)
  run = functools.partial(wl.data_init, model)
  on_values = jit or where != 'map_variables'  # a loop's body is traced even eagerly
  with pytest.raises(Exception if on_values else ValueError, match=_READ_ONLY):
    jax.block_until_ready((jax.jit(run) if jit else run)(model.init(jax.random.key(0), x), x))


@pytest.mark.parametrize(
  'where, first',
  [
    ("while_loop, carry_variables='params'", None),
    ('while_loop', 'plain'),
    ('while_loop', 'remat'),
    ('while_loop', 'jit'),
    ('while_loop', 'cond, taken'),
    ('while_loop cond_fn', 'plain'),
  ],
)
def test_a_linen_layer_a_transform_may_write_or_an_earlier_use_set_is_initialized(where, first):
  # The review of a first version, which refused at trace time: a read-only use after one in
  # nn.remat / nn.jit / a cond's taken branch (writes of another trace) was refused too.
  x = _batch((64, 6)) + 1.0
  model = _read_only_model(where, first)
  new = jax.jit(functools.partial(wl.data_init, model))(model.init(jax.random.key(0), x), x)
  h = wl.WNDense(6).apply({'params': new['params']['first']}, x)
  y = wl.WNDense(6).apply({'params': new['params']['a']}, h)
  np.testing.assert_allclose(np.std(y, 0), 1.0, rtol=1e-4)


@pytest.mark.parametrize('mutable', [False, ['batch_stats'], 'intermediates'])
def test_a_linen_model_applied_read_only_inside_the_model_is_left_as_it_is(mutable):
  # A frozen sub-model applied with its own parameters (a teacher, its features captured)
  # runs plainly, as before: the review found the first version refused it where mutable
  # was not False.
  x = _batch((64, 6)) + 1.0
  teacher = wl.WNDense(6)
  frozen = teacher.init(jax.random.key(3), x)
  before = teacher.apply(frozen, x)

  class Student(nn.Module):
    @nn.compact
    def __call__(self, x):
      if mutable == 'intermediates':
        h = teacher.apply(frozen, x, capture_intermediates=True, mutable=['intermediates'])[0]
      else:
        h = teacher.apply(frozen, x, mutable=mutable)
        h = h[0] if mutable else h
      return wl.WNDense(6, name='a')(h)

  new = wl.data_init(Student(), Student().init(jax.random.key(0), x), x)
  y = wl.WNDense(6).apply({'params': new['params']['a']}, before)
  np.testing.assert_allclose(np.std(y, 0), 1.0, rtol=1e-4)


class _UsesFn(nn.Module):
  fn: Any

  @nn.compact
  def __call__(self, x):
    return self.fn(nn.Dense(6, name='plain')(x))


@pytest.mark.parametrize('jit', [False, True])
def test_linen_layers_around_and_inside_a_weight_norm_wrapper(jit):
  # The wrapper's nn.map_variables hands the layers it maps their parameters read-only:
  # data_init leaves a WN layer inside a wrapped module as it is. It marked it fresh all
  # the same, and a WN layer after the wrapper was refused ("the pre-activation is not
  # finite"). A parent's layer the wrapped module calls through a function is not mapped:
  # it is initialized (the review found a first version left it as it was, silently).
  x = _batch((64, 6)) + 1.0

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return wl.WNDense(6, name='inner')(nn.Dense(6, name='plain')(x))

  class Wrapped(nn.Module):
    def setup(self):
      self.blk = wl.WeightNorm(Block(), where='plain/kernel')
      self.via = wl.WeightNorm(_UsesFn(lambda h: self.s(h)), where='plain/kernel')
      self.s, self.t = wl.WNDense(6), wl.WNDense(6)

    def __call__(self, x):
      return self.t(self.via(self.blk(x)))

  variables = Wrapped().init(jax.random.key(0), x)
  run = functools.partial(wl.data_init, Wrapped())
  new = (jax.jit(run) if jit else run)(variables, x)
  inner = lambda v: v['params']['blk']['layer']['inner']  # noqa: E731
  jax.tree.map(np.testing.assert_array_equal, inner(new), inner(variables))
  _, seen = Wrapped().apply(new, x, capture_intermediates=True, mutable=['intermediates'])
  for name in ('s', 't'):
    np.testing.assert_allclose(
      np.std(seen['intermediates'][name]['__call__'][0], 0), 1.0, rtol=1e-4
    )


@pytest.mark.parametrize('pred', [True, False])
def test_a_layer_used_before_a_cond_is_initialized_there(pred):
  x = _batch((256, 6))
  model = _nnx_cond_model(before=True, branches=2)
  wx.data_init(model, x, pred)
  first = model.a(x)
  np.testing.assert_allclose(np.std(first, 0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(np.mean(first, 0), 0.0, atol=1e-4)


def test_bf16_params_are_finite_and_close():
  x = _batch((512, 10)).astype(jnp.bfloat16)
  model = MLP(depth=3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  new = wl.data_init(model, model.init(jax.random.key(1), x), x)
  assert all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in jax.tree_util.tree_leaves(new))
  _assert_standardized(_wn_outputs(model, new, x), 1.0, mean_tol=5e-2, std_tol=5e-2)


def test_batch_of_one_raises_and_constant_feature_is_finite():
  model = wl.WNDense(3)
  variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match='at least 2 values per feature'):
    wl.data_init(model, variables, jnp.ones((1, 4)))
  x = jnp.concatenate([jnp.ones((8, 1)), _batch((8, 3))], axis=1)
  v = dict(variables['params'])
  v['kernel'] = jnp.zeros((4, 3)).at[0, 0].set(1.0).at[1:, 1:].set(1.0)  # feature 0 constant
  new = wl.data_init(model, {'params': v}, x)
  assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(new))
  np.testing.assert_allclose(new['params']['scale'][0], 1.0)


def test_an_empty_batch_is_refused_as_a_batch_of_one_is():
  # Found by a user: an empty batch raised JAX's "zero-size array to reduction operation max
  # which has no identity" (linen and NNX, eager and under nnx.jit), naming no fix.
  model = wl.WNDense(3)
  variables = model.init(jax.random.key(0), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match='at least 2 values per feature'):
    wl.data_init(model, variables, jnp.ones((0, 4)))
  layer = wx.WNLinear(4, 3, rngs=nnx.Rngs(0))
  before = np.asarray(layer.scale[...])
  with pytest.raises(ValueError, match='at least 2 values per feature'):
    wx.data_init(layer, jnp.ones((0, 4)))
  np.testing.assert_array_equal(layer.scale[...], before)
  # With axis_name the batch counted is the global one: empty rows on every element, or no
  # element at all (a review found "NaN or inf statistics", and JAX's message again).
  for x in (jnp.ones((3, 0, 4)), jnp.ones((0, 5, 4))):
    with pytest.raises(ValueError, match='at least 2 values per feature'):
      jax.vmap(lambda x: wl.data_init(model, variables, x, axis_name='b'), axis_name='b')(x)
  with pytest.raises(ValueError, match='shared across the mapped axis'):
    jax.vmap(lambda x: wl.data_init(model, variables, x))(jnp.ones((0, 5, 4)))


def test_direction_must_be_output_features():
  model = wl.WNDense(3, axis=0)
  x = _batch((16, 4))
  with pytest.raises(ValueError, match='output-feature axis'):
    wl.data_init(model, model.init(jax.random.key(0), x), x)


def test_conv_transpose_and_bad_init_scale():
  model = wl.WNConvTranspose(4, (3,), strides=(2,))
  x = _batch((16, 6, 3))
  new = wl.data_init(model, model.init(jax.random.key(0), x), x, init_scale=0.5)
  y = np.asarray(model.apply(new, x)).reshape(-1, 4)
  np.testing.assert_allclose(y.std(0), 0.5, rtol=1e-4)
  with pytest.raises(ValueError, match='init_scale'):
    wl.data_init(model, new, x, init_scale=-1.0)


@pytest.mark.parametrize('bad', [True, 0, -1.0, np.inf, np.nan, '0.5', jnp.asarray(0.5)])
def test_init_scale_is_a_positive_finite_number(bad):
  # A bool, an infinity or a string is refused up front, naming init_scale (inf used to run
  # and then blame the batch); a callable's result is checked the same way, naming the layer.
  model = wl.WNDense(3)
  x = _batch((8, 4))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r'init_scale must be a positive finite'):
    wl.data_init(model, variables, x, init_scale=bad)
  with pytest.raises(
    ValueError, match=r'init_scale for the root layer \(the model itself\) must be a positive'
  ):
    wl.data_init(model, variables, x, init_scale=lambda path: bad)
  with pytest.raises(ValueError, match="init_scale for layer 'layers/0' must be a positive finite"):
    wx.data_init(NNXNet(nnx.Rngs(0)), _batch((8, 10)), init_scale=lambda path: bad)


@pytest.mark.parametrize('good', [np.float32(0.5), np.float64(0.5), 1, np.int64(2)])
def test_init_scale_takes_numpy_scalars_and_ints(good):
  model = wl.WNDense(3)
  x = _batch((64, 4))
  new = wl.data_init(model, model.init(jax.random.key(0), x), x, init_scale=good)
  np.testing.assert_allclose(np.asarray(model.apply(new, x)).std(0), float(good), rtol=1e-3)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List(
      [wx.WNLinear(10, 16, rngs=rngs)]
      + [wx.WNLinear(16, 16, rngs=rngs) for _ in range(4)]
      + [wx.WNLinear(16, 4, rngs=rngs)]
    )
    self.conv = wx.WNConv(1, 4, (3,), rngs=rngs)

  def __call__(self, x, trace=None):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if trace is not None:
        trace.append(x)
      if i < len(self.layers) - 1:
        x = nnx.relu(x)
    y = self.conv(x[..., None])
    if trace is not None:
      trace.append(y)
    return y


@pytest.mark.parametrize('jit', [False, True])
def test_nnx_every_layer_standardized(jit):
  x = _batch((512, 10))
  model = NNXNet(nnx.Rngs(0))
  run = (
    nnx.jit(lambda m, x: wx.data_init(m, x, init_scale=0.5))
    if jit
    else (lambda m, x: wx.data_init(m, x, init_scale=0.5))
  )
  run(model, x)
  trace = []
  model(x, trace)
  assert len(trace) == 7
  _assert_standardized({str(i): t for i, t in enumerate(trace)}, 0.5)


def test_nnx_init_scale_callable_gets_the_layer_path():
  # As in linen, a callable init_scale gets each layer's path (here as layer_axes names it).
  x = _batch((256, 4))
  net = nnx.Sequential(wx.WNLinear(4, 8, rngs=nnx.Rngs(0)), wx.WNLinear(8, 3, rngs=nnx.Rngs(1)))
  seen = []
  out = wx.data_init(net, x, init_scale=lambda p: seen.append(p) or (0.5 if p == 'layers/1' else 1))
  assert seen == list(wx.layer_axes(net)) == ['layers/0', 'layers/1']
  np.testing.assert_allclose(out.std(0), 0.5, rtol=1e-3)


def test_nnx_matches_linen():
  x = _batch((128, 10))
  lin = MLP(depth=3)
  variables = lin.init(jax.random.key(0), x)
  new = wl.data_init(lin, variables, x)

  class Net(nnx.Module):
    def __init__(self):
      self.layers = nnx.List(
        [
          wx.WNLinear(10, 16, rngs=nnx.Rngs(0)),
          wx.WNLinear(16, 16, rngs=nnx.Rngs(0)),
          wx.WNLinear(16, 4, rngs=nnx.Rngs(0)),
        ]
      )

    def __call__(self, x):
      for i, layer in enumerate(self.layers):
        x = layer(x)
        x = nnx.relu(x) if i < 2 else x
      return x

  net = Net()
  for i, layer in enumerate(net.layers):
    p = variables['params'][f'WNDense_{i}']
    layer.kernel[...] = p['kernel']
  wx.data_init(net, x)
  for i, layer in enumerate(net.layers):
    np.testing.assert_allclose(layer.scale[...], new['params'][f'WNDense_{i}']['scale'], rtol=1e-4)
    np.testing.assert_allclose(
      layer.bias[...], new['params'][f'WNDense_{i}']['bias'], rtol=1e-4, atol=1e-5
    )


def test_nnx_shard_map_axis_name_gives_global_statistics():
  x = _batch((64, 10))
  a, b = NNXNet(nnx.Rngs(0)), NNXNet(nnx.Rngs(0))
  wx.data_init(a, x)
  graphdef, state = nnx.split(b)

  def per_device(state, xs):
    model = nnx.merge(graphdef, state)
    wx.data_init(model, xs, axis_name='batch')
    return nnx.state(model)

  out = jax.vmap(per_device, in_axes=(None, 0), axis_name='batch')(state, x.reshape(4, 16, 10))
  np.testing.assert_allclose(out['layers'][0]['scale'][...][0], a.layers[0].scale[...], rtol=1e-4)
  np.testing.assert_allclose(
    out['layers'][5]['bias'][...][3], a.layers[5].bias[...], rtol=1e-4, atol=1e-5
  )


class NNXResCNN(nnx.Module):
  def __init__(self, rngs):
    self.stem = wx.WNConv(3, 8, (3, 3), rngs=rngs)
    self.res_a = wx.WNConv(8, 8, (3, 3), rngs=rngs)
    self.res_b = wx.WNConv(8, 8, (3, 3), rngs=rngs)
    self.bn = wx.MeanOnlyBatchNorm(8, rngs=rngs)
    self.head = wx.WNLinear(8 * 4 * 4, 5, rngs=rngs)

  def __call__(self, x, trace=None):
    outs = []
    h = self.stem(x)
    outs.append(h)
    h = self.bn(nnx.relu(h), use_running_average=True)
    r = self.res_a(h)
    outs.append(r)
    r = self.res_b(nnx.relu(r))
    outs.append(r)
    h = nnx.relu(h + r)
    h = h.reshape(h.shape[0], 4, 2, 4, 2, 8).mean((2, 4)).reshape(h.shape[0], -1)  # 2x2 pooling
    y = self.head(h)
    outs.append(y)
    if trace is not None:
      trace.extend(outs)
    return y


def test_nnx_cnn_with_residual_block():
  x = _batch((32, 8, 8, 3))
  model = NNXResCNN(nnx.Rngs(0))
  wx.data_init(model, x)
  trace = []
  model(x, trace)
  assert len(trace) == 4
  _assert_standardized({str(i): t for i, t in enumerate(trace)}, 1.0)
  np.testing.assert_array_equal(model.bn.mean[...], 0.0)  # mean-only BN left alone


def test_weight_norm_wrapped_layers_are_left_alone():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return wl.WNDense(3, name='wn')(wl.WeightNorm(nn.Dense(6), name='wrapped')(x))

  model, x = Model(), _batch((64, 5))
  variables = model.init(jax.random.key(0), x)
  new = wl.data_init(model, variables, x)
  for a, b in zip(
    jax.tree_util.tree_leaves(new['params']['wrapped']),
    jax.tree_util.tree_leaves(variables['params']['wrapped']),
  ):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(new['params']['wn']['scale'], variables['params']['wn']['scale'])


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return wl.WNDense(8, kernel_init=nn.initializers.normal(0.05))(c), None


class _Scanned(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    body = nn.remat(_ScanBlock) if self.remat else _ScanBlock
    block = nn.scan(body, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
    return block()(x, None)[0]


@pytest.mark.parametrize('remat', [False, True])
def test_linen_layers_inside_scan_each_from_their_own_statistics(remat):
  # Flax traces a scan body twice (a partial-evaluation pass for its invariants, then the
  # loop): data_init used to initialize on the first, discarded, pass and skip the real one.
  x = _batch((64, 8))
  model = _Scanned(remat)
  variables = model.init(jax.random.key(1), x)
  new = wl.data_init(model, variables, x, init_scale=0.5)
  ((name, block),) = new['params'].items()
  p, old = block['WNDense_0'], variables['params'][name]['WNDense_0']
  np.testing.assert_array_equal(p['kernel'], old['kernel'])
  h = np.asarray(x, np.float64)
  for i in range(3):  # layer i standardized on the output of the initialized layer i - 1
    t = h @ (np.asarray(p['kernel'][i], np.float64) / np.linalg.norm(p['kernel'][i], axis=0))
    np.testing.assert_allclose(p['scale'][i], 0.5 / t.std(0), rtol=1e-4)
    h = t * np.asarray(p['scale'][i], np.float64) + np.asarray(p['bias'][i], np.float64)
    np.testing.assert_allclose(h.std(0), 0.5, rtol=1e-4)
    np.testing.assert_allclose(h.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(model.apply(new, x)).std(0), 0.5, rtol=1e-4)


class _TrainBN(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    h = wl.WNDense(8)(x)
    h = wl.MeanOnlyBatchNorm(use_running_average=not train)(h)
    h = nn.BatchNorm(use_running_average=not train)(nn.relu(h))
    return wl.WNDense(4)(h)


def test_linen_mean_only_batch_norm_in_training_mode():
  x = _batch((32, 4))
  model = _TrainBN()
  variables = model.init(jax.random.key(1), x)
  new = wl.data_init(model, variables, x)
  assert new['batch_stats'] is variables['batch_stats']  # other collections unchanged
  _, state = model.apply(
    new, x, capture_intermediates=True, mutable=['intermediates', 'batch_stats']
  )
  outs = {k: v['__call__'][0] for k, v in state['intermediates'].items() if k.startswith('WN')}
  assert set(outs) == {'WNDense_0', 'WNDense_1'}
  _assert_standardized(outs, 1.0)


@pytest.mark.parametrize('api', ['linen', 'nnx'])
def test_transpose_kernel_default_axis_message(api):
  x = _batch((16, 6, 3))
  msg = r'transpose_kernel=True.*keeps the input features.*axis=-2'
  if api == 'linen':
    model = wl.WNConvTranspose(4, (3,), transpose_kernel=True)
    with pytest.raises(ValueError, match=msg):
      wl.data_init(model, model.init(jax.random.key(0), x), x)
    model = wl.WNConvTranspose(4, (3,), transpose_kernel=True, axis=-2)  # the advice works
    y = model.apply(wl.data_init(model, model.init(jax.random.key(0), x), x), x)
  else:
    layer = wx.WNConvTranspose(3, 4, (3,), transpose_kernel=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=msg):
      wx.data_init(layer, x)
    layer = wx.WNConvTranspose(3, 4, (3,), transpose_kernel=True, axis=-2, rngs=nnx.Rngs(0))
    wx.data_init(layer, x)
    y = layer(x)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 4).std(0), 1.0, rtol=1e-4)


class _NNXRNN(nnx.Module):
  """An input layer, then an RNN cell applied at every step."""

  def __init__(self, rngs, scan):
    self.inp = wx.WNLinear(8, 8, rngs=rngs)
    self.cell = wx.WNLinear(8, 8, rngs=rngs)
    self.scan = scan

  def __call__(self, xs):
    h = jnp.zeros(xs.shape[1:])
    xs = self.inp(xs)
    if not self.scan:
      for x in xs:
        h = self.cell(h + x)
      return h

    # The cell shared across the steps: broadcast state, whose writes nnx.scan discards.
    @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=nnx.Carry)
    def step(cell, h, x):
      return cell(h + x)

    return step(self.cell, h, xs)


def test_nnx_layer_shared_across_scan_steps_is_refused_not_skipped():
  # nnx.scan drops the cell's writes: data_init used to leave its scale as it was, silently.
  xs = _batch((4, 64, 8))
  model = _NNXRNN(nnx.Rngs(0), scan=True)
  before = nnx.to_pure_dict(nnx.state(model))
  with pytest.raises(ValueError, match=r"layer 'cell'.*discards.*Python loop"):
    wx.data_init(model, xs)
  after = nnx.to_pure_dict(nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, after, before)  # the input layer too
  # The advice works: the same layers in a Python loop, then back in the scan.
  model.scan = False
  wx.data_init(model, xs)
  assert not np.allclose(model.cell.scale[...], before['cell']['scale'])
  model.scan = True
  h = np.asarray(model(xs[:1]), np.float64)  # one step: the cell on the initialized input
  np.testing.assert_allclose(h.std(0), 1.0, rtol=1e-4)


class _WNCell(nnx.RNNCellBase):
  """An Elman cell of WN layers, for nnx.RNN."""

  def __init__(self, rngs):
    self.ih = wx.WNLinear(8, 8, rngs=rngs)
    self.hh = wx.WNLinear(8, 8, use_bias=False, rngs=rngs)

  def __call__(self, h, x):
    h = jnp.tanh(self.ih(x) + self.hh(h))
    return h, h

  def initialize_carry(self, input_shape, rngs=None):
    return jnp.zeros((*input_shape[:-1], 8))

  @property
  def num_feature_axes(self):
    return 1


@pytest.mark.parametrize('jit', [False, True])
def test_nnx_rnn_cell_carried_through_the_steps_is_initialized_at_the_first_step(jit):
  # nnx.RNN carries its cell's state through nnx.scan: data_init used to initialize the cell
  # again at every step, from that step's statistics, and keep the last step's: silently.
  # The first step initializes it, as the same cell applied in a Python loop does.
  xs = _batch((64, 5, 8))  # batch, time, features
  model = nnx.RNN(_WNCell(nnx.Rngs(0)))
  run = nnx.jit(wx.data_init, static_argnames='init_scale') if jit else wx.data_init
  run(model, xs, init_scale=0.5)
  pre = np.asarray(model.cell.ih(xs[:, 0]), np.float64)  # first use: the first step's input
  np.testing.assert_allclose(pre.std(0), 0.5, rtol=1e-4)
  looped = _Unrolled(_WNCell(nnx.Rngs(0)))
  wx.data_init(looped, xs, init_scale=0.5)
  want, got = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (looped.cell, model.cell))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6), got, want)


class _Unrolled(nnx.Module):
  """An RNN cell applied in a Python loop over the time axis (1), from a zero carry."""

  def __init__(self, cell):
    self.cell = cell

  def __call__(self, xs):
    h = self.cell.initialize_carry(xs[:, 0].shape)
    for t in range(xs.shape[1]):
      h, _ = self.cell(h, xs[:, t])
    return h


class _RNNs(nnx.Module):
  """Two RNNs with a WN cell, stacked by nnx.vmap: an ensemble, or layers of a scan."""

  def __init__(self, where):
    make = nnx.vmap(lambda key: nnx.RNN(_WNCell(nnx.Rngs(key))), in_axes=0, out_axes=0)
    self.rnns, self.where = make(jax.random.split(jax.random.key(0), 2)), where

  def __call__(self, xs):
    if self.where in ('ensemble', 'pmap'):  # each member on the whole batch
      mapped = nnx.vmap if self.where == 'ensemble' else nnx.pmap
      return mapped(lambda m, x: m(x), in_axes=(0, None))(self.rnns, xs)
    # a scan over the RNNs as layers, each on the previous one's outputs
    return nnx.scan(lambda m, h: m(h), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.rnns, xs)


@pytest.mark.parametrize('where', ['ensemble', 'nested', 'pmap'])
def test_nnx_carried_cells_of_stacked_rnns_are_initialized_at_their_first_step(where):
  # An RNN per member (nnx.vmap or nnx.pmap), or RNNs as the layers of a scan: each cell
  # initialized again at every step (a user trial), then refused; now at its first step.
  if where == 'pmap' and jax.device_count() < 2:
    pytest.skip('needs 2 devices')
  xs = _batch((64, 5, 8))
  model = _RNNs(where)
  wx.data_init(model, xs, init_scale=0.5)
  ih = model.rnns.cell.ih
  v, g, b = (np.asarray(a[...], np.float64) for a in (ih.kernel, ih.scale, ih.bias))
  first = np.asarray(xs[:, 0], np.float64) @ (v[0] / np.linalg.norm(v[0], axis=0)) * g[0] + b[0]
  np.testing.assert_allclose(first.std(0), 0.5, rtol=1e-4)  # the first RNN, its first step
  if where != 'nested':  # the second member on the same first step
    first = np.asarray(xs[:, 0], np.float64) @ (v[1] / np.linalg.norm(v[1], axis=0)) * g[1]
    np.testing.assert_allclose((first + b[1]).std(0), 0.5, rtol=1e-4)


class _SharedAcrossVmap(nnx.Module):
  """Three layers stacked along nnx.scan, the scan run per chunk of the batch by an nnx.vmap
  that shares them (in_axes=None), its axis named: statistics over every chunk."""

  def __init__(self):
    self.layers = _NNXStacked().layers

  def __call__(self, xs):
    run = nnx.scan(lambda m, h: m(h), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    return nnx.vmap(run, in_axes=(None, 0), axis_name='b')(self.layers, xs)


def test_nnx_stacked_layers_in_a_scan_under_a_shared_vmap_are_initialized():
  # A check that counted the vmaps around a scan took this vmap for an axis the layers lack,
  # and refused them as carried; statistics over every chunk (axis_name).
  xs = _batch((4, 16, 8))
  model = _SharedAcrossVmap()
  wx.data_init(model, xs, init_scale=0.5, axis_name='b')
  v, g, b = (
    np.asarray(a[...], np.float64)
    for a in (model.layers.kernel, model.layers.scale, model.layers.bias)
  )
  h = np.asarray(xs, np.float64).reshape(64, 8)
  for i in range(3):
    h = h @ (v[i] / np.linalg.norm(v[i], axis=0)) * g[i] + b[i]
    np.testing.assert_allclose(h.std(0), 0.5, rtol=1e-4)


class _PerStepScale(nnx.Module):
  """One direction for every step of a scan, its own g and b per step (3 steps)."""

  def __init__(self):
    self.lin = wx.WNLinear(8, 8, kernel_init=nnx.initializers.normal(0.05), rngs=nnx.Rngs(0))
    self.lin.scale, self.lin.bias = nnx.Param(jnp.ones((3, 8))), nnx.Param(jnp.zeros((3, 8)))

  def __call__(self, x):
    axes = nnx.StateAxes({nnx.PathContains('kernel'): None, ...: 0})
    return nnx.scan(lambda m, h: m(h), in_axes=(axes, nnx.Carry), out_axes=nnx.Carry)(self.lin, x)


def test_nnx_per_step_scale_of_a_shared_direction_is_initialized():
  # The check for a carried layer first went by the kernel (here shared, not stacked) and
  # refused this; it goes by the scale and bias that data_init writes, stacked here.
  x = _batch((64, 8))
  model = _PerStepScale()
  wx.data_init(model, x, init_scale=0.5)
  v = np.asarray(model.lin.kernel[...], np.float64)
  h = np.asarray(x, np.float64)
  for i in range(3):
    t = h @ (v / np.linalg.norm(v, axis=0)) * np.asarray(model.lin.scale[...][i])
    t = t + np.asarray(model.lin.bias[...][i])
    np.testing.assert_allclose(t.std(0), 0.5, rtol=1e-4)
    h = t


class _Ensemble(nnx.Module):
  """Two copies (nnx.vmap, in_axes=0) of three layers stacked along nnx.scan."""

  def __init__(self):
    make = nnx.vmap(nnx.vmap(lambda k: wx.WNLinear(8, 8, rngs=nnx.Rngs(k))))
    self.layers = make(jax.random.split(jax.random.key(0), (2, 3)))

  def __call__(self, x):
    run = nnx.scan(lambda m, h: m(h), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    return nnx.vmap(run, in_axes=(0, None))(self.layers, x)


def test_nnx_an_ensemble_of_stacked_layers_is_initialized():
  # An axis per vmap and per scan: stacked along both, not refused.
  x = _batch((64, 8))
  model = _Ensemble()
  wx.data_init(model, x, init_scale=0.5)
  v, g, b = (
    np.asarray(a[...], np.float64)
    for a in (model.layers.kernel, model.layers.scale, model.layers.bias)
  )
  for e in range(2):
    h = np.asarray(x, np.float64)
    for i in range(3):
      h = h @ (v[e, i] / np.linalg.norm(v[e, i], axis=0)) * g[e, i] + b[e, i]
      np.testing.assert_allclose(h.std(0), 0.5, rtol=1e-4)


class _StackedPerElement(nnx.Module):
  def __init__(self):
    self.layers = nnx.vmap(lambda k: wx.WNLinear(8, 8, rngs=nnx.Rngs(k)))(
      jax.random.split(jax.random.key(0), 2)
    )

  def __call__(self, x):
    return nnx.vmap(lambda layer, x: layer(x))(self.layers, x)


def test_an_eager_refusal_under_a_vmap_names_the_layer_once():
  # Found by a user: 'WNLinear(kernel (8, 8)): WNLinear(kernel (8, 8)): data_init needs...':
  # eagerly under a vmap the check runs inside the layer's call, with the label the check
  # puts on a refusal under a trace, and the call labelled it again.
  model = _StackedPerElement()
  before = np.asarray(model.layers.scale[...])
  with pytest.raises(ValueError, match='at least 2 values per feature') as e:
    wx.data_init(model, _batch((2, 1, 8)))
  assert str(e.value).count('WNLinear(') == 1, e.value
  np.testing.assert_array_equal(model.layers.scale[...], before)


def test_layers_stacked_along_a_scan_under_disable_jit_are_each_initialized():
  # There the scan runs its steps in Python: each stacked layer looked like one layer used
  # at every step, and only the first was initialized, silently (linen and NNX); then it was
  # refused. Each step's layer is initialized by its own first use, as under jit.
  x = _batch((64, 8))
  models = _NNXStacked(), _NNXStacked()
  wx.data_init(models[0], x)
  with jax.disable_jit():
    wx.data_init(models[1], x)
  want, got = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in models)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6), got, want)
  stack = _Scanned()
  variables = stack.init(jax.random.key(0), x)
  want = wl.data_init(stack, variables, x)
  with jax.disable_jit():
    got = wl.data_init(stack, variables, x)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6), got, want)


def test_a_traced_init_scale_names_the_fix():
  # nnx.jit(data_init)(model, x, init_scale=0.5): the number came traced, and the error only
  # said it was not a number.
  model = wx.WNLinear(8, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"init_scale is traced.*static_argnames='init_scale'"):
    nnx.jit(wx.data_init)(model, _batch((64, 8)), init_scale=0.5)
  nnx.jit(wx.data_init, static_argnames='init_scale')(model, _batch((64, 8)), init_scale=0.5)
  # A callable's traced result, and linen's jitted call: the same fix.
  run = nnx.jit(lambda m, x, s: wx.data_init(m, x, init_scale=lambda _: s))
  with pytest.raises(ValueError, match=r'init_scale is traced'):
    run(model, _batch((64, 8)), 0.5)
  dense = wl.WNDense(8)
  variables = dense.init(jax.random.key(0), _batch((64, 8)))
  with pytest.raises(ValueError, match=r'init_scale is traced.*wn_jax.linen.data_init'):
    jax.jit(lambda v, x, s: wl.data_init(dense, v, x, init_scale=s))(
      variables, _batch((64, 8)), 0.5
    )


class _ClosedOver(nnx.Module):
  def __init__(self):
    self.lin = wx.WNLinear(8, 8, rngs=nnx.Rngs(0))

  def __call__(self, xs):
    return jax.lax.map(lambda x: self.lin(x), xs)


def test_nnx_a_layer_closed_over_by_a_jax_loop_is_named():
  # Flax's TraceContextError named neither the layer nor data_init.
  with pytest.raises(ValueError, match=r"WNLinear.*at 'lin'.*Pass the layer to the NNX transform"):
    wx.data_init(_ClosedOver(), _batch((3, 64, 8)))


class _NNXStacked(nnx.Module):
  """Three layers stacked along nnx.scan (in_axes=0): each step its own layer."""

  def __init__(self):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
      return wx.WNLinear(8, 8, rngs=nnx.Rngs(key))

    self.layers = make(jax.random.split(jax.random.key(0), 3))

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(layer, h):
      return layer(h)

    return run(self.layers, x)


def test_nnx_stacked_layers_inside_scan_each_from_their_own_statistics():
  # Their writes come back from the scan: initialized, not refused.
  x = _batch((64, 8))
  model = _NNXStacked()
  wx.data_init(model, x, init_scale=0.5)
  kernel, scale = (
    np.asarray(a[...], np.float64) for a in (model.layers.kernel, model.layers.scale)
  )
  bias = np.asarray(model.layers.bias[...], np.float64)
  h = np.asarray(x, np.float64)
  for i in range(3):  # layer i standardized on the output of the initialized layer i - 1
    t = h @ (kernel[i] / np.linalg.norm(kernel[i], axis=0))
    np.testing.assert_allclose(scale[i], 0.5 / t.std(0), rtol=1e-4)
    h = t * scale[i] + bias[i]


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('api', ['linen', 'nnx'])
def test_float16_scale_that_does_not_fit_is_refused(api, jit):
  # Inputs of std 1e-5: g = 1 / sigma is about 1e5, past float16's largest finite 65504; it
  # used to become inf silently, and every output non-finite.
  x = (_batch((256, 8)) * 5e-6).astype(jnp.float16)
  msg = r'does not fit float16.*Compute this layer in float32'
  f16 = dict(dtype=jnp.float16, param_dtype=jnp.float16)
  if api == 'linen':
    model = wl.WNDense(4, **f16)
    variables = model.init(jax.random.key(1), x)
    run = lambda v, x: wl.data_init(model, v, x)  # noqa: E731
    with pytest.raises(ValueError if not jit else Exception, match=msg):
      jax.block_until_ready((jax.jit(run) if jit else run)(variables, x))
    # The advice works: the layer in float32.
    x = x.astype(jnp.float32)
    model = wl.WNDense(4)
    y = model.apply(run(model.init(jax.random.key(1), x), x), x)
  else:
    layer = wx.WNLinear(8, 4, rngs=nnx.Rngs(0), **f16)
    before = np.asarray(layer.scale[...])
    run = nnx.jit(wx.data_init) if jit else wx.data_init
    with pytest.raises(ValueError if not jit else Exception, match=msg):
      jax.block_until_ready(run(layer, x))
    if not jit:
      np.testing.assert_array_equal(layer.scale[...], before)  # left as it was
    x = x.astype(jnp.float32)
    layer = wx.WNLinear(8, 4, rngs=nnx.Rngs(0))
    run(layer, x)
    y = layer(x)
  assert np.all(np.isfinite(np.asarray(y, np.float32)))
  np.testing.assert_allclose(np.asarray(y, np.float32).std(0), 1.0, rtol=2e-2)


@pytest.mark.parametrize('bad', [np.nan, np.inf])
@pytest.mark.parametrize('api', ['linen', 'nnx'])
def test_a_batch_with_nan_or_inf_is_named_as_the_cause(api, bad):
  # It was blamed on the dtype: "varies too little on this batch ... compute this layer in
  # float32" for a float32 layer (a NaN standard deviation counted as 1).
  x = _batch((32, 4)).at[3, 1].set(bad)
  msg = r'not finite.*feature.*NaN or inf'
  if api == 'linen':
    model = wl.WNDense(3)
    with pytest.raises(ValueError, match=msg):
      wl.data_init(model, model.init(jax.random.key(0), x), x)
  else:
    layer = wx.WNLinear(4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=msg):
      wx.data_init(layer, x)


class _LinenCell(nn.Module):
  @nn.compact
  def __call__(self, h, x):
    h = wl.WNDense(8, name='cell')(h + x)
    return h, h


class _LinenRNN(nn.Module):
  """A cell whose parameters are shared by every step of nn.scan (variable_broadcast)."""

  @nn.compact
  def __call__(self, xs):
    scan = nn.scan(_LinenCell, variable_broadcast='params', split_rngs={'params': False})
    return scan(name='rnn')(jnp.zeros(xs.shape[1:]), xs)[1]


@pytest.mark.parametrize('jit', [False, True])
def test_a_linen_layer_used_before_a_scan_that_broadcasts_it_is_initialized_there(jit):
  # The steps read what the use before the scan set: its later uses wrote g all the same, a
  # data dependency of the broadcast variable ("broadcasted variable has a data dependency
  # on the scan body", Flax's error; found by a review).
  x = _batch((64, 6)) + 1.0

  class Before(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = wl.WNDense(6, name='a')
      steps = nn.scan(
        lambda m, c, _: (m(c), None),
        variable_broadcast='params',
        split_rngs={'params': False},
        length=2,
      )
      return steps(a, a(x), None)[0]

  run = functools.partial(wl.data_init, Before())
  new = (jax.jit(run) if jit else run)(Before().init(jax.random.key(0), x), x)
  first = wl.WNDense(6).apply({'params': new['params']['a']}, x)
  np.testing.assert_allclose(np.std(first, 0), 1.0, rtol=1e-4)


@pytest.mark.parametrize('transform', ['vjp', 'value_and_grad', 'jvp'])
def test_a_linen_layer_a_forward_differentiates_is_initialized(transform):
  # A model whose forward differentiates a layer (a gradient penalty): the fit check's
  # callback had no derivative rule, and data_init failed, "Linearization failed to produce
  # known values for all output primals" (found by a review).
  x = _batch((64, 6)) + 1.0

  class Differentiates(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = wl.WNDense(6, name='a')
      if transform == 'vjp':
        y, pullback = nn.vjp(lambda m, z: m(z), a, x)
        return y + 0.0 * pullback(jnp.ones_like(y))[1]
      if transform == 'jvp':
        return nn.jvp(lambda m, z: m(z), a, (x,), (jnp.ones_like(x),), {})[0]
      value, _ = nn.value_and_grad(lambda m, z: jnp.sum(m(z)), a, x)
      return a(x) + 0.0 * value

  new = jax.jit(functools.partial(wl.data_init, Differentiates()))(
    Differentiates().init(jax.random.key(0), x), x
  )
  first = wl.WNDense(6).apply({'params': new['params']['a']}, x)
  np.testing.assert_allclose(np.std(first, 0), 1.0, rtol=1e-4)


class _LinenSharedVmap(nn.Module):
  """One layer's parameters shared across nn.vmap's mapped axis (variable_axes None)."""

  axis_name: str | None = None

  @nn.compact
  def __call__(self, xs):
    vm = nn.vmap(
      wl.WNDense,
      variable_axes={'params': None},
      split_rngs={'params': False},
      axis_name=self.axis_name,
    )
    return vm(8, name='shared')(xs)


def test_linen_layer_shared_across_scan_steps_is_refused_with_the_fix():
  # Flax used to answer "broadcasted variable has a data dependency on the scan body".
  xs = _batch((4, 64, 8))
  model = _LinenRNN()
  variables = model.init(jax.random.key(1), xs)
  with pytest.raises(ValueError, match=r"WNDense at '/rnn/cell'.*nn.scan.*outside the scan"):
    wl.data_init(model, variables, xs)
  # The advice works: the cell alone, on one step, with the same parameters.
  cell = variables['params']['rnn']
  new = wl.data_init(_LinenCell(), {'params': cell}, jnp.zeros(xs.shape[1:]), xs[0])
  h = model.apply({'params': {'rnn': new['params']}}, xs)[0]
  np.testing.assert_allclose(np.asarray(h).std(0), 1.0, rtol=1e-4)


@pytest.mark.parametrize('jit', [False, True])
def test_linen_layer_shared_across_vmap_needs_the_axis_name(jit):
  # Flax used to answer with an out_axes error: the layer's g came out per mapped element.
  xs = _batch((4, 64, 8))
  model = _LinenSharedVmap()
  variables = model.init(jax.random.key(1), xs)
  with pytest.raises(ValueError, match=r"WNDense at '/shared'.*nn.vmap.*axis_name="):
    wl.data_init(model, variables, xs)
  # The advice works: the statistics of the whole batch, over the mapped axis too. Under
  # jit, the closure refusal took g (a value of the jit's trace, which holds nn.vmap's) for
  # one lost in a transform's body (a review).
  model = _LinenSharedVmap(axis_name='b')
  run = functools.partial(wl.data_init, model, axis_name='b')
  new = (jax.jit(run) if jit else run)(variables, xs)
  y = np.asarray(model.apply(new, xs)).reshape(-1, 8)
  np.testing.assert_allclose(y.std(0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)


class _NNXSharedVmap(nnx.Module):
  """One layer shared across nnx.vmap's mapped axis (in_axes=None)."""

  def __init__(self, axis_name=None, **dtypes):
    self.shared = wx.WNLinear(8, 8, rngs=nnx.Rngs(0), **dtypes)
    self.axis_name = axis_name

  def __call__(self, xs):
    @nnx.vmap(in_axes=(None, 0), axis_name=self.axis_name)
    def run(layer, x):
      return layer(x)

    return run(self.shared, xs)


def test_nnx_layer_shared_across_vmap_needs_the_axis_name():
  # JAX used to answer with an out_axes error: the layer's g came out per mapped element.
  xs = _batch((4, 64, 8))
  model = _NNXSharedVmap()
  with pytest.raises(ValueError, match=r'WNLinear.*nnx.vmap.*axis_name='):
    wx.data_init(model, xs)
  model = _NNXSharedVmap(axis_name='b')
  wx.data_init(model, xs, axis_name='b')
  y = np.asarray(model(xs)).reshape(-1, 8)
  np.testing.assert_allclose(y.std(0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)


def test_a_vmapped_use_checks_once_not_per_element():
  # The fit check is a debug callback, which a vmap runs once per mapped element: outside
  # jit, each element's slice of each of its arguments compiled a program of its own (192
  # for a vmap over 64 rows, more than the rest of the call). It runs once, on the batch's
  # worst values: as many programs for 56 elements as for 40 (batch sizes no other test uses,
  # after a first call that compiles what every size shares).
  counts = []
  for rows in (12, 40, 56):
    with count_compiles() as seen:
      wx.data_init(_Later('shared vmap'), _batch((rows, 6)))
    counts.append(len(seen))
  assert counts[1] == counts[2], counts


class _Wide(nnx.Module):
  def __init__(self, layer, rngs):
    self.layers = nnx.List([layer(16, 16, rngs=rngs) for _ in range(3)])

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return x


@pytest.mark.parametrize('front', ['linen', 'nnx'])
def test_data_init_on_a_new_batch_size_compiles_what_a_plain_call_does(front):
  # Found by a user: an eager data_init on a batch size no call had before compiled 11
  # programs where the plain model's init + apply compiled 3: the statistics ran op by op,
  # each a program per new activation shape. They are one jitted call: one program more than
  # the plain model's for layers of one shape (batch sizes no other test uses, after a first
  # call at batch 10).
  if front == 'linen':
    wn, plain = (
      nn.Sequential([layer(16), nn.relu, layer(16), nn.relu, layer(16)])
      for layer in (wl.WNDense, nn.Dense)
    )
    key = jax.random.key(0)
    variables = wn.init(key, _batch((10, 16)))

    def run_wn(x):
      return wl.data_init(wn, variables, x)

    def run_plain(x):
      return plain.apply(plain.init(key, x), x)
  else:
    wn, plain = _Wide(wx.WNLinear, nnx.Rngs(0)), _Wide(nnx.Linear, nnx.Rngs(0))

    def run_wn(x):
      return wx.data_init(wn, x)

    def run_plain(x):
      return plain(x)

  new = {'linen': (37, 39), 'nnx': (41, 43)}[front]  # no other test of this worker has them
  counts = []
  for run, rows in ((run_wn, 10), (run_plain, 10), (run_wn, new[0]), (run_plain, new[1])):
    x = _batch((rows, 16))
    with count_compiles() as seen:
      jax.block_until_ready(run(x))
    counts.append(len(seen))
  assert counts[2] <= counts[3] + 1, counts


@pytest.mark.parametrize('jit', [False, True])
def test_a_vmapped_use_still_refuses_a_scale_that_does_not_fit(jit):
  # Reduced over the vmap first, the check still sees what each element saw: inputs of std
  # 1e-5 give g = 1 / sigma of about 1e5, past float16's largest finite 65504.
  xs = (_batch((4, 64, 8)) * 5e-6).astype(jnp.float16)
  model = _NNXSharedVmap(axis_name='b', dtype=jnp.float16, param_dtype=jnp.float16)
  before = np.asarray(model.shared.scale[...])
  run = nnx.jit(wx.data_init, static_argnames='axis_name') if jit else wx.data_init
  with pytest.raises(ValueError if not jit else Exception, match=r'does not fit float16') as e:
    jax.block_until_ready(run(model, xs, axis_name='b'))
  if not jit:
    np.testing.assert_array_equal(model.shared.scale[...], before)  # left as it was
    # Named once (a user saw 'WNLinear(kernel (8, 8)): WNLinear(kernel (8, 8)): ...': the
    # callback's label, then the layer's call's).
    assert str(e.value).count('WNLinear(') == 1, e.value


@pytest.mark.parametrize('front', ['linen', 'nnx'])
def test_a_call_that_initializes_no_layer_is_refused(front):
  # Found by a user: data_init on WeightNorm-wrapped (or plain) layers returned the
  # variables unchanged, silently.
  x = 3.0 * jax.random.normal(jax.random.key(0), (64, 5))
  with pytest.raises(ValueError, match='initialized no layer'):
    if front == 'linen':
      model = wl.WeightNorm(nn.Dense(4))
      wl.data_init(model, model.init(jax.random.key(1), x), x)
    else:
      wx.data_init(wx.WeightNorm(nnx.Linear(5, 4, rngs=nnx.Rngs(0))), x)


class _NNXTrainBN(nnx.Module):
  def __init__(self, rngs):
    self.a = wx.WNLinear(4, 8, rngs=rngs)
    self.mobn = wx.MeanOnlyBatchNorm(8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.b = wx.WNLinear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.b(self.bn(nnx.relu(self.mobn(self.a(x)))))


def test_nnx_data_init_leaves_batch_statistics_alone():
  # As in linen, only the WN layers' scale and bias change. NNX data_init used to leave the
  # running statistics of the batch norms it called in training mode updated.
  x = _batch((32, 4))
  model = _NNXTrainBN(nnx.Rngs(0))
  before = [np.array(a) for a in jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat))]
  scale = model.a.scale[...]
  wx.data_init(model, x)
  for a, b in zip(before, jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat))):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(model.a.scale[...], scale)


@pytest.mark.parametrize('value', [37.3, -1e4, 0.7])
def test_a_constant_feature_keeps_unit_sigma_whatever_its_value(value):
  # A constant feature's float32 standard deviation is rounding noise, about |mu| 1e-7:
  # above 1e-6 for |mu| beyond a few units, it used to give g = 1 / noise (262144 at 37.3).
  x = jnp.full((100, 1), value)
  model = wl.WNDense(3)
  new = wl.data_init(model, model.init(jax.random.key(0), x), x)
  np.testing.assert_allclose(new['params']['scale'], 1.0)
  np.testing.assert_allclose(model.apply(new, x), 0.0, atol=1e-3 * abs(value))
  layer = wx.WNLinear(1, 3, rngs=nnx.Rngs(0))
  wx.data_init(layer, x)
  np.testing.assert_allclose(layer.scale[...], 1.0)


@pytest.mark.parametrize('size', [1e-7, 1e-20, 1e20])
def test_a_varying_feature_is_standardized_at_any_scale(size):
  # Features of std 1e-7 used to count as constant (an absolute cutoff of 1e-6) and kept
  # their scale; at 1e-20 the squares underflowed float32 (sigma 0: constant too), at 1e20
  # they overflowed (sigma inf: g = 0, a dead layer).
  x = _batch((256, 8)) * size
  model = wl.WNDense(4)
  new = wl.data_init(model, model.init(jax.random.key(0), x), x)
  _assert_standardized({'out': model.apply(new, x)}, 1.0)


# A scan built once, at module level (the usual @nnx.scan pattern): JAX keeps its trace of the
# step between calls.
@nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
def _step_through(layer, h):
  return layer(h)


class _NNXStackedModuleScan(_NNXStacked):
  def __call__(self, x):
    return _step_through(self.layers, x)


def test_nnx_data_init_again_through_a_scan_built_once():
  # Found by a user: the second data_init of a model whose scan is built once raised 'the call
  # initialized no layer': JAX reused the first call's trace of the step, so no layer's Python
  # ran. Reused, it would also have kept the first call's init_scale.
  x = _batch((64, 8))
  model = _NNXStackedModuleScan()
  wx.data_init(model, x)
  out = wx.data_init(model, x, init_scale=0.5)
  np.testing.assert_allclose(np.asarray(out).std(0), 0.5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(out), rtol=1e-6, atol=1e-6)
