"""Grid tiling of GeoTIFFs: windows, owned regions (exactly-once stitching), chip reads and file errors."""

from __future__ import annotations

import math
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.windows
from affine import Affine
from rasterio.windows import Window

from geodino.data.tiling import (
    RasterFileError,
    RasterTiler,
    coverage_count,
    grid_windows,
    mosaic_owned,
    owned_windows,
    read_chip,
)

RASTERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "rasters"

# name -> (band count, EPSG code, declared nodata)
EXPECTED = {
    "RGB.byte.tif": (3, 32618, 0.0),
    "cogeo.tif": (3, 3857, None),
    "L7_ETMs.tif": (6, 31985, None),
    "rgbn.tif": (4, 32618, None),
    "LC08_L1TP_224077_20200518_20200518_01_RT_B2_60m.TIF": (1, 32621, None),
    "rgb16.tif": (3, 32620, None),
}


def _raster(name: str) -> Path:
    path = RASTERS / name
    if not path.exists():
        pytest.skip(f"shared test raster {path} not available")
    return path


# ------------------------------------------------------------------------------------------ grid

GRID_CASES = [
    # (height, width, size, stride)
    (718, 791, 256, None),
    (718, 791, 256, 192),
    (718, 791, 224, 200),
    (100, 100, 32, 32),
    (101, 97, 32, 17),
    (50, 70, 64, 48),  # raster smaller than a chip (pad=True only)
    (64, 64, 64, 1),
    (10, 13, 1, 1),
    (1024, 1024, 512, 256),
]


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize(("height", "width", "size", "stride"), GRID_CASES)
def test_owned_windows_tile_exactly_once(height: int, width: int, size: int, stride: int | None, pad: bool):
    windows = grid_windows(height, width, size=size, stride=stride, pad=pad)
    owned = owned_windows(height, width, size=size, stride=stride, pad=pad)
    assert len(windows) == len(owned)
    np.testing.assert_array_equal(coverage_count(owned, height, width), 1)
    # the grid windows themselves cover every pixel at least once
    assert (coverage_count(windows, height, width) >= 1).all()
    for w, o in zip(windows, owned, strict=True):
        assert (w.height, w.width) == (size, size)
        assert w.row_off <= o.row_off and o.row_off + o.height <= w.row_off + w.height
        assert w.col_off <= o.col_off and o.col_off + o.width <= w.col_off + w.width
        assert o.height > 0 and o.width > 0
    # stitching an output that records the raster coordinates reproduces them exactly
    outputs = []
    for w in windows:
        rows, cols = np.mgrid[w.row_off : w.row_off + size, w.col_off : w.col_off + size]
        outputs.append(np.stack([rows, cols]))
    mosaic = mosaic_owned(outputs, windows, owned, height=height, width=width, fill=-1)
    rows, cols = np.mgrid[:height, :width]
    np.testing.assert_array_equal(mosaic, np.stack([rows, cols]))


def test_pad_true_vs_false_shapes():
    h, w, size, stride = 718, 791, 256, 192
    padded = grid_windows(h, w, size=size, stride=stride, pad=True)
    shifted = grid_windows(h, w, size=size, stride=stride, pad=False)
    n_rows = math.ceil((h - size) / stride) + 1
    n_cols = math.ceil((w - size) / stride) + 1
    assert len(padded) == len(shifted) == n_rows * n_cols
    # pad=True: windows stay on the stride grid, the last ones extend past the raster
    assert {int(x.row_off) for x in padded} == {i * stride for i in range(n_rows)}
    assert max(x.row_off + x.height for x in padded) > h
    assert max(x.col_off + x.width for x in padded) > w
    # pad=False: the last row/column ends exactly at the edge, nothing leaves the raster
    assert max(x.row_off + x.height for x in shifted) == h
    assert max(x.col_off + x.width for x in shifted) == w
    assert all(x.row_off >= 0 and x.col_off >= 0 for x in shifted)
    # stride defaults to size; a raster that the size divides gets the same grid either way
    assert grid_windows(512, 512, size=256) == grid_windows(512, 512, size=256, stride=256, pad=False)
    assert len(grid_windows(512, 512, size=256)) == 4


def test_grid_argument_errors():
    with pytest.raises(ValueError, match="stride"):
        grid_windows(100, 100, size=32, stride=40)
    with pytest.raises(ValueError, match="stride"):
        grid_windows(100, 100, size=32, stride=0)
    with pytest.raises(ValueError, match="size"):
        grid_windows(100, 100, size=0)


def test_mosaic_rejects_double_counting():
    # torchgeo #1245: a shifted last window whose full extent is stitched counts pixels twice
    windows = grid_windows(10, 10, size=4, stride=4, pad=False)
    outputs = [np.ones((4, 4))] * len(windows)
    with pytest.raises(ValueError, match="exactly once"):
        mosaic_owned(outputs, windows, windows, height=10, width=10)


# ------------------------------------------------------------------------------------ real rasters


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_chips_match_source(name: str):
    path = _raster(name)
    count, epsg, nodata = EXPECTED[name]
    size, stride = 200, 150
    tiler = RasterTiler(path, size=size, stride=stride, pad=True)
    with rasterio.open(path) as src:
        assert src.count == count and src.crs.to_epsg() == epsg and src.nodata == nodata
        assert len(tiler) == len(grid_windows(src.height, src.width, size=size, stride=stride))
        full_mask = src.dataset_mask() > 0
        owned_count = np.zeros((src.height, src.width), dtype=np.int32)
        for chip in tiler:
            w = chip.window
            r0, c0 = int(w.row_off), int(w.col_off)
            assert chip.image.shape == (count, size, size)
            assert chip.image.dtype == np.dtype(src.dtypes[0])
            assert chip.valid.shape == (size, size) and chip.valid.dtype == bool
            assert chip.crs == src.crs
            assert chip.path == path
            # chip pixel (0, 0) -> world coordinate of source pixel (row0, col0), upper-left corner
            x, y = chip.transform @ (0, 0)
            ex, ey = src.transform @ (c0, r0)
            with warnings.catch_warnings():  # rasterio's helper uses Affine's deprecated `*`
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                assert chip.transform.almost_equals(rasterio.windows.transform(w, src.transform))
            assert (x, y) == pytest.approx((ex, ey))
            assert chip.transform @ (0.5, 0.5) == pytest.approx(src.xy(r0, c0))
            assert chip.transform @ (size - 0.5, size - 0.5) == pytest.approx(
                src.xy(r0 + size - 1, c0 + size - 1)
            )
            # data and mask inside the raster equal direct reads
            h_in, w_in = min(size, src.height - r0), min(size, src.width - c0)
            inside = Window(c0, r0, w_in, h_in)
            np.testing.assert_array_equal(chip.image[:, :h_in, :w_in], src.read(window=inside))
            np.testing.assert_array_equal(chip.valid[:h_in, :w_in], full_mask[r0 : r0 + h_in, c0 : c0 + w_in])
            # padding outside the raster: fill value, invalid
            assert not chip.valid[h_in:, :].any() and not chip.valid[:, w_in:].any()
            assert (chip.image[:, h_in:, :] == (nodata or 0)).all()
            o = chip.owned
            owned_count[
                int(o.row_off) : int(o.row_off + o.height), int(o.col_off) : int(o.col_off + o.width)
            ] += 1
        np.testing.assert_array_equal(owned_count, 1)


def test_rgb_byte_nodata_collar():
    path = _raster("RGB.byte.tif")
    tiler = RasterTiler(path, size=128, pad=False)
    first = tiler[0]  # top-left corner of the scene: outside the rotated footprint
    assert not first.valid[0, 0]
    assert (first.image[:, 0, 0] == 0).all()
    # valid exactly where some band is not nodata (0)
    for chip in (first, tiler[len(tiler) // 2], tiler[-1]):
        np.testing.assert_array_equal(chip.valid, (chip.image != 0).any(axis=0))
    with rasterio.open(path) as src:
        valid_fraction = (src.dataset_mask() > 0).mean()
    assert 0.3 < valid_fraction < 0.95


def test_pad_false_chips_stay_inside():
    path = _raster("rgb16.tif")
    tiler = RasterTiler(path, size=128, stride=100, pad=False)
    assert all(c.valid.all() for c in tiler)  # no nodata declared, no padding: all valid
    with rasterio.open(path) as src:
        assert max(w.row_off + w.height for w in tiler.windows) == src.height


def test_band_selection_and_stitching():
    path = _raster("L7_ETMs.tif")
    tiler = RasterTiler(path, size=96, stride=64, bands=[4, 3, 2])
    with rasterio.open(path) as src:
        expected = src.read([4, 3, 2])
        h, w = src.height, src.width
    chips = list(tiler)
    assert all(c.image.shape == (3, 96, 96) for c in chips)
    mosaic = mosaic_owned([c.image for c in chips], tiler.windows, tiler.owned, height=h, width=w)
    np.testing.assert_array_equal(mosaic, expected)
    with pytest.raises(RasterFileError, match=re.escape("L7_ETMs.tif")):
        RasterTiler(path, size=96, bands=[7])


def test_tiler_pickles_and_reopens():
    path = _raster("rgbn.tif")
    tiler = RasterTiler(path, size=128)
    a = tiler[3]
    clone = pickle.loads(pickle.dumps(tiler))  # what a spawned DataLoader worker receives
    assert clone._src is None
    np.testing.assert_array_equal(clone[3].image, a.image)
    tiler._pid = -1  # as if inherited through fork: must reopen, not reuse the handle
    old = tiler._src
    np.testing.assert_array_equal(tiler[3].image, a.image)
    assert tiler._src is not old
    tiler.close()
    clone.close()
    old.close()


def test_dataloader_workers():
    torch = pytest.importorskip("torch")
    path = _raster("rgbn.tif")
    tiler = RasterTiler(path, size=128, stride=96)
    tiler[0]  # parent opens its handle before forking; workers must reopen their own
    loader = torch.utils.data.DataLoader(
        tiler, batch_size=4, num_workers=2, collate_fn=list, multiprocessing_context="fork"
    )
    chips = [c for batch in loader for c in batch]
    assert len(chips) == len(tiler)
    for i in (0, len(tiler) - 1):
        np.testing.assert_array_equal(chips[i].image, tiler[i].image)
    tiler.close()


def test_read_chip_boundless_fill_and_float_nan(tmp_path: Path):
    path = tmp_path / "float.tif"
    data = np.arange(2 * 20 * 30, dtype=np.float32).reshape(2, 20, 30)
    data[1, 5, 7] = np.nan
    data[:, 0, 0] = -9999
    profile = dict(driver="GTiff", width=30, height=20, count=2, dtype="float32", crs="EPSG:32632",
                   transform=Affine(10, 0, 500000, 0, -10, 4000000), nodata=-9999)  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    with rasterio.open(path) as src:
        chip = read_chip(src, Window(-4, -2, 16, 16), fill=-1)
        assert chip.image.shape == (2, 16, 16) and chip.image.dtype == np.float32
        assert (chip.image[:, :2, :] == -1).all() and (chip.image[:, :, :4] == -1).all()
        np.testing.assert_array_equal(chip.image[:, 2:, 4:], data[:, :14, :12])
        assert not chip.valid[:2].any() and not chip.valid[:, :4].any()
        assert not chip.valid[2, 4]  # declared nodata
        assert not chip.valid[2 + 5, 4 + 7]  # NaN in one band
        assert chip.valid[2:, 4:].sum() == 14 * 12 - 2
        assert chip.transform @ (0, 0) == pytest.approx((500000 - 40, 4000000 + 20))


# ------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=re.escape("nope.tif")):
        RasterTiler(tmp_path / "nope.tif", size=64)


def test_truncated_file(tmp_path: Path):
    src = _raster("RGB.byte.tif")
    path = tmp_path / "truncated_RGB.byte.tif"
    path.write_bytes(src.read_bytes()[:10_000])
    with pytest.raises(RasterFileError, match=re.escape("truncated_RGB.byte.tif")):
        tiler = RasterTiler(path, size=64)
        list(tiler)


def test_corrupt_file(tmp_path: Path):
    path = tmp_path / "garbage.tif"
    path.write_bytes(b"not a tiff at all" * 100)
    with pytest.raises(RasterFileError, match=re.escape("garbage.tif")):
        RasterTiler(path, size=64)


def _write(path: Path, data: np.ndarray, **kw) -> Path:
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype.name, transform=Affine(2, 0, 100, 0, -2, 200))  # fmt: skip
    profile.update(kw)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def test_no_crs(tmp_path: Path):
    path = _write(tmp_path / "no_crs.tif", np.ones((1, 32, 32), dtype=np.uint8))
    with pytest.raises(RasterFileError, match=r"no_crs\.tif has no CRS.*rio edit-info --crs"):
        RasterTiler(path, size=16)


def test_all_nodata(tmp_path: Path):
    path = _write(tmp_path / "empty.tif", np.zeros((2, 600, 500), dtype=np.uint16), crs="EPSG:4326", nodata=0)
    with pytest.raises(RasterFileError, match=r"empty\.tif.*nodata"):
        RasterTiler(path, size=64)
    # a single valid pixel, missed by the decimated check, is found by the full-resolution fallback
    data = np.zeros((2, 600, 500), dtype=np.uint16)
    data[1, 301, 253] = 7
    path = _write(tmp_path / "one_pixel.tif", data, crs="EPSG:4326", nodata=0)
    assert len(RasterTiler(path, size=64)) > 0


def test_smaller_than_chip_without_pad(tmp_path: Path):
    path = _write(tmp_path / "small.tif", np.ones((1, 40, 50), dtype=np.uint8), crs="EPSG:4326")
    with pytest.raises(RasterFileError, match=r"small\.tif.*smaller than a chip"):
        RasterTiler(path, size=64, pad=False)
    chips = list(RasterTiler(path, size=64, pad=True))
    assert len(chips) == 1 and chips[0].valid.sum() == 40 * 50


# -------------------------------------------------------------------------------------------- AOI


def _aoi_lonlat(path: Path, radius_m: float) -> tuple:
    """A circle around the raster's centre, in lon/lat (EPSG:4326), and the same circle in the raster CRS."""
    import shapely
    from rasterio.warp import transform_geom

    with rasterio.open(path) as src:
        b, crs = src.bounds, src.crs
    circle = shapely.Point((b.left + b.right) / 2, (b.bottom + b.top) / 2).buffer(radius_m, quad_segs=32)
    lonlat = shapely.geometry.shape(transform_geom(crs, "EPSG:4326", shapely.geometry.mapping(circle)))
    return lonlat, circle


def test_aoi_tiles_only_its_pixels_each_exactly_once():
    from rasterio.features import geometry_mask

    path = _raster("RGB.byte.tif")
    lonlat, circle = _aoi_lonlat(path, 40_000)
    tiler = RasterTiler(path, size=64, stride=48, aoi=lonlat, aoi_crs="EPSG:4326")
    full = RasterTiler(path, size=64, stride=48)
    assert 0 < len(tiler) < len(full)
    region = tiler.region
    region_transform = tiler.transform @ Affine.translation(region.col_off, region.row_off)
    shape = (int(region.height), int(region.width))
    inside = geometry_mask([circle], out_shape=shape, transform=region_transform, invert=True)
    # the region ends at the circle's far edges and starts on the block grid (3-row strips spanning
    # the full width here: rows snap to multiples of 3, columns to 0)
    rows, cols = np.nonzero(inside)
    assert rows.max() >= shape[0] - 2 and cols.max() >= shape[1] - 2  # pixel-centre rule: 1 px slack
    assert region.row_off % 3 == 0 and region.col_off == 0
    # every chip: pixels outside the AOI are invalid, inside ones keep the file's mask
    for chip in tiler:
        r0, c0 = int(chip.window.row_off - region.row_off), int(chip.window.col_off - region.col_off)
        h, w = min(64, shape[0] - r0), min(64, shape[1] - c0)
        assert not chip.valid[:h, :w][~inside[r0 : r0 + h, c0 : c0 + w]].any()
    # stitched ones: every AOI pixel owned by exactly one chip, nothing outside the kept windows
    mosaic = tiler.mosaic([np.ones((64, 64), dtype=np.int32) for _ in range(len(tiler))])
    assert (mosaic[inside] == 1).all()
    assert mosaic.shape == shape


def test_aoi_region_is_block_aligned_on_a_tiled_file():
    import shapely

    path = _raster("cogeo.tif")
    with rasterio.open(path) as src:
        block_h, block_w = src.block_shapes[0]
        x0, y0 = src.transform @ (300, 700)
        x1, y1 = src.transform @ (600, 900)
    tiler = RasterTiler(path, size=128, aoi=shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    assert tiler.region.col_off % block_w == 0 and tiler.region.row_off % block_h == 0
    assert tiler.region.col_off <= 300 and tiler.region.row_off <= 700
    assert tiler.region.col_off + tiler.region.width >= 600


def test_empty_or_disjoint_aoi_is_a_clear_error():
    import shapely

    path = _raster("RGB.byte.tif")
    with pytest.raises(RasterFileError, match=r"RGB\.byte\.tif.*AOI is empty"):
        RasterTiler(path, size=64, aoi=shapely.Polygon())
    with pytest.raises(RasterFileError, match=r"RGB\.byte\.tif.*does not overlap"):
        RasterTiler(path, size=64, aoi=shapely.box(10, 50, 11, 51), aoi_crs="EPSG:4326")
