"""The probe helpers of ``benchmarks/learning_signal.py`` give known answers on synthetic features.

Pixel features of windows are stitched back to the image's patch grid; the k-NN and linear probes reach
high accuracy on separable features and stay near chance on random ones (the shared probe functions of
``geodino.train.probe`` are tested in ``test_probe.py``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_signal.py"


@pytest.fixture(scope="module")
def ls():
    spec = importlib.util.spec_from_file_location("learning_signal", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["learning_signal"] = module  # dataclasses resolve their module by name
    sys.path.insert(0, str(SCRIPT.parent))  # its sibling results_md, as when run as a script
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))
        del sys.modules["learning_signal"]


def test_window_features_are_stitched_row_major(ls) -> None:
    image = torch.randn(3, 128, 256)
    dense, pooled = ls.pixel_extractor(16)(image)
    assert dense.shape == (8 * 16, 768) and pooled.shape == (2, 768)
    # patch (r, c) of the row-major grid holds the pixels of rows 16r.., columns 16c..
    r, c = 2, 13
    patch = image[:, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16]
    torch.testing.assert_close(dense[r * 16 + c], patch.flatten())
    grid = dense.reshape(8, 16, 768)
    torch.testing.assert_close(pooled[1], grid[:, 8:].mean(dim=(0, 1)))  # the right 128 px window
    # per-window patch features [n_windows, (size/p)², D] (32 px windows) back on the image grid
    per_window = ls.windows(grid.permute(2, 0, 1), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ls.stitch(per_window, (128, 256), 32, 16), dense)


@pytest.mark.parametrize("probe", ["knn", "linear"])
def test_probes_separate_separable_features_and_not_random_ones(ls, probe: str) -> None:
    g = torch.Generator().manual_seed(0)
    n, classes = 300, 4
    y = torch.arange(n) % classes
    groups = torch.arange(n) // (n // 3)  # 3 folds
    centres = torch.randn(classes, 16, generator=g) * 3
    separable = centres[y] + torch.randn(n, 16, generator=g)
    noise = torch.randn(n, 16, generator=g)
    fn = ls.knn_predict if probe == "knn" else lambda x, t, z: ls.linear_predict(x, t, z, 1e-4)
    good = np.mean(ls.leave_one_group_out(separable, y, groups, fn), axis=0)
    chance = np.mean(ls.leave_one_group_out(noise, y, groups, fn), axis=0)
    assert good[0] > 0.95 and good[1] > 0.9
    assert 0.1 < chance[0] < 0.4  # 4 balanced classes: 0.25
    majority = ls.leave_one_group_out(noise, y, groups, ls.majority_probe)
    assert all(acc == pytest.approx(0.25) for acc, _ in majority)
