"""Shared test helpers: the `../shared` folder of real data and official fixtures, and seeding."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

#: ``../shared`` beside the project root (CI and developers); override with GEODINO_SHARED.
SHARED = Path(os.environ.get("GEODINO_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def shared_path(*parts: str) -> Path:
    """Path under the shared folder, skipping the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: the shared data/fixtures folder is not next to this checkout")
    return path


def assert_same_chips(store: Sequence, source: Sequence) -> None:
    """The chips of a chip store equal its source's: pixels, valid masks, dtype, window, transform, CRS and
    path (both ``Sequence[geodino.data.Chip]``)."""
    assert len(store) == len(source)
    for i in range(len(source)):
        want, got = source[i], store[i]
        assert got.image.dtype == want.image.dtype
        np.testing.assert_array_equal(got.image, want.image)
        np.testing.assert_array_equal(got.valid, want.valid)
        assert (got.window, got.transform, got.crs, got.path) == (
            want.window,
            want.transform,
            want.crs,
            want.path,
        )


def load_fixture(name: str) -> dict:
    """An official-code fixture: config, float32 state dict(s), input and reference outputs."""
    folder = shared_path("fixtures", name)

    def load(file: str) -> dict | torch.Tensor:
        return torch.load(folder / file, weights_only=True)

    fixture = {"config": json.loads((folder / "config.json").read_text())}
    for file in folder.glob("*.pt"):
        obj = load(file.name)
        if file.stem.endswith("state_dict"):
            obj = {k: v.float() if v.is_floating_point() else v for k, v in obj.items()}
        fixture[file.stem] = obj
    return fixture


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread, as in DataLoader workers (torch sets it there); small ops run faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
