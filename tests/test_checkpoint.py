"""Checkpoints with orbax lose nothing: 10 + restore + 10 steps == 20 steps, bit for bit."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax import serialization

import wn_jax
from tests.helpers import assert_trees_equal
from wn_jax import linen as wl
from wn_jax import nnx as wx

pytestmark = pytest.mark.standard_promotion  # optax's adam

X = jax.random.normal(jax.random.key(0), (16, 6))
Y = jax.random.normal(jax.random.key(1), (16, 3))


def _steps(loss, params, tx, state, n):
  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(n):
    params, state = step(params, state)
  return params, state


def _save_restore(tmp_path, tree):
  path = tmp_path / 'ckpt'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
  # A fresh checkpointer, restoring into an abstract target: as a new process would.
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract)


def _flax_bytes(tmp_path, tree):
  del tmp_path
  target = jax.tree_util.tree_map(jnp.zeros_like, tree)
  return serialization.from_bytes(target, serialization.to_bytes(tree))


def _flax_state_dict(tmp_path, tree):
  del tmp_path
  target = jax.tree_util.tree_map(jnp.zeros_like, tree)
  return serialization.from_state_dict(target, serialization.to_state_dict(tree))


def _check_resume(tmp_path, loss, params, tx, save_restore=_save_restore):
  full, full_state = _steps(loss, params, tx, tx.init(params), 20)
  half, half_state = _steps(loss, params, tx, tx.init(params), 10)
  restored = save_restore(tmp_path, {'params': half, 'opt_state': half_state})
  resumed, resumed_state = _steps(loss, restored['params'], tx, restored['opt_state'], 10)
  assert_trees_equal(resumed, full)
  assert_trees_equal(resumed_state, full_state)
  return resumed


def test_linen_wn_layers(tmp_path):
  model = nn.Sequential([wl.WNDense(8), nn.relu, wl.WNDense(3)])
  params = model.init(jax.random.key(2), X)['params']
  _check_resume(
    tmp_path, lambda p: jnp.mean((model.apply({'params': p}, X) - Y) ** 2), params, optax.adam(1e-2)
  )


def test_nnx_wn_layers(tmp_path):
  model = nnx.Sequential(
    wx.WNLinear(6, 8, rngs=nnx.Rngs(0)), nnx.relu, wx.WNLinear(8, 3, rngs=nnx.Rngs(1))
  )
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def loss(p):
    s = nnx.clone(state)
    nnx.replace_by_pure_dict(s, p)
    return jnp.mean((nnx.merge(graphdef, s)(X) - Y) ** 2)

  resumed = _check_resume(tmp_path, loss, params, optax.adam(1e-2))
  nnx.replace_by_pure_dict(state, resumed)
  assert nnx.merge(graphdef, state)(X).shape == (16, 3)


SAVE_RESTORE = pytest.mark.parametrize(
  'save_restore',
  [_save_restore, _flax_bytes, _flax_state_dict],
  ids=['orbax', 'flax-bytes', 'flax-state-dict'],
)


@SAVE_RESTORE
def test_weight_normed_pytree(tmp_path, save_restore):
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  params = wn_jax.weight_norm(model.init(jax.random.key(2), X)['params'], axis=(-1,))
  resumed = _check_resume(
    tmp_path,
    lambda p: jnp.mean((model.apply({'params': wn_jax.materialize(p)}, X) - Y) ** 2),
    params,
    optax.adam(1e-2),
    save_restore,
  )
  assert isinstance(resumed['layers_0']['kernel'], wn_jax.WeightNormed)
  assert resumed['layers_0']['kernel'].axis == (-1,)


@SAVE_RESTORE
def test_optimizer_transformation_state(tmp_path, save_restore):
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  params = model.init(jax.random.key(2), X)['params']
  _check_resume(
    tmp_path,
    lambda p: jnp.mean((model.apply({'params': p}, X) - Y) ** 2),
    params,
    wn_jax.optim.weight_norm(optax.adam(1e-2)),
    save_restore,
  )


def test_restore_without_target_is_refused_by_materialize(tmp_path):
  # orbax without a target gives {'v', 'g'} dicts: the static axis is lost. materialize
  # refuses them, naming the key path and the fix, instead of passing them to the model.
  params = wn_jax.weight_norm({'enc': {'kernel': jnp.ones((6, 3)), 'bias': jnp.zeros(3)}})
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'ckpt', params)
  with ocp.StandardCheckpointer() as ckptr:
    untyped = ckptr.restore(tmp_path / 'ckpt')
  assert set(untyped['enc']['kernel']) == {'v', 'g'}
  with pytest.raises(ValueError, match=r"'enc/kernel'.*without a target.*restore\(path, abstract"):
    wn_jax.materialize(untyped)
  # The fix the message names: restore with a target.
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, params)
  with ocp.StandardCheckpointer() as ckptr:
    typed = ckptr.restore(tmp_path / 'ckpt', abstract)
  assert_trees_equal(wn_jax.materialize(typed), wn_jax.materialize(params))


def test_fold_for_deployment():
  class Net(nn.Module):
    wn: bool

    @nn.compact
    def __call__(self, x):
      dense = wl.WNDense if self.wn else nn.Dense
      return dense(3, name='b')(nn.relu(dense(8, name='a')(x)))

  model, plain = Net(wn=True), Net(wn=False)
  params = model.init(jax.random.key(2), X)['params']
  params = jax.tree_util.tree_map(lambda a: a * 1.3, params)  # "trained": g != ||v||
  folded = wl.fold(params)
  assert set(folded['a']) == {'kernel', 'bias'}
  assert jax.tree_util.tree_structure(folded) == jax.tree_util.tree_structure(
    plain.init(jax.random.key(2), X)['params']
  )
  np.testing.assert_allclose(
    plain.apply({'params': folded}, X), model.apply({'params': params}, X), rtol=1e-5, atol=1e-6
  )
  # WeightNormed trees fold to their weights too.
  wn = wn_jax.weight_norm(plain.init(jax.random.key(3), X)['params'])
  assert_trees_equal(wl.fold(wn), wn_jax.materialize(wn))


def test_fold_nnx_state_into_plain_nnx_layers():
  wn_model = nnx.Sequential(
    wx.WNLinear(6, 8, rngs=nnx.Rngs(0)), nnx.relu, wx.WNLinear(8, 3, rngs=nnx.Rngs(1))
  )
  wn_model.layers[0].scale[...] = wn_model.layers[0].scale[...] * 1.7
  plain = nnx.Sequential(
    nnx.Linear(6, 8, rngs=nnx.Rngs(5)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(6))
  )
  folded = wl.fold(nnx.to_pure_dict(nnx.state(wn_model, nnx.Param)))
  state = nnx.state(plain, nnx.Param)
  nnx.replace_by_pure_dict(state, folded)
  nnx.update(plain, state)
  assert not hasattr(plain.layers[0], 'scale')
  np.testing.assert_allclose(plain(X), wn_model(X), rtol=1e-5, atol=1e-6)


def test_fold_finds_layers_and_weight_normed_nodes_inside_lists_and_tuples():
  # Found by a user: fold left a layer in a list unfolded (kernel still v, scale kept) and a
  # WeightNormed node in a tuple as it was, silently; decay_mask and project_directions find
  # them there.
  layer = wl.WNDense(4).init(jax.random.key(0), X)['params']
  layer = jax.tree_util.tree_map(lambda a: a * 1.3, layer)
  node = wn_jax.weight_norm({'w': jax.random.normal(jax.random.key(1), (3, 2))})['w']
  Pair = collections.namedtuple('Pair', 'first second')
  tree = {'blocks': [layer, {'inner': (layer, node)}], 'pair': Pair(layer, None)}
  folded = wl.fold(tree)
  as_dicts = wl.fold({'blocks': {'0': layer}})['blocks']['0']
  for got in (folded['blocks'][0], folded['blocks'][1]['inner'][0], folded['pair'].first):
    assert_trees_equal(got, as_dicts)
  assert_trees_equal(folded['blocks'][1]['inner'][1], node.weight())
  assert type(folded['pair']) is Pair and folded['pair'].second is None
  assert isinstance(folded['blocks'], list) and isinstance(folded['blocks'][1]['inner'], tuple)
