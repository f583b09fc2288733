"""The pytree level: weight_norm / materialize on every framework's parameters."""

import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import wn_jax
from tests import reference as ref
from tests.helpers import assert_close
from tests.helpers import assert_trees_close
from tests.helpers import assert_trees_equal


def _mlp_params():
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  x = jnp.ones((4, 5))
  return model, model.init(jax.random.key(0), x)['params'], x


def test_linen_params_roundtrip_and_selection():
  model, params, x = _mlp_params()
  wn = wn_jax.weight_norm(params)
  assert isinstance(wn['layers_0']['kernel'], wn_jax.WeightNormed)
  assert not isinstance(wn['layers_0']['bias'], wn_jax.WeightNormed)
  assert wn['layers_2']['kernel'].g.shape == (3,)
  assert_trees_close(wn_jax.materialize(wn), params)
  y = model.apply({'params': wn_jax.materialize(wn)}, x)
  np.testing.assert_allclose(y, model.apply({'params': params}, x), rtol=1e-5, atol=1e-6)
  # Regex and callable selection.
  only_first = wn_jax.weight_norm(params, where=r'layers_0/kernel')
  assert isinstance(only_first['layers_0']['kernel'], wn_jax.WeightNormed)
  assert not isinstance(only_first['layers_2']['kernel'], wn_jax.WeightNormed)
  by_fn = wn_jax.weight_norm(params, where=lambda path, leaf: leaf.shape == (8, 3))
  assert isinstance(by_fn['layers_2']['kernel'], wn_jax.WeightNormed)
  assert not isinstance(by_fn['layers_0']['kernel'], wn_jax.WeightNormed)


def test_whole_tensor_and_tuple_axes_on_trees():
  p = {'a': jnp.arange(1.0, 25.0).reshape(2, 3, 4)}
  whole = wn_jax.weight_norm(p, axis=None)
  assert whole['a'].g.shape == ()
  both = wn_jax.weight_norm(p, axis=(0, 2))
  assert both['a'].g.shape == (2, 4)
  for t in (whole, both):
    assert_trees_close(wn_jax.materialize(t), p, rtol=1e-6)


def test_nnx_state():
  model = nnx.Sequential(
    nnx.Linear(5, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1))
  )
  graphdef, state = nnx.split(model)
  wn = wn_jax.weight_norm(state, where='kernel')
  x = jnp.ones((2, 5))

  @jax.jit
  def loss(wn_state):
    return jnp.sum(nnx.merge(graphdef, wn_jax.materialize(wn_state))(x) ** 2)

  np.testing.assert_allclose(loss(wn), jnp.sum(model(x) ** 2), rtol=1e-5)
  grads = jax.grad(loss)(wn)
  leaves = jax.tree_util.tree_leaves(grads, is_leaf=lambda x: isinstance(x, wn_jax.WeightNormed))
  assert sum(isinstance(leaf, wn_jax.WeightNormed) for leaf in leaves) == 2


def test_equinox_module():
  mlp = eqx.nn.MLP(5, 3, 8, 2, key=jax.random.key(0))
  wn = wn_jax.weight_norm(
    mlp, axis=0, where=lambda path, leaf: wn_jax._tree.path_str(path).endswith('weight')
  )
  x = jnp.ones(5)
  np.testing.assert_allclose(wn_jax.materialize(wn)(x), mlp(x), rtol=1e-5, atol=1e-6)
  # Equinox Linear weights are (out, in): axis=0 keeps the outputs.
  assert wn.layers[0].weight.g.shape == (8,)


def test_plain_nested_dict_and_list():
  p = {
    'layers': [{'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}, {'w': 2 * jnp.ones((2, 1))}],
    'scale': 1.0,
  }
  wn = wn_jax.weight_norm(p)
  assert isinstance(wn['layers'][1]['w'], wn_jax.WeightNormed)
  assert wn['scale'] == 1.0
  assert_trees_close(wn_jax.materialize(wn), p)
  # Already weight-normed leaves are kept as they are.
  again = wn_jax.weight_norm(wn)
  assert again['layers'][0]['w'] is wn['layers'][0]['w']


def test_transforms_compose():
  model, params, x = _mlp_params()
  wn = wn_jax.weight_norm(params)

  def loss(p, x):
    return jnp.sum(model.apply({'params': wn_jax.materialize(p)}, x) ** 2)

  g1 = jax.jit(jax.grad(loss))(wn, x)
  g2 = jax.grad(lambda p, x: jax.checkpoint(loss)(p, x))(wn, x)
  assert_trees_close(g1, g2, rtol=1e-5, atol=1e-6)
  # vmap over a stack of weight-normed parameter sets.
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), wn)
  ws = jax.vmap(wn_jax.materialize)(stacked)
  assert ws['layers_0']['kernel'].shape == (2, 5, 8)
  np.testing.assert_allclose(
    ws['layers_0']['kernel'][1], 2 * params['layers_0']['kernel'], rtol=1e-5
  )
  # scan over layers of a deep stack.
  layers = wn_jax.weight_norm(
    {'w': jnp.stack([jnp.eye(4) * (i + 1) for i in range(3)])}, axis=(0, 2)
  )

  def step(h, layer):
    return jnp.tanh(h @ wn_jax.materialize(layer)['w']), None

  per_layer = jax.tree_util.tree_map(
    lambda a: a, {'w': wn_jax.WeightNormed(layers['w'].v, layers['w'].g, -1)}
  )
  h, _ = jax.lax.scan(step, jnp.ones((2, 4)), per_layer)
  assert h.shape == (2, 4) and np.all(np.isfinite(h))


@pytest.mark.standard_promotion
def test_adam_trains_weight_normed_leaves():
  model, params, x = _mlp_params()
  y = jax.random.normal(jax.random.key(1), (4, 3))
  wn = wn_jax.weight_norm(params)
  opt = optax.adam(1e-2)
  state = opt.init(wn)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(
      lambda p: jnp.mean((model.apply({'params': wn_jax.materialize(p)}, x) - y) ** 2)
    )(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  p, losses = wn, []
  for _ in range(30):
    p, state, loss = step(p, state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
  k0, k1 = wn['layers_0']['kernel'], p['layers_0']['kernel']
  assert isinstance(k1, wn_jax.WeightNormed)
  assert not np.allclose(k0.v, k1.v) and not np.allclose(k0.g, k1.g)


def test_matches_reference_on_trees():
  rng = np.random.default_rng(0)
  v, g = rng.normal(size=(6, 4)), rng.uniform(1, 2, size=4)
  tree = {'x': wn_jax.WeightNormed(jnp.asarray(v, jnp.float32), jnp.asarray(g, jnp.float32), -1)}
  assert_close(wn_jax.materialize(tree)['x'], ref.normalize(v, g, -1))
  gw = rng.normal(size=(6, 4))
  grads = jax.grad(lambda t: jnp.sum(wn_jax.materialize(t)['x'] * gw))(tree)
  ev, eg = ref.grads(v, g, -1, gw)
  assert_close(grads['x'].v, ev, factor=4)
  assert_close(grads['x'].g, eg, factor=4)


@pytest.mark.parametrize(
  'call,message',
  [
    (lambda: wn_jax.weight_norm({'b': jnp.zeros(3)}), 'selected no leaf'),
    (lambda: wn_jax.weight_norm({'k': jnp.ones((2, 2))}, where='nomatch'), 'selected no leaf'),
    (
      lambda: wn_jax.weight_norm({'k': jnp.ones((2, 2))}, where=lambda p, x: p[-1] == 'k'),
      r"selected no leaf.*JAX key path, such as \(DictKey\(key='k'\),\): compare path\[-1\].key",
    ),
    (lambda: wn_jax.weight_norm({'k': jnp.ones((2, 2))}, where='('), 'regular expression'),
    (lambda: wn_jax.weight_norm({'k': jnp.ones((2, 2))}, where=3), 'where must be'),
    (lambda: wn_jax.weight_norm({'k': jnp.ones((2, 2))}, axis=2), "leaf 'k'.*out of range"),
    (lambda: wn_jax.weight_norm({'k': jnp.ones((2, 2), jnp.int32)}, where='k'), 'floating'),
    (
      lambda: wn_jax.materialize({'k': wn_jax.WeightNormed(jnp.ones((2, 3)), jnp.ones(2))}),
      'WeightNormed.*g must have',
    ),
  ],
)
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_inputs_are_not_modified():
  p = {'k': np.ones((3, 2), np.float32)}
  wn_jax.weight_norm(p)
  assert isinstance(p['k'], np.ndarray)


def test_repr_and_static_axis():
  wn = wn_jax.WeightNormed(jnp.ones((2, 3)), jnp.ones(3), axis=[1])
  assert wn.axis == (1,)
  assert 'axis=(1,)' in repr(wn)
  leaves, treedef = jax.tree_util.tree_flatten(wn)
  assert len(leaves) == 2
  assert jax.tree_util.tree_unflatten(treedef, leaves).axis == (1,)
  assert repr(wn) == 'WeightNormed(v=float32[2, 3], g=float32[3], axis=(1,))'
  # Found by a user: a tree of dtypes (jax.tree.map(lambda a: a.dtype, tree), a common look
  # at a tree) crashed the repr: a NumPy dtype has a shape but no dtype.
  dtypes = jax.tree_util.tree_map(lambda a: a.dtype, wn)
  assert repr(dtypes) == "WeightNormed(v=dtype('float32'), g=dtype('float32'), axis=(1,))"


@settings(max_examples=20, deadline=None)
@given(
  st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=4),
  st.integers(0, 1000),
)
def test_materialize_inverts_weight_norm(shapes, seed):
  rng = np.random.default_rng(seed)
  p = {
    f'l{i}': {'k': jnp.asarray(rng.normal(size=s), jnp.float32), 'b': jnp.zeros(s[1])}
    for i, s in enumerate(shapes)
  }
  assert_trees_close(wn_jax.materialize(wn_jax.weight_norm(p)), p, rtol=1e-5, atol=1e-6)


def _nested_wn():
  rng = np.random.default_rng(3)
  return {
    'dense': {
      'kernel': wn_jax.weight_norm({'k': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)})['k'],
      'bias': jnp.arange(3.0),
    },
    'conv': [
      wn_jax.WeightNormed(
        jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32), jnp.ones((2, 4)), axis=(0, 2)
      ),
      wn_jax.WeightNormed(jnp.asarray(rng.normal(size=(2, 2)), jnp.float32), jnp.ones(()), None),
    ],
  }


def test_flax_serialization_round_trips_weight_normed_trees():
  from flax import serialization

  tree = _nested_wn()
  target = jax.tree_util.tree_map(jnp.zeros_like, tree)
  for restored in (
    serialization.from_bytes(target, serialization.to_bytes(tree)),
    serialization.from_state_dict(target, serialization.to_state_dict(tree)),
  ):
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(tree)
    assert restored['conv'][0].axis == (0, 2) and restored['conv'][1].axis is None
    assert_trees_equal(restored, tree)
  # The state dict is plain nested dicts of arrays: v and g by name.
  state = serialization.to_state_dict(tree)
  assert set(state['dense']['kernel']) == {'v', 'g'}
  with pytest.raises(ValueError, match='v.*g'):
    serialization.from_state_dict(target, {**state, 'dense': {**state['dense'], 'kernel': {}}})


def test_materialize_names_the_key_path_of_a_bad_node():
  bad = {'enc': [{'k': wn_jax.WeightNormed(jnp.ones((2, 3)), jnp.ones(2))}]}
  with pytest.raises(ValueError, match=r"'enc/0/k'.*g"):
    wn_jax.materialize(bad)


@pytest.mark.parametrize(
  'g_shape', [(3,), (), (4, 3)], ids=['kept-out', 'whole-tensor', 'every-axis']
)
def test_materialize_rejects_a_v_g_dict(g_shape):
  # What an untyped restore (orbax, msgpack) gives for a WeightNormed node.
  loaded = {'head': {'kernel': {'v': jnp.ones((4, 3)), 'g': jnp.ones(g_shape)}}}
  with pytest.raises(ValueError, match=r"'head/kernel'.*restore.*target.*WeightNormed"):
    wn_jax.materialize(loaded)


def test_materialize_keeps_dicts_that_are_not_v_g_pairs():
  # Other keys, or a g that cannot be v's magnitude: not a lost WeightNormed, left alone.
  for tree in (
    {'v': jnp.ones((4, 3)), 'g': jnp.ones(3), 'b': jnp.ones(3)},
    {'v': jnp.ones((4, 3)), 'g': jnp.ones(5)},
    {'v': jnp.ones((4, 3)), 'g': 1.0},
  ):
    assert wn_jax.materialize(tree) is not None
    assert_trees_equal(wn_jax.materialize(tree), tree)


@pytest.mark.standard_promotion  # optax's sgd
def test_numpy_integer_axes_are_canonical_static_ints():
  w = jnp.arange(1.0, 7.0).reshape(2, 3)
  node = wn_jax.weight_norm({'w': w}, axis=np.int64(-1))['w']
  assert type(node.axis) is int and node.axis == -1
  assert_trees_equal(node, wn_jax.weight_norm({'w': w}, axis=-1)['w'])
  direct = wn_jax.WeightNormed(node.v, node.g, axis=np.int64(-1))
  assert type(direct.axis) is int and hash(direct.axis) == hash(-1)
  pair = wn_jax.WeightNormed(w, jnp.ones(()), axis=(np.int32(0), np.int64(1))).axis
  assert pair == (0, 1) and all(type(a) is int for a in pair)
  tx = wn_jax.optim.weight_norm(optax.sgd(0.1), axis=np.int64(0))
  state = tx.init({'w': w})
  assert state.directions['w'].axis == 0 and state.directions['w'].g.shape == (2,)
  updates, _ = jax.jit(tx.update)({'w': jnp.ones_like(w)}, state, {'w': w})
  assert updates['w'].shape == w.shape


def _boxed_trees():
  state = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param)
  init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, 'model'))
  linen = nn.Dense(4, kernel_init=init).init(jax.random.key(0), jnp.ones((1, 3)))['params']
  return {'nnx state': state, 'partitioned linen params': linen}


@pytest.mark.parametrize('tree', list(_boxed_trees()))
@pytest.mark.parametrize(
  'where', ['kernel$', lambda path, leaf: path[-1].key == 'kernel'], ids=['regex', 'callable']
)
def test_where_sees_a_boxed_leaf_by_its_parameter_path(tree, where):
  # An nnx.Variable or a Partitioned box flattens with a trailing 'value' key: where='kernel$'
  # selected nothing, the callable failed, and the hint offered where='value', which also
  # selected the bias (a user trial).
  params = _boxed_trees()[tree]
  out = wn_jax.weight_norm(params, where=where)
  kinds = {
    wn_jax._tree.path_str(p): type(x).__name__
    for p, x in jax.tree_util.tree_flatten_with_path(out, is_leaf=wn_jax._tree._is_wn)[0]
  }
  # A box with partition names goes inside the node (tests/test_sharding.py).
  node = {'nnx state': 'kernel/value', 'partitioned linen params': 'kernel'}[tree]
  assert [k for k, t in kinds.items() if t == 'WeightNormed'] == [node]
  tx = wn_jax.optim.weight_norm(optax.sgd(0.1), where=where)
  plain = wn_jax.materialize(out)
  tx.update(jax.tree.map(jnp.ones_like, plain), tx.init(plain), plain)


def test_where_takes_a_compiled_pattern():
  # re.compile(...) was refused: "where must be None, a regular expression string or ...".
  params = {'fc': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}, 'emb': jnp.ones((4, 3))}
  out = wn_jax.weight_norm(params, where=re.compile(r'KERNEL', re.IGNORECASE))
  assert isinstance(out['fc']['kernel'], wn_jax.WeightNormed)
  assert not isinstance(out['emb'], wn_jax.WeightNormed)


class _WNStep(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return wn_jax.linen.WNDense(6)(x), None


class _MixedLinen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = wn_jax.linen.WNDense(6)(nn.Dense(6)(x))
    x = wn_jax.linen.WeightNorm(nn.Dense(6, parent=None))(x)
    steps = nn.scan(_WNStep, variable_axes={'params': 0}, split_rngs={'params': True}, length=2)
    return nn.Dense(3)(steps()(x, None)[0])


def _mixed_trees():
  linen = _MixedLinen().init(jax.random.key(0), jnp.ones((2, 5)))['params']
  model = nnx.Sequential(
    nnx.Linear(5, 6, rngs=nnx.Rngs(0)),
    wn_jax.nnx.WNLinear(6, 6, rngs=nnx.Rngs(1)),
    wn_jax.nnx.WeightNorm(nnx.Linear(6, 3, rngs=nnx.Rngs(2))),
  )
  return {'linen': linen, 'nnx': nnx.to_pure_dict(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize('kind', ['linen', 'nnx'])
def test_default_selection_leaves_what_a_layer_normalizes_alone(kind):
  # where=None took every floating matrix: a WN layer's kernel, a wrapped layer's kernel and
  # a stacked WN layer's (layers, out) scale were weight-normalized a second time (the same
  # function, but ||v|| frozen at its first value: silently a projection of those directions).
  params = _mixed_trees()[kind]
  wn = wn_jax.weight_norm(params)
  taken = {
    '/'.join(str(k.key) for k in path)
    for path, x in jax.tree_util.tree_leaves_with_path(
      wn, is_leaf=lambda x: isinstance(x, wn_jax.WeightNormed)
    )
    if isinstance(x, wn_jax.WeightNormed)
  }
  assert taken == {'linen': {'Dense_0/kernel', 'Dense_1/kernel'}, 'nnx': {'layers/0/kernel'}}[kind]
  assert_trees_close(wn_jax.materialize(wn), params)
  # Asked for by name, a WN layer's kernel is still taken.
  named = wn_jax.weight_norm(params, where='kernel')
  assert isinstance(named['layers' if kind == 'nnx' else 'WNDense_0'], (dict, list))


def test_default_selection_refuses_a_wrapper_it_cannot_place_with_the_where_fix():
  # An inline wrapper beside a plain layer of its shape: either may be the wrapped one. The
  # refusal offered "use the pytree route", which is where the user already was.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8)(wn_jax.linen.WeightNorm(nn.Dense(8))(x))

  params = Net().init(jax.random.key(0), jnp.ones((2, 8)))['params']
  for call in (wn_jax.weight_norm, lambda p: wn_jax.optim.weight_norm(optax.sgd(0.1)).init(p)):
    with pytest.raises(
      ValueError, match=r"several layers.*parent=None.*where=r'\^Dense_1/kernel\$'"
    ):
      call(params)
  wn = wn_jax.weight_norm(params, where=r'^Dense_1/kernel$')
  assert isinstance(wn['Dense_1']['kernel'], wn_jax.WeightNormed)
  assert not isinstance(wn['Dense_0']['kernel'], wn_jax.WeightNormed)


@pytest.mark.parametrize('kind', ['nnx', 'linen'])
def test_a_flax_module_where_parameters_go_is_refused_with_the_fix(kind):
  # weight_norm of an NNX model returned the model half converted ("'WeightNormed' object is
  # not subscriptable" at its first call), and the optimizer's init took it (a user trial).
  model = nnx.Linear(3, 3, rngs=nnx.Rngs(0)) if kind == 'nnx' else nn.Dense(3)
  fix = r'nnx.state\(model, nnx.Param\)' if kind == 'nnx' else r"model.init\(key, x\)\['params'\]"
  for label, call in (
    ('wn_jax.weight_norm', wn_jax.weight_norm),
    ('wn_jax.optim.weight_norm', wn_jax.optim.weight_norm(optax.sgd(0.1)).init),
  ):
    with pytest.raises(TypeError, match=rf'{label}: expected the parameters.*{fix}'):
      call(model)
  if kind == 'nnx':
    assert isinstance(model.kernel[...], jax.Array)  # left as it was
  # Inside a tree too, and every other tool that takes parameters (they returned the module,
  # an empty dict or an all-True mask).
  for label, call in (
    ('wn_jax.weight_norm', wn_jax.weight_norm),
    ('wn_jax.materialize', wn_jax.materialize),
    ('wn_jax.optim.decay_mask', wn_jax.optim.decay_mask),
    ('wn_jax.optim.direction_stats', wn_jax.optim.direction_stats),
    ('wn_jax.optim.project_directions', wn_jax.optim.project_directions().init),
    ('wn_jax.linen.fold', wn_jax.linen.fold),
  ):
    with pytest.raises(TypeError, match=rf'{label}: expected the parameters.*{fix}'):
      call({'enc': model, 'dec': {'kernel': jnp.ones((3, 3))}})


def _stacked_and_head():
  # An nn.scan stack of three (6, 6) kernels beside an unstacked (6, 2) head.
  key = jax.random.key(0)
  return {
    'layers': {'kernel': jax.random.normal(key, (3, 6, 6))},
    'head': {'kernel': jax.random.normal(jax.random.key(1), (6, 2))},
  }


@pytest.mark.parametrize(
  'axis',
  [
    {'layers/kernel': (0, -1), 'head/kernel': -1},
    lambda path: (0, -1) if path.startswith('layers/') else -1,
  ],
  ids=['mapping', 'callable'],
)
def test_axis_per_leaf_for_a_stack_beside_an_unstacked_layer(axis):
  # A user's trial: one axis spans every leaf, so (0, -1) for the stack left the head with
  # no direction at all (w = g * sign(v)), silently. A mapping or a callable gives each its own.
  params = _stacked_and_head()
  wn = wn_jax.weight_norm(params, axis=axis)
  assert wn['layers']['kernel'].axis == (0, -1) and wn['layers']['kernel'].g.shape == (3, 6)
  assert wn['head']['kernel'].axis == -1 and wn['head']['kernel'].g.shape == (2,)
  assert_trees_close(wn_jax.materialize(wn), params, rtol=1e-6)
  state = wn_jax.optim.weight_norm(optax.sgd(0.1), axis=axis).init(params)
  assert state.directions['layers']['kernel'].g.shape == (3, 6)
  assert state.directions['head']['kernel'].g.shape == (2,)


def test_one_axis_that_keeps_every_axis_of_a_matrix_is_refused():
  params = _stacked_and_head()
  for call in (
    lambda: wn_jax.weight_norm(params, axis=(0, -1)),
    lambda: wn_jax.optim.weight_norm(optax.sgd(0.1), axis=(0, -1)).init(params),
  ):
    with pytest.raises(ValueError, match=r"'head/kernel'.*keeps every axis.*mapping"):
      call()
  # Asked for by name, per leaf, or for every leaf alike, it is the user's choice; a vector
  # keeps its one axis.
  assert wn_jax.weight_norm(params, axis={'layers/kernel': -1, 'head/kernel': (0, 1)})
  assert wn_jax.weight_norm(params['head'], axis=(0, 1))['kernel'].g.shape == (6, 2)
  assert wn_jax.weight_norm({'b': jnp.ones(3)}, where='b')['b'].g.shape == (3,)


def test_a_mapping_without_a_selected_leaf_names_it():
  params = _stacked_and_head()
  with pytest.raises(ValueError, match=r"'head/kernel'.*no axis in the mapping.*layers/kernel"):
    wn_jax.weight_norm(params, axis={'layers/kernel': (0, -1)})
  # A review trial: keys that name no selected leaf (a typo, a leaf where= leaves out) passed.
  both = {'layers/kernel': (0, -1), 'head/kernel': -1}
  with pytest.raises(ValueError, match=r"axis names \['head/kernel'\], which where= did not"):
    wn_jax.weight_norm(params, axis=both, where='layers')
  with pytest.raises(ValueError, match=r"no axis in the mapping.*ends in '/value'"):
    wn_jax.weight_norm(params, axis={'layers/kernel/value': (0, -1), 'head/kernel': -1})
  with pytest.raises(ValueError, match=r'no axis in the mapping.*flat'):
    wn_jax.weight_norm(params, axis={'layers': {'kernel': (0, -1)}, 'head': {'kernel': -1}})


def test_one_rule_for_every_leaf_is_checked_as_one_axis_is():
  # A review trial: a callable that ignores the path got past the refusal; a wrapper was told
  # to pass a mapping it does not take; a ragged axis got NumPy's error.
  with pytest.raises(ValueError, match=r"'head/kernel'.*keeps every axis"):
    wn_jax.weight_norm(_stacked_and_head(), axis=lambda path: (0, -1))
  x = jnp.ones((2, 3))
  wrapper = wn_jax.linen.WeightNorm(_TwoKernels(), axis=(0, 1), where='a|b')
  with pytest.raises(ValueError, match=r'keeps every axis.*Narrow where='):
    wrapper.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r'axis must be an int, a tuple of ints or None'):
    wn_jax.WeightNormed(jnp.ones((2, 3, 4)), jnp.ones(()), axis=[0, (1, 2)]).weight()


class _TwoKernels(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = self.param('a', nn.initializers.ones, (3, 4))
    b = self.param('b', nn.initializers.ones, (2, 3, 4))
    return x @ a + jnp.sum(b)


@pytest.mark.parametrize('where', [None, 'kernel'])
def test_weight_norm_of_abstract_parameters_gives_abstract_nodes(where):
  # Found by a user trial: an abstract restore target (jax.eval_shape of init, as in a fresh
  # process) was refused: "selected no leaf" (where=None, with a float (4, 3) kernel there),
  # or "got jax.ShapeDtypeStruct ... use wn_jax.weight_norm" (where='kernel').
  model = nn.Dense(3)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4)))['params']
  got = wn_jax.weight_norm(abstract, where=where)
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))['params']
  want = jax.eval_shape(lambda: wn_jax.weight_norm(params, where=where))
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  assert isinstance(got['kernel'], wn_jax.WeightNormed)
  assert got['kernel'].g.shape == (3,) and got['kernel'].v.shape == (4, 3)
  assert jax.tree_util.tree_all(
    jax.tree_util.tree_map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), got, want)
  )


def test_weight_norm_of_abstract_parameters_refuses_what_it_refuses_concrete():
  # A review: an int (or complex) abstract leaf named by where= became a node; a concrete one
  # is refused. And a leaf on one device gives g that device (it gave none).
  for dtype in (jnp.int32, jnp.complex64):
    with pytest.raises(ValueError, match=r"leaf 'a': w must be a real floating array"):
      wn_jax.weight_norm({'a': jax.ShapeDtypeStruct((8, 4), dtype)}, where='a')
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  node = wn_jax.weight_norm({'a': jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=one)})['a']
  assert node.g.sharding == one and node.g.shape == (4,)


def test_materialize_of_an_abstract_node_names_jax_eval_shape():
  # A review: the refusal said "use wn_jax.weight_norm and wn_jax.materialize" to a caller of
  # materialize; jax.eval_shape(wn_jax.materialize, tree) is what works.
  tree = wn_jax.weight_norm({'k': jax.ShapeDtypeStruct((4, 3), jnp.float32)}, where='k')
  with pytest.raises(ValueError, match=r'abstract.*jax.eval_shape'):
    wn_jax.materialize(tree)
  assert jax.eval_shape(wn_jax.materialize, tree)['k'].shape == (4, 3)
