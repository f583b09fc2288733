"""Two JAX processes (jax.distributed, gloo) train, initialize and checkpoint like one.

The test launches two workers (tests/multiprocess_worker.py) on a free localhost port, 4 host
CPU devices each, then one process with 8 devices that restores their checkpoint on another
mesh. Every launch is bounded in time, and its processes are killed if it fails or overruns,
so a hung collective fails the test instead of hanging it.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

# Slow (make check leaves it out); one worker runs this file's tests (a parallel run shares
# its fixture, session-scoped).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('test_multiprocess')]

ROOT = pathlib.Path(__file__).parent.parent
WORKER = str(ROOT / 'tests' / 'multiprocess_worker.py')
TIMEOUT_S = 900  # per launch; about 70 s of CPU per worker, so generous for a loaded machine
CHECKS = [
  'linen',
  'nnx',
  'pytree',
  'optim',
  'data_init',
  'global_arguments',
  'checkpoint',
  'example',
]


def _env(devices: int) -> dict:
  return {
    **os.environ,
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
    'JAX_PLATFORMS': 'cpu',
    'PYTHONPATH': str(ROOT),
  }


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(out: str, *argv_per_process: list[str], devices: int) -> list[tuple[int | None, str]]:
  """Runs the processes together; returns the exit code (None: killed) and output of each.

  Output goes to files (a full pipe would block a worker), read back at the end.
  """
  logs = [pathlib.Path(out) / f'{argv[0]}{i}.log' for i, argv in enumerate(argv_per_process)]
  procs = []
  try:
    for argv, log in zip(argv_per_process, logs):
      with open(log, 'w') as f:
        procs.append(
          subprocess.Popen(
            [sys.executable, WORKER, *argv], cwd=ROOT, env=_env(devices), stdout=f, stderr=f
          )
        )
    deadline = time.monotonic() + TIMEOUT_S
    codes: list[int | None] = []
    for p in procs:
      try:
        codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0)))
      except subprocess.TimeoutExpired:
        break
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  codes += [None] * (len(procs) - len(codes))
  return [
    (code, log.read_text() + ('' if code is not None else f'\n[killed after {TIMEOUT_S} s]'))
    for code, log in zip(codes, logs)
  ]


@pytest.fixture(scope='session')  # never torn down while other files' tests interleave
def runs(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('multiprocess'))
  port = str(_free_port())
  workers = _launch(out, ['train', '0', port, out], ['train', '1', port, out], devices=4)
  restore = _launch(out, ['restore', out], devices=8)
  return workers, restore[0]


def _show(output: str) -> str:
  return output[-4000:]


@pytest.mark.parametrize('name', CHECKS)
def test_two_processes_equal_one(runs, name):
  workers, _ = runs
  for i, (_, output) in enumerate(workers):
    assert f'OK {name}\n' in output, f'process {i}:\n{_show(output)}'


def test_workers_exit_cleanly(runs):
  workers, _ = runs
  for i, (code, output) in enumerate(workers):
    assert code == 0, f'process {i} exited with {code}:\n{_show(output)}'


def test_checkpoint_restores_on_another_mesh(runs):
  _, (code, output) = runs
  assert 'OK restore_resharded\n' in output and code == 0, _show(output)
