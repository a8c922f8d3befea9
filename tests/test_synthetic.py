"""Synthetic scenes: determinism, georeferencing, file layout, nodata collar and plausible spectra."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from geodino.data import BAND_NAMES, LandCover, SceneInfo, make_scene
from geodino.data.synthetic import DEFAULT_ORIGIN


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> SceneInfo:
    folder = tmp_path_factory.mktemp("scene")
    return make_scene(folder / "scene.tif", seed=0, labels_path=folder / "labels.tif")


def _pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_same_seed_same_scene_other_seed_other_scene(tmp_path: Path) -> None:
    a = make_scene(tmp_path / "a.tif", size=128, seed=7)
    b = make_scene(tmp_path / "b.tif", size=128, seed=7)
    c = make_scene(tmp_path / "c.tif", size=128, seed=8)
    np.testing.assert_array_equal(_pixels(a.path), _pixels(b.path))
    np.testing.assert_array_equal(a.classes, b.classes)
    assert (_pixels(a.path) != _pixels(c.path)).mean() > 0.5
    assert (a.classes != c.classes).mean() > 0.2


def test_default_scene_is_georeferenced_tiled_uint16_rgbn(scene: SceneInfo) -> None:
    with rasterio.open(scene.path) as src:
        assert src.crs.to_epsg() == 32633
        assert src.transform == Affine(0.6, 0.0, DEFAULT_ORIGIN[0], 0.0, -0.6, DEFAULT_ORIGIN[1])
        assert src.res == pytest.approx((0.6, 0.6))
        assert (src.width, src.height, src.count) == (512, 512, 4)
        assert src.dtypes == ("uint16",) * 4
        assert src.nodata == 0
        assert src.descriptions == BAND_NAMES
        assert src.colorinterp[:3] == tuple(rasterio.enums.ColorInterp[c] for c in ("red", "green", "blue"))
        assert src.scales == pytest.approx((1e-4,) * 4)
        assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
        assert src.compression == rasterio.enums.Compression.deflate
    assert scene.transform == src.transform
    assert scene.crs == src.crs


def test_custom_grid_crs_bands_and_dtype(tmp_path: Path) -> None:
    info = make_scene(
        tmp_path / "s.tif",
        size=96,
        bands=3,
        gsd=0.3,
        crs="EPSG:32632",
        origin=(400_000.0, 5_000_000.0),
        dtype="uint8",
    )
    with rasterio.open(info.path) as src:
        assert src.crs.to_epsg() == 32632
        assert src.bounds == pytest.approx(
            (400_000.0, 5_000_000.0 - 96 * 0.3, 400_000.0 + 96 * 0.3, 5_000_000.0)
        )
        assert (src.count, src.dtypes[0], src.descriptions) == (3, "uint8", ("red", "green", "blue"))


def test_nodata_collar_matches_class_map(scene: SceneInfo) -> None:
    pixels = _pixels(scene.path)
    outside = scene.classes == LandCover.NODATA
    assert outside[[0, 0, -1, -1], [0, -1, 0, -1]].all(), "corners lie outside the rotated footprint"
    assert not outside[200:312, 200:312].any(), "the centre is inside the footprint"
    assert 0.02 < outside.mean() < 0.25
    assert (pixels[:, outside] == 0).all()
    assert (pixels[:, ~outside] > 0).all(), "valid pixels never equal nodata"
    assert pixels.max() <= 10_000


def test_class_map_has_several_classes_with_plausible_spectra(scene: SceneInfo) -> None:
    pixels = _pixels(scene.path).astype(np.float64) / 10_000  # reflectance
    red, nir = pixels[0], pixels[3]
    present = set(np.unique(scene.classes)) - {LandCover.NODATA}
    assert len(present) >= 5
    assert {LandCover.WATER, LandCover.FOREST, LandCover.ROAD} <= present

    def mean(band: np.ndarray, cls: LandCover) -> float:
        return float(band[scene.classes == cls].mean())

    assert mean(nir, LandCover.WATER) < 0.05 < 0.2 < mean(nir, LandCover.FOREST)
    ndvi = (nir - red) / (nir + red + 1e-9)
    assert mean(ndvi, LandCover.FOREST) > 0.6 > mean(ndvi, LandCover.ROAD)
    assert mean(red, LandCover.ROAD) > 2 * mean(red, LandCover.FOREST)


def test_labels_geotiff_matches_scene_grid(scene: SceneInfo) -> None:
    assert scene.labels_path is not None
    with rasterio.open(scene.labels_path) as labels, rasterio.open(scene.path) as src:
        assert (labels.crs, labels.transform, labels.shape) == (src.crs, src.transform, src.shape)
        np.testing.assert_array_equal(labels.read(1), scene.classes)
        assert labels.colormap(1)[LandCover.WATER][:3] == (31, 120, 180)
        assert labels.tags(1)["class_1"] == "water"


def test_generation_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_scene(tmp_path / "s.tif", size=512, seed=3)
    assert time.perf_counter() - start < 3.0  # about 0.3 s on one core; generous for loaded CI runners


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bands": 5}, "bands=5"),
        ({"size": 16}, "at least 32"),
        ({"gsd": 0.0}, "gsd=0.0"),
        ({"dtype": "float32"}, "dtype='float32'"),
        ({"nodata": 5}, "collides"),
    ],
)
def test_bad_arguments_say_what_is_allowed(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_scene(tmp_path / "s.tif", **kwargs)
    assert not (tmp_path / "s.tif").exists()
