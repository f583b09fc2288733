"""Shared machinery of the paper's data-dependent initialization (section 3).

A layer in data-init mode computes its pre-activation ``t = (v / ||v||) . x`` without
bias, takes the per-feature mean ``mu`` and standard deviation ``sigma`` over every
axis but the last (features), and sets

    g = init_scale / sigma        b = -mu * init_scale / sigma

so its output on that batch has mean 0 and standard deviation ``init_scale`` per
feature. It returns that initialized output, so a single forward pass initializes the
layers in order, each on the outputs of the initialized layers before it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import sys
import types
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import api as _api  # the modules of JAX's control flow, for _traced_in
from jax._src import pjit as _pjit
from jax._src import pmap as _pmap
from jax._src.interpreters import batching  # BatchTracer: not in the public module
from jax._src.interpreters import partial_eval as pe  # JaxprTrace: not in the public module
from jax._src.lax.control_flow import conditionals as _conditionals
from jax._src.lax.control_flow import loops as _loops

from wn_jax._axes import is_eps
from wn_jax._core import reduce_dtype

# A feature is taken as constant on the batch when its standard deviation is at most this
# many units in the last place of its mean (of the statistics' dtype): a constant feature's
# sigma is the rounding of its mean, about |mu| * eps, never exactly 0. Its sigma counts
# as 1 (g = init_scale, b = -mu * init_scale), so nothing blows up. A feature that varies,
# at whatever scale, is standardized.
CONSTANT_FEATURE_ULPS = 128


@dataclasses.dataclass
class Mode:
  init_scale: float | Callable[[str], float]
  axis_name: str | None
  done: set = dataclasses.field(default_factory=set)
  # (tag, layer, scale ndim) of each layer that initialized itself, for the caller to
  # check that its writes landed; it also keeps the layer alive, so no later layer takes its id (an NNX
  # transform's copies of a layer are freed after it).
  claimed: list = dataclasses.field(default_factory=list)
  # Of each layer first used inside a scan's body (stacked along it, or carried through its
  # steps, which the caller tells apart; see wn_jax.nnx.data_init): the scans and vmaps
  # around that use, by key.
  in_scan: dict = dataclasses.field(default_factory=dict)
  # NNX: each layer's path in the model by its tag (an NNX layer does not know its path).
  paths: dict = dataclasses.field(default_factory=dict)
  # The frame of data_init: only the tracing between it and a layer counts (see claim).
  entry: Any = None


_MODE: contextvars.ContextVar[Mode | None] = contextvars.ContextVar(
  'wn_jax_data_init', default=None
)


@contextlib.contextmanager
def mode(init_scale: float | Callable[[str], float], axis_name: str | None) -> Iterator[Mode]:
  if isinstance(init_scale, jax.core.Tracer):
    raise _traced_scale()
  if not (callable(init_scale) or _is_scale(init_scale)):
    raise ValueError(
      f'data_init: init_scale must be a positive finite number (a Python or NumPy float) or '
      f'a callable (layer path) -> such a number; got {init_scale!r}.'
    )
  entry: types.FrameType | None = sys._getframe(1)
  while entry is not None and entry.f_code.co_filename == contextlib.__file__:
    entry = entry.f_back  # past the context manager's own frames, to data_init's
  token = _MODE.set(Mode(init_scale, axis_name, entry=entry))
  try:
    yield _MODE.get()  # type: ignore[misc]
    if not _MODE.get().done:  # type: ignore[union-attr]
      raise ValueError(
        'data_init: the call initialized no layer: no WN layer (WNDense, WNConv, '
        'WNConvTranspose; NNX: WNLinear, WNConv, WNConvTranspose) ran in it. Plain layers and '
        'layers inside a WeightNorm wrapper are left as they are (a wrapper scales parameters, '
        'not the output features of a pre-activation): build the layers to initialize as WN '
        "layers, or set a wrapper's scale by hand."
      )
  finally:
    _MODE.reset(token)


def running() -> bool:
  """Whether a data init is running."""
  return _MODE.get() is not None


def path(tag: object) -> str | None:
  """The path of the NNX layer tagged ``tag`` in the model a data init runs on."""
  m = _MODE.get()
  return None if m is None else m.paths.get(tag)


def claim(key: object, where: Callable[[], str]) -> Mode | None:
  """The active mode if the layer ``key`` is still to be initialized (first use only).

  Inside a shape probe (``jax.eval_shape``, ``nnx.eval_shape``) no layer is initialized:
  its results are discarded. A first use that JAX traces once but that may run other than
  once is refused (``where()`` names the layer): in a branch of ``lax.cond`` /
  ``lax.switch`` (JAX traces every branch), or in a ``while_loop`` / ``fori_loop`` body
  (each iteration would initialize the layer again), as ``nnx.cond``, ``nn.cond``,
  ``nnx.while_loop``, ... trace them. The first use there is only known when it runs.
  A first use in a ``scan`` body is recorded in ``in_scan``: a layer stacked along the
  scan is each step's own, one carried through its steps is for the caller to refuse. Under
  ``jax.disable_jit`` a scan runs in Python, where the two look alike: refused.
  """
  m = _MODE.get()
  if m is None or key in m.done:
    return None
  inside = _traced_in(m.entry, m.axis_name)
  if 'eval_shape' in inside:
    return None
  # Under jax.disable_jit, control flow runs in Python (the branch taken, each iteration):
  # the first use is then the first that runs.
  disable_jit = jax.config.jax_disable_jit  # type: ignore[attr-defined]
  refused = next((name for name in inside if name not in _MAPS), None)
  if refused is not None and not disable_jit:
    raise ValueError(
      f'{where()}: data_init would initialize this layer in a branch of a cond / switch or in '
      f'the body of a while / fori loop ({refused}): JAX traces it once, but it runs once per '
      f'branch taken or iteration, so which use comes first is only known when it runs. Use '
      f'the layer once before the conditional or loop, or run data_init on the model with '
      f'the branch chosen in Python (call the branch function directly).'
    )
  scans = inside.count('scan')
  if scans and disable_jit:
    raise ValueError(
      f'{where()}: data_init would initialize this layer inside a scan under '
      f'jax.disable_jit(), where the scan runs its steps in Python: a layer stacked along the '
      f'scan (each step its own) then looks like one layer used at every step, and only the '
      f'first step would be initialized. Run data_init without jax.disable_jit().'
    )
  if scans:
    m.in_scan[key] = (scans, inside.count('vmap') + inside.count('pmap'))
  m.done.add(key)
  return m


def _nested(outer: Callable, name: str) -> types.CodeType | None:
  """The code of the function ``name`` defined in ``outer``, or in a function a memoizing
  wrapper of ``outer`` closes over (``None`` if this JAX has none)."""
  fn = inspect.unwrap(outer)
  for f in (fn, *filter(inspect.isfunction, _cells(fn))):
    found = next((c for c in f.__code__.co_consts if getattr(c, 'co_name', None) == name), None)
    if found is not None:
      return found
  return None


def _cells(fn: Callable) -> Iterator[Any]:
  """What ``fn`` closes over (its filled cells)."""
  for cell in fn.__closure__ or ():
    with contextlib.suppress(ValueError):  # an empty cell
      yield cell.cell_contents


# The functions that vmap and pmap run the mapped function in (one frame per mapped call,
# its mapped axis's name among its locals).
_MAPPED = {
  _nested(_api.vmap, 'vmap_f'): 'vmap',
  _nested(_pmap._cached_shard_map, '_fun'): 'pmap',
}
# Transforms that may add an axis to a layer's parameters outside (stacked, mapped) and run
# the layer once per step or element: not refused.
_MAPS = ('scan', 'vmap', 'pmap')


# The code of JAX's own functions that trace a function that may run other than once (or,
# for the probes, not at all), by name: a frame running it is inside. A user's function of
# the same name is other code.
_TRACERS = {
  inspect.unwrap(f).__code__: name
  for f, name in (
    (_conditionals.cond, 'cond'),
    (_conditionals.switch, 'switch'),
    (_loops.while_loop, 'while_loop'),
    (_loops.fori_loop, 'fori_loop'),
    (_loops.scan, 'scan'),
    (_api.eval_shape, 'eval_shape'),
    (_pjit.jit_eval_shape, 'eval_shape'),
  )
}


def _traced_in(stop: object, shared_axis: str | None = None) -> tuple[str, ...]:
  """The JAX functions tracing this call below the frame ``stop`` (data_init's), innermost
  first: the names in ``_TRACERS`` (``'cond'``, ..., ``'scan'``) and ``_MAPPED`` (but for a
  vmap or pmap whose axis is ``shared_axis``, which the layer is shared across), or just
  ``'eval_shape'`` if a frame is a shape probe. Read from the Python stack, which a
  ``custom_vjp``, ``custom_jvp`` or ``shard_map`` inside a branch does not hide (they start
  traces of their own, not nested in the branch's).
  """
  found: list[str] = []
  frame: types.FrameType | None = sys._getframe(1)
  while frame is not None and frame is not stop:
    name = _TRACERS.get(frame.f_code) or _MAPPED.get(frame.f_code)
    if name == 'eval_shape':
      return (name,)
    shared = shared_axis is not None and frame.f_locals.get('axis_name') == shared_axis
    if name in ('vmap', 'pmap') and shared:
      name = None
    if name is not None:
      found.append(name)
    frame = frame.f_back
  return tuple(found)


def is_partial_eval(x: object) -> bool:
  """Whether ``x`` is traced in a partial-evaluation pass: no layer is initialized there.

  Flax's scan traces its body once in such a pass, to find its loop invariants, and discards
  it; the loop's own trace follows. A trace nested in that pass (``nn.remat`` in the body)
  counts too: its chain of parent traces reaches the pass.
  """
  trace = getattr(x, '_trace', None)
  while trace is not None:
    if isinstance(trace, pe.JaxprTrace):
      return True
    trace = getattr(trace, 'parent_trace', None)
  return False


def _mapped_levels(x: object) -> set[int]:
  """The ``vmap`` levels (ids of their traces) along which ``x`` varies."""
  levels = set()
  while isinstance(x, batching.BatchTracer):
    if isinstance(x.batch_dim, int):
      levels.add(id(x._trace))
    x = x.val
  return levels


def check_not_broadcast(kernel: object, inputs: object) -> None:
  """A ``ValueError`` if the kernel is one ``nn.scan`` broadcasts to every step.

  Flax's scan first traces its body in a partial-evaluation pass where the loop's inputs are
  unknown; a broadcast kernel is known there (a stacked one is not). Its ``g`` would then
  depend on the loop, which a broadcast variable cannot.
  """
  leaves = jax.tree_util.tree_leaves(inputs)
  if any(map(is_partial_eval, leaves)) and not is_partial_eval(kernel):
    raise ValueError(
      'data_init cannot initialize a layer inside nn.scan whose parameters are '
      "broadcast to every step (variable_broadcast='params'): they cannot depend on one "
      "step's statistics. Initialize it outside the scan: run data_init on the scanned "
      "module alone, on one step's inputs, with its parameters (variables['params'] under "
      "the scan's name), and put the result back; or give each step its own parameters "
      "(variable_axes={'params': 0})."
    )


def check_not_shared_across_vmap(kernel: object, g: object) -> None:
  """A ``ValueError`` if ``g`` varies along a ``vmap`` axis the kernel is shared across."""
  if _mapped_levels(g) - _mapped_levels(kernel):
    raise ValueError(
      'data_init cannot initialize a layer whose parameters are shared across '
      "the mapped axis of nn.vmap (variable_axes={'params': None}) or nnx.vmap "
      "(in_axes=None) from each mapped element's statistics. Pass the same axis_name= to "
      "the vmap and to data_init, so the statistics are the whole batch's, mapped axis "
      'included.'
    )


def _is_scale(s: object) -> bool:
  """Whether ``s`` is a static output scale: a finite real number > 0 (not a bool)."""
  return is_eps(s) and float(s) > 0  # type: ignore[arg-type]


def _traced_scale() -> ValueError:
  return ValueError(
    'data_init: init_scale is traced (data_init under jax.jit / nnx.jit with init_scale, or '
    'what its callable returns, computed from an argument of the jitted function): it must '
    'be a Python number. Make it static (nnx.jit(wn_jax.nnx.data_init, static_argnames='
    "'init_scale'); for linen, jax.jit(lambda v, x: wn_jax.linen.data_init(model, v, x, "
    'init_scale=0.5))) or bind it with functools.partial before jitting.'
  )


def scale_for(m: Mode, path: str) -> float:
  s = m.init_scale(path) if callable(m.init_scale) else m.init_scale
  if isinstance(s, jax.core.Tracer):
    raise _traced_scale()
  if not _is_scale(s):
    raise ValueError(
      f'data_init: init_scale for layer {path!r} must be a positive finite number (a Python '
      f'or NumPy float); got {s!r}.'
    )
  return float(s)  # type: ignore[arg-type]


def statistics(t: jax.Array, m: Mode) -> tuple[jax.Array, jax.Array]:
  """Per-feature (last axis) mean and standard deviation of ``t``, in float32 or wider.

  Over the global batch: under ``jit`` with a sharded batch XLA reduces across devices;
  inside ``shard_map`` / ``pmap``, pass the mapped ``axis_name`` to ``data_init``.
  """
  count = t.size // t.shape[-1]
  if count < 2 and m.axis_name is None:
    raise ValueError(
      f'data_init needs at least 2 values per feature to estimate a standard '
      f'deviation; got an output of shape {t.shape}. Pass a larger batch.'
    )
  t = t.astype(reduce_dtype(t.dtype))
  axes = tuple(range(t.ndim - 1))
  mu = jnp.mean(t, axis=axes)
  if m.axis_name is not None:
    mu = jax.lax.pmean(mu, m.axis_name)
  # The deviations scaled by their largest magnitude, so their squares neither underflow
  # (a feature varying by 1e-20) nor overflow (by 1e20) the statistics' dtype.
  d = t - mu
  top = jnp.max(jnp.abs(d), axis=axes)
  if m.axis_name is not None:
    top = jax.lax.pmax(top, m.axis_name)
  top = jnp.where(top > 0, top, 1.0)
  var = jnp.mean(jnp.square(d / top), axis=axes)
  if m.axis_name is not None:
    var = jax.lax.pmean(var, m.axis_name)
  sigma = top * jnp.sqrt(var)
  rounding = CONSTANT_FEATURE_ULPS * jnp.finfo(sigma.dtype).eps * jnp.abs(mu)
  return mu, jnp.where(sigma <= rounding, 1.0, sigma)  # a NaN stays NaN, for _check_fits


def initialize(
  t: jax.Array, m: Mode, path: str, label: str, dtypes: tuple[Any, Any | None]
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """``(g, b, output)`` from the bias-free pre-activation ``t``: the module docstring's rule.

  ``dtypes`` are the parameter dtypes of ``g`` and ``b`` (``None``: no bias; then ``b`` is
  ``None`` and the output is only scaled). ``label`` names the layer in the one error raised
  after the layer's call has returned (under ``jit``: see ``_check_fits``). Computed in float32 or wider; ``g`` and ``b``
  come cast to their dtypes, refused (``ValueError``) where they do not fit them.
  """
  mu, sigma = statistics(t, m)
  g = scale_for(m, path) / sigma
  out = t.astype(mu.dtype) * g
  b = None if dtypes[1] is None else -mu * g
  _check_fits(label, g, b, mu, sigma, tuple(d for d in (*dtypes, t.dtype) if d is not None))
  if b is None:
    return g.astype(dtypes[0]), None, out.astype(t.dtype)
  return g.astype(dtypes[0]), b.astype(dtypes[1]), (out + b).astype(t.dtype)


def _check_fits(
  label: str,
  g: jax.Array,
  b: jax.Array | None,
  mu: jax.Array,
  sigma: jax.Array,
  dtypes: tuple[Any, ...],
) -> None:
  """A ``ValueError`` unless ``g`` and ``b`` are finite in every one of ``dtypes``; it names
  a pre-activation that is not finite (``mu``, ``sigma``: its statistics) as the cause.

  ``dtypes``: their parameter dtypes and the layer's compute dtype (``w``'s entries reach
  ``g``, and ``b`` is added in it). Value-dependent: raised at once on concrete arrays;
  under a trace (``jit``) a debug callback raises it when the computation runs, with
  ``label`` (no caller is left to add it then).
  """
  found, compute = ([g] if b is None else [g, b]), jnp.dtype(dtypes[-1])
  fits = jnp.all(jnp.stack([jnp.isfinite(x.astype(d)).all() for x in found for d in dtypes]))
  largest = [jnp.max(jnp.abs(x)) for x in found]

  def check(fits, bad_features, sigma_min, *largest, prefix=''):
    if bool(fits):
      return
    if int(bad_features):
      raise ValueError(
        f'{prefix}data_init: the pre-activation is not finite on this batch ({int(bad_features)} '
        f'feature(s) with NaN or inf statistics): the batch, or a layer before this one, has '
        f'NaN or inf, or the pre-activation overflows {compute} (largest finite '
        f'{float(jnp.finfo(compute).max):.3g}). Initialize on a finite batch at the scale the '
        f'layer sees in training, or compute this layer in float32.'
      )
    big = max(float(v) for v in largest)
    narrow = [str(jnp.dtype(d)) for d in dtypes if float(jnp.finfo(d).max) < big] or dtypes
    raise ValueError(
      f'{prefix}data_init sets g = init_scale / sigma (here up to {float(largest[0]):.3g})'
      + ('' if len(largest) == 1 else f' and b = -mu * g (up to {float(largest[1]):.3g})')
      + f', which does not fit {"/".join(sorted(set(map(str, narrow))))}: the '
      f'pre-activation varies too little on this batch (smallest per-feature standard '
      f'deviation {float(sigma_min):.3g}). Compute this layer in float32 (dtype and '
      f'param_dtype float32), pass a smaller init_scale, or initialize on a batch at the '
      f'scale the layer sees in training.'
    )

  bad_features = jnp.sum(~(jnp.isfinite(mu) & jnp.isfinite(sigma)))
  args = (fits, bad_features, jnp.min(sigma), *largest)
  if any(isinstance(a, jax.core.Tracer) for a in args):
    jax.debug.callback(functools.partial(check, prefix=f'{label}: '), *args)
  else:
    check(*args)


def check_output_axis(kernel_ndim: int, kept: tuple[int, ...], out_axis: int) -> None:
  if kept != (out_axis % kernel_ndim,):
    if out_axis == -2 and kept == (kernel_ndim - 1,):
      raise ValueError(
        'data_init sets one g per output feature, so the layer must keep the '
        'output-feature axis; with transpose_kernel=True the default axis=-1 keeps the input '
        "features (PyTorch's convention). Build the layer with axis=-2 (the output features "
        'with transpose_kernel=True), or initialize this layer by hand.'
      )
    raise ValueError(
      f'data_init sets one g per output feature, so the layer must keep the '
      f'output-feature axis ({out_axis % kernel_ndim} of the kernel); it keeps {kept}. '
      f'Use the default axis, or initialize this layer by hand.'
    )
