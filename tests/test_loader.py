"""Chip batches: collation, the threaded ChipLoader and the block-aware worker batch sampler."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch
from conftest import shared_path
from rasterio.windows import Window
from torch.utils.data import DataLoader

from geodino.data.loader import ChipBatch, ChipLoader, WorkerBatchSampler, collate_chips, column_bands
from geodino.data.synthetic import make_scene
from geodino.data.tiling import Chip, ChipRef, RasterFileError, RasterTiler, read_chip


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4-band uint16 scene, 640 px, tiled 256 px, with a nodata collar."""
    path = tmp_path_factory.mktemp("loader") / "scene.tif"
    make_scene(path, size=640, seed=3, block_size=256)
    return path


def assert_batches_match(batches: list[ChipBatch], chips: list[Chip]) -> None:
    """The batches hold exactly ``chips``, in order: pixels (as float32), masks and metadata."""
    assert sum(len(b) for b in batches) == len(chips)
    k = 0
    for batch in batches:
        assert batch.image.dtype == torch.float32 and batch.valid.dtype == torch.bool
        assert batch.image.shape[0] == batch.valid.shape[0] == len(batch.windows) == len(batch.transforms)
        for j in range(len(batch)):
            chip = chips[k]
            np.testing.assert_array_equal(batch.image[j].numpy(), chip.image.astype(np.float32))
            np.testing.assert_array_equal(batch.valid[j].numpy(), chip.valid)
            assert batch.windows[j] == chip.window
            assert batch.transforms[j] == chip.transform
            assert batch.crs[j] == chip.crs
            assert batch.paths[j] == chip.path
            assert batch.owned[j] == chip.owned
            k += 1


# ---------------------------------------------------------------------------------------- collate


def test_collate_chips_copies_chips_into_one_float32_batch(scene: Path):
    tiler = RasterTiler(scene, size=200, stride=150)
    chips = [tiler[i] for i in (0, 3, len(tiler) - 1)]  # the last one is padded past the edge
    assert chips[0].image.dtype == np.uint16 and not chips[-1].valid.all()
    batch = collate_chips(chips)
    assert batch.image.shape == (3, 4, 200, 200) and batch.valid.shape == (3, 200, 200)
    assert_batches_match([batch], chips)
    # the batch owns its memory: changing it leaves the chips alone
    batch.image.zero_()
    assert chips[1].image.any()
    moved = batch.to("cpu")
    assert (
        isinstance(moved, ChipBatch)
        and moved.windows == batch.windows
        and torch.equal(moved.valid, batch.valid)
    )


def test_collate_chips_refuses_mixed_sizes(scene: Path):
    small, large = RasterTiler(scene, size=64)[0], RasterTiler(scene, size=96)[0]
    with pytest.raises(ValueError, match=r"chip 1 .* one size"):
        collate_chips([small, large])
    with pytest.raises(ValueError, match="at least one chip"):
        collate_chips([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a CUDA device")
def test_chip_batch_pins_and_moves_to_cuda(scene: Path):
    batch = collate_chips([RasterTiler(scene, size=64)[i] for i in range(4)])
    pinned = batch.pin_memory()
    assert pinned.image.is_pinned() and pinned.valid.is_pinned()
    on_gpu = pinned.to("cuda", non_blocking=True)
    assert on_gpu.image.is_cuda and torch.equal(on_gpu.image.cpu(), batch.image)


# ------------------------------------------------------------------------------------- ChipLoader


@pytest.mark.parametrize("threads", [1, 3])
def test_chip_loader_delivers_the_tilers_chips_in_order(scene: Path, threads: int):
    # overlapping windows, padded edge chips, a batch size that does not divide the chip count
    tiler = RasterTiler(scene, size=128, stride=100)
    loader = ChipLoader.from_tiler(tiler, 5, threads=threads, prefetch=2)
    assert len(loader) == -(-len(tiler) // 5)
    batches = list(loader)
    assert len(batches) == len(loader)
    assert_batches_match(batches, list(tiler))
    assert_batches_match(list(loader), list(tiler))  # a second epoch gives the same


def test_chip_loader_reuses_batch_memory_only_once_released(scene: Path):
    tiler = RasterTiler(scene, size=64)
    chips = list(tiler)
    kept = []
    for k, batch in enumerate(ChipLoader.from_tiler(tiler, 4, threads=2, prefetch=2)):
        assert_batches_match([batch], chips[4 * k : 4 * k + 4])
        if k % 3 == 0:
            kept.append((k, batch.image[1:3]))  # a view keeps its batch's memory from being reused
        del batch
    assert len(kept) > 3
    for k, view in kept:
        expected = np.stack([c.image for c in chips[4 * k + 1 : 4 * k + 3]]).astype(np.float32)
        np.testing.assert_array_equal(view.numpy(), expected)


def test_chip_loader_on_a_real_raster_with_band_selection():
    path = shared_path("data", "rasters", "RGB.byte.tif")  # uint8, nodata 0, 718 x 791 px
    tiler = RasterTiler(path, size=256, stride=200, bands=[3, 1])
    batches = list(ChipLoader.from_tiler(tiler, 4, threads=2))
    assert batches[0].image.shape[1:] == (2, 256, 256)
    assert_batches_match(batches, list(tiler))


def test_chip_loader_from_an_aoi_tiler_masks_outside_the_aoi(scene: Path):
    with rasterio.open(scene) as src:
        left, bottom, right, top = src.bounds
    # a disc in the raster's CRS, off-centre so that it cuts through chips
    disc = shapely.Point(left + 0.4 * (right - left), bottom + 0.55 * (top - bottom)).buffer(
        0.3 * (right - left)
    )
    tiler = RasterTiler(scene, size=96, stride=80, aoi=disc)
    chips = list(tiler)
    assert any(c.valid.any() and not c.valid.all() for c in chips)  # some chips straddle the AOI edge
    assert_batches_match(list(ChipLoader.from_tiler(tiler, 4, threads=2)), chips)


def test_chip_loader_reads_windows_of_several_rasters(scene: Path, tmp_path: Path):
    other = tmp_path / "other.tif"
    make_scene(other, size=300, seed=5, block_size=128)
    rng = np.random.default_rng(0)
    rasters_of, cols, rows = rng.integers(0, 2, 12), rng.integers(0, 260, 12), rng.integers(0, 260, 12)
    refs = [
        ChipRef(int(i), Window(int(c), int(r), 96, 96))
        for i, c, r in zip(rasters_of, cols, rows, strict=True)
    ]
    refs.append(ChipRef(1, Window(250, -40, 96, 96)))  # partly outside the raster
    rasters = [scene, other]
    batches = list(ChipLoader(rasters, refs, 4, threads=2))
    with rasterio.open(scene) as a, rasterio.open(other) as b:
        expected = [read_chip((a, b)[ref.raster], ref.window) for ref in refs]
    assert_batches_match(batches, [Chip(**{**vars(c), "owned": None}) for c in expected])


def test_chip_loader_errors_name_the_file(scene: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"missing\.tif"):
        ChipLoader([tmp_path / "missing.tif"], [ChipRef(0, Window(0, 0, 8, 8))], 2)
    with pytest.raises(ValueError, match="one size"):
        ChipLoader([scene], [ChipRef(0, Window(0, 0, 8, 8)), ChipRef(0, Window(0, 0, 9, 8))], 2)
    three = tmp_path / "three.tif"
    make_scene(three, size=64, bands=3, block_size=16)
    refs = [ChipRef(0, Window(0, 0, 32, 32)), ChipRef(1, Window(0, 0, 32, 32))]
    with pytest.raises(RasterFileError, match=r"three\.tif: has 3 bands"):
        list(ChipLoader([scene, three], refs, 1, threads=2))


def test_chip_loader_stops_its_threads_when_the_loop_breaks(scene: Path):
    before = threading.active_count()
    batches = iter(ChipLoader.from_tiler(RasterTiler(scene, size=64), 2, threads=2))
    next(batches)
    assert threading.active_count() == before + 2
    batches.close()  # what `break` out of a for loop does once the iterator is dropped
    assert threading.active_count() == before


# ----------------------------------------------------------------------------- worker batch sampler


def test_column_bands_split_each_raster_into_equal_contiguous_bands():
    windows = [Window(c, r, 224, 224) for r in range(0, 2240, 224) for c in range(0, 2240, 224)]
    refs = [ChipRef(0, w) for w in windows] + [ChipRef(1, w) for w in windows[:30]]
    band = np.array(column_bands(refs, 3))
    for raster in (0, 1):
        members = [i for i, r in enumerate(refs) if r.raster == raster]
        counts = np.bincount(band[members], minlength=3)
        assert counts.max() - counts.min() <= 1
        cols = [[refs[i].window.col_off for i in members if band[i] == b] for b in range(3)]
        assert max(cols[0]) <= min(cols[1]) and max(cols[1]) <= min(cols[2])


@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_worker_batch_sampler_gives_each_worker_its_own_band(num_workers: int):
    windows = [Window(c, r, 224, 224) for r in range(0, 8192, 224) for c in range(0, 8192, 224)]
    sampler = WorkerBatchSampler(windows, 8, num_workers=num_workers)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(windows)))  # every window exactly once
    workers = max(num_workers, 1)
    per_worker = [[i for b in batches[w::workers] for i in b] for w in range(workers)]
    for w, run in enumerate(per_worker):
        assert run == sorted(run)  # each worker walks its band in raster order
        assert all(len(b) == 8 for b in batches[w::workers][:-1])
    # bands are side by side: a worker's columns never interleave with the next worker's
    for left, right in itertools.pairwise(per_worker):
        assert max(windows[i].col_off for i in left) <= min(windows[i].col_off for i in right)
    if num_workers == 0:
        assert batches == [list(range(i, min(i + 8, len(windows)))) for i in range(0, len(windows), 8)]


def test_dataloader_with_workers_and_collate_chips(scene: Path):
    tiler = RasterTiler(scene, size=128, stride=100)
    sampler = WorkerBatchSampler(tiler.windows, 3, num_workers=2)
    loader = DataLoader(
        tiler, batch_sampler=sampler, num_workers=2, collate_fn=collate_chips, pin_memory=False
    )
    batches = list(loader)
    order = [i for b in sampler for i in b]
    assert_batches_match(batches, [tiler[i] for i in order])
