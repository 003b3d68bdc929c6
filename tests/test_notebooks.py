"""The notebooks in notebooks/ run top to bottom without errors (small sizes: DIFFUSION_JAX_NB_SMALL=1).

Each notebook is executed by nbclient in a fresh kernel that runs *this* interpreter: a kernel spec written to a
temporary folder points at ``sys.executable`` (a "python3" spec found on the machine could belong to another
Python), and the first code cell prints ``sys.executable``, which is checked. Figures go to a temporary folder
(``DIFFUSION_JAX_NB_OUT``). The committed files must carry no outputs.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402
from xla_env import xla_flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ["01_family_zoo", "02_trajectory_geometry", "03_nfe_vs_quality"]
CELL_TIMEOUT = 420          # seconds per cell: compile-heavy cells on 2 shared cores
KERNEL = "diffusion-jax-test"


def _read(name: str):
    return nbformat.read(os.path.join(NB_DIR, name + ".ipynb"), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    """No outputs or execution counts in git, a SMALL switch in the first code cell, valid nbformat."""
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, name
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell with saved output"
        assert "sys.path" not in cell.source, f"{name}: notebooks import the installed package"
    assert 'SMALL = os.environ.get("DIFFUSION_JAX_NB_SMALL", "0") == "1"' in code[0].source
    assert 'matplotlib.use("Agg")' in code[0].source


def _kernel_manager(tmp_path) -> KernelManager:
    """A kernel manager whose kernel runs ``sys.executable -m ipykernel_launcher``."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "diffusion_jax test kernel", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)
    assert km.kernel_spec.argv[0] == sys.executable
    return km


def _run(name: str, cwd: str, tmp_path, setup_only: bool = False) -> None:
    nb = _read(name)
    if setup_only:                             # markdown + the first code cell
        first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
        nb.cells = nb.cells[: first + 1]
    out = tmp_path / "figures"
    env = dict(os.environ, DIFFUSION_JAX_NB_SMALL="1", JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
               DIFFUSION_JAX_NB_OUT=str(out))
    env["XLA_FLAGS"] = xla_flags(1)            # one host device, whatever the calling test session set
    km = _kernel_manager(tmp_path)
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT,
                                     allow_errors=False, resources={"metadata": {"path": cwd}})
    try:
        client.execute(env=env)                # raises CellExecutionError on the first failing cell
    finally:
        # nbclient shuts down only the kernels it started itself: without this each test left its kernel
        # (~0.9 GB, a few % CPU) running until the test session ended
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    first = next(c for c in nb.cells if c.cell_type == "code")
    text = "".join(o.get("text", "") for o in first.outputs if o.output_type == "stream")
    assert "SMALL=True" in text, text
    assert f"python {sys.executable}" in text, text
    assert f"figures -> {out / name}" in text, text
    if not setup_only:
        pngs = list((out / name).glob("*.png"))
        assert pngs and all(p.stat().st_size > 1000 for p in pngs), pngs


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_from_notebooks_dir(name, tmp_path):
    _run(name, NB_DIR, tmp_path)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_setup_cell_runs_from_repo_root(name, tmp_path):
    """Started from the repository root, the setup cell finds the package and imports it."""
    _run(name, ROOT, tmp_path, setup_only=True)
