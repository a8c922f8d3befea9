"""Rasters without CRS (PNG / JPEG / TIFF image chips): indexed on their pixel grid, read, sampled, stored."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
import zarr
from conftest import assert_same_chips, shared_path
from geopandas.testing import assert_geodataframe_equal
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from geodino.cli import main
from geodino.data import make_scene
from geodino.data.chipstore import ChipStore, write_chip_store
from geodino.data.corpus import CorpusDataset, RasterCorpus
from geodino.data.curation import curate
from geodino.data.sampler import RandomChipSampler
from geodino.data.tiling import ChipRef, RasterFileError

#: (file name, rasterio driver, height, width) of the image chips without CRS.
CHIPS = (("a.png", "PNG", 300, 300), ("b.png", "PNG", 256, 384), ("c.jpg", "JPEG", 272, 240))


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """``uint8 [3, height, width]`` RGB with smooth regions, edges and sensor noise, like an aerial tile."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(30, 220, (3, height // 32 + 2, width // 32 + 2))
    rows = np.linspace(0, coarse.shape[1] - 1.001, height)
    cols = np.linspace(0, coarse.shape[2] - 1.001, width)
    r0, c0 = rows.astype(int), cols.astype(int)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    smooth = (
        coarse[:, r0][:, :, c0] * (1 - fr) * (1 - fc)
        + coarse[:, r0 + 1][:, :, c0] * fr * (1 - fc)
        + coarse[:, r0][:, :, c0 + 1] * (1 - fr) * fc
        + coarse[:, r0 + 1][:, :, c0 + 1] * fr * fc
    )
    smooth[:, height // 3 : height // 2, :] *= 0.6  # a road-like dark band
    return np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)


def _open(path: str | Path, mode: str = "r", **profile: object) -> rasterio.io.DatasetReaderBase:
    """``rasterio.open`` without the ``NotGeoreferencedWarning`` of a file without geotransform."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, mode, **profile)


def _write(path: Path, driver: str, data: np.ndarray) -> Path:
    """An image file without CRS or geotransform."""
    c, h, w = data.shape
    with _open(path, "w", driver=driver, height=h, width=w, count=c, dtype=data.dtype) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def chips_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("chips")
    for seed, (name, driver, h, w) in enumerate(CHIPS):
        _write(folder / name, driver, _image(h, w, seed))
    _write(folder / "d.tif", "GTiff", _image(200, 260, 9))  # a GeoTIFF without georeferencing
    return folder


@pytest.fixture(scope="module")
def chip_paths(chips_dir: Path) -> list[str]:
    return [str(chips_dir / name) for name in ("a.png", "b.png", "c.jpg", "d.tif")]


@pytest.fixture(scope="module")
def geo_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("geo")
    return make_scene(folder / "scene.tif", size=256, bands=3, dtype="uint8", seed=1).path


def _index(sources: object, expect_no_crs: str) -> RasterCorpus:
    """Index ``sources``, checking that only geodino's one no-CRS warning (``expect_no_crs``) is raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        corpus = RasterCorpus.from_paths(sources, progress=False)
    messages = [str(w.message) for w in caught]
    assert not any(issubclass(w.category, NotGeoreferencedWarning) for w in caught), messages
    (no_crs,) = [m for m in messages if "have no CRS" in m]
    assert no_crs.startswith(expect_no_crs) and "indexed in pixel coordinates; no footprints" in no_crs
    return corpus


def _direct_read(path: str, window: Window) -> np.ndarray:
    with _open(path) as src:
        return src.read(window=window)


def _assert_pixel_rows(index: gpd.GeoDataFrame, paths: list[str]) -> None:
    for path in paths:
        row = index.loc[index["raster"] == path].iloc[0]
        with _open(path) as src:
            assert (row["height"], row["width"], row["count"]) == (src.height, src.width, 3)
        assert pd.isna(row["crs"]) and pd.isna(row["epsg"]) and row.geometry is None
        assert (row["gsd_x"], row["gsd_y"], row["dtype"]) == (1.0, 1.0, "uint8")
        assert row["valid_fraction"] == 1.0


def test_pixel_grid_corpus_indexes_saves_samples_and_reads(tmp_path: Path, chip_paths: list[str]) -> None:
    corpus = _index(chip_paths, "4 of 4 raster(s) have no CRS")
    assert list(corpus.index["raster"]) == chip_paths and corpus.index.crs == "EPSG:4326"
    _assert_pixel_rows(corpus.index, chip_paths)
    assert corpus.scaling is not None and (corpus.scaling[:, 1] > corpus.scaling[:, 0]).all()

    corpus.save(tmp_path / "corpus.parquet")
    loaded = RasterCorpus.load(tmp_path / "corpus.parquet")
    _assert_pixel_rows(loaded.index, chip_paths)
    np.testing.assert_array_equal(loaded.scaling, corpus.scaling)
    for a, b in zip(loaded.valid_maps, corpus.valid_maps, strict=True):
        np.testing.assert_array_equal(a.valid, b.valid)

    refs = RandomChipSampler(loaded.valid_maps, size=128, num_samples=24, seed=0).epoch_refs(0)
    assert {r.raster for r in refs} == {0, 1, 2, 3}
    table = loaded.chip_table(refs)
    assert table.geometry.isna().all() and table["crs"].isna().all() and (table["valid_fraction"] == 1).all()
    assert loaded.refs(table) == refs

    raw = CorpusDataset(loaded, refs, scaled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotGeoreferencedWarning)  # reads open the files quietly too
        chips = [raw[i] for i in range(len(raw))]
    for ref, chip in zip(refs, chips, strict=True):
        path = chip_paths[ref.raster]
        np.testing.assert_array_equal(chip.image, _direct_read(path, ref.window))
        assert chip.valid.all() and chip.crs is None and str(chip.path) == path
    scaled = CorpusDataset(loaded, refs)[0].image
    assert (
        scaled.dtype == np.float32 and scaled.shape == (3, 128, 128) and 0 <= scaled.min() < scaled.max() <= 1
    )

    curated = curate(table, torch.randn(len(table), 8), 6, levels=(4, 2))
    assert len(curated) == 6 and curated.geometry.isna().all()


def test_mixed_corpus_has_footprints_for_georeferenced_rasters_only(
    tmp_path: Path, chip_paths: list[str], geo_scene: Path
) -> None:
    paths = [chip_paths[0], str(geo_scene), chip_paths[1]]
    corpus = _index(paths, "2 of 3 raster(s) have no CRS (e.g. " + chip_paths[0])
    _assert_pixel_rows(corpus.index, [chip_paths[0], chip_paths[1]])
    geo = corpus.index.iloc[1]
    with rasterio.open(geo_scene) as src:
        assert CRS.from_wkt(geo["crs"]) == src.crs and geo["epsg"] == 32633
        lon, lat = geo.geometry.centroid.x, geo.geometry.centroid.y
    assert geo.geometry.is_valid and -180 < lon < 180 and -90 < lat < 90

    corpus.save(tmp_path / "mixed.parquet")
    loaded = RasterCorpus.load(tmp_path / "mixed.parquet")
    assert loaded.index.geometry.isna().tolist() == [True, False, True]
    refs = RandomChipSampler(loaded.valid_maps, size=96, num_samples=30, seed=2).epoch_refs(0)
    table = loaded.chip_table(refs)
    is_geo = np.array([r.raster == 1 for r in refs])
    assert is_geo.any() and not is_geo.all()
    assert (table.geometry.notna().to_numpy() == is_geo).all()
    assert (table["crs"].notna().to_numpy() == is_geo).all()
    assert table.geometry[is_geo].within(geo.geometry.buffer(1e-9)).all()
    assert_geodataframe_equal(table, corpus.chip_table(refs))

    dataset = CorpusDataset(loaded, refs, scaled=False)
    for ref in refs[:8]:
        np.testing.assert_array_equal(dataset[ref].image, _direct_read(paths[ref.raster], ref.window))


@pytest.mark.parametrize("target", [{"crs": "EPSG:4326"}, {"gsd": 2.0}])
def test_target_grid_refuses_a_raster_without_crs(
    target: dict, chip_paths: list[str], geo_scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    png = chip_paths[0]
    fix = r"has no CRS.*target grid.*rio edit-info --crs.*or index without crs / gsd"
    with pytest.raises(RasterFileError, match=rf"^{re.escape(png)} {fix}"):
        RasterCorpus.from_paths([str(geo_scene), png], progress=False, **target)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        corpus = RasterCorpus.from_paths([str(geo_scene), png], on_error="skip", progress=False, **target)
    assert list(corpus.index["raster"]) == [str(geo_scene)]

    (option, value), out = next(iter(target.items())), tmp_path / "corpus.parquet"
    assert main(["index", png, f"--{option}", str(value), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"geodino: error: {png} has no CRS" in err and "rio edit-info --crs" in err and not out.exists()


def test_chip_store_of_pixel_grid_and_mixed_chips(
    tmp_path: Path, chip_paths: list[str], geo_scene: Path
) -> None:
    corpus = _index([*chip_paths[:2], str(geo_scene)], "2 of 3 raster(s) have no CRS")
    refs = RandomChipSampler(corpus.valid_maps, size=64, num_samples=20, seed=3).epoch_refs(0)
    pixel_refs = [r for r in refs if r.raster < 2]
    assert 0 < len(pixel_refs) < len(refs)

    for name, chosen, table in [
        ("pixel_built", pixel_refs, None),
        ("pixel_given", pixel_refs, corpus.chip_table(pixel_refs)),
        ("mixed", refs, None),
    ]:
        source = CorpusDataset(corpus, chosen, scaled=False)
        store = write_chip_store(tmp_path / f"{name}.zarr", source, chips=table, batch_size=4, progress=False)
        reopened = ChipStore(store.path)
        assert_same_chips(reopened, source)
        assert [reopened[i].crs is None for i in range(len(chosen))] == [r.raster < 2 for r in chosen]
        chips = reopened.chips
        no_crs = np.array([r.raster < 2 for r in chosen])
        assert (chips.geometry.isna().to_numpy() == no_crs).all() and (
            chips["crs"].isna().to_numpy() == no_crs
        ).all()
        assert corpus.refs(chips) == chosen
        assert "" in zarr.open_group(store.path, mode="r").attrs["crs"]
    mixed = ChipStore(tmp_path / "mixed.zarr").chips
    geo_rows = mixed.geometry.notna()
    expected = corpus.chip_table(refs).geometry[geo_rows.to_numpy()]
    assert np.allclose(mixed.geometry[geo_rows].total_bounds, expected.total_bounds, atol=1e-9)


def test_loveda_png_tiles() -> None:
    folder = shared_path("data", "landcover", "loveda", "img")
    pngs = sorted(folder.glob("*.png"))
    if not pngs:
        pytest.skip(f"{folder} holds no PNG tiles")
    with pytest.warns(UserWarning, match=rf"{len(pngs)} of {len(pngs)} raster\(s\) have no CRS"):
        corpus = RasterCorpus.from_paths(str(folder / "*.png"), valid_map_side=256, progress=False)
    assert corpus.index["crs"].isna().all() and corpus.index.geometry.isna().all()
    refs = RandomChipSampler(corpus.valid_maps, size=256, num_samples=16, seed=0).epoch_refs(0)
    batch = torch.stack(
        [torch.from_numpy(chip.image) for chip in map(CorpusDataset(corpus, refs).__getitem__, refs)]
    )
    assert batch.shape == (16, 3, 256, 256) and batch.dtype == torch.float32 and batch.std() > 0.05
    ref: ChipRef = refs[0]
    raw = CorpusDataset(corpus, refs, scaled=False)[ref].image
    np.testing.assert_array_equal(raw, _direct_read(str(pngs[ref.raster]), ref.window))


def test_cli_index_and_sample_png_chips(
    tmp_path: Path, chips_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    corpus_path, table_path = tmp_path / "corpus.parquet", tmp_path / "chips.parquet"
    assert main(["index", str(chips_dir / "*.png"), "--out", str(corpus_path)]) == 0
    captured = capsys.readouterr()
    assert "geodino: warning: 2 of 2 raster(s) have no CRS" in captured.err
    assert "NotGeoreferencedWarning" not in captured.err and (
        "indexed 2 raster(s), 0 CRS + 2 in pixel coordinates (no CRS)" in captured.out
    )
    assert main(["sample", str(corpus_path), "--n", "10", "--size", "64", "--out", str(table_path)]) == 0
    table = gpd.read_parquet(table_path)
    assert len(table) == 10 and table.geometry.isna().all() and table["crs"].isna().all()

    assert main(["index", str(chips_dir), "--out", str(corpus_path)]) == 0  # a folder: its *.tif only
    assert list(RasterCorpus.load(corpus_path).index["raster"]) == [str(chips_dir / "d.tif")]
    empty = tmp_path / "pngs"
    empty.mkdir()
    _write(empty / "x.png", "PNG", _image(64, 64, 5))
    assert main(["index", str(empty), "--out", str(corpus_path)]) == 2
    assert "give a glob such as 'chips/**/*.png'" in capsys.readouterr().err
