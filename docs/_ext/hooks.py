"""mkdocs hooks for the wn_jax site.

- Math: pages and docstrings write TeX as ``$...$`` (inline) and ``$$ ... $$`` (block);
  ``pymdownx.arithmatex`` (generic mode) marks it, and ``on_page_content`` converts each piece to
  MathML at build time with latex2mathml. Browsers render MathML natively (Chromium 109+,
  Firefox, Safari): the site needs no JavaScript, no fonts and no network for math.
- Notebooks: ``notebooks/*.ipynb`` become pages (Markdown and code cells with their committed
  outputs; they are not executed here: tests/test_notebooks.py executes them).
- Benchmarks: ``benchmarks/results/*.md`` and their plots become pages under ``performance/``,
  each listed in the Performance section of the nav (a new results file needs no edit here).
- ``CHANGELOG.md`` (repository root) becomes ``changelog.md``.
- ``WN_JAX_DOCS_SELFTEST=1`` makes the build log one warning, so tests/test_docs.py can check
  that the Makefile's build turns warnings into errors.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import pathlib
import re
from typing import Any

from latex2mathml.converter import convert
from mkdocs.structure.files import File
from mkdocs.structure.files import Files

ROOT = pathlib.Path(__file__).resolve().parents[2]
log = logging.getLogger('mkdocs.hooks.wn_jax')

# What pymdownx.arithmatex (generic: true) writes for $...$ and $$...$$.
_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)


def to_mathml(tex: str, *, display: str, where: str) -> str:
  """One TeX formula (HTML-escaped, as arithmatex leaves it) as MathML."""
  tex = html.unescape(tex).strip()
  mathml = convert(tex, display=display)
  # latex2mathml keeps a command it does not know as text: a build error, not a raw formula.
  if re.search(r'>\\[A-Za-z]', mathml):
    log.warning('%s: cannot render TeX %r to MathML', where, tex)
  return mathml


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
  where = page.file.src_uri
  html_text = _BLOCK.sub(
    lambda m: (
      f'<div class="math-block">{to_mathml(m.group(1), display="block", where=where)}</div>'
    ),
    html_text,
  )
  return _INLINE.sub(lambda m: to_mathml(m.group(1), display='inline', where=where), html_text)


def _fence(text: str, lang: str) -> str:
  ticks = '```'
  while ticks in text:
    ticks += '`'
  return f'{ticks}{lang}\n{text.rstrip()}\n{ticks}\n'


def _output(text: str) -> str:
  return f'<div class="nb-output" markdown="1">\n\n{_fence(text, "text")}\n</div>\n'


def notebook_markdown(path: pathlib.Path, images: dict[str, bytes]) -> str:
  """A notebook as Markdown: cells in order, outputs as committed. Images go in ``images``."""
  nb = json.loads(path.read_text())
  note = (
    f'!!! note "Notebook `notebooks/{path.name}`"\n'
    '    Shown with the outputs committed in the repository; `make test` executes it '
    '(tests/test_notebooks.py). Run it yourself with `jupyter lab notebooks/` '
    'after `make test` has built `.venv`.\n'
  )
  parts = []
  for i, cell in enumerate(nb['cells']):
    source = ''.join(cell['source'])
    if cell['cell_type'] == 'markdown':
      if note and source.startswith('# '):  # the title first, so mkdocs takes the page title
        title, _, rest = source.partition('\n')
        source = f'{title}\n\n{note}\n{rest}'
        note = ''
      parts.append(source + '\n')
      continue
    if cell['cell_type'] != 'code':
      continue
    parts.append(_fence(source, 'python'))
    for j, out in enumerate(cell.get('outputs', [])):
      kind = out['output_type']
      if kind == 'stream':
        parts.append(_output(''.join(out['text'])))
      elif kind == 'error':
        raise ValueError(f'{path.name}: cell {i} has a committed error output; rerun the notebook')
      else:
        data = out.get('data', {})
        if 'image/png' in data:
          name = f'{path.stem}_{i}_{j}.png'
          images[name] = base64.b64decode(''.join(data['image/png']))
          parts.append(f'![output of cell {i}]({name})\n')
        elif 'text/html' in data:
          parts.append(
            '<div class="nb-output" markdown="0">\n' + ''.join(data['text/html']) + '\n</div>\n'
          )
        elif 'text/plain' in data:
          parts.append(_output(''.join(data['text/plain'])))
  return note + '\n'.join(parts)


def on_config(config: Any) -> Any:
  for entry in config['nav'] or []:
    if isinstance(entry, dict) and 'Performance' in entry:
      section = entry['Performance']
      listed = {x if isinstance(x, str) else next(iter(x.values())) for x in section}
      for path in sorted((ROOT / 'benchmarks' / 'results').glob('*.md')):
        page = f'performance/results/{path.name}'
        if page not in listed:
          section.append(page)
  return config


def on_files(files: Files, config: Any) -> Files:
  if os.environ.get('WN_JAX_DOCS_SELFTEST'):
    log.warning('WN_JAX_DOCS_SELFTEST: a deliberate warning')
  files.append(File.generated(config, 'changelog.md', abs_src_path=str(ROOT / 'CHANGELOG.md')))
  for path in sorted((ROOT / 'notebooks').glob('*.ipynb')):
    images: dict[str, bytes] = {}
    text = notebook_markdown(path, images)
    files.append(File.generated(config, f'notebooks/{path.stem}.md', content=text))
    for name, data in images.items():
      files.append(File.generated(config, f'notebooks/{name}', content=data))
  for path in sorted((ROOT / 'benchmarks' / 'results').iterdir()):
    if path.suffix in ('.md', '.png', '.svg'):
      files.append(
        File.generated(config, f'performance/results/{path.name}', abs_src_path=str(path))
      )
  return files
