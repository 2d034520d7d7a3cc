"""Every notebook executes headless without errors, at its small default
settings (each trains at most a tiny model for a few dozen steps), from its
own folder as Jupyter runs it (the repository root would hide imports that
only work from there)."""

import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob(
    "*.ipynb"))
# ~90 s (it trains and inspects a run): under -m slow, for CI's time budget.
SLOW = ("inspect_run.ipynb",)


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p
    for p in NOTEBOOKS], ids=lambda p: p.name)
def test_notebook_executes(path):
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}}
                          ).execute()


def test_notebooks_are_stripped():
  import json
  for path in NOTEBOOKS:
    for cell in json.loads(path.read_text())["cells"]:
      assert not cell.get("outputs"), f"{path.name} has outputs; strip them"
