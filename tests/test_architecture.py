"""The house rules of ``wn_jax/`` (docs/design.md), and the Flax / JAX internals it leans on.

Each internal listed on the design page is pinned here, so an upgrade that moves it fails
here, by name, before it fails somewhere in the middle of a layer.
"""

import ast
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from wn_jax import _data_init

PACKAGE = pathlib.Path(__file__).parent.parent / 'wn_jax'
FILES = sorted(PACKAGE.rglob('*.py'))
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 50  # of code: a docstring does not count


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
  lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
  first = node.body[0]
  if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
    lines -= first.end_lineno - first.lineno + 1  # type: ignore[operator]
  return lines


@pytest.mark.parametrize('path', FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_file_is_short(path):
  n = len(path.read_text().splitlines())
  assert n <= MAX_FILE_LINES, f'{path.name}: {n} lines'


@pytest.mark.parametrize('path', FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_short(path):
  tree = ast.parse(path.read_text())
  long = [
    (node.name, _code_lines(node))
    for node in ast.walk(tree)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    and _code_lines(node) > MAX_FUNCTION_LINES
  ]
  assert not long, f'{path.name}: functions over {MAX_FUNCTION_LINES} lines of code: {long}'


def test_no_state_forced_onto_modules():
  found = [p.name for p in FILES if 'object.__setattr__' in p.read_text()]
  assert not found


def _imports(path: pathlib.Path) -> set[str]:
  """The ``wn_jax`` modules ``path`` imports at run time (not under ``TYPE_CHECKING``)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('wn_jax'):
      out.update(f'{node.module}.{a.name}' for a in node.names)
      out.add(node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith('wn_jax'))
  return out


def test_imports_have_no_cycles():
  def name(p: pathlib.Path) -> str:
    parts = p.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)

  modules = {name(p): p for p in FILES}
  graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
  # A package's __init__ re-exports its submodules: an edge into a package is the package's.
  done: set[str] = set()

  def visit(m: str, stack: tuple[str, ...]) -> None:
    assert m not in stack, f'import cycle: {" -> ".join((*stack, m))}'
    if m in done:
      return
    for i in graph[m]:
      if not i.startswith(m + '.'):
        visit(i, (*stack, m))
    done.add(m)

  for m in graph:
    visit(m, ())


# --- the internals (each listed on the design page) ---


def test_pinned_partial_eval_pass_of_flax_scan_is_seen():
  # _data_init.is_partial_eval: Flax's scan traces its body once in a partial-evaluation
  # pass (jax._src.interpreters.partial_eval.JaxprTrace) before the loop's own trace.
  seen = []

  class Body(nn.Module):
    @nn.compact
    def __call__(self, c, x):
      k = self.param('k', nn.initializers.ones, (2,))
      seen.append(_data_init.is_partial_eval(k))
      return c, x * k

  scan = nn.scan(Body, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
  variables = scan().init(jax.random.key(0), jnp.zeros(()), jnp.ones((3, 2)))
  seen.clear()
  scan().apply(variables, jnp.zeros(()), jnp.ones((3, 2)))
  assert seen == [True, False]


def test_pinned_vmap_levels_are_read():
  # _data_init._mapped_levels reads jax._src.interpreters.batching.BatchTracer's batch_dim,
  # val and _trace: a value mapped by vmap has one level, an unmapped one none.
  def f(x, y):
    assert len(_data_init._mapped_levels(x)) == 1
    assert not _data_init._mapped_levels(y)
    return x + y

  jax.vmap(f, in_axes=(0, None))(jnp.ones((2, 3)), jnp.ones(3))
