"""The notebooks execute top to bottom (they are committed with their outputs)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # make check leaves it out

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / 'notebooks').glob('*.ipynb'))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}}
  ).execute()
  errors = [
    o
    for c in nb.cells
    if c.cell_type == 'code'
    for o in c.get('outputs', [])
    if o.get('output_type') == 'error'
  ]
  assert not errors


def test_there_are_three():
  assert [p.stem for p in NOTEBOOKS] == [
    '01_weight_norm_explained',
    '02_training_with_weight_norm',
    '03_porting_from_pytorch',
  ]
