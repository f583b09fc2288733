"""Test configuration: strict dtype promotion everywhere; x64 only where a test asks."""

import jax
import pytest
from hypothesis import settings

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
