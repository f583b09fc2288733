"""Two JAX processes (jax.distributed, gloo) train, initialize and checkpoint like one.

The test launches two workers (tests/multiprocess_worker.py) on a free localhost port, 4 host
CPU devices each, then restores their checkpoint on another mesh in its own process (8 CPU
devices, from tests/conftest.py). The launch is bounded in time, and its processes are killed
if it fails or overruns, so a hung collective fails the test instead of hanging it.

One test, so that one pytest-xdist worker launches the processes, once; it reports every
check that failed, in each process.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import pytest

from tests import multiprocess_worker

pytestmark = pytest.mark.slow  # make check leaves it out

ROOT = pathlib.Path(__file__).parent.parent
WORKER = str(ROOT / 'tests' / 'multiprocess_worker.py')
TIMEOUT_S = 900  # about 70 s of CPU per worker, so generous for a loaded machine
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


def _env() -> dict:
  return {
    **os.environ,
    # After the suite's own flags (tests/conftest.py), which the workers keep.
    'XLA_FLAGS': f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count=4',
    'JAX_PLATFORMS': 'cpu',
    'PYTHONPATH': str(ROOT),
  }


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(out: str, *argv_per_process: list[str]) -> list[tuple[int | None, str]]:
  """Runs the processes together; returns the exit code (None: killed) and output of each.

  Output goes to files (a full pipe would block a worker), read back at the end.
  """
  logs = [pathlib.Path(out) / f'process{i}.log' for i in range(len(argv_per_process))]
  procs = []
  try:
    for argv, log in zip(argv_per_process, logs):
      with open(log, 'w') as f:
        procs.append(
          subprocess.Popen(
            [sys.executable, WORKER, *argv], cwd=ROOT, env=_env(), stdout=f, stderr=f
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


def _show(output: str) -> str:
  return output[-4000:]


def test_two_processes_equal_one(tmp_path):
  port = str(_free_port())
  workers = _launch(str(tmp_path), *([str(i), port, str(tmp_path)] for i in range(2)))
  failures = [
    f'process {i}: no OK {name}'
    for i, (_, output) in enumerate(workers)
    for name in CHECKS
    if f'OK {name}\n' not in output
  ]
  failures += [
    f'process {i} exited with {code}' for i, (code, _) in enumerate(workers) if code != 0
  ]
  assert not failures, '\n'.join(
    failures + [f'process {i}:\n{_show(output)}' for i, (_, output) in enumerate(workers)]
  )
  # The checkpoint the two processes saved, restored here on a 2 x 4 mesh, resharded.
  multiprocess_worker.restore_resharded(str(tmp_path), jax.devices('cpu'))
