"""Multi-process checks, run by tests/test_multiprocess.py; not a test module.

Importing this file only imports libraries (pytest's doctest collection imports it): JAX is
configured, devices are touched and the checks run only from ``main()``.

    python tests/multiprocess_worker.py PROCESS_ID PORT DIR   # twice: ids 0 and 1

Two processes of 4 host CPU devices each (gloo collectives, coordinator on 127.0.0.1:PORT)
form one 4 x 2 ('data', 'model') mesh. WN linen layers, WN NNX layers, the pytree transform
and the optax transformation train 3 adam steps with the batch over 'data' and each kernel
sharded over its output features ('model'), its input features ('model') or both (in over
'data', out over 'model'); losses and gathered parameters must equal a single-device run in
the same process to 1e-5, and ``scale`` / ``g`` must be sharded like its kernel's output
features. Then data-dependent initialization on a global batch of which each process holds
half, every wn_jax entry point called on global arrays outside ``jit``, and an orbax
checkpoint saved by both processes and restored in the same layout, bit for bit. Process 0
writes the saved state to DIR/saved.npz; ``restore_resharded(DIR)`` (the test calls it, in its
own process of 8 devices) restores the checkpoint on a 2 x 4 mesh with other shardings and
compares bit for bit.

Each check prints ``OK name`` or ``FAIL name: error``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import wn_jax
from wn_jax import linen as wl
from wn_jax import nnx as wx

EXAMPLE = os.path.join(os.path.dirname(__file__), '..', 'examples', 'multihost_training.py')
STEPS = 3
LAYOUTS = ('out', 'in', 'both')
AUTO = jax.sharding.AxisType.Auto
TX = optax.adam(1e-2)
OPTIM_TX = wn_jax.optim.weight_norm(optax.adam(1e-2))


def _kernel_names(layout: str, ndim: int) -> tuple:
  """The mesh axes of a kernel's dimensions, layout (*window, in, out)."""
  lead = (None,) * (ndim - 2)
  return lead + {'out': (None, 'model'), 'in': ('model', None), 'both': ('data', 'model')}[layout]


def _data() -> dict:
  rng = np.random.default_rng(0)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {'x': f(16, 8), 'y': f(16, 8), 'xi': f(64, 8) * 3 + 1}


def _linen_mlp(layout: str | None = None) -> nn.Module:
  """A WN linen MLP; with ``layout``, its first kernel carries partitioning metadata."""
  init = nn.initializers.lecun_normal()
  if layout is not None:
    init = nn.with_partitioning(init, _kernel_names(layout, 2))
  return nn.Sequential([wl.WNDense(16, kernel_init=init), nn.relu, wl.WNDense(8)])


def _nnx_mlp(layout: str | None = None) -> nnx.Module:
  init = nnx.initializers.lecun_normal()
  if layout is not None:
    init = nnx.with_partitioning(init, _kernel_names(layout, 2))
  rngs = nnx.Rngs(0)
  return nnx.Sequential(
    wx.WNLinear(8, 16, kernel_init=init, rngs=rngs), nnx.relu, wx.WNLinear(16, 8, rngs=rngs)
  )


PLAIN_MLP = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(8)])


def _mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AUTO, AUTO))


def _global(mesh, a, spec) -> jax.Array:
  """A global array from a host value every process holds: each process puts its shards."""
  a = np.asarray(a)
  return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda idx: a[idx])


def _specs(tree, layout):
  """Kernels (ndim >= 2) by layout; 1-D leaves (scale, bias, g) follow the out features."""

  def rule(path, leaf):
    if leaf.ndim >= 2:
      return P(*_kernel_names(layout, leaf.ndim))
    return P(_kernel_names(layout, 2)[-1]) if leaf.ndim == 1 else P()

  return jax.tree_util.tree_map_with_path(rule, tree)


def _put(mesh, tree, layout):
  return jax.tree_util.tree_map(lambda a, s: _global(mesh, a, s), tree, _specs(tree, layout))


def _gather(tree):
  """The global values on every process, as NumPy: one replicating jit for the whole tree."""
  mesh = jax.tree_util.tree_leaves(tree)[0].sharding.mesh
  return jax.device_get(jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree))


def _assert_trees(got, want, what, exact=False):
  lg, tg = jax.tree_util.tree_flatten(got)
  lw, tw = jax.tree_util.tree_flatten(want)
  assert tg == tw, (what, tg, tw)
  for a, b in zip(lg, lw):
    if exact:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=what)


def _scale_follows(scale, kernel, what):
  """``scale``'s sharding is its kernel's, restricted to the kernel's out-feature axis."""
  spec = kernel.sharding.spec
  want = NamedSharding(kernel.sharding.mesh, P(spec[-1] if len(spec) == kernel.ndim else None))
  assert scale.sharding.is_equivalent_to(want, scale.ndim), (what, scale.sharding, want)


def _train(loss_fn, params, x, tx, mesh=None, steps=STEPS):
  """``steps`` adam steps; on the mesh when ``params`` and ``x`` are global arrays.

  The step takes everything as arguments (never closes over a global array) and pins its
  outputs to its inputs' shardings, as a sharded training loop does.
  """

  def step(p, s, x):
    loss, g = jax.value_and_grad(loss_fn)(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = jax.jit(tx.init)(params)
  if mesh is None:
    step = jax.jit(step)
  else:
    # Leaves that depend on no input (adam's count) come out on one device: replicate them.
    state = jax.tree_util.tree_map(
      lambda a: a if len(a.sharding.device_set) == mesh.size else _global(mesh, a, P()), state
    )
    shardings = lambda t: jax.tree_util.tree_map(lambda a: a.sharding, t)
    step = jax.jit(step, out_shardings=(shardings(params), shardings(state), None))
  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state, x)
    losses.append(float(loss))
  return params, state, losses


def _compare_training(name, loss_fn, params, x, tx, shard, kept):
  """Single device vs the two-process mesh, for every layout: losses and parameters.

  Returns the sharded (params, opt_state) of the last layout ('both').
  """
  mesh = _mesh()
  ref, _, ref_losses = _train(loss_fn, params, x, tx)
  for layout in LAYOUTS:
    gparams = shard(mesh, layout)
    gx = _global(mesh, x, P('data'))
    got, state, losses = _train(loss_fn, gparams, gx, tx, mesh)
    assert not all(a.is_fully_addressable for a in jax.tree_util.tree_leaves(got))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f'{name}/{layout}')
    _assert_trees(_gather(got), ref, f'{name}/{layout}')
    kept[name] = {'params': got, 'opt_state': state}


def _train_checks(out: str) -> dict:
  d = _data()
  x, y = d['x'], d['y']
  trained: dict = {}  # the sharded train states that the checkpoint check saves
  plain = jax.jit(PLAIN_MLP.init)(jax.random.key(3), x)['params']
  plain_loss = lambda p, x: jnp.mean((PLAIN_MLP.apply({'params': p}, x) - y) ** 2)

  def check_linen():
    model = _linen_mlp()
    params = jax.jit(model.init)(jax.random.key(3), x)['params']
    loss = lambda p, x: jnp.mean((model.apply({'params': p}, x) - y) ** 2)

    def shard(mesh, layout):
      # The partitioning metadata shards the first kernel; wn_jax boxes `scale` like it.
      pmodel = _linen_mlp(layout)
      shardings = nn.get_sharding(jax.eval_shape(pmodel.init, jax.random.key(3), x), mesh)
      variables = jax.jit(pmodel.init, out_shardings=shardings)(jax.random.key(3), x)
      first = nn.unbox(variables['params']['layers_0'])
      _scale_follows(first['scale'], first['kernel'], f'linen/{layout}')
      # The other layer by the same layout, from the same values.
      return {**_put(mesh, params, layout), 'layers_0': first}

    _compare_training('linen', loss, params, x, TX, shard, trained)

  def check_nnx():
    graphdef, state = nnx.split(_nnx_mlp())

    def loss(p, x):
      s = nnx.clone(state)
      nnx.replace_by_pure_dict(s, p)
      return jnp.mean((nnx.merge(graphdef, s)(x) - y) ** 2)

    def shard(mesh, layout):
      # The first kernel's partitioning metadata, and the `scale` wn_jax derives from it
      # (abstract: built eagerly under the mesh in check_global_arguments).
      with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: _nnx_mlp(layout))
      meta = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract)))['layers'][0]
      assert meta['scale'] == P(meta['kernel'][-1]), meta
      params = nnx.to_pure_dict(state)
      specs = _specs(params, layout)
      specs['layers'][0] = {**specs['layers'][0], 'kernel': meta['kernel'], 'scale': meta['scale']}
      return jax.tree_util.tree_map(lambda a, s: _global(mesh, a, s), params, specs)

    _compare_training('nnx', loss, nnx.to_pure_dict(state), x, TX, shard, trained)

  def check_pytree():
    def shard(mesh, layout):
      # weight_norm on global weights (under jit; outside it in check_global_arguments):
      # each g is computed from its global kernel and sharded like the kernel's out features.
      wn = jax.jit(wn_jax.weight_norm)(_put(mesh, plain, layout))
      for layer in wn.values():
        _scale_follows(layer['kernel'].g, layer['kernel'].v, f'pytree/{layout}')
      return wn

    loss = lambda p, x: plain_loss(wn_jax.materialize(p), x)
    _compare_training('pytree', loss, wn_jax.weight_norm(plain), x, TX, shard, trained)

  def check_optim():
    def shard(mesh, layout):
      gw = _put(mesh, plain, layout)
      directions = jax.jit(OPTIM_TX.init)(gw).directions
      for name, layer in directions.items():
        _scale_follows(layer['kernel'].g, gw[name]['kernel'], f'optim/{layout}')
      return gw

    _compare_training('optim', plain_loss, plain, x, OPTIM_TX, shard, trained)

  def check_data_init():
    # Each process holds only its half of the batch; the statistics are the global batch's.
    mesh = _mesh()
    xi = d['xi']
    half = xi.shape[0] // 2
    local = xi[jax.process_index() * half : (jax.process_index() + 1) * half]
    gx = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)
    assert gx.shape == xi.shape and not gx.is_fully_addressable

    model = _linen_mlp()
    variables = jax.jit(model.init)(jax.random.key(3), xi)
    want = wl.data_init(model, variables, xi)
    gvars = _put(mesh, variables, 'both')
    got = jax.jit(lambda v, x: wl.data_init(model, v, x))(gvars, gx)
    _assert_trees(_gather(got), want, 'linen data_init under jit')
    # The test could fail: one process's half gives other statistics.
    half_scale = wl.data_init(model, variables, local)['params']['layers_0']['scale']
    assert not np.allclose(want['params']['layers_0']['scale'], half_scale, rtol=1e-3)

    ref = _nnx_mlp()
    graphdef, state = nnx.split(ref)
    m = nnx.merge(graphdef, _put(mesh, state, 'both'))
    wx.data_init(ref, xi)
    nnx.jit(wx.data_init)(m, gx)
    _assert_trees(_gather(nnx.to_pure_dict(nnx.state(m))), nnx.to_pure_dict(nnx.state(ref)), 'nnx')

  def check_global_arguments():
    # wn_jax's entry points on global (not fully addressable) arrays, outside jit: none may
    # close over them in a jitted function or pull them to the host. (weight_norm,
    # materialize, fold, linen data_init, the optim transformation, NNX layer construction.)
    mesh = _mesh()
    gw = _put(mesh, plain, 'both')
    assert not gw['layers_0']['kernel'].is_fully_addressable
    _assert_trees(_gather(wn_jax.materialize(wn_jax.weight_norm(gw))), plain, 'materialize')
    model = _linen_mlp()
    variables = jax.jit(model.init)(jax.random.key(3), x)
    gvars = _put(mesh, variables, 'both')
    _assert_trees(_gather(wl.fold(gvars['params'])), wl.fold(variables['params']), 'fold')
    gx = _global(mesh, x, P('data'))
    want = wl.data_init(model, variables, x)
    _assert_trees(_gather(wl.data_init(model, gvars, gx)), want, 'linen data_init')
    tx = wn_jax.optim.weight_norm(optax.sgd(0.1))
    ones = lambda t: jax.tree_util.tree_map(jnp.ones_like, t)
    got, _ = tx.update(ones(gw), tx.init(gw), gw)
    want, _ = tx.update(ones(plain), tx.init(plain), plain)
    _assert_trees(_gather(got), want, 'optim update')
    # An NNX model built under the mesh: each WN layer computes `scale` from its global
    # kernel, sharded like the kernel's out features.
    with jax.set_mesh(mesh):
      m = _nnx_mlp('both')
    _scale_follows(m.layers[0].scale[...], m.layers[0].kernel[...], 'nnx')
    want = nnx.to_pure_dict(nnx.state(_nnx_mlp()))
    _assert_trees(_gather(nnx.to_pure_dict(nnx.state(m))), want, 'nnx built under the mesh')

  def check_checkpoint():
    state = {'wn': trained['linen'], 'optim': trained['optim']}
    path = os.path.join(out, 'ckpt')
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, state)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(path, abstract)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
      assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
    saved = _gather(state)
    _assert_trees(_gather(restored), saved, 'checkpoint, same layout', exact=True)
    if jax.process_index() == 0:
      np.savez(os.path.join(out, 'saved.npz'), *jax.tree_util.tree_leaves(saved))

  def check_example():
    # examples/multihost_training.py's train(), in these two processes.
    spec = importlib.util.spec_from_file_location('multihost_training', EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.train(3)
    assert len(losses) == 3 and np.all(np.isfinite(losses)), losses

  return {
    'linen': check_linen,
    'nnx': check_nnx,
    'pytree': check_pytree,
    'optim': check_optim,
    'data_init': check_data_init,
    'global_arguments': check_global_arguments,
    'checkpoint': check_checkpoint,
    'example': check_example,
  }


def restore_resharded(out: str, devices: list) -> None:
  """The two processes' checkpoint, in one process on a 2 x 4 mesh of ``devices``, resharded."""
  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AUTO, AUTO), devices=devices)
  x = _data()['x']
  params = nn.unbox(jax.eval_shape(_linen_mlp().init, jax.random.key(3), x)['params'])
  plain = jax.eval_shape(PLAIN_MLP.init, jax.random.key(3), x)['params']
  like = {
    'wn': {'params': params, 'opt_state': jax.eval_shape(TX.init, params)},
    'optim': {'params': plain, 'opt_state': jax.eval_shape(OPTIM_TX.init, plain)},
  }

  # New shardings: every matrix over 'model' along its input features, the rest replicated.
  def target(a):
    spec = P('model', None) if a.ndim == 2 else P()
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

  abstract = jax.tree_util.tree_map(target, like)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(out, 'ckpt'), abstract)
  leaves = jax.tree_util.tree_leaves(restored)
  for a, t in zip(leaves, jax.tree_util.tree_leaves(abstract)):
    assert a.sharding.is_equivalent_to(t.sharding, a.ndim), (a.sharding, t.sharding)
  with np.load(os.path.join(out, 'saved.npz')) as saved:
    want = [saved[f'arr_{i}'] for i in range(len(saved.files))]
  assert len(want) == len(leaves), (len(want), len(leaves))
  for a, b in zip(leaves, want):
    np.testing.assert_array_equal(np.asarray(a), b)


def main(argv: list[str]) -> int:
  pid, port, out = int(argv[0]), argv[1], argv[2]
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    f'127.0.0.1:{port}', num_processes=2, process_id=pid, initialization_timeout=60
  )
  assert jax.process_count() == 2 and jax.local_device_count() == 4, jax.devices()
  checks = _train_checks(out)
  failed = 0
  for name, check in checks.items():
    start, cpu = time.perf_counter(), time.process_time()
    try:
      check()
      took = f'{time.perf_counter() - start:.1f} s, CPU {time.process_time() - cpu:.1f} s'
      print(f'OK {name}\n  ({took})', flush=True)
    except Exception as e:  # report it and go on, where the other process can too
      failed += 1
      traceback.print_exc()
      print(f'FAIL {name}: {type(e).__name__}: {e}', flush=True)
  jax.distributed.shutdown()
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
