"""Stand-ins for the issue's held-out rasters, through the whole data path.

Custom CRSs with no EPSG code (PROJ-string LAEA and Transverse Mercator, ESRI WKT1 Albers), undeclared fill
values (0, 65535, -9999, -32768), int16 surface reflectance with negative values, a corpus mixing them with
a shared real raster, and broken files: each through ``RasterCorpus.from_paths`` (GeoParquet round trip),
the scaling, ``RandomChipSampler``, ``CorpusDataset``, ``RasterTiler`` + ``mosaic``, ``ChipLoader``, the
chip store and the ``geodino index / sample / chips`` commands. Rasters are built here with a known valid
footprint (a rotated rectangle, like a rotated acquisition) so masks can be compared pixel for pixel.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch.utils.data
from affine import Affine
from conftest import shared_path
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.shutil import copy as rio_copy
from rasterio.warp import calculate_default_transform, reproject, transform_bounds
from rasterio.windows import Window

from geodino.cli import main
from geodino.data import (
    ChipLoader,
    ChipRef,
    ChipStore,
    CorpusDataset,
    RandomChipSampler,
    RasterCorpus,
    RasterFileError,
    RasterTiler,
    write_chip_store,
)

#: Lambert Azimuthal Equal Area from PROJ parameters only (GRS80, no datum: not EPSG:3035).
LAEA = "+proj=laea +lat_0=47 +lon_0=-3 +x_0=1000000 +y_0=2000000 +ellps=GRS80 +units=m +no_defs"
#: A made-up southern Transverse Mercator (UTM-like false northing, non-UTM meridian and scale).
TMERC = "+proj=tmerc +lat_0=0 +lon_0=-62.5 +k=0.9995 +x_0=600000 +y_0=10000000 +datum=WGS84 +units=m +no_defs"
#: ESRI-dialect WKT1 (GCS_/D_ names, "Albers"), as ArcGIS writes it: an African Albers with no EPSG code.
ESRI_ALBERS = (
    'PROJCS["Custom_Albers",GEOGCS["GCS_WGS_1984",DATUM["D_WGS_1984",SPHEROID["WGS_1984",6378137.0,'
    '298.257223563]],PRIMEM["Greenwich",0.0],UNIT["Degree",0.0174532925199433]],PROJECTION["Albers"],'
    'PARAMETER["False_Easting",0.0],PARAMETER["False_Northing",0.0],PARAMETER["Central_Meridian",24.0],'
    'PARAMETER["Standard_Parallel_1",-18.0],PARAMETER["Standard_Parallel_2",-32.0],'
    'PARAMETER["Latitude_Of_Origin",0.0],UNIT["Meter",1.0]]'
)
#: CRS definition and upper-left corner (CRS units) of a raster in that CRS.
CUSTOM_CRSS = {
    "laea": (LAEA, (900_000.0, 2_300_000.0)),
    "tmerc": (TMERC, (550_000.0, 8_200_000.0)),
    "esri": (ESRI_ALBERS, (-100_000.0, -2_500_000.0)),
}
UTM_SOUTH = "EPSG:32733"
H, W = 240, 300  # raster size, pixels (smaller than the valid maps' 1024 cells: the maps are exact)


def _footprint(height: int = H, width: int = W, margin: float = 25.0) -> np.ndarray:
    """``bool [height, width]``: a rectangle rotated by 12 degrees, ``margin`` px inside the raster."""
    yy, xx = np.mgrid[:height, :width] + 0.5
    angle = np.deg2rad(12)
    u = (xx - width / 2) * np.cos(angle) + (yy - height / 2) * np.sin(angle)
    v = -(xx - width / 2) * np.sin(angle) + (yy - height / 2) * np.cos(angle)
    return (np.abs(u) < width / 2 - margin) & (np.abs(v) < height / 2 - margin)


def _write(
    path: Path,
    data: np.ndarray,
    crs: CRS | str | None = UTM_SOUTH,
    origin: tuple[float, float] = (300_000.0, 7_000_000.0),
    res: float = 10.0,
    **profile: object,
) -> Path:
    """A tiled (128 px blocks) DEFLATE GeoTIFF of ``data [C, h, w]`` with ``res`` CRS units per pixel."""
    with rasterio.open(
        path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
        dtype=data.dtype, crs=crs, transform=Affine(res, 0, origin[0], 0, -res, origin[1]), tiled=True,
        blockxsize=128, blockysize=128, compress="deflate", **profile,
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


def _reflectance(seed: int, bands: int = 3, fill: int = -32768) -> np.ndarray:
    """Sentinel-2 L2A-like int16 surface reflectance x 10000 (-1000..12000) with ``fill`` off-footprint."""
    rng = np.random.default_rng(seed)
    data = np.clip(rng.normal(2500, 2200, size=(bands, H, W)), -1000, 12000).astype(np.int16)
    data[:, ::7, ::5] = 0  # real zeros inside the footprint: valid data, not fill
    data[:, ~_footprint()] = fill
    return data


def _quiet_from_paths(*args: object, **kwargs: object) -> RasterCorpus:
    """``RasterCorpus.from_paths`` failing on any warning (no spurious fill hints) but the pooled one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="the scaling percentiles are pooled", category=UserWarning)
        return RasterCorpus.from_paths(*args, progress=False, **kwargs)


def _window_mask(mask: np.ndarray, window: Window) -> np.ndarray:
    """``mask`` over ``window`` (pixels), False outside the raster."""
    r0, c0 = int(window.row_off), int(window.col_off)
    out = np.zeros((int(window.height), int(window.width)), dtype=bool)
    inner = mask[max(r0, 0) : r0 + out.shape[0], max(c0, 0) : c0 + out.shape[1]]
    out[max(-r0, 0) : max(-r0, 0) + inner.shape[0], max(-c0, 0) : max(-c0, 0) + inner.shape[1]] = inner
    return out


# ------------------------------------------------------------------------------ custom CRS, no EPSG


@pytest.fixture(scope="module", params=sorted(CUSTOM_CRSS))
def custom(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, np.ndarray]:
    """uint16 raster in a custom CRS with a declared nodata 0 collar, and its pixels."""
    definition, origin = CUSTOM_CRSS[request.param]
    data = np.random.default_rng(0).integers(1, 9000, size=(3, H, W), dtype=np.uint16)
    data[:, ~_footprint()] = 0
    folder = tmp_path_factory.mktemp(request.param)
    path = _write(folder / f"{request.param}.tif", data, CRS.from_user_input(definition), origin, nodata=0)
    return path, data


def test_custom_crs_is_stored_losslessly_and_chips_carry_it(
    custom: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    path, data = custom
    with rasterio.open(path) as src:
        crs, transform, bounds = src.crs, src.transform, src.bounds
    assert crs.to_epsg() is None  # a real stand-in: nothing to fall back on
    RasterCorpus.from_paths(path, progress=False).save(tmp_path / "corpus.parquet")
    corpus = RasterCorpus.load(tmp_path / "corpus.parquet")
    row = corpus.index.iloc[0]
    assert pd.isna(row["epsg"])
    assert CRS.from_wkt(row["crs"]) == crs and CRS.from_wkt(row["crs"]).to_wkt() == crs.to_wkt()
    assert Affine(*row["transform"]) == transform
    expected = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
    np.testing.assert_allclose(row.geometry.bounds, expected, rtol=0, atol=1e-6)
    assert row["valid_fraction"] == _footprint().mean()

    refs = RandomChipSampler(corpus.valid_maps, size=48, num_samples=30, max_nodata=0.0, seed=3).epoch_refs(0)
    dataset = CorpusDataset(corpus, refs, scaled=False)
    table = corpus.chip_table(refs)
    for i, (_, window) in enumerate(refs):
        chip = dataset[i]
        assert _footprint()[window.toslices()].all()  # max_nodata=0: never in the collar
        assert chip.crs == crs and chip.crs.to_wkt() == crs.to_wkt()
        assert chip.transform == transform @ Affine.translation(window.col_off, window.row_off)
        np.testing.assert_array_equal(chip.image, data[(slice(None), *window.toslices())])
        assert chip.valid.all()
        (left, bottom), (right, top) = (chip.transform @ (0, 48)), (chip.transform @ (48, 0))
        chip_bounds = (left, bottom, right, top)
        expected = transform_bounds(crs, "EPSG:4326", *chip_bounds, densify_pts=4)
        np.testing.assert_allclose(table.geometry[i].bounds, expected, rtol=0, atol=1e-6)
    assert (table["crs"] == row["crs"]).all()


def test_custom_crs_tiler_mosaic_and_loader(custom: tuple[Path, np.ndarray]) -> None:
    path, data = custom
    with rasterio.open(path) as src:
        crs, transform = src.crs, src.transform
    tiler = RasterTiler(path, size=64, stride=48)
    chips = list(tiler)
    for chip in chips:
        assert chip.crs == crs
        assert chip.transform == transform @ Affine.translation(chip.window.col_off, chip.window.row_off)
    np.testing.assert_array_equal(tiler.mosaic([c.image for c in chips]), data)
    np.testing.assert_array_equal(tiler.mosaic([c.valid for c in chips]), _footprint())
    batches = list(ChipLoader.from_tiler(tiler, batch_size=8))
    assert [w for b in batches for w in b.windows] == tiler.windows
    for batch, start in zip(batches, range(0, len(chips), 8), strict=True):
        for j, chip in enumerate(chips[start : start + 8]):
            assert batch.crs[j] == crs and batch.transforms[j] == chip.transform
            np.testing.assert_array_equal(batch.image[j].numpy(), chip.image.astype(np.float32))
            np.testing.assert_array_equal(batch.valid[j].numpy(), chip.valid)


@pytest.mark.parametrize(("target", "gsd"), [("EPSG:4326", None), ("EPSG:3857", 20.0), (LAEA, 15.0)])
def test_reprojection_from_a_custom_crs(
    custom: tuple[Path, np.ndarray], target: str, gsd: float | None
) -> None:
    path, data = custom
    corpus = RasterCorpus.from_paths(path, crs=target, gsd=gsd, resampling="nearest", progress=False)
    row = corpus.index.iloc[0]
    dst_crs = CRS.from_user_input(target)
    with rasterio.open(path) as src:
        res = None if gsd is None else (gsd, gsd)
        transform, width, height = calculate_default_transform(
            src.crs, dst_crs, src.width, src.height, *src.bounds, resolution=res
        )
        expected = np.zeros((3, height, width), dtype=np.uint16)
        reproject(
            data, expected, src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
            dst_crs=dst_crs, resampling=Resampling.nearest, src_nodata=0, dst_nodata=0,
        )  # fmt: skip
    assert (row["width"], row["height"]) == (width, height)
    assert Affine(*row["transform"]) == transform
    assert CRS.from_wkt(row["crs"]) == dst_crs
    chip = corpus.read(ChipRef(0, Window(0, 0, width, height)))
    assert chip.crs == dst_crs and chip.transform == transform
    assert (chip.image == expected).all(axis=0).mean() > 0.999  # GDAL warper both ways; edge rounding
    valid = (expected != 0).any(axis=0)
    assert (chip.valid == valid).mean() > 0.999
    assert row["valid_fraction"] == pytest.approx(valid.mean(), abs=0.002)


def test_custom_target_crs_from_a_real_raster(tmp_path: Path) -> None:
    path = shared_path("data", "rasters", "RGB.byte.tif")
    corpus = RasterCorpus.from_paths(path, crs=LAEA, gsd=300.0, progress=False)
    corpus.save(tmp_path / "corpus.parquet")
    loaded = RasterCorpus.load(tmp_path / "corpus.parquet")
    row = loaded.index.iloc[0]
    assert CRS.from_wkt(row["crs"]) == CRS.from_proj4(LAEA) and pd.isna(row["epsg"])
    chip = loaded.read(ChipRef(0, Window(0, 0, int(row["width"]), int(row["height"]))))
    assert chip.crs == CRS.from_proj4(LAEA) and chip.transform == Affine(*row["transform"])
    assert chip.valid.mean() == pytest.approx(row["valid_fraction"], abs=0.01)
    assert 0.3 < row["valid_fraction"] < 0.9  # the rotated collar is masked, not counted as data


# ------------------------------------------------------------------------------ undeclared fill value


FILLS = [("uint16", 0), ("uint16", 65535), ("int16", -9999), ("int16", -32768), ("float32", -9999.0)]


@pytest.fixture(scope="module", params=FILLS, ids=[f"{d}{v}" for d, v in FILLS])
def undeclared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, np.ndarray, float]:
    """A 2-band raster without a nodata tag whose collar holds a fill value, its pixels and the value."""
    dtype, fill = request.param
    data = np.random.default_rng(5).integers(1, 3000, size=(2, H, W)).astype(dtype)
    data[:, ~_footprint()] = fill
    path = _write(
        tmp_path_factory.mktemp("fill") / f"fill_{dtype}_{fill}.tif", data, TMERC, (550_000.0, 8_200_000.0)
    )
    return path, data, fill


def test_undeclared_fill_is_hinted_then_masked(undeclared: tuple[Path, np.ndarray, float]) -> None:
    path, data, fill = undeclared
    with pytest.warns(UserWarning, match=rf"--nodata {fill}\b.*\n.*{path.name}: border value {fill}"):
        unmasked = RasterCorpus.from_paths(path, progress=False)
    assert unmasked.index["valid_fraction"][0] == 1.0  # the fill counts as data until declared

    footprint = _footprint()
    corpus = _quiet_from_paths(path, nodata=fill)
    assert corpus.index["nodata"][0] == fill
    assert corpus.index["valid_fraction"][0] == footprint.mean()
    np.testing.assert_array_equal(corpus.valid_maps[0].valid, footprint)
    np.testing.assert_array_equal(corpus.scaling[0], np.percentile(data[:, footprint], [2, 98], axis=1))
    refs = RandomChipSampler(corpus.valid_maps, size=40, num_samples=40, max_nodata=0.0).epoch_refs(0)
    assert all(footprint[w.toslices()].all() for _, w in refs)
    edge = ChipRef(0, Window(-16, H - 40, 64, 64))  # across the collar and past the raster's edge
    chip = corpus.read(edge)
    np.testing.assert_array_equal(chip.valid, _window_mask(footprint, edge.window))
    assert (chip.image[:, :16] == fill).all()  # outside the raster: the fill value
    scaled = CorpusDataset(corpus)[edge].image
    assert scaled.dtype == np.float32 and scaled.min() >= 0 and scaled.max() <= 1

    tiler = RasterTiler(path, size=64, nodata=fill)
    chips = list(tiler)
    np.testing.assert_array_equal(tiler.mosaic([c.valid for c in chips]), footprint)
    for batch in ChipLoader.from_tiler(tiler, batch_size=len(chips)):
        np.testing.assert_array_equal(batch.valid.numpy(), np.stack([c.valid for c in chips]))
        np.testing.assert_array_equal(
            batch.image.numpy(), np.stack([c.image for c in chips]).astype(np.float32)
        )


def test_index_cli_nodata_flag_and_hint(
    undeclared: tuple[Path, np.ndarray, float], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path, _, fill = undeclared
    out = tmp_path / "corpus.parquet"
    assert main(["index", str(path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "geodino: warning: 1 raster(s) declare no nodata" in err and f"--nodata {fill}" in err
    assert f"{path}: border value {fill}" in err
    assert main(["index", str(path), "--out", str(out), "--nodata", str(fill)]) == 0
    assert "warning" not in capsys.readouterr().err
    corpus = RasterCorpus.load(out)
    assert corpus.index["nodata"][0] == fill and corpus.index["valid_fraction"][0] == _footprint().mean()


def test_nodata_the_dtype_cannot_hold(tmp_path: Path) -> None:
    """-9999 is meant for int16 files: uint8 / uint16 files keep their own masks and do not crash."""
    rgb = shared_path("data", "rasters", "RGB.byte.tif")
    collar = np.where(_footprint(), 1000, 0).astype(np.uint16)[None]  # a 0 collar -9999 cannot mask
    u16 = _write(tmp_path / "u16.tif", collar)
    with pytest.warns(UserWarning, match=r"u16\.tif: border value 0") as record:
        corpus = RasterCorpus.from_paths([rgb, u16], bands=[1], nodata=-9999, progress=False)
    assert not any("RGB.byte" in str(w.message) for w in record if "border value" in str(w.message))
    assert corpus.index["nodata"][0] == 0 and pd.isna(corpus.index["nodata"][1])
    with rasterio.open(rgb) as src:
        mask = src.read_masks(1) > 0  # its declared nodata 0 still applies
    np.testing.assert_array_equal(corpus.valid_maps[0].valid, mask)
    chip = corpus.read(ChipRef(0, Window(-10, -10, 64, 64)))
    np.testing.assert_array_equal(chip.valid, _window_mask(mask, Window(-10, -10, 64, 64)))
    assert chip.image.dtype == np.uint8 and (chip.image[:, :10] == 0).all()
    with pytest.raises(RasterFileError, match=r"u16\.tif: nodata=-9999 cannot occur in this uint16 raster"):
        RasterTiler(u16, size=64, nodata=-9999)
    refs = [ChipRef(0, Window(-10, -10, 64, 64)), ChipRef(1, Window(0, 0, 64, 64))]
    (batch,) = list(ChipLoader([rgb, u16], refs, 2, bands=[1], nodata=-9999))
    np.testing.assert_array_equal(batch.valid[0].numpy(), chip.valid)
    np.testing.assert_array_equal(batch.image[0].numpy(), chip.image.astype(np.float32))
    assert batch.valid[1].all()  # -9999 cannot mark the uint16 collar: read as it is


# ------------------------------------------------------------------------------ int16 + mixed corpus


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real uint8 raster (declared nodata 0), int16 reflectance (declared -32768, real zeros inside) in a
    custom CRS, a uint16 raster with an undeclared 0 collar and values above 32767, in an ESRI CRS."""
    folder = tmp_path_factory.mktemp("mixed")
    bright = np.random.default_rng(7).integers(30000, 65000, size=(3, H, W), dtype=np.uint16)
    bright[:, ~_footprint()] = 0
    return {
        "rgb": shared_path("data", "rasters", "RGB.byte.tif"),
        "s2": _write(folder / "s2_l2a.tif", _reflectance(6), LAEA, (900_000.0, 2_300_000.0), nodata=-32768),
        "u16": _write(folder / "bright.tif", bright, ESRI_ALBERS, (-100_000.0, -2_500_000.0)),
    }


def test_mixed_corpus_keeps_each_rasters_nodata(mixed: dict[str, Path], tmp_path: Path) -> None:
    corpus = _quiet_from_paths(list(mixed.values()), bands=[1, 2, 3], nodata=0)
    assert list(corpus.index["nodata"]) == [0, -32768, 0]  # declared, declared, the override
    assert list(corpus.index["dtype"]) == ["uint8", "int16", "uint16"]
    footprint = _footprint()
    with rasterio.open(mixed["rgb"]) as src:
        rgb_mask = src.dataset_mask() > 0
    np.testing.assert_array_equal(corpus.valid_maps[0].valid, rgb_mask)
    np.testing.assert_array_equal(corpus.valid_maps[1].valid, footprint)  # zeros inside stay valid
    np.testing.assert_array_equal(corpus.valid_maps[2].valid, footprint)

    # Raw reads share one dtype that holds int16 and uint16: int32, no wrap-around.
    refs = [ChipRef(i, Window(-8, H - 56, 64, 64)) for i in (1, 2)] + [ChipRef(0, Window(100, 100, 64, 64))]
    raw = CorpusDataset(corpus, refs, scaled=False)
    assert raw.dtype == np.int32
    s2, bright = rasterio.open(mixed["s2"]).read(), rasterio.open(mixed["u16"]).read()
    for i, (pixels, fill) in enumerate(((s2, -32768), (bright, 0))):
        chip = raw[i]
        assert chip.image.dtype == np.int32
        np.testing.assert_array_equal(chip.image[:, :56, 8:], pixels[:, H - 56 :, :56])
        assert (chip.image[:, :, :8] == fill).all() and (chip.image[:, 56:] == fill).all()
        np.testing.assert_array_equal(chip.valid, _window_mask(footprint, refs[i].window))
    assert (raw[0].image[:, raw[0].valid] < 0).any() and (raw[1].image > 32767).any()

    # Scaling per dtype, fills excluded: the low end of the int16 raster is real reflectance, not -32768.
    two = _quiet_from_paths([mixed["s2"], mixed["u16"]], nodata=0)
    np.testing.assert_array_equal(two.scaling[0], np.percentile(s2[:, footprint], [2, 98], axis=1))
    np.testing.assert_array_equal(two.scaling[1], np.percentile(bright[:, footprint], [2, 98], axis=1))
    assert (two.scaling[0, 0] < 0).all() and (two.scaling[1, 0] > 30000).all()
    chip = CorpusDataset(two)[ChipRef(0, refs[0].window)]
    low, high = two.scaling[0, :, :, None, None]
    expected = np.clip((raw[0].image - low) / (high - low), 0, 1)
    np.testing.assert_allclose(chip.image, expected, rtol=0, atol=1e-6)
    # One scaling over the corpus on request.
    pooled = np.concatenate([s2[:, footprint], bright[:, footprint]], axis=1)
    one = _quiet_from_paths([mixed["s2"], mixed["u16"]], nodata=0, scaling_by="corpus")
    np.testing.assert_array_equal(one.scaling, np.percentile(pooled, [2, 98], axis=1)[None].repeat(2, axis=0))

    store = write_chip_store(tmp_path / "chips.zarr", raw, progress=False)
    assert store.dtype == "int32"
    for i in range(len(raw)):
        np.testing.assert_array_equal(store[i].image, raw[i].image)
        assert store[i].crs == raw[i].crs and store[i].transform == raw[i].transform


def test_mixed_corpus_through_the_cli(
    mixed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    corpus_path, table_path, store_path = (
        tmp_path / "corpus.parquet",
        tmp_path / "chips.parquet",
        tmp_path / "c.zarr",
    )
    files = [str(p) for p in mixed.values()]
    assert main(["index", *files, "--bands", "1", "2", "3", "--nodata", "0", "--out", str(corpus_path)]) == 0
    assert (
        main(
            [
                "sample",
                str(corpus_path),
                "--n",
                "48",
                "--size",
                "48",
                "--max-nodata",
                "0",
                "--out",
                str(table_path),
            ]
        )
        == 0
    )
    assert main(["chips", str(table_path), "--corpus", str(corpus_path), "--out", str(store_path)]) == 0
    assert "warning" not in capsys.readouterr().err  # scaled per dtype: nothing pooled over dtypes
    corpus, table, store = RasterCorpus.load(corpus_path), gpd.read_parquet(table_path), ChipStore(store_path)
    assert store.dtype == "int32" and len(store) == 48
    assert table["raster"].nunique() == 3
    for i, ref in enumerate(corpus.refs(table)):
        chip = store[i]
        with rasterio.open(corpus.index["raster"][ref.raster]) as src:
            assert chip.crs == src.crs and chip.crs.to_wkt() == table["crs"][i] == src.crs.to_wkt()
            assert chip.transform == src.transform @ Affine.translation(
                ref.window.col_off, ref.window.row_off
            )
            np.testing.assert_array_equal(chip.image, src.read([1, 2, 3], window=ref.window))
            assert chip.valid.all() and (src.dataset_mask(window=ref.window) > 0).all()


# ------------------------------------------------------------------------------------------- errors


def _truncated(folder: Path) -> Path:
    path = _write(folder / "truncated.tif", _reflectance(1), nodata=-32768)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _corrupt_header(folder: Path) -> Path:
    path = folder / "corrupt.tif"
    path.write_bytes(b"II*\x00" + np.random.default_rng(0).bytes(4000))  # TIFF magic, garbage directory
    return path


BAD_FILES = {
    # name -> (make the file, what the error says, what it tells the user to do)
    "truncated": (_truncated, "truncated", "re-download or re-export"),
    "corrupt": (_corrupt_header, "corrupt, truncated or not a GeoTIFF", "re-download or re-export"),
    "all_nodata": (
        lambda d: _write(d / "all_nodata.tif", np.full((3, 64, 64), -32768, np.int16), nodata=-32768),
        "all pixels are nodata",
        "Check its nodata value",
    ),
    "two_bands": (
        lambda d: _write(d / "two_bands.tif", _reflectance(3, bands=2)),
        "has no band 3",
        "Select bands",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_are_named_with_a_fix(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make, reason, fix = BAD_FILES[name]
    path = make(tmp_path)
    named = re.escape(str(path))
    with pytest.raises(RasterFileError, match=rf"^{named}.*{re.escape(reason)}.*{re.escape(fix)}"):
        RasterCorpus.from_paths(path, bands=[1, 2, 3], progress=False)
    with pytest.raises(RasterFileError, match=rf"^{named}"):
        list(RasterTiler(path, size=64, bands=[1, 2, 3]))
    out = tmp_path / "corpus.parquet"
    assert main(["index", str(path), "--bands", "1", "2", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"geodino: error: {path}" in err and reason in err and fix in err and "--skip-bad" in err
    assert "Traceback" not in err and not out.exists()


def test_no_crs_is_refused_only_when_reprojecting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A GeoTIFF with a geotransform but no CRS: the corpus indexes it on its pixel grid (tests/test_no_crs.py
    covers reading it); reprojecting it, or tiling it, fails naming the file and the fix."""
    path = _write(tmp_path / "no_crs.tif", _reflectance(2), crs=None)
    refused = rf"^{re.escape(str(path))} has no CRS.*rio edit-info --crs"
    with pytest.raises(RasterFileError, match=refused):
        RasterCorpus.from_paths(path, bands=[1, 2, 3], crs="EPSG:4326", progress=False)
    with pytest.raises(RasterFileError, match=refused):
        list(RasterTiler(path, size=64, bands=[1, 2, 3]))
    out = tmp_path / "corpus.parquet"
    assert main(["index", str(path), "--crs", "EPSG:4326", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"geodino: error: {path} has no CRS" in err and "rio edit-info --crs" in err and not out.exists()

    with pytest.warns(UserWarning, match=r"1 of 1 raster\(s\) have no CRS"):
        row = RasterCorpus.from_paths(path, nodata=-32768, progress=False).index.iloc[0]
    assert pd.isna(row["crs"]) and row.geometry is None and (row["gsd_x"], row["gsd_y"]) == (10.0, 10.0)


def test_truncation_past_the_overviews_fails_at_read_time_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A COG keeps its overviews before the full-resolution tiles: cut short, it indexes from the overviews
    (nothing to notice yet) and the reads of the lost tiles must fail loudly, naming the file."""
    yy, xx = np.mgrid[:2048, :2048]
    full = _write(tmp_path / "full.tif", ((yy * 7 + xx * 3) % 4000 + 1).astype(np.uint16)[None])
    cog = tmp_path / "cog.tif"
    rio_copy(full, cog, driver="COG", compress="deflate", blocksize=256, overview_resampling="nearest")
    cog.write_bytes(cog.read_bytes()[: cog.stat().st_size * 6 // 10])
    corpus = RasterCorpus.from_paths(cog, valid_map_side=256, progress=False)
    assert corpus.index["valid_fraction"][0] == 1.0
    lost = ChipRef(0, Window(1792, 1792, 256, 256))  # the last tile: past the cut
    match = rf"{re.escape(str(cog))}: cannot read chip .*corrupt or truncated.*Read error.*re-download"
    with pytest.raises(RasterFileError, match=match):
        corpus.read(lost)
    refs = RandomChipSampler(corpus.valid_maps, size=256, num_samples=40, seed=1).epoch_refs(0)
    with pytest.raises(RasterFileError, match=match):
        list(torch.utils.data.DataLoader(CorpusDataset(corpus, refs), batch_size=8, collate_fn=list))
    with pytest.raises(RasterFileError, match=match):
        list(ChipLoader([cog], [*refs, lost], batch_size=8))
    with pytest.raises(RasterFileError, match=rf"{re.escape(str(cog))}: cannot read chip \d+"):
        list(RasterTiler(cog, size=256))

    corpus.save(tmp_path / "corpus.parquet")
    corpus.chip_table([*refs, lost]).to_parquet(tmp_path / "chips.parquet")
    args = [str(tmp_path / "chips.parquet"), "--corpus", str(tmp_path / "corpus.parquet")]
    assert main(["chips", *args, "--out", str(tmp_path / "chips.zarr")]) == 2
    err = capsys.readouterr().err
    assert f"geodino: error: {cog}: cannot read chip" in err and "Traceback" not in err


def test_mixed_dtypes_are_scaled_per_dtype() -> None:
    """uint8 beside uint16: by default each dtype has its own levels, so the uint8 raster spans [0, 1];
    ``scaling_by="corpus"`` pools them (the uint16 raster sets the high end, the uint8 one comes out as a dark
    sliver) and warns."""
    rasters = [shared_path("data", "rasters", name) for name in ("RGB.byte.tif", "rgb16.tif")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corpus = RasterCorpus.from_paths(rasters, bands=[1, 2, 3], progress=False)
    assert corpus.scaling_by == "dtype"
    with rasterio.open(rasters[0]) as src:
        data = src.read(out_shape=(3, 465, 512))  # the decimated read: 512 px on the long side (791 px)
        whole = Window(0, 0, src.width, src.height)
    valid = (data != 0).any(axis=0)  # declared nodata 0, dataset-mask semantics
    np.testing.assert_array_equal(corpus.scaling[0], np.percentile(data[:, valid], [2, 98], axis=1))
    with rasterio.open(rasters[1]) as src:  # 500 px: read whole, no nodata
        expected = np.percentile(src.read().reshape(3, -1), [2, 98], axis=1)
    np.testing.assert_array_equal(corpus.scaling[1], expected)
    chip = CorpusDataset(corpus)[ChipRef(0, whole)]
    assert chip.image[:, chip.valid].min() == 0 and chip.image[:, chip.valid].max() == 1

    with pytest.warns(
        UserWarning, match=r"different dtypes \(scaling_by='corpus'\).*scaling_by='dtype'"
    ) as caught:
        pooled = RasterCorpus.from_paths(rasters, bands=[1, 2, 3], scaling_by="corpus", progress=False)
    assert all(str(path) in str(caught[-1].message) for path in rasters)
    np.testing.assert_array_equal(pooled.scaling[0], pooled.scaling[1])
    assert pooled.scaling[0, 1].min() > 255  # the uint16 raster dominates the pooled high percentile
    chip = CorpusDataset(pooled)[ChipRef(0, whole)]
    assert chip.image.max() < 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RasterCorpus.from_paths(rasters[:1], bands=[1, 2, 3], scaling_by="corpus", progress=False)


def test_index_cli_scaling_by(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rasters = [str(shared_path("data", "rasters", name)) for name in ("RGB.byte.tif", "rgb16.tif")]
    out = tmp_path / "corpus.parquet"
    index = ["index", *rasters, "--bands", "1", "2", "3", "--out", str(out)]
    assert main(index) == 0
    assert RasterCorpus.load(out).scaling_by == "dtype"
    assert main([*index, "--scaling-by", "raster"]) == 0
    assert "warning" not in capsys.readouterr().err
    corpus = RasterCorpus.load(out)
    direct = RasterCorpus.from_paths(rasters, bands=[1, 2, 3], scaling_by="raster", progress=False)
    assert corpus.scaling_by == "raster"
    np.testing.assert_array_equal(corpus.scaling, direct.scaling)
    assert main([*index, "--scaling-by", "corpus"]) == 0
    assert "--scaling-by dtype" in capsys.readouterr().err  # the pooled-dtypes warning names the fix
    assert RasterCorpus.load(out).scaling_by == "corpus"
