"""Executes notebooks/quickstart.ipynb end to end with nbclient and checks the numbers it prints.

The notebook trains a small flow-matching model and a VP score SDE on eight Gaussians, samples them
with three registered samplers and computes the PF-ODE log-likelihood; its last code cell prints
``RESULT {json}``. ~40 s of CPU time: 60 s on 2 shared CPU cores, ~80 s when they are heavily shared.
Nothing is written to the repository: the executed notebook stays in memory.
"""
import json
import math
import os
import sys

import pytest

from tests.subproc import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def _stream_text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream" and o.get("name") == "stdout":
                out.append(o.get("text", ""))
    return "".join(out)


def test_quickstart_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "save the notebook with outputs cleared"


@pytest.mark.slow  # 60 s on 2 moderately shared CPU cores, ~80 s when heavily shared
def test_quickstart_runs_and_results_are_sane(monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this environment: put the repository on its path (the notebook also finds it
    # from the working directory) and keep JAX on the CPU quietly.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    before = set(os.listdir(REPO)) | {os.path.join("notebooks", f) for f in os.listdir(os.path.join(REPO, "notebooks"))}

    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": REPO}})
    client.execute()  # raises CellExecutionError on the first failing cell

    after = set(os.listdir(REPO)) | {os.path.join("notebooks", f) for f in os.listdir(os.path.join(REPO, "notebooks"))}
    assert after == before, f"the notebook wrote files into the repository: {sorted(after - before)}"

    text = _stream_text(nb)
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one RESULT line, got {len(lines)}:\n{text[-2000:]}"
    r = json.loads(lines[0][len("RESULT "):])

    # the kernel ran this interpreter (jupyter_client maps the kernelspec's "python" to sys.executable)
    assert os.path.realpath(r["python"]) == os.path.realpath(sys.executable)
    scalars = {k: v for k, v in r.items() if isinstance(v, float)}
    assert all(math.isfinite(v) for v in scalars.values()), scalars
    for m in ("rf", "vp"):
        assert r[f"{m}_loss_final"] < r[f"{m}_loss_first"], (m, r[f"{m}_loss_first"], r[f"{m}_loss_final"])
        # held-out NLL: well below the moment-matched Gaussian, not (much) below the data entropy
        assert r["data_nll"] - 0.1 < r[f"{m}_nll"] < r["gaussian_nll"] - 1.0, (m, r[f"{m}_nll"], r)
        mmd = r[f"{m}_mmd"]
        assert len(mmd) == 6 and all(math.isfinite(v) for v in mmd.values()), mmd
        # the best sampler setting is far closer to the data than the moment-matched Gaussian
        assert min(mmd.values()) < 0.3 * r["gaussian_mmd"], (m, mmd, r["gaussian_mmd"])
    # plots were produced (one per step)
    n_png = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert n_png >= 7, n_png
