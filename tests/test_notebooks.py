"""The notebooks run end to end (small settings) and are stored without outputs.

Each notebook reads MTJAX_NOTEBOOK_QUICK=1 in its parameters cell and shrinks
itself to seconds. They run in a fresh python3 kernel of this interpreter
(jupyter_client starts the 'python3' kernel spec with sys.executable), which
inherits this process's environment. The quickstart runs on conftest.py's 8
fake CPU devices (its mesh and sharded train step, as on a Colab TPU); the
others on one device, which compiles faster.
"""
import pathlib
import time

import pytest

from job_env import job_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] /
                    "notebooks").glob("*.ipynb"))
INSTALL = 'pip install -q "git+https://github.com/'
DEVICES = {"quickstart": 8}  # others: 1


def _ids(paths):
  return [p.stem for p in paths]


def test_there_are_notebooks():
  assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "routing",
                                        "soft_injection"}, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  code = [c for c in nb.cells if c.cell_type == "code"]
  dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
           and (c.outputs or c.execution_count is not None)]
  assert not dirty, (f"{path.name}: code cells {dirty} hold outputs; strip "
                     "them (jupyter nbconvert --clear-output --inplace)")
  # Colab: the first code cell installs mtjax unless it is importable.
  first = code[0].source
  assert INSTALL in first and "import mtjax" in first and "except ImportError" \
      in first, first
  params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and "MTJAX_NOTEBOOK_QUICK" in params[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_runs_end_to_end(path, tmp_path, monkeypatch):
  monkeypatch.setenv("MTJAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("XLA_FLAGS",
                     job_env(DEVICES.get(path.stem, 1))["XLA_FLAGS"])
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  start = time.monotonic()
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name} failed:\n{e}")
  took = time.monotonic() - start
  errors = [o for c in nb.cells if c.cell_type == "code"
            for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if "image/png" in o.get("data", {})]
  assert figures, f"{path.name} drew no figure"
  print(f"\n[notebooks] {path.name} ran in {took:.0f}s")
