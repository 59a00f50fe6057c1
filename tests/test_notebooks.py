"""Every notebook in notebooks/ runs top to bottom (tiny settings), and is committed clean.

The notebooks read BVL_NOTEBOOK_SMOKE=1 (a few training steps instead of
minutes) and BVL_NOTEBOOK_WORKDIR (where their runs go); everything else,
including their own assertions, runs as a user would run it, in a real kernel.
Their first cell installs the package where it is missing (Colab): from the
WHEEL or REPO_URL it names, or it stops with one sentence saying to set one.
"""
import os
import subprocess
import sys
import tempfile
from unittest import mock

import nbformat
from absl.testing import absltest, parameterized
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "notebooks")
NAMES = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
# Notebooks that read a dataset of ../shared/data (they download it elsewhere).
NEEDS = {"inside_vit.ipynb": os.path.join(NOTEBOOKS, "..", "..", "shared", "data",
                                          "oxford_pets3.tar")}


class NotebooksTest(parameterized.TestCase):

  def test_there_are_notebooks(self):
    self.assertContainsSubset({"quickstart.ipynb", "inside_vit.ipynb", "mae_siglip.ipynb",
                               "hf_weights.ipynb"}, set(NAMES))

  @parameterized.parameters(*NAMES)
  def test_committed_without_outputs(self, name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    for i, cell in enumerate(nb.cells):
      if cell.cell_type == "code":
        self.assertEqual(cell.outputs, [], f"{name} cell {i} has outputs")
        self.assertIsNone(cell.execution_count, f"{name} cell {i} has an execution count")

  @parameterized.parameters(*NAMES)
  def test_install_cell_without_a_source_says_what_to_set(self, name):
    """Run by a Python that sees no installed package (-S), outside any clone."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    env = {k: v for k, v in os.environ.items()
           if k not in ("BVL_WHEEL", "BVL_REPO_URL", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-S", "-c", first.source],
                          cwd=self.create_tempdir().full_path, env=env, capture_output=True,
                          text=True, timeout=60)
    self.assertNotEqual(proc.returncode, 0)
    self.assertEqual(proc.stderr.strip().splitlines()[-1],
                     "RuntimeError: big_vision_like is not installed: set WHEEL (a .whl path "
                     "or URL) or REPO_URL (a git URL) at the top of this cell and run it again.")

  @parameterized.parameters(*NAMES)
  def test_runs_top_to_bottom(self, name):
    if name in NEEDS and not os.path.exists(NEEDS[name]):
      self.skipTest(f"{name} needs {os.path.abspath(NEEDS[name])} (absent)")
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    workdir = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
    env = {"BVL_NOTEBOOK_SMOKE": "1", "BVL_NOTEBOOK_WORKDIR": workdir}
    with mock.patch.dict(os.environ, env):
      NotebookClient(nb, timeout=900, kernel_name="python3",
                     resources={"metadata": {"path": NOTEBOOKS}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    self.assertEqual(errors, [])
    self.assertNotEmpty(outputs)


if __name__ == "__main__":
  absltest.main()
