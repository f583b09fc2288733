"""Shared machinery of the paper's data-dependent initialization (section 3).

A layer in data-init mode computes its pre-activation ``t = (v / ||v||) . x`` without
bias, takes the per-feature mean ``mu`` and standard deviation ``sigma`` over every
axis but the last (features), and sets

    g = init_scale / sigma        b = -mu * init_scale / sigma

so its output on that batch has mean 0 and standard deviation ``init_scale`` per
feature. It returns that initialized output, so a single forward pass initializes the
layers in order, each on the outputs of the initialized layers before it.

Which use of a layer is its first is decided when the computation runs, not when it is
traced: ``data_init`` sets each WN layer's scale to -inf (:func:`fresh`; not NaN, which
``jax_debug_nans`` would stop on) before the pass, and every use initializes the features
whose scale is still -inf, keeping the others. So
a first use in one branch of a ``cond``, in a loop or scan body (one trace, run at every
step), or in a trace JAX reuses for a later call is the one that runs first. A layer no
use reached gets its scale back (:func:`settle`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import itertools
import sys
import types
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import api as _api  # the modules of JAX's shape probes, for _in_probe
from jax._src import pjit as _pjit
from jax._src.interpreters import batching  # BatchTracer: not in the public module
from jax._src.interpreters import partial_eval as pe  # JaxprTrace: not in the public module

from wn_jax import _fit_check
from wn_jax import _stacking
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
  done: set = dataclasses.field(default_factory=set)  # the layers traced so far, by key
  # (tag, layer) of each layer traced, for the caller to check that its writes landed; it
  # also keeps the layer alive, so no later layer takes its id (an NNX transform's copies
  # of a layer are freed after it).
  claimed: list = dataclasses.field(default_factory=list)
  # NNX: each layer's path in the model by its tag (an NNX layer does not know its path).
  paths: dict = dataclasses.field(default_factory=dict)
  # NNX: by tag, each layer marked fresh, with (layer, scale before, the fresh array, bias
  # before): the fresh array still there at a later use, no earlier use's write landed.
  marked: dict = dataclasses.field(default_factory=dict)
  # The frame of data_init: only the tracing between it and a layer counts (see claim).
  entry: Any = None
  # linen: the trace data_init's apply runs under, and the layers a write of that trace (not
  # of a lifted transform's body, which may not run) landed in (see foreign).
  home: Any = None
  landed: set = dataclasses.field(default_factory=set)
  # This data init's number, unique in the process. NNX: in each layer's marking, so that the
  # model's graph differs from any earlier call's and JAX reuses no trace of one (a scan built
  # once keeps its trace), which would run no layer's Python and keep that call's init_scale.
  call: int = dataclasses.field(default_factory=itertools.count().__next__)


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
        'WNConvTranspose; NNX: WNLinear, WNConv, WNConvTranspose) ran in it where it could '
        'write. Plain layers and layers inside a WeightNorm wrapper are left as they are (a '
        'wrapper scales parameters, not the output features of a pre-activation): build the '
        "layers to initialize as WN layers, or set a wrapper's scale by hand. linen: a WN layer "
        "that runs only in the body of nn.while_loop without carry_variables='params' (or in "
        'its cond_fn), or of nn.map_variables without mutable=True, has its parameters '
        'read-only there: use it once outside first.'
      )
  finally:
    _MODE.reset(token)


def running() -> bool:
  """Whether a data init is running."""
  return _MODE.get() is not None


def check_set(label: Callable[[], str], scale: jax.Array) -> None:
  """A ``ValueError`` where ``scale`` is still fresh (-inf) for a use that cannot write it:
  its layer's parameters are read-only there, and no earlier use set it. At once on a
  concrete scale; under a trace when the computation runs (a use in a branch not taken, or
  after one that wrote, passes)."""

  def refuse(marked):
    if np.any(np.asarray(marked) > 0):
      raise ValueError(
        f'{label()}: data_init runs this layer where its parameters are read-only, in the '
        "body of a Flax transform (nn.while_loop without carry_variables='params', or its "
        'cond_fn even with it; nn.map_variables without mutable=True; the module of a '
        'WeightNorm wrapper), before any use set its scale: this use cannot. Use the layer '
        'once before, where it can write (outside the transform, or in the loop body), or '
        "pass carry_variables='params' to nn.while_loop (mutable=True to nn.map_variables)."
      )

  marked = jnp.any(is_fresh(scale), keepdims=True).astype(jnp.float32)
  if isinstance(marked, jax.core.Tracer):
    _fit_check.callback_once(refuse, marked)
  else:
    refuse(marked)


def path(tag: object) -> str | None:
  """The path of the NNX layer tagged ``tag`` in the model a data init runs on."""
  m = _MODE.get()
  return None if m is None else m.paths.get(tag)


def foreign(x: Any, home: Any) -> bool:
  """Whether ``x`` is a tracer of a trace other than ``home`` (an opaque trace state,
  ``jax.core.get_opaque_trace_state``'s, as Flax's scopes keep it) and the traces that hold
  it (a ``jit`` around ``nn.vmap``'s): stored where ``home``'s computation reads it, it would
  be lost or leak (a value of a transform's body, which that body does not return)."""
  trace = getattr(x, '_trace', None) if isinstance(x, jax.core.Tracer) else None
  ref = getattr(home, '_trace_ref', None)  # JAX's OpaqueTraceState: a weakref to the trace
  if trace is None or not callable(ref):
    return False
  outer = ref()
  while outer is not None:
    if outer is trace:
      return False
    outer = getattr(outer, 'parent_trace', None)
  return True


def claim(key: object) -> tuple[Mode, bool] | None:
  """``(mode, first)`` while a data init runs, for every traced use of the layer ``key``:
  ``first`` for its first traced use, which runs the checks. ``None`` inside a shape probe
  (``jax.eval_shape``, ``nnx.eval_shape``), whose results are discarded.

  Every traced use initializes the features whose scale is still fresh when it runs
  (:func:`initialize`): which use comes first is known only when it runs, in a branch of a
  ``cond``, in a loop or a scan (one traced step, run at every step), or in a trace that
  JAX reuses for a later call.
  """
  m = _MODE.get()
  if m is None or _in_probe(m.entry):
    return None
  first = key not in m.done
  m.done.add(key)
  return m, first


# The code of JAX's shape probes: a frame running one is inside a probe.
_PROBES = frozenset(inspect.unwrap(f).__code__ for f in (_api.eval_shape, _pjit.jit_eval_shape))


def _in_probe(stop: object) -> bool:
  """Whether this call runs inside a shape probe below the frame ``stop`` (data_init's):
  read from the Python stack."""
  frame: types.FrameType | None = sys._getframe(1)
  while frame is not None and frame is not stop:
    if frame.f_code in _PROBES:
      return True
    frame = frame.f_back
  return False


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


def broadcast_in_scan(kernel: object, inputs: object) -> bool:
  """Whether ``kernel`` is one ``nn.scan`` broadcasts to every step, traced in its
  partial-evaluation pass (see :func:`check_not_broadcast`)."""
  leaves = jax.tree_util.tree_leaves(inputs)
  return any(map(is_partial_eval, leaves)) and not is_partial_eval(kernel)


def check_not_broadcast(kernel: object, inputs: object) -> None:
  """A ``ValueError`` if the kernel is one ``nn.scan`` broadcasts to every step.

  Flax's scan first traces its body in a partial-evaluation pass where the loop's inputs are
  unknown; a broadcast kernel is known there (a stacked one is not). Its ``g`` would then
  depend on the loop, which a broadcast variable cannot.
  """
  if broadcast_in_scan(kernel, inputs):
    raise ValueError(
      'data_init cannot initialize a layer inside nn.scan whose parameters are '
      "broadcast to every step (variable_broadcast='params'): they cannot depend on one "
      "step's statistics. Initialize it outside the scan: use the layer once before the "
      'scan, outside any transform (its steps then read what that use set), or run '
      "data_init on the scanned module alone, on one step's inputs, with its parameters "
      "(variables['params'] under the scan's name), and put the result back; or give each "
      "step its own parameters (variable_axes={'params': 0})."
    )


def shared_across_vmap(kernel: object, g: object) -> bool:
  """Whether ``g`` varies along a ``vmap`` axis the kernel is shared across."""
  return bool(_mapped_levels(g) - _mapped_levels(kernel))


def shared_across_vmap_error() -> ValueError:
  return ValueError(
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
      f'data_init: init_scale for {_stacking.layer_name(path)} must be a positive finite '
      f'number (a Python or NumPy float); got {s!r}.'
    )
  return float(s)  # type: ignore[arg-type]


def statistics(t: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """Per-feature (last axis) mean and standard deviation of ``t``, in float32 or wider.

  Over the global batch: under ``jit`` with a sharded batch XLA reduces across devices;
  inside ``shard_map`` / ``pmap``, pass the mapped ``axis_name`` to ``data_init``.
  """
  t = t.astype(reduce_dtype(t.dtype))
  axes = tuple(range(t.ndim - 1))
  mu = jnp.mean(t, axis=axes)
  if axis_name is not None:
    mu = jax.lax.pmean(mu, axis_name)
  # The deviations scaled by their largest magnitude, so their squares neither underflow
  # (a feature varying by 1e-20) nor overflow (by 1e20) the statistics' dtype. The max
  # starts at 0 (|d| is never below it): an empty batch gets NaN statistics, which the fit
  # check refuses as too few values, not a max with no identity.
  d = t - mu
  top = jnp.max(jnp.abs(d), axis=axes, initial=0.0)
  if axis_name is not None:
    top = jax.lax.pmax(top, axis_name)
  top = jnp.where(top > 0, top, 1.0)
  var = jnp.mean(jnp.square(d / top), axis=axes)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  sigma = top * jnp.sqrt(var)
  rounding = CONSTANT_FEATURE_ULPS * jnp.finfo(sigma.dtype).eps * jnp.abs(mu)
  return mu, jnp.where(sigma <= rounding, 1.0, sigma)  # a NaN stays NaN, for the fit check


def initialize(
  t: jax.Array,
  m: Mode,
  path: str,
  label: object,
  current: tuple[jax.Array, jax.Array | None],
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """``(g, b, output)`` from the bias-free pre-activation ``t`` and the layer's current
  ``(g, b)`` (``b`` ``None``: no bias; then the output is only scaled).

  Where the current ``g`` is still fresh (-inf, see :func:`fresh`), ``g`` and ``b`` are set
  by the module docstring's rule; elsewhere they are kept (a later use of the layer), and
  the output is ``t * g + b`` with them. ``label`` names the layer in the one error raised
  after the layer's call has returned (under ``jit``: see :func:`wn_jax._fit_check.check`).
  Computed in float32 or wider; ``g`` and ``b`` come in their current dtypes, refused
  (``ValueError``) where a fresh one does not fit them, or (one value per feature) cannot be
  estimated.

  The array work is one jitted call (:func:`_initialized`), ``init_scale`` an argument of it:
  eagerly, a batch size no call had before compiles one program, not one per operation.
  """
  g_now, b_now = current
  dtypes = tuple(jnp.dtype(jnp.result_type(x)) for x in current if x is not None)
  rows = t.size // t.shape[-1] * (1 if m.axis_name is None else jax.lax.axis_size(m.axis_name))
  one_value = rows < 2  # per feature, over the global batch
  scale = np.asarray(scale_for(m, path), reduce_dtype(t.dtype))  # as a Python float would be
  g, b, out, fit = _initialized(t, g_now, b_now, scale, m.axis_name)
  _fit_check.check(label, fit, (*dtypes, t.dtype), one_value)
  return _placed_as(g, g_now), None if b_now is None else _placed_as(b, b_now), out


@functools.partial(jax.jit, static_argnums=(4,))
def _initialized(t, g_now, b_now, init_scale, axis_name):
  """:func:`initialize`'s arrays: ``(g, b, output, fit)``, ``fit`` what
  :func:`wn_jax._fit_check.check` checks."""
  mu, sigma = statistics(t, axis_name)
  g = init_scale / sigma
  b = -mu * g
  new = is_fresh(g_now)
  fit = _fit_check.per_feature(g, None if b_now is None else b, mu, sigma, new)
  g = jnp.where(new, _like(g, g_now), g_now.astype(g.dtype))
  if b_now is not None:
    b = jnp.where(_like(new, b_now), _like(b, b_now), b_now.astype(b.dtype))
  out = kept(t, (g, None if b_now is None else b))[2]
  return g.astype(g_now.dtype), None if b_now is None else b.astype(b_now.dtype), out, fit


def kept(t: jax.Array, current: tuple[jax.Array, jax.Array | None]) -> tuple[Any, Any, jax.Array]:
  """``(g, b, output)`` of a use that sets nothing: ``t * g + b`` with the current ``(g, b)``,
  in float32 or wider (a later use inside a vmap the layer is shared across, whose statistics
  vary along it; and :func:`initialize`'s output, with what it set)."""
  g, b = current
  out = t.astype(reduce_dtype(t.dtype)) * g
  return g, b, (out if b is None else out + b).astype(t.dtype)


def _like(x: jax.Array, ref: jax.Array) -> jax.Array:
  """``x`` sharded as ``ref`` where ``ref``'s mesh has Explicit axes: a select needs its
  operands sharded alike (a bias is often replicated, the statistics per feature)."""
  sharding = jax.typeof(ref).sharding
  if jax.sharding.AxisType.Explicit in getattr(getattr(sharding, 'mesh', None), 'axis_types', ()):
    return jax.sharding.reshard(x, sharding)  # the NamedSharding: no mesh context needed
  return x


def _placed_as(x: jax.Array, ref: jax.Array) -> jax.Array:
  """``x`` on ``ref``'s devices and layout when both are concrete: eagerly, a bias computed
  from the statistics would otherwise take their layout, not its own (and the layer's next
  call compile anew). A ``ref`` not yet placed (uncommitted, as after a plain ``init``) gets
  an ``x`` not placed either: committed to one device, the next call on a batch sharded over
  several would fail ("incompatible devices")."""
  tracer = isinstance(x, jax.core.Tracer) or isinstance(ref, jax.core.Tracer)
  if tracer or not isinstance(ref, jax.Array):
    return x
  if not ref.committed:
    # Only a trip through the host makes an array uncommitted; x is one value per feature.
    return jax.device_put(np.asarray(x)) if x.committed and x.is_fully_addressable else x
  return jax.device_put(x, ref.sharding) if x.sharding != ref.sharding else x


def fresh(scale: jax.Array) -> jax.Array:
  """``scale`` marked as not yet initialized (-inf: no scale is), before a data init's pass;
  sharded as ``scale``."""
  return jax.lax.full_like(scale, -jnp.inf)


def is_fresh(scale: jax.Array) -> jax.Array:
  """Where ``scale`` still holds :func:`fresh`'s mark: no use has initialized it."""
  return jnp.isneginf(scale)


def settle(scale: jax.Array, before: jax.Array) -> jax.Array:
  """A scale after the pass: ``before`` where no use initialized it (still -inf), placed as
  ``before`` was (the marks, made eagerly under ``jax.set_mesh``, are placed on its mesh)."""
  return _placed_as(jnp.where(is_fresh(scale), before, scale), before)


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
