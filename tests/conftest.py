"""Test configuration: 8 CPU devices, strict dtype promotion everywhere; x64 only where a test
asks."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest
from hypothesis import settings

# Fast compilation. The suite compiles thousands of small programs (most eager calls of a new
# shape compile one) and runs each a few times: XLA's compile time is most of its time. So it
# compiles the HLO XLA always optimizes, with LLVM's own optimizations off
# (``jax_disable_most_optimizations``, a JAX option) and, on a CPU, the older loop emitters
# and one LLVM module per program (XLA flags, set only where this jaxlib accepts them). The same
# programs, compiled faster: the whole suite ran in 265 s instead of 669 s, with the same
# results. XLA splits a program's LLVM module into up to 32 parts compiled on threads; on two
# cores shared by two xdist workers that cost more than it saved (on an AMD EPYC, pytest took
# 353-423 s with one part against 465-486 s with the default split). ``make test`` runs
# tests/test_range.py a second time with ``WN_JAX_TEST_XLA=default``, XLA as users get it, since
# the range tests pin how the compiled norm rounds. Environment variables, so subprocesses
# (the notebooks, the two-process test) and xdist's workers get them too.
_FAST_CPU_FLAGS = '--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1'


def _compile_fast() -> None:
  if os.environ.setdefault('WN_JAX_TEST_XLA', 'fast') != 'fast':
    return
  os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'
  jax.config.update('jax_disable_most_optimizations', True)
  flags = os.environ.get('XLA_FLAGS', '')
  if _FAST_CPU_FLAGS in flags:  # an xdist worker: its controller has probed the flags
    return
  # XLA aborts on a flag it does not know: try it in a subprocess first.
  flags = f'{flags} {_FAST_CPU_FLAGS}'.strip()
  probe = [sys.executable, '-c', 'import jax; jax.devices()']
  if subprocess.run(probe, env={**os.environ, 'XLA_FLAGS': flags}, capture_output=True).returncode:
    return
  os.environ['XLA_FLAGS'] = flags


_compile_fast()


def _share_compiled_programs() -> None:
  """One persistent compilation cache (JAX's own) for the whole run, in a temporary folder:
  the two xdist workers, the notebooks' and guides' kernels and the two-process test compile
  many of the same programs, and each is compiled once. Every program is kept (XLA compiles
  most of the suite's in milliseconds: JAX's default keeps only those over a second). A
  repeated eager call still counts as a compilation if it lowers anew (tests/test_eager.py).
  Measured on 2 cores: pytest's CPU time 757 s -> 640 s, its wall time 389 s -> 325 s.

  The cache writes its files unlocked: a process reading one while another writes it gets a
  warning and compiles the program itself (pyproject.toml lets that warning pass)."""
  if 'WN_JAX_TEST_CACHE' not in os.environ:  # the controller: workers and subprocesses inherit it
    os.environ['WN_JAX_TEST_CACHE'] = tempfile.mkdtemp(prefix='wn_jax_tests_')
    atexit.register(shutil.rmtree, os.environ['WN_JAX_TEST_CACHE'], ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ['WN_JAX_TEST_CACHE']
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  jax.config.update('jax_compilation_cache_dir', os.environ['WN_JAX_TEST_CACHE'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


_share_compiled_programs()

# 8 host CPU devices for the sharding tests (and the multi-process test's restore), in-process
# as in equinox's conftest.py: JAX reads this when its backend starts, so before any test runs.
# Everything else runs on the default device, the first.
jax.config.update('jax_num_cpu_devices', 8)

# Derandomized: the same examples on every run, so CI is reproducible.
settings.register_profile('wn_jax', derandomize=True, deadline=None)
settings.load_profile('wn_jax')


@pytest.fixture
def x64():
  """Runs the test with 64-bit types enabled."""
  with jax.enable_x64(True):
    yield


@pytest.fixture(autouse=True)
def _promotion(request):
  """Strict promotion, except for tests marked ``standard_promotion``.

  optax's own code (adam's bias correction, ``float ** int32``) needs standard
  promotion; tests that run it say so. wn_jax's code runs under strict.
  """
  mode = 'standard' if request.node.get_closest_marker('standard_promotion') else 'strict'
  with jax.numpy_dtype_promotion(mode):
    yield


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """float32 matmuls and convolutions in full float32 on every platform.

  GPUs run them in TF32 by default, 10 bits of mantissa: tests that compare layer outputs
  with the float64 reference or with each other would then need platform-dependent
  tolerances. Only the tests pin this; the library leaves the user's precision alone.
  """
  with jax.default_matmul_precision('highest'):
    yield


# tests/data/make_torch_oracle.py needs torch and is run by hand, never collected.
collect_ignore_glob = ['data/*']


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
  """The slow tests first (subprocesses, notebooks, the docs, 8-device sharding; a stable
  sort, the same on every xdist worker): each starts while short tests remain to fill the
  other worker, rather than one running alone at the end. ``--dist loadfile`` (make test)
  hands out whole files in its own order, the files with the most tests first: there the
  sort orders the tests within each file."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)
