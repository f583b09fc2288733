"""The docs site: every guide's code runs, and the built site is whole.

- Every ``python`` code block in ``docs/**/*.md`` runs, page by page in one namespace (blocks
  with ``>>>`` as doctests, others as plain code), so the guides cannot drift from the library.
- The built site (``make docs``; or built here when ``WN_JAX_SITE`` does not name one) has no
  broken internal link or anchor, no raw math or Sphinx/RST markup left in any page, math
  that became MathML, and every public name documented on exactly one API page.
"""

from __future__ import annotations

import doctest
import html.parser
import importlib
import os
import pathlib
import posixpath
import re
import subprocess
import sys
import urllib.parse

import pytest

# Slow (make check leaves it out). make test runs each file on one worker (--dist loadfile), so
# the built site, a session-scoped fixture, is read or built once.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
PAGES = sorted(p for p in DOCS.rglob('*.md') if 'api' not in p.relative_to(DOCS).parts)
PUBLIC_MODULES = ['wn_jax', 'wn_jax.linen', 'wn_jax.nnx', 'wn_jax.optim', 'wn_jax.pytorch']

FENCE = re.compile(
  r'^(?P<indent> *)(?P<ticks>```+)(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=ticks)\s*$',
  re.M | re.S,
)


def code_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
  """The ``python`` fenced blocks of a Markdown page: (line number, code)."""
  text = path.read_text()
  blocks = []
  for m in FENCE.finditer(text):
    if m.group('info').strip().split(' ')[0] not in ('python', 'py', 'pycon'):
      continue
    indent = len(m.group('indent'))
    body = '\n'.join(line[indent:] for line in m.group('body').splitlines())
    blocks.append((text.count('\n', 0, m.start()) + 2, body + '\n'))
  return blocks


@pytest.mark.standard_promotion  # guides show user code, which runs under JAX's default promotion
@pytest.mark.parametrize('path', PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_guide_code_runs(path, monkeypatch):
  blocks = code_blocks(path)
  if path.parent.name == 'guides' or path.name in ('getting-started.md', 'concepts.md'):
    assert blocks, f'{path.relative_to(ROOT)} has no python code to run'
  monkeypatch.chdir(ROOT)  # as a user in a clone: guides read examples/ and tests/data/
  globs: dict = {'__name__': f'docs_{path.stem}'}
  parser = doctest.DocTestParser()
  flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
  for line, code in blocks:
    where = f'{path.relative_to(ROOT)}:{line}'
    if '>>>' in code:
      test = parser.get_doctest(code, globs, where, str(path), line)
      runner = doctest.DocTestRunner(optionflags=flags)
      out: list[str] = []
      runner.run(test, out=out.append, clear_globs=False)
      assert not runner.failures, ''.join(out)
      globs.update(test.globs)  # DocTest runs in a copy: carry its names to the next block
    else:
      exec(compile(code, where, 'exec'), globs)  # noqa: S102


def test_readme_links_resolve():
  """The README, the front door, links to the docs pages and files that exist."""
  text = (ROOT / 'README.md').read_text()
  targets = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', text)
  local = [t for t in targets if not urllib.parse.urlsplit(t).scheme]
  assert local, 'the README links to no docs page'
  missing = [t for t in local if not (ROOT / t).exists()]
  assert not missing, missing


# The built site.


def _make_docs_command(site_dir: pathlib.Path) -> list[str]:
  """The Makefile's ``docs`` build command line, writing to ``site_dir``."""
  recipe = (ROOT / 'Makefile').read_text().split('\ndocs:', 1)[1]
  line = next(ln for ln in recipe.splitlines() if 'mkdocs build' in ln)
  args = line.split('mkdocs build', 1)[1].split()
  i = args.index('--site-dir')
  args[i + 1] = str(site_dir)
  return [sys.executable, '-m', 'mkdocs', 'build', *args]


def test_make_docs_fails_on_a_warning(tmp_path):
  """``make docs`` turns any warning into a failed build (``--quiet`` would silence ``--strict``)."""
  proc = subprocess.run(
    _make_docs_command(tmp_path),
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, 'NO_MKDOCS_2_WARNING': '1', 'WN_JAX_DOCS_SELFTEST': '1'},
  )
  assert proc.returncode != 0, proc.stdout + proc.stderr
  assert 'WN_JAX_DOCS_SELFTEST' in proc.stderr


@pytest.fixture(scope='session')
def site(tmp_path_factory) -> pathlib.Path:
  """The site ``make docs`` built (``WN_JAX_SITE``), or one built here with ``--strict``."""
  given = os.environ.get('WN_JAX_SITE')
  if given:
    path = pathlib.Path(given)
    assert (path / 'index.html').exists(), f'WN_JAX_SITE={given} holds no built site'
    return path
  out = tmp_path_factory.mktemp('site')
  proc = subprocess.run(
    _make_docs_command(out),
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'},
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return out


class Page(html.parser.HTMLParser):
  """Links, ids, doc headings and the text outside code and math of one HTML page."""

  SKIP = {'code', 'pre', 'script', 'style', 'math', 'svg', 'textarea'}

  def __init__(self, text: str):
    super().__init__(convert_charrefs=True)
    self.links: list[str] = []
    self.resources: list[str] = []  # what the browser loads by itself: scripts, styles, images
    self.ids: set[str] = set()
    self.doc_headings: list[str] = []
    self.text: list[str] = []
    self.math_text: list[str] = []
    self._skip: list[str] = []
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if a.get('id'):
      self.ids.add(a['id'])
    if tag in ('h1', 'h2', 'h3', 'h4', 'h5', 'h6') and 'doc-heading' in (a.get('class') or ''):
      self.doc_headings.append(a.get('id') or '')
    for key in ('href', 'src'):
      if a.get(key) and tag in ('a', 'img', 'link', 'script'):
        self.links.append(a[key])
        if tag != 'a':
          self.resources.append(a[key])
    if tag in self.SKIP:
      self._skip.append(tag)

  def handle_endtag(self, tag):
    if self._skip and self._skip[-1] == tag:
      self._skip.pop()

  def handle_data(self, data):
    if not self._skip:
      self.text.append(data)
    elif self._skip[0] == 'math':
      self.math_text.append(data)


def _pages(site: pathlib.Path) -> dict[str, Page]:
  return {
    p.relative_to(site).as_posix(): Page(p.read_text())
    for p in sorted(site.rglob('*.html'))
    if p.name != '404.html'
  }


@pytest.fixture(scope='session')
def pages(site) -> dict[str, Page]:
  return _pages(site)


def test_site_has_every_page(pages):
  for name in [
    'index.html',
    'getting-started.html',
    'changelog.html',
    'performance/index.html',
    'api/core.html',
  ]:
    assert name in pages
  for nb in sorted((ROOT / 'notebooks').glob('*.ipynb')):
    assert f'notebooks/{nb.stem}.html' in pages
  for guide in sorted((DOCS / 'guides').glob('*.md')):
    assert f'guides/{guide.stem}.html' in pages
  for result in sorted((ROOT / 'benchmarks' / 'results').glob('*.md')):
    assert f'performance/results/{result.stem}.html' in pages


def test_no_broken_internal_links(site, pages):
  broken = []
  for name, page in pages.items():
    for link in page.links:
      url = urllib.parse.urlsplit(link)
      if url.scheme or url.netloc or link.startswith(('mailto:', 'data:', 'javascript:')):
        continue
      target = (
        posixpath.normpath(posixpath.join(posixpath.dirname(name), url.path)) if url.path else name
      )
      path = site / urllib.parse.unquote(target)
      if path.is_dir():
        path = path / 'index.html'
        target = posixpath.join(target, 'index.html')
      if not path.exists():
        broken.append(f'{name}: {link} (no {target})')
      elif url.fragment and path.suffix == '.html':
        ids = pages[target].ids if target in pages else Page(path.read_text()).ids
        if urllib.parse.unquote(url.fragment) not in ids:
          broken.append(f'{name}: {link} (no id {url.fragment!r} in {target})')
  assert not broken, '\n'.join(broken)


def test_site_loads_nothing_from_the_network(pages):
  """No web fonts, CDN scripts or remote images: math and all render offline."""
  remote = [
    f'{name}: {url}'
    for name, page in pages.items()
    for url in page.resources
    if urllib.parse.urlsplit(url).scheme or url.startswith('//')
  ]
  assert not remote, '\n'.join(remote)


RAW = {
  'Sphinx role': re.compile(r':(?:math|func|class|meth|mod|attr|data|obj|exc|ref|doc):'),
  'RST directive': re.compile(r'^\s*\.\. [a-z-]+::', re.M),
  'RST table rule': re.compile(r'^\s*={3,}(\s+={3,})+\s*$', re.M),
  'TeX delimiters': re.compile(r'\$\$|\\\(|\\\)|\\\[|\\\]'),
  'TeX between dollars': re.compile(r'\$[^$\n]*\\[A-Za-z]+[^$\n]*\$'),
  'TeX command': re.compile(
    r'\\(?:frac|lVert|rVert|sqrt|sum|cdot|nabla|sigma|mu|qquad|mathbf|odot|top)\b'
  ),
}


def _assert_mathml(site: pathlib.Path, names: list[str]) -> None:
  for name in names:
    text = (site / name).read_text()
    assert '<math' in text and 'class="arithmatex"' not in text, name


@pytest.mark.parametrize('group', ['guides', 'api'])
def test_no_raw_math_or_markup(site, pages, group):
  """No raw TeX, Sphinx role or RST markup on any page; the math became MathML."""
  if group == 'api':
    _assert_mathml(site, ['api/core.html', 'api/optim.html'])
  else:
    _assert_mathml(site, ['getting-started.html', 'notebooks/01_weight_norm_explained.html'])
  found = []
  for name, page in pages.items():
    if name.startswith('api/') != (group == 'api'):
      continue
    text = ''.join(page.text)
    for what, pattern in RAW.items():
      for m in pattern.finditer(text):
        found.append(f'{name}: {what}: ...{text[max(0, m.start() - 40) : m.end() + 40]!r}...')
    math = ''.join(page.math_text)
    if '\\' in math:
      found.append(f'{name}: a TeX command MathML could not render: {math!r}')
  assert not found, '\n'.join(found)


def _public() -> dict[int, tuple[object, set[str]]]:
  """Every public object (by identity) with all its public dotted names."""
  found: dict[int, tuple[object, set[str]]] = {}
  for modname in PUBLIC_MODULES:
    module = importlib.import_module(modname)
    names = getattr(module, '__all__', None)
    if names is None:
      names = [
        n
        for n, obj in vars(module).items()
        if not n.startswith('_') and getattr(obj, '__module__', None) == modname
      ]
    for n in names:
      obj = getattr(module, n)
      found.setdefault(id(obj), (obj, set()))[1].add(f'{modname}.{n}')
  return found


def test_every_public_name_on_exactly_one_api_page(pages):
  where: dict[str, list[str]] = {}
  for name, page in pages.items():
    if name.startswith('api/'):
      for heading in page.doc_headings:
        where.setdefault(heading, []).append(name)
  wrong = []
  for obj, names in _public().values():
    if isinstance(obj, type(sys)):
      continue  # a submodule: it has its own page
    pages_of = sorted(p for n in names for p in where.get(n, []))
    if len(pages_of) != 1:
      wrong.append(f'{sorted(names)}: on {pages_of or "no API page"}')
  assert not wrong, 'each public name must be on exactly one API page:\n' + '\n'.join(wrong)
  for modname in PUBLIC_MODULES[1:]:
    assert modname in where, f'{modname} has no API page'
