"""notebooks/lns_tour.ipynb: committed without outputs, and it runs top to bottom.

Running it needs the jupyter packages of requirements.txt (nbclient, nbformat,
ipykernel); an install without them skips that test, the others still run.
"""

import json
import os
import re

import pytest

from lns_testutil import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "lns_tour.ipynb")
BUDGET_S = 240  # a cell's limit (the whole notebook takes about 60 s on 2 idle cores)


def _cells():
  with open(NOTEBOOK) as f:
    return json.load(f)["cells"]


STRIP = ("python -c \"import nbformat as f; p='notebooks/lns_tour.ipynb'; n=f.read(p, 4); "
         "[(c.update(outputs=[], execution_count=None), c.metadata.pop('execution', None)) "
         "for c in n.cells if c.cell_type == 'code']; f.write(n, p)\"")


def test_committed_without_outputs():
  """Outputs are stripped before committing (STRIP, or jupyter nbconvert --clear-output)."""
  code = [c for c in _cells() if c["cell_type"] == "code"]
  assert code
  dirty = [i for i, c in enumerate(code)
           if c.get("outputs") or c.get("execution_count") or "execution" in c["metadata"]]
  assert not dirty, f"code cells {dirty} of {NOTEBOOK} hold outputs; clear them: {STRIP}"


def test_imports_only_public_names():
  source = "\n".join("".join(c["source"]) for c in _cells() if c["cell_type"] == "code")
  assert "import lns_jax" in source
  for line in source.splitlines():
    stripped = line.strip()
    if stripped.startswith(("import ", "from ")):
      assert stripped.split()[1].split(".")[0] in {
          "lns_jax", "jax", "numpy", "matplotlib", "json", "os", "shutil", "tempfile",
          "importlib"}, line
  private = re.findall(r"\w+\._(?!_)\w*", source)  # x._name; x.__version__ is fine
  assert not private, f"the notebook uses private names: {private}"


def test_notebook_runs(monkeypatch):
  why = "the notebook test needs nbclient, nbformat and ipykernel (pip install -r requirements.txt)"
  nbclient = pytest.importorskip("nbclient", reason=why, exc_type=ImportError)
  nbformat = pytest.importorskip("nbformat", reason=why, exc_type=ImportError)
  pytest.importorskip("ipykernel", reason=why, exc_type=ImportError)
  # The kernel inherits the environment: one CPU device, as a user's notebook has, not the
  # tests' two; quick compiles (LNS_FAST_COMPILE=1 for the trainer's, conftest's XLA
  # options for every other jit and eager op).
  monkeypatch.setenv("XLA_FLAGS", xla_flags())
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("LNS_FAST_COMPILE", "1")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=BUDGET_S, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # a cell running past BUDGET_S fails (a hung kernel, not a benchmark)
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")
  images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))
  assert "max |jax.grad - Eq. 18|" in text and "written by lns-jax" in text
  assert images >= 6, f"expected the notebook's figures inline, got {images}"
