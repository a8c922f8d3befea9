"""Chip store: exact roundtrip of chips and chip table, crash-safe resume, mismatch errors, DataLoader."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio.warp
import shapely
import torch
import zarr
from conftest import assert_same_chips, shared_path
from geopandas.testing import assert_geodataframe_equal
from torch.utils.data import DataLoader

from geodino.data.chipstore import ChipStore, ChipStoreDataset, write_chip_store
from geodino.data.synthetic import make_scene
from geodino.data.tiling import Chip, RasterFileError, RasterTiler


class LoggedSource:
    """A chip source that logs every index it reads to a file (shared by threads and processes) and
    raises on indexes ``>= fail_at``, as a crash in the middle of a write would."""

    def __init__(self, tiler: RasterTiler, log: Path, fail_at: int | None = None) -> None:
        self.tiler, self.log, self.fail_at = tiler, log, fail_at

    def __len__(self) -> int:
        return len(self.tiler)

    def __getitem__(self, index: int) -> Chip:
        with self.log.open("a") as f:
            f.write(f"{index}\n")
        if self.fail_at is not None and index >= self.fail_at:
            raise RuntimeError(f"simulated crash at chip {index}")
        return self.tiler[index]

    def reads(self) -> list[int]:
        return [int(v) for v in self.log.read_text().split()] if self.log.exists() else []


class EditedAt:
    """A chip source whose chip ``index`` is replaced by ``edit(chip)``."""

    def __init__(self, tiler: RasterTiler, index: int, edit: Callable[[Chip], Chip]) -> None:
        self.tiler, self.index, self.edit = tiler, index, edit

    def __len__(self) -> int:
        return len(self.tiler)

    def __getitem__(self, index: int) -> Chip:
        chip = self.tiler[index]
        return self.edit(chip) if index == self.index else chip


def crop(chip: Chip) -> Chip:
    return replace(chip, image=chip.image[:, :-1, :-1], valid=chip.valid[:-1, :-1])


def blank(chip: Chip) -> Chip:
    return replace(chip, image=np.zeros_like(chip.image), valid=np.zeros_like(chip.valid))


def window_and_image(chip: Chip) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(chip.window.flatten()), torch.from_numpy(chip.image.astype(np.float32))


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    make_scene(path, size=480, seed=3)
    return path


@pytest.fixture
def tiler(scene: Path) -> RasterTiler:
    # 480 px in 128 px chips: the last row and column extend 32 px past the edge (padded chips).
    return RasterTiler(scene, size=128)


def assert_same_store(a: ChipStore, b: ChipStore) -> None:
    ra, rb = zarr.open_group(a.path, mode="r"), zarr.open_group(b.path, mode="r")
    for name in ("image", "valid", "transform", "window", "crs", "raster"):
        np.testing.assert_array_equal(ra[name][:], rb[name][:])
    assert ra.attrs.asdict() == rb.attrs.asdict()
    assert_geodataframe_equal(a.chips, b.chips)


def interrupted(path: Path, tiler: RasterTiler, log: Path, fail_at: int) -> None:
    with pytest.raises(RuntimeError, match="simulated crash") as err:
        write_chip_store(path, LoggedSource(tiler, log, fail_at), batch_size=4, progress=False)
    assert "call write_chip_store again" in str(err.value.__notes__)


def test_synthetic_roundtrip_layout_and_table(tmp_path: Path, tiler: RasterTiler) -> None:
    assert tiler.windows[-1].col_off + 128 > tiler.width  # edge chips exist
    store = write_chip_store(tmp_path / "s.zarr", tiler, batch_size=5, progress=False)  # 16 = 3 x 5 + 1
    assert_same_chips(store, tiler)

    root = zarr.open_group(store.path, mode="r")
    assert root["image"].shape == (16, 4, 128, 128) and root["image"].chunks == (1, 4, 128, 128)
    assert root["valid"].dtype == bool and root["valid"].chunks == (1, 128, 128)
    assert root["window"].dtype == np.int64 and root["transform"].dtype == np.float64
    assert root.attrs["complete"] and root.attrs["raster"] == [str(tiler.path)]
    assert "batches" not in root  # commit records are removed once complete

    table = store.chips
    assert list(table.columns) == ["raster", "col_off", "row_off", "width", "height", "crs", "geometry"]
    assert table.crs.to_epsg() == 4326 and (table["crs"] == tiler.crs.to_wkt()).all()
    for row, window in zip(table.itertuples(), tiler.windows, strict=True):
        assert (row.col_off, row.row_off, row.width, row.height) == window.flatten()
        c0, r0, c1, r1 = row.col_off, row.row_off, row.col_off + 128, row.row_off + 128
        corners = [tiler.transform @ cr for cr in [(c0, r0), (c1, r0), (c1, r1), (c0, r1)]]
        lon, lat = rasterio.warp.transform(tiler.crs, "EPSG:4326", *zip(*corners, strict=True))
        assert shapely.equals_exact(row.geometry, shapely.Polygon(zip(lon, lat, strict=True)), tolerance=1e-9)

    reopened = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(reopened[-1].image, tiler[15].image)


def test_blank_chip_has_no_chunk_but_reads_back(tmp_path: Path, tiler: RasterTiler) -> None:
    # zarr skips chunks equal to the fill value (write_empty_chunks=False): chunk files cannot mark
    # written chips, the commit records do.
    source = EditedAt(tiler, 3, blank)
    store = write_chip_store(tmp_path / "s.zarr", source, batch_size=4, progress=False)
    assert not (store.path / "image" / "c" / "3" / "0" / "0" / "0").exists()
    assert (store.path / "image" / "c" / "2" / "0" / "0" / "0").exists()
    assert_same_chips(store, source)


def test_real_raster_with_given_table(tmp_path: Path) -> None:
    tiler = RasterTiler(shared_path("data", "rasters", "RGB.byte.tif"), size=256, stride=200)
    fresh = write_chip_store(tmp_path / "built.zarr", tiler, progress=False)
    assert_same_chips(fresh, tiler)
    assert fresh.chips.geometry.is_valid.all() and fresh.chips.total_bounds[0] < -76  # Bahamas, west of 76 W

    table = fresh.chips.assign(valid_fraction=[c.valid.mean() for c in tiler])
    store = write_chip_store(
        tmp_path / "given.zarr", tiler, chips=table, scheduler="synchronous", progress=False
    )
    assert_geodataframe_equal(store.chips, table)
    with pytest.raises(ValueError, match="differs from row 1 of the chip table"):
        write_chip_store(tmp_path / "bad.zarr", tiler, chips=table.assign(col_off=0), progress=False)


def test_interrupted_write_resumes_only_missing_chips(tmp_path: Path, tiler: RasterTiler) -> None:
    path = tmp_path / "s.zarr"
    interrupted(path, tiler, tmp_path / "crash.log", fail_at=9)  # batches of 4: chips 0-7 commit

    assert path.exists()
    with pytest.raises(ValueError, match=r"incomplete chip store \(8 of 16 chips written\); resume it"):
        ChipStore(path)
    partial = ChipStore(path, allow_incomplete=True)
    np.testing.assert_array_equal(partial.written, np.arange(16) < 8)
    np.testing.assert_array_equal(partial[7].image, tiler[7].image)
    with pytest.raises(ValueError, match="chip 8 is not written yet"):
        partial[8]
    with pytest.raises(ValueError, match="no chip table yet"):
        _ = partial.chips

    source = LoggedSource(tiler, tmp_path / "resume.log")
    store = write_chip_store(path, source, batch_size=4, progress=False)
    assert sorted(source.reads()) == list(range(8, 16))  # each missing chip read once, nothing else
    assert_same_store(store, write_chip_store(tmp_path / "fresh.zarr", tiler, batch_size=4, progress=False))

    again = LoggedSource(tiler, tmp_path / "again.log")
    assert write_chip_store(path, again, progress=False).complete and again.reads() == []


def test_mismatched_source_errors(tmp_path: Path, tiler: RasterTiler, scene: Path) -> None:
    path = tmp_path / "s.zarr"
    interrupted(path, tiler, tmp_path / "crash.log", fail_at=5)
    with pytest.raises(ValueError, match=r"holds 16 chips but the source has 64.*overwrite=True"):
        write_chip_store(path, RasterTiler(scene, size=64), progress=False)
    other_size = RasterTiler(scene, size=160, stride=128)  # also 16 chips, but 160 px
    assert len(other_size) == 16
    with pytest.raises(RasterFileError, match=r"scene.tif, chip 4: image \(4, 160, 160\).*overwrite=True"):
        write_chip_store(path, other_size, progress=False)
    store = write_chip_store(path, other_size, overwrite=True, progress=False)
    assert store.height == 160 and store.complete

    with pytest.raises(RasterFileError, match=r"scene.tif, chip 6: image \(4, 127, 127\)"):
        write_chip_store(tmp_path / "cropped.zarr", EditedAt(tiler, 6, crop), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    with pytest.raises(ValueError, match="not a"):
        write_chip_store(tmp_path / "other", tiler, progress=False)


def test_dataloader_workers_read_every_chip(tmp_path: Path, tiler: RasterTiler) -> None:
    store = write_chip_store(tmp_path / "s.zarr", tiler, progress=False)
    store[0]  # arrays opened in the parent: workers must reopen their own
    loader = DataLoader(ChipStoreDataset(store, transform=window_and_image), batch_size=5, num_workers=2)
    windows, images = (torch.cat(parts) for parts in zip(*loader, strict=True))
    assert windows.tolist() == [list(w.flatten()) for w in tiler.windows]
    torch.testing.assert_close(images, torch.stack([window_and_image(c)[1] for c in tiler]))


def test_a_store_of_another_chip_table_is_refused(tmp_path: Path, tiler: RasterTiler) -> None:
    """A table sampled again (same length, other windows) must not resume, or reuse, a store written from the
    first one: its pixels would pass for the new table's chips."""
    table = write_chip_store(tmp_path / "ref.zarr", tiler, progress=False).chips
    other = table.iloc[::-1].reset_index(drop=True)  # the same number of chips, other windows per row
    path = tmp_path / "s.zarr"
    crashing = LoggedSource(tiler, tmp_path / "crash.log", fail_at=9)  # batches of 4: chips 0-7 commit
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_chip_store(path, crashing, chips=table, batch_size=4, scheduler="synchronous", progress=False)
    refused = r"s\.zarr: chip 0 was written from window \(0, 0, .*another chip table.*overwrite=True"
    with pytest.raises(ValueError, match=refused):
        write_chip_store(path, tiler, chips=other, progress=False)
    store = write_chip_store(path, tiler, chips=table, progress=False)  # the same table resumes
    fresh = write_chip_store(tmp_path / "fresh.zarr", tiler, chips=table, batch_size=4, progress=False)
    assert_same_store(store, fresh)
    with pytest.raises(ValueError, match=r"s\.zarr: chip 0 was written from window.*another chip table"):
        write_chip_store(path, tiler, chips=other, progress=False)  # nor is a complete store reused
