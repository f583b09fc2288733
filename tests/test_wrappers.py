"""The ``WeightNorm`` wrappers (linen and NNX): methods and attributes, refusals, options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import wn_jax
from tests import reference as ref
from tests.helpers import assert_close
from wn_jax import linen as wl
from wn_jax import nnx as wx

KEY = jax.random.key(0)


def _rand(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def _moved(scale, factor=1.5):
  """The scale tree moved away from ``||v||``, so a wrapper that ignored it would fail."""
  return jax.tree_util.tree_map(lambda g: factor * g, scale)


def _normalized(layer_params, scale, axis=-1):
  """``layer_params`` with each parameter that ``scale`` mirrors replaced by the reference w."""
  out = {}
  for k, v in layer_params.items():
    if k not in scale:
      out[k] = v
    elif isinstance(scale[k], dict):
      out[k] = _normalized(v, scale[k], axis)
    else:
      out[k] = jnp.asarray(ref.normalize(v, scale[k], axis), jnp.float32)
  return out


# Item 4: the wrapped layer's methods and attributes.


def test_linen_embed_attend_uses_w():
  model = wl.WeightNorm(nn.Embed(5, 4), where='embedding', axis=0)
  ids = jnp.array([0, 3, 4])
  params = model.init(KEY, ids)['params']
  params = {'layer': params['layer'], 'scale': _moved(params['scale'])}
  w = ref.normalize(params['layer']['embedding'], params['scale']['embedding'], 0)
  q = _rand((2, 4))
  assert_close(model.apply({'params': params}, ids), w[np.asarray(ids)])
  assert_close(model.apply({'params': params}, q, method='attend'), np.asarray(q) @ w.T)
  # From a parent, the bound method is forwarded too.
  assert_close(model.apply({'params': params}, q, method=lambda m, q: m.attend(q)), q @ w.T)
  # Attributes that hold v (a parameter made in setup) are refused, not handed over raw.
  with pytest.raises(AttributeError, match=r"'embedding'.*direction v.*\.layer\.embedding"):
    model.apply({'params': params}, method=lambda m: m.embedding)


def test_linen_rnn_over_a_wrapped_cell_equals_the_rnn_with_w():
  x = _rand((2, 5, 3))
  rnn = nn.RNN(wl.WeightNorm(nn.LSTMCell(8)))
  params = rnn.init(KEY, x)['params']['cell']
  params = {'layer': params['layer'], 'scale': _moved(params['scale'])}
  out = rnn.apply({'params': {'cell': params}}, x)
  plain = nn.RNN(nn.LSTMCell(8))
  w = _normalized(params['layer'], params['scale'])
  assert_close(out, plain.apply({'params': {'cell': w}}, x), factor=4)
  grads = jax.grad(lambda p: jnp.sum(rnn.apply({'params': {'cell': p}}, x) ** 2))(params)
  assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads['scale']))


def test_nnx_embed_attend_and_rnn_use_w():
  embed = nnx.Embed(5, 4, rngs=nnx.Rngs(0))
  model = wx.WeightNorm(embed, where='embedding', axis=0)
  model.scale['embedding'][...] = 1.5 * model.scale['embedding'][...]
  w = ref.normalize(embed.embedding[...], model.scale['embedding'][...], 0)
  q = _rand((2, 4))
  assert_close(model.attend(q), np.asarray(q) @ w.T)
  with pytest.raises(AttributeError, match=r"'embedding'.*direction v"):
    _ = model.embedding

  cell = nnx.LSTMCell(3, 8, rngs=nnx.Rngs(0))
  wrapped = wx.WeightNorm(cell)
  for g in jax.tree_util.tree_leaves(wrapped.scale, is_leaf=lambda x: isinstance(x, nnx.Param)):
    g[...] = 1.5 * g[...]
  x = _rand((2, 5, 3))
  out = nnx.RNN(wrapped)(x)
  plain = nnx.clone(cell)
  for name in ('ii', 'if_', 'ig', 'io', 'hi', 'hf', 'hg', 'ho'):
    v, g = getattr(cell, name).kernel[...], wrapped.scale[name]['kernel'][...]
    getattr(plain, name).kernel[...] = jnp.asarray(ref.normalize(v, g), jnp.float32)
  assert_close(out, nnx.RNN(plain)(x), factor=4)


def test_nnx_wrapper_forwards_a_method_that_creates_state():
  # MultiHeadAttention.init_cache sets cache variables where the layer held None: through the
  # wrapper it raised Flax's "Expected a subgraph for 'cache_index'" (the state copied back
  # could only update variables the layer had).
  kw = dict(num_heads=2, in_features=8, qkv_features=8, decode=True, rngs=nnx.Rngs(0))
  model = wx.WeightNorm(nnx.MultiHeadAttention(**kw), where=r'kernel$', axis=-1)
  for g in jax.tree_util.tree_leaves(model.scale, is_leaf=lambda x: isinstance(x, nnx.Param)):
    g[...] = 1.5 * g[...]
  x = _rand((1, 4, 8))
  full = model(x, mask=nnx.make_causal_mask(jnp.ones((1, 4))), decode=False)
  model.init_cache((1, 4, 8))
  steps = [model(x[:, i : i + 1]) for i in range(4)]
  assert_close(jnp.concatenate(steps, axis=1), full, factor=8)
  assert int(model.layer.cache_index[...]) == 4


class _Blocks(nnx.Module):  # layers in a plain list
  def __init__(self):
    rngs = nnx.Rngs(0)
    self.blocks = nnx.data([nnx.Linear(8, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)])

  def __call__(self, x):
    return self.blocks[1](self.blocks[0](x))


class _Appends(nnx.Module):  # a call appends a variable to a list of each kind
  def __init__(self):
    self.lin = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    self.seen, self.also = nnx.List([]), nnx.data([])

  def __call__(self, x):
    y = self.lin(x)
    self.seen.append(nnx.BatchStat(jnp.mean(y)))
    self.also.append(nnx.BatchStat(jnp.max(y)))
    return y


class _MakesASubmodule(nnx.Module):
  def __init__(self):
    self.lin = nnx.Linear(8, 8, rngs=nnx.Rngs(0))

  def __call__(self, x):
    if not hasattr(self, 'bn'):
      self.bn = nnx.BatchNorm(8, rngs=nnx.Rngs(1))
    return self.bn(self.lin(x))


class _Sows(nnx.Module):
  def __init__(self):
    self.lin = nnx.Linear(8, 8, rngs=nnx.Rngs(0))

  def __call__(self, x):
    h = self.lin(x)
    self.sow(nnx.Intermediate, 'h', h)
    return h


def test_nnx_capture_reads_what_a_wrapped_layer_sows():
  # nnx.capture puts its own entries on every module, the scale's nnx.Dicts too: reading the
  # scales by iterating the Dicts broke on them.
  x = _rand((2, 8))
  _, got = nnx.capture(wx.WeightNorm(_Sows()), nnx.Intermediate)(x)
  _, want = nnx.capture(_Sows(), nnx.Intermediate)(x)
  jax.tree.map(assert_close, nnx.to_pure_dict(got)['layer'], nnx.to_pure_dict(want))


@pytest.mark.parametrize('make', [_Blocks, _Appends])
def test_nnx_wrapper_carries_back_the_state_a_call_leaves(make):
  # The state a call leaves, in containers, and new: as a plain model's call leaves it (the
  # first way of carrying new state back broke layers in plain lists and appends).
  wrapped, plain = wx.WeightNorm(make()), make()
  x = _rand((4, 8))
  for _ in range(2):
    assert_close(wrapped(x), plain(x))
  mean = lambda m: nnx.state(m, nnx.BatchStat)  # noqa: E731
  jax.tree.map(assert_close, mean(wrapped.layer), mean(plain))


class _Counts(nnx.Module):  # plain attributes its methods set, as nnx.jit carries them back
  def __init__(self):
    self.lin = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    self.calls, self.mode = 0, 'train'

  def __call__(self, x):
    self.calls += 1
    self.last_shape = x.shape  # created by the call
    return self.lin(x)

  def set_mode(self, mode):
    self.mode = mode
    self.lin.tag = mode  # on a submodule
    self.impl = self.lin  # a graph node: not carried (the copy's layer computes with w)
    self.fn = lambda y: y @ self.lin.kernel[...]  # a closure over the copy: not carried
    if hasattr(self, 'last_shape'):
      del self.last_shape


def test_nnx_wrapper_carries_back_plain_attributes_a_method_sets():
  # The call runs on a copy: an int, a string or a tuple a method set on it was lost
  # silently, where a plain call (and nnx.jit) keeps it.
  wrapped, plain = wx.WeightNorm(_Counts()), _Counts()
  x = _rand((4, 8))
  for m in (wrapped, plain):
    m(x)
    m(x)
    m.set_mode('eval')
  nnx.jit(lambda m, x: m(x))(plain, x)
  wrapped(x)
  layer = wrapped.layer
  assert not hasattr(layer, 'fn') and not hasattr(layer, 'impl')
  wrapped.set_mode('eval')
  plain.set_mode('eval')
  assert not hasattr(layer, 'last_shape') and not hasattr(plain, 'last_shape')  # deleted
  wrapped(x)
  plain(x)
  assert (layer.calls, layer.mode, layer.last_shape, layer.lin.tag) == (4, 'eval', (4, 8), 'eval')
  assert (plain.calls, plain.mode, plain.last_shape, plain.lin.tag) == (4, 'eval', (4, 8), 'eval')
  assert_close(wrapped(x), plain(x))  # and the weights are still the layer's own


class _Steps(nnx.Module):  # a call reassigns an array attribute, an array entry and an nnx.Rngs
  def __init__(self):
    self.lin = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    self.step, self.d, self.rngs = jnp.array(0), nnx.Dict({'m': jnp.zeros(())}), nnx.Rngs(0)

  def __call__(self, x, rngs=None):
    self.step = self.step + 1
    self.d['m'] = self.d['m'] + 2.0
    if rngs is not None:
      self.rngs = rngs.fork()
    return self.lin(x) + jax.random.normal(self.rngs(), (8,))


def test_nnx_wrapper_carries_back_arrays_and_rngs_a_call_replaces():
  # A faster eager call skipped the carry-back when the copy held no variable but parameters,
  # counting an array or a callable (an nnx.Rngs) as nothing to carry: a user's step counter
  # stayed at 0 and a forked Rngs was lost, so later draws differed from the plain layer's.
  wrapped, plain = wx.WeightNorm(_Steps()), _Steps()
  x = _rand((4, 8))
  for m in (wrapped, plain):
    m(x, rngs=nnx.Rngs(7))
    m(x)
  assert_close(wrapped(x), plain(x))
  layer = wrapped.layer
  assert (int(layer.step), float(layer.d['m'])) == (int(plain.step), float(plain.d['m'])) == (3, 6)
  ours, theirs = layer.rngs.default, plain.rngs.default
  assert int(ours.count[...]) == int(theirs.count[...])
  key_data = jax.random.key_data
  np.testing.assert_array_equal(key_data(ours.key[...]), key_data(theirs.key[...]))


class _WritesBias(nnx.Module):
  def __init__(self):
    self.lin = nnx.Linear(8, 8, rngs=nnx.Rngs(0))

  def __call__(self, x):
    self.lin.bias[...] = self.lin.bias[...] + 1.0
    return self.lin(x)

  def bias(self):
    return self.lin.bias


def test_nnx_wrapper_runs_on_a_copy_of_every_parameter():
  # The method runs on a copy: a parameter it writes in place, selected or not, is the copy's,
  # and a parameter it returns is not the layer's own (a faster call handed the method the
  # layer's own unselected parameters).
  wrapped = wx.WeightNorm(_WritesBias())
  wrapped(_rand((4, 8)))
  np.testing.assert_array_equal(wrapped.layer.lin.bias[...], jnp.zeros(8))
  assert wrapped.bias() is not wrapped.layer.lin.bias


def test_nnx_wrapper_reads_scales_the_user_put_in_plain_dicts():
  # The scales read through nnx.state before; a faster read knew only nnx.Dict and raised a
  # KeyError on a scale subtree a user had set as plain dicts.
  model = wx.WeightNorm(nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0))))
  model.scale['layers'] = {'0': {'kernel': nnx.Param(2.0 * jnp.ones(4))}}
  layer = model.layer.layers[0]
  w = ref.normalize(np.asarray(layer.kernel[...]), 2.0 * np.ones(4), -1)
  assert_close(model(jnp.ones((1, 4))), jnp.ones((1, 4)) @ w + layer.bias[...])


def test_nnx_wrapper_refuses_a_call_that_makes_a_submodule():
  # Adopted from the copy the call ran on, a new submodule may hold w (the copy's weights):
  # a user trial found w in the layer's parameters that way. Refused, naming it.
  wrapped = wx.WeightNorm(_MakesASubmodule())
  before = nnx.to_pure_dict(nnx.state(wrapped))
  with pytest.raises(ValueError, match=r"__call__\(\) created 'bn', a BatchNorm.*__init__"):
    wrapped(_rand((4, 8)))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(wrapped)), before)


class _MakesStats(nnx.Module):
  def __init__(self):
    self.lin = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    self.stats = nnx.data(None)

  def __call__(self, x):
    y = self.lin(x)
    self.shape = y.shape  # a plain tuple: carried back
    self.stats = nnx.data((nnx.BatchStat(jnp.min(y)),))  # new variables in a new container
    return y


def test_nnx_wrapper_refusal_names_the_container_of_new_state():
  # A review found the refusal naming 'shape', a plain tuple the call also set (carried back
  # when alone), instead of the tuple of new variables that could not be carried.
  with pytest.raises(ValueError, match=r"created 'stats', a tuple"):
    wx.WeightNorm(_MakesStats())(_rand((4, 8)))


# Item 5: weight norm applied twice.


@pytest.mark.parametrize(
  'layer',
  [wl.WNDense(3), wl.WeightNorm(nn.Dense(3))],
  ids=['WNDense', 'WeightNorm'],
)
def test_linen_refuses_weight_norm_twice(layer):
  with pytest.raises(ValueError, match=r'weight-normalized already.*WeightNorm'):
    wl.WeightNorm(layer).init(KEY, jnp.ones((1, 2)))


def test_linen_weight_norm_beside_a_wn_layer_is_allowed():
  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):
      return wl.WNDense(2, name='wn')(nn.Dense(3, name='plain')(x))

  params = wl.WeightNorm(Mixed(), where='plain/kernel').init(KEY, jnp.ones((1, 2)))['params']
  assert jax.tree_util.tree_map(jnp.shape, params['scale']) == {'plain': {'kernel': (3,)}}


def test_a_wn_layers_bias_may_be_wrapped():
  # Only its kernel (and scale) are weight-normalized already.
  params = wl.WeightNorm(wl.WNDense(3), where='bias', axis=None).init(KEY, jnp.ones((1, 2)))
  assert jax.tree_util.tree_map(jnp.shape, params['params']['scale']) == {'bias': ()}
  model = wx.WeightNorm(wx.WNLinear(2, 3, rngs=nnx.Rngs(0)), where='bias', axis=None)
  assert model.scale['bias'][...].shape == ()


@pytest.mark.parametrize(
  'make',
  [
    lambda: wx.WNLinear(2, 3, rngs=nnx.Rngs(0)),
    lambda: wx.WeightNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0))),
  ],
  ids=['WNLinear', 'WeightNorm'],
)
def test_nnx_refuses_weight_norm_twice(make):
  with pytest.raises(ValueError, match=r'weight-normalized already.*WeightNorm'):
    wx.WeightNorm(make())


# Item 7: a layer without parameters.


def test_both_refuse_a_layer_without_parameters_in_the_same_words():
  class Pool(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.max_pool(x, (2,))

  class NNXPool(nnx.Module):
    def __call__(self, x):
      return nnx.max_pool(x, (2,))

  words = r'Pool\).*has no parameters.*nothing to weight-normalize'
  with pytest.raises(ValueError, match=words):
    wl.WeightNorm(Pool()).init(KEY, jnp.ones((1, 4, 2)))
  with pytest.raises(ValueError, match=words):
    wx.WeightNorm(NNXPool())


# Item 10: a layer with submodules built inline in a parent's compact method.


def test_linen_wrapper_of_an_inline_sequential():
  def seq():
    return nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])

  class Parent(nn.Module):
    @nn.compact
    def __call__(self, x):
      return wl.WeightNorm(seq())(x)

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return seq()(x)

  x = _rand((4, 2))
  params = Parent().init(KEY, x)['params']
  # The layers live beside the wrapper (built by the parent); the scale mirrors them.
  assert jax.tree_util.tree_map(jnp.shape, params['WeightNorm_0']) == {
    'scale': {'Dense_0': {'kernel': (3,)}, 'Dense_1': {'kernel': (2,)}}
  }
  plain = {k: params[k] for k in ('Dense_0', 'Dense_1')}
  assert_close(Parent().apply({'params': params}, x), Plain().apply({'params': plain}, x))
  scale = _moved(params['WeightNorm_0']['scale'])
  moved = {**params, 'WeightNorm_0': {'scale': scale}}
  assert_close(
    Parent().apply({'params': moved}, x),
    Plain().apply({'params': _normalized(plain, scale)}, x),
  )
  # fold knows this is a wrapper's scale tree (its layer's parameters hold v).
  with pytest.raises(ValueError, match=r'WeightNorm wrapper'):
    wl.fold(moved)


# Item 12: something that is not a layer.


def test_wrappers_refuse_what_is_not_a_layer():
  with pytest.raises(TypeError, match=r'flax\.linen\.Module.*got.*Array'):
    wl.WeightNorm(jnp.ones((2, 3)))
  with pytest.raises(TypeError, match=r'flax\.nnx\.Module.*got.*Array'):
    wx.WeightNorm(jnp.ones((2, 3)))
  with pytest.raises(TypeError, match=r'flax\.nnx\.Module.*got.*Dense'):
    wx.WeightNorm(nn.Dense(3))


# Item 14: Flax's options.


def test_linen_scale_param_dtype_and_epsilon():
  model = wl.WeightNorm(
    nn.Dense(3, param_dtype=jnp.float16, dtype=jnp.float32), param_dtype=jnp.float32
  )
  params = model.init(KEY, jnp.ones((1, 2)))['params']
  assert params['layer']['kernel'].dtype == jnp.float16
  assert params['scale']['kernel'].dtype == jnp.float32
  assert_close(params['scale']['kernel'], ref.norm(params['layer']['kernel'], -1).reshape(3))
  # epsilon: a lower bound on ||v||.
  v = jnp.array([[1e-4, 3.0], [0.0, 4.0]])
  g = jnp.array([2.0, 2.0])
  params = {'layer': {'kernel': v}, 'scale': {'kernel': g}}
  eps = wl.WeightNorm(nn.Dense(2, use_bias=False), epsilon=1e-2)
  x = jnp.eye(2)
  assert_close(eps.apply({'params': params}, x), [[2e-2, 1.2], [0.0, 1.6]])


def test_nnx_scale_param_dtype_and_epsilon():
  layer = nnx.Linear(2, 3, param_dtype=jnp.float16, dtype=jnp.float32, rngs=nnx.Rngs(0))
  model = wx.WeightNorm(layer, param_dtype=jnp.float32)
  assert model.scale['kernel'][...].dtype == jnp.float32
  assert_close(model.scale['kernel'][...], ref.norm(layer.kernel[...], -1).reshape(3))
  plain = nnx.Linear(2, 2, use_bias=False, rngs=nnx.Rngs(0))
  plain.kernel[...] = jnp.array([[1e-4, 3.0], [0.0, 4.0]])
  model = wx.WeightNorm(
    plain, epsilon=1e-2, scale_init=nnx.initializers.constant(2.0), rngs=nnx.Rngs(0)
  )
  assert_close(model(jnp.eye(2)), [[2e-2, 1.2], [0.0, 1.6]])


@pytest.mark.parametrize('epsilon', [-1.0, float('inf'), float('nan')])
def test_a_bad_epsilon_is_refused_at_construction(epsilon):
  with pytest.raises(ValueError, match='epsilon must be a finite non-negative number'):
    wl.WeightNorm(nn.Dense(3), epsilon=epsilon)
  with pytest.raises(ValueError, match='epsilon must be a finite non-negative number'):
    wx.WeightNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), epsilon=epsilon)


def test_the_not_a_layer_error_gives_an_example_of_its_own_api():
  with pytest.raises(TypeError, match=r'e\.g\. nnx\.Linear'):
    wx.WeightNorm(jnp.ones((2, 3)))


def test_selecting_no_leaf_names_the_parameters_and_the_fix():
  with pytest.raises(ValueError, match=r"'embedding'.*where='embedding'"):
    wx.WeightNorm(nnx.Embed(10, 4, rngs=nnx.Rngs(0)))


# layer_axes names the wrappers too: the documented recipe for a square wrapped kernel.


class _SquareNNX(nnx.Module):
  def __init__(self):
    self.a = wx.WNLinear(6, 6, axis=0, rngs=nnx.Rngs(0))
    self.b = wx.WeightNorm(nnx.Linear(6, 6, rngs=nnx.Rngs(1)), axis=0)

  def __call__(self, x):
    return self.b(jnp.tanh(self.a(x)))


class _SquareLinen(nn.Module):
  def setup(self):
    self.a = wl.WNDense(6, axis=0)
    self.b = wl.WeightNorm(nn.Dense(6), axis=0)

  def __call__(self, x):
    return self.b(jnp.tanh(self.a(x)))


def _projected(params, axes):
  # One projected step: each direction keeps its norm at init along the axis named.
  tx = optax.chain(optax.sgd(0.5), wn_jax.optim.project_directions(axis=axes))
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert wn_jax.optim.direction_stats(params, updates, axis=axes)
  return optax.apply_updates(params, updates)


def test_layer_axes_names_each_wrapper_with_its_axis():
  # layer_axes listed WN layers only, so project_directions(axis=layer_axes(model)) failed
  # on a square wrapped kernel with "no axis in the mapping ... build it with layer_axes".
  x = _rand((4, 6))
  model = _SquareNNX()
  assert wx.layer_axes(model) == {'a': 0, 'b': 0}
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  new = _projected(params, wx.layer_axes(model))
  for v, old in (
    (new['a']['kernel'], params['a']['kernel']),
    (new['b']['layer']['kernel'], params['b']['layer']['kernel']),
  ):
    assert_close(wn_jax.norm(v, axis=0), wn_jax.norm(old, axis=0), jnp.float32)
  linen = _SquareLinen()
  assert wl.layer_axes(linen, x) == {'a': 0, 'b': 0}
  lp = linen.init(KEY, x)['params']
  new = _projected(lp, wl.layer_axes(linen, x))
  assert_close(
    wn_jax.norm(new['b']['layer']['kernel'], axis=0),
    wn_jax.norm(lp['b']['layer']['kernel'], axis=0),
    jnp.float32,
  )


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(wl.WeightNorm(nn.Dense(6))(wl.WNDense(6, axis=0)(x))), None


class _ScanStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_ScanBlock, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
    return scan()(x, None)[0]


def _each_projected(params, axis, kernels, steps=3):
  # The stacked projection step, against each layer's own step with its own axis.
  new = _projected(params, axis)
  for i in range(steps):
    one = _projected(jax.tree.map(lambda a, i=i: a[i], params), _per_step(axis))
    for get in kernels:
      assert_close(get(new)[i], get(one), jnp.float32)


def _per_step(axis):
  return {path: tuple(a - 1 if a > 0 else a for a in kept[1:]) for path, kept in axis.items()}


def test_layer_axes_keeps_the_layer_axis_of_stacked_layers():
  # layer_axes gave each stacked layer its per-step axis (-1), which every tool refused for
  # the stacked kernel with advice to use layer_axes: circular. The leading layer axis is
  # now kept, and the layer's own non-negative axes move past it.
  x = _rand((4, 6))
  params = _ScanStack().init(KEY, x)['params']
  (block,) = params
  axes = wl.layer_axes(_ScanStack(), x)
  assert axes == {f'{block}/WNDense_0': (0, 1), f'{block}/WeightNorm_0': (0, -1)}
  kernels = [lambda p: p[block]['WNDense_0']['kernel'], lambda p: p[block]['Dense_0']['kernel']]
  _each_projected(params, axes, kernels)

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(rngs):
    return wx.WeightNorm(nnx.Linear(6, 6, rngs=rngs), axis=0)

  model = make(nnx.Rngs(0))
  assert wx.layer_axes(model) == {'': (0, 1)}
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  _each_projected(pure, wx.layer_axes(model), [lambda p: p['layer']['kernel']])


class _EndStep(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(wl.WNDense(4, name='d')(x)), wl.WNDense(5, axis=0, name='e')(x)


def _end_stack(stack):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(
        _EndStep, variable_axes={'params': stack}, split_rngs={'params': True}, length=3
      )
      return scan(name='s')(x, None)[1]

  return Net()


@pytest.mark.parametrize('stack', [0, -1])
def test_layer_axes_reads_a_layer_stacked_along_its_first_or_last_axis(stack):
  # Stacked along the last axis, a square layer fits the first-axis reading too: layer_axes
  # took it so, and fold, the projection and direction_stats were silently wrong (a user
  # trial). layer_axes now reads the stacking from one layer's shapes, as built.
  x = _rand((2, 4))
  params = _end_stack(stack).init(KEY, x)['params']
  first = stack == 0
  axes = wl.layer_axes(_end_stack(stack), x)
  assert axes == {'s/d': (0, -1) if first else (-2, -1), 's/e': (0, 1) if first else (0, -1)}
  folded = wl.fold(params, axes)['s']
  new = _projected(params, axes)['s']
  for name, own in (('d', -1), ('e', 0)):
    layer = params['s'][name]
    for i in range(3):
      one = {k: jnp.take(a, i, axis=stack) for k, a in layer.items()}
      want = ref.normalize(one['kernel'], one['scale'], own)
      assert_close(jnp.take(folded[name]['kernel'], i, axis=stack), want, jnp.float32)
      kept = wn_jax.norm(jnp.take(new[name]['kernel'], i, axis=stack), own)
      assert_close(kept, wn_jax.norm(one['kernel'], own), jnp.float32)

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=0, out_axes=stack)
  def make(rngs):
    return wx.WNLinear(4, 4, rngs=rngs)

  model = make(nnx.Rngs(0))
  assert wx.layer_axes(model) == {'': (0, -1) if first else (-2, -1)}
  folded = wx.fold(model)['kernel']
  for i in range(3):
    v, g = (jnp.take(p[...], i, axis=stack) for p in (model.kernel, model.scale))
    assert_close(jnp.take(folded, i, axis=stack), ref.normalize(v, g, -1), jnp.float32)


@pytest.mark.parametrize('stack', [0, -1])
def test_layer_axes_refuses_a_stack_its_shapes_do_not_tell(stack):
  # Stacked 8 times, an 8x8 layer's shapes fit the first-axis and the last-axis readings:
  # layer_axes took the first, silently wrong for a last-axis stack (a user trial).
  def net(length, inner=None):
    class Step(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        layer = wl.WNDense(8) if inner is None else inner()
        return layer(x), None

    return nn.scan(
      Step, variable_axes={'params': stack}, split_rngs={'params': True}, length=length
    )

  x = _rand((2, 8))
  both = r"layer 'WNDense_0'.*several stackings.*\(0, -1\) if stacked at index 0.*\(-2, -1\) if"
  both += r".*stacked=\{'WNDense_0': axes\}"
  with pytest.raises(ValueError, match=both):
    wl.layer_axes(net(8)(), x, None)
  given = (0, -1) if stack == 0 else (-2, -1)  # as the user built it
  params = net(8)().init(KEY, x, None)['params']
  axes = wl.layer_axes(net(8)(), x, None, stacked={'WNDense_0': given})
  folded, layer = wl.fold(params, axes)['WNDense_0'], params['WNDense_0']
  for i in range(8):
    one = {k: jnp.take(a, i, axis=stack) for k, a in layer.items()}
    want = ref.normalize(one['kernel'], one['scale'], -1)
    assert_close(jnp.take(folded['kernel'], i, axis=stack), want, jnp.float32)
  with pytest.raises(ValueError, match=r"stacked= names \['WNDense_9'\]"):
    wl.layer_axes(net(8)(), x, None, stacked={'WNDense_9': given})

  @nnx.split_rngs(splits=8)
  @nnx.vmap(in_axes=0, out_axes=stack)
  def make(rngs):
    return wx.WNLinear(8, 8, rngs=rngs)

  with pytest.raises(ValueError, match=r'the root layer.*several stackings'):
    wx.layer_axes(make(nnx.Rngs(0)))
  assert wx.layer_axes(make(nnx.Rngs(0)), stacked={'': given}) == {'': given}
  # Nested stacks, the outer along the other end: read where the sizes differ (the kernel
  # (3, 8, 8, 2) keeps its first and last two axes), refused where they coincide.
  if stack == 0:
    mixed = nn.scan(net(3), variable_axes={'params': -1}, split_rngs={'params': True}, length=2)
    assert wl.layer_axes(mixed(), x, None) == {'WNDense_0': (0, -2, -1)}
    mixed = nn.scan(net(8), variable_axes={'params': -1}, split_rngs={'params': True}, length=2)
    with pytest.raises(ValueError, match=r"layer 'WNDense_0'.*several stackings"):
      wl.layer_axes(mixed(), x, None)


def test_inferred_axes_refuse_a_scale_of_several_axes():
  # A middle-axis stack (kernel (in, layers, out), scale (out, layers)) whose sizes coincide
  # fits one set of kept axes in order: inferred, fold and the projection took it, silently
  # wrong (a user trial). A scale of several axes is a stacked layer's or a layer built
  # keeping several axes: the axes must be given.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      ens = nn.vmap(
        wl.WNDense, variable_axes={'params': 1}, split_rngs={'params': True}, axis_size=3
      )
      return ens(4, name='stk')(x)

  x = _rand((3, 2, 4))
  params = Net().init(KEY, x)['params']
  assert params['stk']['kernel'].shape == (4, 3, 4)
  for call in (
    wl.fold,
    wn_jax.optim.direction_stats,
    lambda p: wn_jax.optim.project_directions().init(p),
  ):
    with pytest.raises(ValueError, match=r"layer 'stk'.*several axes.*layer_axes"):
      call(params)
  with pytest.raises(ValueError, match=r"layer 'stk'.*middle axis"):
    wl.layer_axes(Net(), x)


def test_layer_axes_reads_a_layer_that_nn_vmap_lifts_itself():
  # nn.vmap(WNConv) is a lifted WNConv, called again around the layer's own call: its
  # stacked shapes were taken for one layer's, and layer_axes gave the per-step -1.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      ens = nn.vmap(
        wl.WNConv,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=None,
        axis_size=2,
      )
      return ens(4, (2,), name='s')(x)

  x = _rand((2, 5, 3))
  params = Net().init(KEY, x)['params']
  axes = wl.layer_axes(Net(), x)
  assert axes == {'s': (0, -1)}
  folded, layer = wl.fold(params, axes)['s'], params['s']
  for i in range(2):
    want = ref.normalize(layer['kernel'][i], layer['scale'][i], -1)
    assert_close(folded['kernel'][i], want, jnp.float32)


def test_a_layer_stacked_along_a_middle_axis_is_refused_by_every_tool():
  # Its scale (out, layers) is not its kernel (in, layers, out) along any kept axes: the
  # projection and direction_stats skipped it silently, even when the axis mapping named it.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      ens = nn.vmap(
        wl.WNDense,
        variable_axes={'params': 1},
        split_rngs={'params': True},
        in_axes=None,
        axis_size=2,
      )
      return ens(5, name='ens')(wl.WNDense(3, name='head')(x))

  x = _rand((2, 4))
  params = Net().init(KEY, x)['params']
  middle = r"layer 'ens'.*middle axis"
  with pytest.raises(ValueError, match=middle):
    wl.layer_axes(Net(), x)
  axes = {'ens': -1, 'head': -1}  # by hand
  with pytest.raises(ValueError, match=middle):
    wn_jax.optim.project_directions(axis=axes).init(params)
  with pytest.raises(ValueError, match=middle):
    wn_jax.optim.direction_stats(params, axis=axes)
  with pytest.raises(ValueError, match=middle):
    wl.fold(params, axes)
  # Read as a WN layer, not a plain one: its g is not decayed, nor its kernel decomposed again.
  assert wn_jax.optim.decay_mask(params)['ens']['scale'] is False
  mixed = wn_jax.weight_norm({'plain': {'kernel': jnp.ones((3, 3))}, **params})
  assert not isinstance(mixed['ens']['kernel'], wn_jax.WeightNormed)


@pytest.mark.parametrize(
  'make',
  [
    lambda: wl.WeightNorm(nn.Dense(3), scale_init=1.0).init(KEY, jnp.ones((2, 3))),
    lambda: wx.WeightNorm(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), scale_init=1.0, rngs=nnx.Rngs(0)),
    lambda: wl.WNDense(3, scale_init=1.0).init(KEY, jnp.ones((2, 3))),
    lambda: wx.WNLinear(3, 3, scale_init=1.0, rngs=nnx.Rngs(0)),
  ],
)
def test_a_scale_init_that_is_no_initializer_is_refused(make):
  # A number for scale_init failed with "'float' object is not callable".
  with pytest.raises(
    ValueError, match=r'(Dense|Linear).*scale_init must be None.*got 1\.0.*initializers\.constant'
  ):
    make()


@pytest.mark.parametrize(
  'make',
  [
    lambda: wl.WeightNorm(nn.Dense(3), param_dtype=jnp.int32).init(KEY, jnp.ones((2, 3))),
    lambda: wx.WeightNorm(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), param_dtype=jnp.int32),
  ],
)
def test_a_wrapper_refuses_a_param_dtype_that_is_not_floating(make):
  # It said "wn_jax.decompose: w must be a real floating array", naming neither.
  with pytest.raises(ValueError, match=r'WeightNorm\(.*param_dtype must be None .* got int32'):
    make()


def test_linen_wrapper_refuses_a_layer_owned_elsewhere():
  # A shared layer wrapped in another module's scope: its params lie neither under the
  # wrapper nor beside it, so project_directions took a sibling ('block/other') for the
  # wrapped layer and held the wrong kernel's norm, silently (a user trial).
  class Block(nn.Module):
    shared: nn.Module

    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name='other')(wl.WeightNorm(self.shared)(x))

  class Net(nn.Module):
    def setup(self):
      self.dense = nn.Dense(4)
      self.block = Block(self.dense)

    def __call__(self, x):
      return self.block(x)

  with pytest.raises(
    ValueError, match=r"WeightNorm\(Dense\) at '/block/WeightNorm_0'.*'dense'.*parent=None"
  ):
    Net().init(KEY, jnp.ones((2, 4)))


def test_a_scale_tree_without_a_selected_parameters_g_is_refused_by_name():
  # Parameters of a kernel-only wrapper given to a where='kernel|bias' one, or a misnamed
  # scale tree: a bare KeyError: 'bias' (a user trial).
  x = jax.random.normal(jax.random.key(1), (4, 6))
  both = wl.WeightNorm(nn.Dense(3), where='kernel|bias')
  params = wl.WeightNorm(nn.Dense(3)).init(jax.random.key(0), x)['params']
  want = (
    r"WeightNorm\(Dense\) at '/': leaf 'bias': the scale tree has no magnitude g .*\['kernel'\]"
  )
  for apply in (both.apply, jax.jit(both.apply)):
    with pytest.raises(ValueError, match=want):
      apply({'params': params}, x)
  misnamed = {**params, 'scale': {'kernal': params['scale']['kernel']}}
  with pytest.raises(ValueError, match=r"leaf 'kernel': .*it holds \['kernal'\]"):
    wl.WeightNorm(nn.Dense(3)).apply({'params': misnamed}, x)
  layer = wx.WeightNorm(nnx.Linear(6, 3, rngs=nnx.Rngs(0)))
  layer.scale = nnx.data({'kernal': layer.scale['kernel']})
  with pytest.raises(ValueError, match=r"nnx.WeightNorm\(Linear\): leaf 'kernel': the scale tree"):
    layer(x)


def test_a_g_of_another_shape_names_its_leaf():
  # A checkpoint made with axis=(-2, -1) loaded into an axis=-1 wrapper of attention: the
  # error named the wrapper, not which of its four kernels.
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  attention = nn.MultiHeadDotProductAttention(2, qkv_features=8)
  made = wl.WeightNorm(attention, axis=(-2, -1), where='(query|key|value)/kernel')
  variables = made.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"at '/': leaf '(query|key|value)/kernel': wn_jax.norm"):
    wl.WeightNorm(attention).apply(variables, x)


def test_a_layer_field_holding_a_function_is_the_layers_not_a_method():
  # A field's default (nn.Dense's kernel_init) sits on the class: the wrapper took it for a
  # method and forwarded it, and outside apply it raised CallCompactUnboundModuleError.
  layer = nn.Dense(3, kernel_init=nn.initializers.ones)
  wrapper = wl.WeightNorm(layer)
  assert wrapper.kernel_init is layer.kernel_init
  assert wl.WeightNorm(nn.Dense(3)).bias_init is nn.Dense(3).bias_init  # a class default
  assert wrapper.kernel_init(jax.random.key(0), (2, 3)).shape == (2, 3)
  linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  assert wx.WeightNorm(linear).dot_general is linear.dot_general

  class Gated(nnx.Module):  # an NNX attribute set over a class default function
    act = _double  # a class default, shadowed by the instance's attribute

    def __init__(self):
      self.linear, self.act = nnx.Linear(2, 3, rngs=nnx.Rngs(0)), jnp.tanh

    def __call__(self, x):
      return self.act(self.linear(x))

  assert wx.WeightNorm(Gated(), where='kernel').act is jnp.tanh


def _double(x):
  return 2 * x


def test_layer_axes_of_a_vmapped_wrapper_names_only_the_wrapper():
  # nn.vmap's lifted wrapper class was met once more at its parent's path: layer_axes listed
  # the model itself, '', as a wrapper keeping -1 (a user trial).
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      lifted = nn.vmap(
        wl.WeightNorm, variable_axes={'params': 0}, split_rngs={'params': True}, in_axes=0
      )
      return lifted(nn.Dense(3, parent=None))(x)

  x = jax.random.normal(jax.random.key(1), (2, 4, 6))
  assert wl.layer_axes(Stack(), x) == {'VmapWeightNorm_0': (0, -1)}
