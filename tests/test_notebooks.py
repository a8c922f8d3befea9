"""The notebooks run top to bottom (code cells executed in order, in a temporary folder) and leave the
results they show: the quickstart a PCA map of the scene; the pretraining one a falling loss, a k-NN probe
of the teacher at every 10 steps, an exported teacher and feature maps that pretraining changed."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def check_quickstart(ns: dict) -> None:
    assert ns["pca"].shape == (3, 32, 32) and ns["pca"].max() > 0


def check_pretrain(ns: dict) -> None:
    losses = np.array(ns["losses"])
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert losses[-10:].mean() < losses[:10].mean()
    assert (ns["out"] / "teacher_checkpoint.pth").is_file()
    probes = ns["probe"].history
    assert [h["step"] for h in probes] == [0, 10, 20, 30, 40]
    assert all(0 < h["knn_miou"] <= 1 and 0 < h["knn_accuracy"] <= 1 for h in probes)
    before, after = (ns["maps"][k].features for k in ("random init", "pretrained"))
    assert before.shape == after.shape == (64, 48, 48) and not np.allclose(before, after)


#: What each notebook must leave in its namespace.
CHECKS = {"01_quickstart.ipynb": check_quickstart, "02_pretrain.ipynb": check_pretrain}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(notebook, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    cells = json.loads(notebook.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{notebook.name}", "exec"), namespace)
    CHECKS[notebook.name](namespace)
