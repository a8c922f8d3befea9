"""Raster corpus: index of real and synthetic rasters, reprojection, bands, scaling, GeoParquet, bad input."""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch.utils.data
from affine import Affine
from conftest import shared_path
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.warp import calculate_default_transform, reproject, transform_bounds
from rasterio.windows import Window

from geodino.data.corpus import CorpusDataset, RasterCorpus
from geodino.data.synthetic import make_scene
from geodino.data.tiling import ChipRef, RasterFileError
from geodino.data.validity import read_valid_map

LC08 = "LC08_L1TP_224077_20200518_20200518_01_RT_B2_60m.TIF"
# name -> (EPSG code, band count, dtype, declared nodata)
EXPECTED = {
    "L7_ETMs.tif": (31985, 6, "uint8", None),
    LC08: (32621, 1, "uint16", None),
    "RGB.byte.tif": (32618, 3, "uint8", 0.0),
    "cogeo.tif": (3857, 3, "uint8", None),
    "rgb16.tif": (32620, 3, "uint16", None),
    "rgbn.tif": (32618, 4, "uint8", None),
}
# A Lambert Conformal Conic CRS with made-up parameters: no EPSG code.
CUSTOM_LCC = (
    'PROJCS["made-up LCC",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
    'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Lambert_Conformal_Conic_2SP"],'
    'PARAMETER["standard_parallel_1",41.3],PARAMETER["standard_parallel_2",47.7],'
    'PARAMETER["latitude_of_origin",44.1],PARAMETER["central_meridian",11.7],'
    'PARAMETER["false_easting",700000],PARAMETER["false_northing",300000],UNIT["metre",1]]'
)


#: The CRS GDAL writes for an unknown projection: no relation to Earth coordinates.
LOCAL_CS = 'LOCAL_CS["arbitrary",UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]'


def _write(path: Path, data: np.ndarray, *, crs: CRS | str | None = "EPSG:32633", **profile: object) -> Path:
    """A GeoTIFF of ``data [C, h, w]`` with 2 m pixels."""
    profile = {"transform": Affine(2.0, 0, 400_000.0, 0, -2.0, 5_000_000.0), **profile}
    with rasterio.open(
        path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
        dtype=data.dtype, crs=crs, **profile,
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


def _bounds_close(polygon: object, expected: tuple[float, ...], tol: float = 1e-6) -> None:
    np.testing.assert_allclose(polygon.bounds, expected, rtol=0, atol=tol)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scene(tmp_path_factory.mktemp("scene") / "scene.tif", size=256, seed=1).path


@pytest.fixture(scope="module")
def shared_corpus() -> RasterCorpus:
    folder = shared_path("data", "rasters")
    with pytest.warns(UserWarning, match="undeclared fill value") as record:
        corpus = RasterCorpus.from_paths(folder, bands=[1], scaling=None, progress=False)
    (message,) = [str(w.message) for w in record if "undeclared" in str(w.message)]
    assert LC08 in message and "nodata=0" in message
    assert not any(name in message for name in EXPECTED if name != LC08), message
    return corpus


# ------------------------------------------------------------------------------------ real rasters


def test_real_rasters_index(shared_corpus: RasterCorpus) -> None:
    index = shared_corpus.index
    assert [Path(p).name for p in index["raster"]] == sorted(EXPECTED)
    assert index.crs == "EPSG:4326"
    for row, valid_map in zip(index.itertuples(), shared_corpus.valid_maps, strict=True):
        epsg, count, dtype, nodata = EXPECTED[Path(row.raster).name]
        with rasterio.open(row.raster) as src:
            assert (row.epsg, row.count, row.dtype) == (epsg, count, dtype)
            assert row.nodata == nodata if nodata is not None else np.isnan(row.nodata)
            assert CRS.from_wkt(row.crs) == src.crs
            assert (row.height, row.width, row.gsd_x, row.gsd_y) == (src.height, src.width, *src.res)
            _bounds_close(row.geometry, transform_bounds(src.crs, "EPSG:4326", *src.bounds))
            expected_map = read_valid_map(src, [1])
            np.testing.assert_array_equal(valid_map.valid, expected_map.valid)
            assert row.valid_fraction == pytest.approx(expected_map.valid_fraction)
    fractions = dict(zip(index["raster"].map(lambda p: Path(p).name), index["valid_fraction"], strict=True))
    assert 0.5 < fractions["RGB.byte.tif"] < 0.8  # nodata collar around the rotated scene
    assert fractions["rgbn.tif"] == 1.0


def test_mixed_band_counts_need_a_selection() -> None:
    folder = shared_path("data", "rasters")
    with pytest.raises(RasterFileError, match=r"has 1 bands but .*L7_ETMs.tif has 6.*bands=\[") as info:
        RasterCorpus.from_paths(folder, progress=False)
    assert str(info.value).startswith(str(folder / LC08))  # sorted: L7_ETMs.tif, then LC08


@pytest.mark.parametrize("name", ["RGB.byte.tif", "rgbn.tif", "cogeo.tif"])
def test_reads_equal_rasterio(name: str) -> None:
    path = shared_path("data", "rasters", name)
    corpus = RasterCorpus.from_paths([path], progress=False)
    with rasterio.open(path) as src:
        for window in (Window(100, 50, 128, 96), Window(src.width - 60, src.height - 40, 128, 128)):
            chip = corpus.read(ChipRef(0, window))
            np.testing.assert_array_equal(chip.image, src.read(window=window, boundless=True, fill_value=0))
            inner = Window(window.col_off, window.row_off, min(128, src.width - window.col_off), 40)
            mask = src.dataset_mask(window=inner) > 0
            np.testing.assert_array_equal(chip.valid[: mask.shape[0], : mask.shape[1]], mask)
            assert not chip.valid[:, src.width - int(window.col_off) :].any()  # past the right edge
            assert chip.path == path and chip.crs == src.crs


def test_undeclared_fill_value() -> None:
    path = shared_path("data", "rasters", LC08)
    with pytest.warns(UserWarning, match=r"nodata=0 .*\n.*LC08.*border value 0"):
        RasterCorpus.from_paths(path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        corpus = RasterCorpus.from_paths(path, nodata=0, progress=False)
    with rasterio.open(path) as src:
        zero = src.read(1) == 0
    assert corpus.index["nodata"][0] == 0
    assert corpus.index["valid_fraction"][0] == pytest.approx(1 - zero.mean(), abs=0.005)
    chip = corpus.read(ChipRef(0, Window(0, 700, 200, 100)))
    np.testing.assert_array_equal(chip.valid[:58], ~zero[700:, :200])
    low = corpus.scaling[0, 0, 0]
    assert low > 7000  # fill excluded from the percentiles (the darkest real pixels are ~7400)


# ----------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(("crs", "gsd"), [("EPSG:4326", 1e-5), ("EPSG:3857", 1.0)])
def test_reprojected_grid(scene: Path, crs: str, gsd: float) -> None:
    corpus = RasterCorpus.from_paths(scene, crs=crs, gsd=gsd, progress=False)
    row = next(corpus.index.itertuples())
    with rasterio.open(scene) as src:
        transform, width, height = calculate_default_transform(
            src.crs, crs, src.width, src.height, *src.bounds, resolution=gsd
        )
        assert (row.width, row.height) == (width, height)
        assert Affine(*row.transform).almost_equals(transform)
        assert (row.gsd_x, row.gsd_y) == pytest.approx((gsd, gsd))
        assert row.epsg == CRS.from_user_input(crs).to_epsg()
        _bounds_close(row.geometry, transform_bounds(src.crs, "EPSG:4326", *src.bounds), tol=1e-5)
        expected = np.zeros((src.count, height, width), dtype=np.uint16)
        reproject(
            src.read(), expected, src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
            dst_crs=crs, resampling=Resampling.bilinear, src_nodata=0, dst_nodata=0,
        )  # fmt: skip
    chip = corpus.read(ChipRef(0, Window(0, 0, width, height)))
    assert chip.crs == CRS.from_user_input(crs) and chip.transform.almost_equals(transform)
    close = np.abs(chip.image.astype(np.int32) - expected) <= 1
    assert close.mean() > 0.995
    np.testing.assert_array_equal(chip.valid, (expected != 0).any(axis=0))


def test_reprojection_without_nodata_masks_outside(tmp_path: Path) -> None:
    """4-band raster without nodata: GDAL does not report the VRT's alpha as mask (rasterio #1454)."""
    data = np.random.default_rng(0).integers(1, 255, size=(4, 200, 200), dtype=np.uint8)
    path = _write(tmp_path / "rgbn.tif", data, crs="EPSG:32618", photometric="minisblack")  # no alpha
    corpus = RasterCorpus.from_paths(path, crs="EPSG:4326", progress=False)
    row, valid_map = next(corpus.index.itertuples()), corpus.valid_maps[0]
    assert 0.5 < row.valid_fraction < 0.99
    chip = corpus.read(ChipRef(0, Window(0, 0, row.width, row.height)))
    assert 0.5 < chip.valid.mean() < 0.99
    assert chip.valid.mean() == pytest.approx(valid_map.valid_fraction, abs=0.01)
    assert (chip.image[:, chip.valid] > 0).any(axis=0).all()  # only warped pixels are valid


def test_alpha_band_is_the_mask_not_a_band(tmp_path: Path) -> None:
    """An RGBA GeoTIFF whose right half is transparent: by default the corpus reads red, green and blue, and
    the alpha band makes that half invalid (read as a fourth band, its all-valid mask would not)."""
    data = np.random.default_rng(2).integers(1, 255, size=(4, 64, 64), dtype=np.uint8)
    data[3] = 255
    data[3, :, 32:] = 0
    path = _write(tmp_path / "rgba.tif", data)
    with rasterio.open(path, "r+") as dst:
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    corpus = RasterCorpus.from_paths(path, progress=False)
    row = next(corpus.index.itertuples())
    assert list(row.bands) == [1, 2, 3]
    assert row.valid_fraction == pytest.approx(0.5, abs=0.05)
    chip = corpus.read(ChipRef(0, Window(0, 0, 64, 64)))
    assert chip.image.shape == (3, 64, 64)
    np.testing.assert_array_equal(chip.valid, data[3] > 0)


def test_raster_rewritten_after_indexing_is_refused(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(1, 255, size=(4, 64, 64), dtype=np.uint8)
    path = _write(tmp_path / "scene.tif", data)
    corpus = RasterCorpus.from_paths(path, progress=False)
    rewritten = {
        "4 bands indexed, 3 now": data[:3],
        "uint8 indexed, uint16 now": data.astype(np.uint16),
        "64 x 64 px indexed, 48 x 64 now": data[:, :, :48],
    }
    for change, pixels in rewritten.items():
        corpus.close()
        _write(path, pixels)
        with pytest.raises(
            RasterFileError, match=rf"scene\.tif: raster 0 changed .*\({change}\).*geodino index"
        ):
            corpus.read(ChipRef(0, Window(0, 0, 32, 32)))


def test_custom_crs_without_epsg(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(1, 255, size=(3, 64, 80), dtype=np.uint8)
    path = _write(tmp_path / "lcc.tif", data, crs=CRS.from_wkt(CUSTOM_LCC))
    corpus = RasterCorpus.from_paths(path, progress=False)
    row = next(corpus.index.itertuples())
    assert pd.isna(row.epsg) and corpus.index["epsg"].dtype == "Int64"
    assert CRS.from_wkt(row.crs) == CRS.from_wkt(CUSTOM_LCC)
    with rasterio.open(path) as src:
        _bounds_close(row.geometry, transform_bounds(src.crs, "EPSG:4326", *src.bounds))
    np.testing.assert_array_equal(corpus.read(ChipRef(0, Window(8, 4, 32, 32))).image, data[:, 4:36, 8:40])
    table = corpus.chip_table([ChipRef(0, Window(8, 4, 32, 32))])
    assert table.geometry[0].within(row.geometry)
    corpus.save(tmp_path / "corpus.parquet")
    assert pd.isna(RasterCorpus.load(tmp_path / "corpus.parquet").index.epsg[0])


def test_int16_reflectance_scaling(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(1500, 900, size=(2, 300, 300)).astype(np.int16)  # negatives from atmospheric corr.
    data[1] = data[1] // 2 - 300
    data[:, :40] = -9999  # 13 % nodata: would drag the 2nd percentile to -9999 if counted
    path = _write(tmp_path / "refl.tif", data, nodata=-9999)
    corpus = RasterCorpus.from_paths(path, progress=False)
    valid = data[:, 40:].reshape(2, -1)
    np.testing.assert_allclose(corpus.scaling[0], np.percentile(valid, [2, 98], axis=1))
    assert corpus.scaling[0, 0, 1] < 0 < corpus.scaling[0, 1, 1]  # band 2 spans negative values
    image = corpus.scale(data[:, 40:], 0)
    assert image.dtype == np.float32 and image.min() == 0.0 and image.max() == 1.0
    assert 0.4 < np.median(image) < 0.6
    frac_zero = (image == 0).mean(axis=(1, 2))
    np.testing.assert_allclose(frac_zero, 0.02, atol=0.002)  # values at or below the 2nd percentile
    order = np.argsort(data[0, 40:].ravel())
    assert (np.diff(image[0].ravel()[order]) >= 0).all()  # monotonic


def test_scale_zeroes_nan_and_leaves_the_input_alone(tmp_path: Path) -> None:
    """Float pixels (a float raster's read) may hold NaN: 0 after scaling; integer and float pixels of the
    same values scale alike, and the caller's array is not modified."""
    rng = np.random.default_rng(3)
    data = rng.integers(100, 3000, size=(2, 64, 64)).astype(np.uint16)
    corpus = RasterCorpus.from_paths(_write(tmp_path / "u16.tif", data), progress=False)
    floats = data.astype(np.float32)
    floats[1, :3] = np.nan
    before = floats.copy()
    scaled = corpus.scale(floats, 0)
    np.testing.assert_array_equal(floats, before)  # NaN-aware: the input is untouched
    assert (scaled[1, :3] == 0).all() and np.isfinite(scaled).all()
    np.testing.assert_array_equal(scaled[:, 3:], corpus.scale(data, 0)[:, 3:])
    assert scaled.dtype == np.float32 and scaled.min() >= 0 and scaled.max() <= 1


def test_scaling_by_raster(tmp_path: Path) -> None:
    """Each raster its own levels: the percentiles of its own valid pixels in the decimated read."""
    rng = np.random.default_rng(4)
    # 2 x 2 blocks: the decimated read (1024 -> 512 px) holds each block's value whichever pixel it picks.
    blocks = rng.integers(1, 60000, size=(2, 512, 512), dtype=np.uint16)
    blocks[:, :64] = 0  # nodata collar
    bright = _write(tmp_path / "bright.tif", blocks.repeat(2, axis=1).repeat(2, axis=2), nodata=0)
    rgb = rng.integers(0, 256, size=(2, 200, 300), dtype=np.uint8)
    dark = rng.normal(300, 100, size=(2, 200, 200)).astype(np.int16)
    # Valid only on rows and columns 3i + 2, which the 3x decimated read (1536 -> 512 px) never picks.
    grid = np.zeros((2, 1536, 1536), dtype=np.uint16)
    grid[:, 2::3, 2::3] = 7
    paths = [bright, _write(tmp_path / "rgb.tif", rgb), _write(tmp_path / "dark.tif", dark)]
    paths.append(_write(tmp_path / "grid.tif", grid, nodata=0))
    corpus = RasterCorpus.from_paths(paths, scaling_by="raster", progress=False)

    pixels = [blocks[:, 64:].reshape(2, -1), rgb.reshape(2, -1), dark.reshape(2, -1)]
    assert corpus.scaling.shape == (4, 2, 2)
    for levels, valid in zip(corpus.scaling, pixels, strict=False):
        np.testing.assert_array_equal(levels, np.percentile(valid, [2, 98], axis=1))
    # No pixel in the sample: the levels of the whole corpus' sample.
    np.testing.assert_array_equal(corpus.scaling[3], np.percentile(np.hstack(pixels), [2, 98], axis=1))
    for i, path in enumerate(paths[:3]):
        with rasterio.open(path) as src:
            chip = CorpusDataset(corpus)[ChipRef(i, Window(0, 0, src.width, src.height))]
        scaled = chip.image[:, chip.valid]
        assert scaled.min() == 0 and scaled.max() == 1  # the dark scene too: no absolute radiometry
        assert 0.3 < np.median(scaled) < 0.7


@pytest.mark.parametrize("scaling_by", ["dtype", "raster", "corpus"])
def test_scaling_by_save_load_roundtrip(scaling_by: str, scene: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    u8 = _write(tmp_path / "u8.tif", rng.integers(0, 256, size=(3, 64, 80), dtype=np.uint8))
    u16 = _write(tmp_path / "u16.tif", rng.integers(1, 9000, size=(3, 50, 60), dtype=np.uint16))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the scaling percentiles are pooled", category=UserWarning)
        corpus = RasterCorpus.from_paths(
            [u8, scene, u16], bands=[1, 2, 3], scaling_by=scaling_by, progress=False
        )
    levels = corpus.scaling
    assert levels.shape == (3, 2, 3)
    assert np.array_equal(levels[0], levels[1]) == (scaling_by == "corpus")  # uint8, uint16
    assert np.array_equal(levels[1], levels[2]) == (scaling_by != "raster")  # uint16, uint16
    corpus.save(tmp_path / "corpus.parquet")
    loaded = RasterCorpus.load(tmp_path / "corpus.parquet")
    assert (loaded.scaling_by, loaded.percentiles) == (scaling_by, (2.0, 98.0))
    np.testing.assert_array_equal(loaded.scaling, levels)
    pd.testing.assert_frame_equal(pd.DataFrame(loaded.index), pd.DataFrame(corpus.index))
    for i in range(3):
        ref = ChipRef(i, Window(0, 0, 48, 48))
        np.testing.assert_array_equal(CorpusDataset(loaded)[ref].image, CorpusDataset(corpus)[ref].image)

    unscaled = RasterCorpus.from_paths(u16, scaling=None, scaling_by=scaling_by, progress=False)
    unscaled.save(tmp_path / "unscaled.parquet")
    loaded = RasterCorpus.load(tmp_path / "unscaled.parquet")
    assert (loaded.scaling, loaded.percentiles, loaded.scaling_by) == (None, None, scaling_by)


def test_load_corpus_saved_before_scaling_by(scene: Path, tmp_path: Path) -> None:
    """Files from before ``scaling_by``: one pooled ``scaling`` [2, C] in the settings, loaded as "corpus"."""
    u8 = np.random.default_rng(6).integers(0, 256, size=(3, 64, 80), dtype=np.uint8)
    u8 = _write(tmp_path / "u8.tif", u8)
    with pytest.warns(UserWarning, match="different dtypes"):
        corpus = RasterCorpus.from_paths([u8, scene], bands=[1, 2, 3], scaling_by="corpus", progress=False)
    corpus.save(tmp_path / "corpus.parquet")
    table = gpd.read_parquet(tmp_path / "corpus.parquet").drop(columns=["scaling_low", "scaling_high"])
    pooled = corpus.scaling[0].tolist()
    old = {"read": asdict(corpus.settings), "percentiles": [2.0, 98.0], "scaling": pooled}
    table.attrs = {"geodino.corpus": json.dumps(old)}
    table.to_parquet(tmp_path / "old.parquet")
    loaded = RasterCorpus.load(tmp_path / "old.parquet")
    assert (loaded.scaling_by, loaded.percentiles, loaded.settings) == (
        "corpus",
        (2.0, 98.0),
        corpus.settings,
    )
    np.testing.assert_array_equal(loaded.scaling, [pooled, pooled])
    pd.testing.assert_frame_equal(pd.DataFrame(loaded.index), pd.DataFrame(corpus.index))
    ref = ChipRef(0, Window(0, 0, 64, 64))
    np.testing.assert_array_equal(CorpusDataset(loaded)[ref].image, CorpusDataset(corpus)[ref].image)

    table.attrs = {"geodino.corpus": json.dumps(old | {"percentiles": None, "scaling": None})}
    table.to_parquet(tmp_path / "old_unscaled.parquet")
    loaded = RasterCorpus.load(tmp_path / "old_unscaled.parquet")
    assert (loaded.scaling, loaded.percentiles, loaded.scaling_by) == (None, None, "corpus")


def test_band_selection_by_description(scene: Path) -> None:
    corpus = RasterCorpus.from_paths(scene, bands=["NIR", "red", "Green"], progress=False)
    assert corpus.index["bands"][0] == [4, 1, 2]
    assert corpus.index["band_descriptions"][0] == ["red", "green", "blue", "nir"]
    with rasterio.open(scene) as src:
        expected = src.read([4, 1, 2], window=Window(30, 40, 64, 64))
    np.testing.assert_array_equal(corpus.read(ChipRef(0, Window(30, 40, 64, 64))).image, expected)
    assert corpus.scaling.shape == (1, 2, 3)
    for bad in (["swir"], [5]):
        with pytest.raises(RasterFileError, match=r"scene\.tif: has no band .*1 'red', 2 'green'"):
            RasterCorpus.from_paths(scene, bands=bad, progress=False)


def test_save_load_roundtrip(scene: Path, tmp_path: Path) -> None:
    lcc = _write(
        tmp_path / "lcc.tif",
        np.random.default_rng(3).integers(1, 9000, size=(3, 50, 60), dtype=np.uint16),
        crs=CRS.from_wkt(CUSTOM_LCC),
    )
    corpus = RasterCorpus.from_paths([scene, lcc], bands=[3, 2, 1], nodata=0, progress=False)
    corpus.save(tmp_path / "corpus.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.parquet", "lcc.tif"]  # no temp file left
    loaded = RasterCorpus.load(tmp_path / "corpus.parquet")
    pd.testing.assert_frame_equal(pd.DataFrame(loaded.index), pd.DataFrame(corpus.index))
    assert loaded.index.crs == corpus.index.crs
    for a, b in zip(loaded.valid_maps, corpus.valid_maps, strict=True):
        assert (a.height, a.width) == (b.height, b.width)
        np.testing.assert_array_equal(a.valid, b.valid)
    np.testing.assert_array_equal(loaded.scaling, corpus.scaling)
    assert (loaded.settings, loaded.percentiles, loaded.scaling_by) == (
        corpus.settings,
        corpus.percentiles,
        corpus.scaling_by,
    )
    refs = [ChipRef(0, Window(-20, 200, 64, 64)), ChipRef(1, Window(10, 10, 32, 32))]
    for ref in refs:
        a, b = loaded.read(ref), corpus.read(ref)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.valid, b.valid)

    table = corpus.chip_table(refs)
    assert table["col_off"].dtype == np.int64 and list(table["raster"]) == [str(scene), str(lcc)]
    table.to_parquet(tmp_path / "chips.parquet")
    assert loaded.refs(gpd.read_parquet(tmp_path / "chips.parquet")) == refs
    with rasterio.open(scene) as src:
        left, top = src.transform @ (-20, 200)
        size = 64 * src.res[0]
        chip_bounds = (left, top - size, left + size, top)
        _bounds_close(table.geometry[0], transform_bounds(src.crs, "EPSG:4326", *chip_bounds))
    assert 0 < table["valid_fraction"][0] < 1 and table["valid_fraction"][1] == 1.0

    lcc.unlink()  # checked lazily, on read
    with pytest.raises(FileNotFoundError, match=r"lcc\.tif: raster 1 of the corpus no longer exists"):
        RasterCorpus.load(tmp_path / "corpus.parquet").read(refs[1])
    with pytest.raises(ValueError, match="not a RasterCorpus"):
        RasterCorpus.load(tmp_path / "chips.parquet")


def test_dataset(scene: Path) -> None:
    corpus = RasterCorpus.from_paths(scene, progress=False)
    refs = [ChipRef(0, Window(c, r, 64, 64)) for r in (0, 96) for c in (0, 128)]
    by_ref = CorpusDataset(corpus)
    chip = by_ref[refs[3]]
    assert chip.image.dtype == np.float32 and chip.image.shape == (4, 64, 64)
    assert chip.image.min() >= 0 and chip.image.max() <= 1 and chip.image.std() > 0.05
    np.testing.assert_array_equal(chip.image, corpus.scale(corpus.read(refs[3]).image, 0))
    with pytest.raises(TypeError, match="by ChipRef"):
        by_ref[0]

    dataset = CorpusDataset(pickle.loads(pickle.dumps(corpus)), refs=corpus.chip_table(refs))
    assert len(dataset) == 4
    np.testing.assert_array_equal(dataset[3].image, chip.image)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=list)
    chips = [c for batch in loader for c in batch]
    for got, ref in zip(chips, refs, strict=True):
        np.testing.assert_array_equal(got.image, by_ref[ref].image)

    raw = CorpusDataset(RasterCorpus.from_paths(scene, scaling=None, progress=False))[refs[3]]
    assert raw.image.dtype == np.float32 and raw.image.max() > 100  # unscaled digital numbers


# ------------------------------------------------------------------------------------------ torchgeo


def test_from_torchgeo_dataset(scene: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("requests") is None:
        pytest.skip("torchgeo.datasets imports requests, which is not installed")
    from torchgeo.datasets import RasterDataset

    folder = tmp_path / "scenes"
    folder.mkdir()
    shutil.copy(scene, folder / "a.tif")
    make_scene(folder / "b.tif", size=128, seed=2)
    dataset = RasterDataset(paths=folder)
    corpus = RasterCorpus.from_torchgeo(dataset, progress=False)
    assert sorted(corpus.index["raster"]) == sorted(str(p) for p in folder.glob("*.tif"))
    assert corpus.index["bands"][0] == [1, 2, 3, 4]


def test_from_torchgeo_index_layout(scene: Path) -> None:
    """Same index layout as torchgeo 0.8's RasterDataset: a GeoDataFrame with a ``filepath`` column."""
    times = pd.IntervalIndex.from_tuples(
        [(pd.Timestamp.min, pd.Timestamp.max)], closed="both", name="datetime"
    )
    index = gpd.GeoDataFrame({"filepath": [str(scene)]}, index=times, geometry=[None], crs="EPSG:32633")
    dataset = SimpleNamespace(index=index, band_indexes=[3, 2, 1], separate_files=False)
    corpus = RasterCorpus.from_torchgeo(dataset, progress=False)
    assert list(corpus.index["raster"]) == [str(scene)] and corpus.index["bands"][0] == [3, 2, 1]
    with pytest.raises(ValueError, match="separate_files"):
        RasterCorpus.from_torchgeo(SimpleNamespace(index=index, separate_files=True))


# ----------------------------------------------------------------------------------------- bad input


def test_bad_inputs(scene: Path, tmp_path: Path) -> None:
    bad_header = tmp_path / "bad_header.tif"  # the scene's directory is at the end of the file
    bad_header.write_bytes(scene.read_bytes()[: scene.stat().st_size // 2])
    bad_pixels = _write(tmp_path / "bad_pixels.tif", np.ones((3, 300, 300), np.uint8))  # opens, reads fail
    bad_pixels.write_bytes(bad_pixels.read_bytes()[: bad_pixels.stat().st_size * 6 // 10])
    no_crs = _write(tmp_path / "no_crs.tif", np.ones((1, 32, 32), np.uint8), crs=None)
    empty = _write(tmp_path / "empty.tif", np.zeros((1, 32, 32), np.uint8), nodata=0)
    local = _write(tmp_path / "local.tif", np.ones((3, 32, 32), np.uint8), crs=CRS.from_wkt(LOCAL_CS))
    reasons = {
        bad_header: "corrupt, truncated",
        bad_pixels: "corrupt or truncated",
        empty: "all pixels are nodata",
        local: "its CRS .* cannot be transformed.*local or engineering CRS.*rio edit-info --crs",
    }
    for path, reason in reasons.items():
        with pytest.raises(RasterFileError, match=rf"{path.name}.*{reason}"):
            RasterCorpus.from_paths(path, progress=False)
    # Without CRS: refused only when reprojecting (tests/test_no_crs.py covers the pixel grid).
    with pytest.raises(RasterFileError, match=r"no_crs\.tif has no CRS.*rio edit-info --crs"):
        RasterCorpus.from_paths(no_crs, crs="EPSG:4326", progress=False)
    with pytest.raises(RasterFileError, match=r"local\.tif: its CRS .* cannot be transformed"):
        RasterCorpus.from_paths(local, crs="EPSG:32618", progress=False)  # to a target grid

    with pytest.warns(UserWarning, match="skipped 4 unreadable") as record:
        corpus = RasterCorpus.from_paths([*reasons, scene], on_error="skip", progress=False)
    assert list(corpus.index["raster"]) == [str(scene)]
    (message,) = [str(w.message) for w in record if "skipped" in str(w.message)]
    assert all(f"{path}: {path}" in message for path in reasons), message
    with pytest.warns(UserWarning), pytest.raises(RasterFileError, match="all 4 were skipped"):
        RasterCorpus.from_paths(list(reasons), on_error="skip", progress=False)

    with pytest.raises(ValueError, match=r"scaling_by must be one of \('dtype', 'raster', 'corpus'\)"):
        RasterCorpus.from_paths(scene, scaling_by="band", progress=False)
    with pytest.raises(FileNotFoundError, match="no rasters found in"):
        RasterCorpus.from_paths(tmp_path / "nothing", progress=False)
    with pytest.raises(FileNotFoundError, match="no rasters found in"):
        RasterCorpus.from_paths(str(tmp_path / "*.jp2"), progress=False)
    globbed = RasterCorpus.from_paths(str(scene.parent / "sc*.tif"), progress=False)
    assert list(globbed.index["raster"]) == [str(scene)]
