# Two commands on a fresh clone with only Python and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SRC := $(wildcard wn_jax tests benchmarks examples notebooks/*.py docs/_ext)

.PHONY: demo test check lint typecheck docs clean

# pip installs uv into the venv, and uv installs the rest: the same releases pip picks, downloaded
# and unpacked in parallel (on a fresh clone of a 2-core machine, 46 s with the venv instead of
# pip's 87 s). Bytecode is compiled at install, as pip does, so no process of the suite compiles
# a dependency's source (on machines with PYTHONDONTWRITEBYTECODE set, none would write it).
# uv reads no pip configuration: where it cannot install (a private index, no uv), pip does.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv || echo 'uv did not install: pip installs instead'
install = $(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode $(1) \
	|| $(PY) -m pip install -q $(1)

# Install once per change of pyproject.toml.
.stamp-dev: pyproject.toml | $(PY)
	$(call install,-e ".[dev]")
	touch $@

.stamp-demo: pyproject.toml | $(PY)
	$(call install,-e ".[demo]")
	touch $@

demo: .stamp-demo
	$(PY) benchmarks/convergence.py --quick

lint: .stamp-dev
	$(PY) -m ruff check $(SRC)
	$(PY) -m ruff format --check $(SRC)

typecheck: .stamp-dev
	$(PY) -m mypy

# --strict alone: --quiet would hide the warnings that --strict turns into errors.
docs: .stamp-dev
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# The quick inner loop (about a minute): lint, types, and the quick tier: the core
# and pytree tests against the float64 reference, the compile counts of tests/test_eager.py and
# every doctest of the library, and the house rules of tests/test_architecture.py. `make test` runs
# everything and is what CI runs (`pytest -m "not slow"` leaves out only the sharding, subprocess,
# notebook and built-site tests).
QUICK := tests/test_core.py tests/test_tree.py tests/test_eager.py tests/test_architecture.py wn_jax
check: lint typecheck
	$(PY) -m pytest -q -n 2 --dist loadfile $(QUICK)

# The suite compiles fast (tests/conftest.py: LLVM's optimizations off, XLA's older CPU loop
# emitters, one LLVM module per program); the range tests run once more with XLA as users get it.
# --dist loadfile: each test file runs on one worker, so the programs its tests share (the same
# layers, shapes and eager primitives) are traced, lowered and compiled once, not on both.
# lint, typecheck and docs side by side (-O: each one's output together).
test: .stamp-dev
	$(MAKE) --no-print-directory -j3 -O lint typecheck docs
	WN_JAX_SITE=site $(PY) -m pytest -q -n 2 --dist loadfile
	WN_JAX_TEST_XLA=default $(PY) -m pytest -q -n 2 tests/test_range.py

clean:
	rm -rf $(VENV) .stamp-* site
