"""Sharded training on 8 host CPU devices, in a subprocess (the device count is fixed at
JAX's start). The checks live in tests/sharded_checks.py."""

import os
import pathlib
import subprocess
import sys

import pytest

# Slow (make check leaves it out); one worker runs this file's tests (a parallel run shares
# its fixture, session-scoped).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('test_sharding')]

ROOT = pathlib.Path(__file__).parent.parent
CHECKS = [
  'linen_dense',
  'linen_conv',
  'nnx_linear',
  'nnx_conv',
  'pytree',
  'optimizer',
  'partitioned_scale',
  'data_init',
  'explicit_mesh',
  'projection',
]


def _run(*args, timeout=600):
  env = {
    **os.environ,
    'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
    'PYTHONPATH': str(ROOT),
  }
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


@pytest.fixture(scope='session')  # never torn down while other files' tests interleave
def report():
  proc = _run('tests/sharded_checks.py')
  return proc.stdout + proc.stderr


@pytest.mark.parametrize('name', CHECKS)
def test_sharded_equals_single_device(report, name):
  assert f'OK {name}\n' in report, report[-3000:]


def test_example_runs():
  proc = _run('examples/sharded_training.py', '--steps', '3')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh {'data': 2, 'model': 4}" in proc.stdout
  assert "scale of WNDense_0 stays sharded: P('model',)" in proc.stdout
