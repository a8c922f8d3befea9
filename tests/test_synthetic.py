"""Synthetic scenes: determinism, grids, file layout, nodata, spectra, canopy height and known change."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from geodino.data import BAND_NAMES, LandCover, SceneInfo, make_scene
from geodino.data.synthetic import (
    CANOPY_NODATA,
    CHANGE_NODATA,
    DEFAULT_ORIGIN,
    ChangePair,
    make_change_pair,
)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> SceneInfo:
    folder = tmp_path_factory.mktemp("scene")
    return make_scene(
        folder / "scene.tif", seed=0, labels_path=folder / "labels.tif", canopy_path=folder / "canopy.tif"
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> ChangePair:
    folder = tmp_path_factory.mktemp("pair")
    return make_change_pair(folder / "a.tif", folder / "b.tif", change_path=folder / "change.tif", seed=0)


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


def _grid(path: Path) -> tuple:
    with rasterio.open(path) as src:
        return src.crs, src.transform, src.shape


def _stand_anomaly(values: np.ndarray, stand: np.ndarray) -> np.ndarray:
    """Values minus the mean of their stand (one integer id per value)."""
    _, index = np.unique(stand, return_inverse=True)
    means = np.bincount(index, weights=values) / np.bincount(index)
    return values - means[index]


def test_canopy_geotiff_matches_scene_grid(scene: SceneInfo) -> None:
    assert scene.canopy_path is not None and scene.canopy_height is not None
    assert _grid(scene.canopy_path) == _grid(scene.path)
    with rasterio.open(scene.canopy_path) as src:
        assert (src.count, src.dtypes[0], src.nodata) == (1, "float32", CANOPY_NODATA)
        assert src.descriptions == ("canopy_height_m",)
        assert src.units == ("m",)
        np.testing.assert_array_equal(src.read(1), scene.canopy_height)
        assert src.read_masks(1).astype(bool).tolist() == scene.landscape.valid.tolist()


def test_canopy_heights_follow_land_cover(scene: SceneInfo) -> None:
    height, classes, valid = scene.canopy_height, scene.classes, scene.landscape.valid
    assert (height[~valid] == CANOPY_NODATA).all()
    assert height[valid].min() >= 0.0 and height[valid].max() <= 40.0
    forest = classes == LandCover.FOREST
    assert np.median(height[forest]) > 5.0
    stand_medians = [
        np.median(height[forest & (scene.landscape.parcel == p)])
        for p in np.unique(scene.landscape.parcel[forest])
    ]
    assert np.std(stand_medians) > 2.0, "stands differ in height"
    assert np.percentile(height[forest], 95) > 15.0
    for cls in (LandCover.BUILDING, LandCover.ROAD, LandCover.WATER, LandCover.BARE_SOIL):
        assert (height[classes == cls] == 0.0).all(), cls.name
    low = (classes == LandCover.CROPLAND) | (classes == LandCover.GRASSLAND)
    assert height[low].max() <= 1.0 and height[low].mean() > 0.05


def test_taller_crowns_are_brighter_in_the_near_infrared(scene: SceneInfo) -> None:
    nir = _pixels(scene.path)[3].astype(np.float64)
    forest = scene.classes == LandCover.FOREST
    stand = scene.landscape.parcel[forest]
    height = _stand_anomaly(scene.canopy_height[forest].astype(np.float64), stand)
    brightness = _stand_anomaly(nir[forest], stand)
    assert np.corrcoef(height, brightness)[0, 1] > 0.7


def test_canopy_is_deterministic_and_leaves_the_scene_unchanged(tmp_path: Path) -> None:
    a = make_scene(tmp_path / "a.tif", size=128, seed=4, canopy_path=tmp_path / "ca.tif")
    b = make_scene(tmp_path / "b.tif", size=128, seed=4, canopy_path=tmp_path / "cb.tif")
    c = make_scene(tmp_path / "c.tif", size=128, seed=5, canopy_path=tmp_path / "cc.tif")
    plain = make_scene(tmp_path / "plain.tif", size=128, seed=4)
    np.testing.assert_array_equal(_pixels(a.canopy_path), _pixels(b.canopy_path))
    assert (a.canopy_height != c.canopy_height).mean() > 0.5
    np.testing.assert_array_equal(_pixels(a.path), _pixels(plain.path))
    assert plain.canopy_path is None and plain.canopy_height is None


def test_change_pair_shares_the_grid_and_date_a_is_the_single_date_scene(
    pair: ChangePair, scene: SceneInfo
) -> None:
    assert pair.change_path is not None
    grids = {_grid(path) for path in (pair.scene_a.path, pair.scene_b.path, pair.change_path)}
    assert grids == {_grid(scene.path)}
    np.testing.assert_array_equal(_pixels(pair.scene_a.path), _pixels(scene.path))
    np.testing.assert_array_equal(pair.scene_a.classes, scene.classes)
    assert pair.scene_b.dtype == "uint16" and pair.scene_b.bands == BAND_NAMES


def test_change_mask_is_exactly_where_the_land_cover_differs(pair: ChangePair) -> None:
    a, b = pair.scene_a.landscape, pair.scene_b.landscape
    both = a.valid & b.valid
    assert (a.valid != b.valid).mean() > 0.01, "each date has its own footprint"
    np.testing.assert_array_equal(pair.change[~both], CHANGE_NODATA)
    np.testing.assert_array_equal(pair.change[both], (a.classes != b.classes)[both])
    assert 0.02 < pair.changed_fraction < 0.2
    assert sum(pair.transitions.values()) == (pair.change == 1).sum()
    assert list(pair.transitions.values()) == sorted(pair.transitions.values(), reverse=True)
    assert {(LandCover.FOREST, LandCover.BARE_SOIL), (LandCover.CROPLAND, LandCover.BUILDING)} <= set(
        pair.transitions
    )
    assert {to for _, to in pair.transitions} >= {LandCover.WATER, LandCover.ROAD}


def test_change_geotiff_holds_mask_and_transitions(pair: ChangePair) -> None:
    with rasterio.open(pair.change_path) as src:
        assert (src.count, src.dtypes[0], src.nodata) == (2, "uint8", CHANGE_NODATA)
        assert src.descriptions == ("change", "transition")
        change, transition = src.read()
        tags = src.tags(2)
    np.testing.assert_array_equal(change, pair.change)
    forest_cut = (pair.scene_a.classes == LandCover.FOREST) & (pair.scene_b.classes == LandCover.BARE_SOIL)
    assert (transition[forest_cut & pair.valid] == 25).all() and tags["value_25"] == "forest to bare_soil"
    assert (transition[pair.change == 0] == 0).all()
    assert (transition[~pair.valid] == CHANGE_NODATA).all()
    codes, counts = np.unique(transition[pair.change == 1], return_counts=True)
    assert dict(zip(codes.tolist(), counts.tolist(), strict=True)) == {
        10 * a + b: n for (a, b), n in pair.transitions.items()
    }


def test_unchanged_ground_looks_alike_but_not_identical(pair: ChangePair) -> None:
    a = _pixels(pair.scene_a.path).astype(np.float64) / 10_000
    b = _pixels(pair.scene_b.path).astype(np.float64) / 10_000
    same, changed = pair.change == 0, pair.change == 1
    for band in range(4):
        assert np.corrcoef(a[band][same], b[band][same])[0, 1] > 0.85, BAND_NAMES[band]
    assert np.abs(a - b)[:, same].mean() > 0.002, "illumination, haze and noise differ between dates"
    assert (a == b).all(axis=0)[same].mean() < 0.05

    def ndvi_step(where: np.ndarray) -> np.ndarray:
        (red_a, nir_a), (red_b, nir_b) = a[[0, 3]][:, where], b[[0, 3]][:, where]
        return np.abs((nir_a - red_a) / (nir_a + red_a) - (nir_b - red_b) / (nir_b + red_b))

    assert np.median(ndvi_step(changed)) > 3 * np.median(ndvi_step(same)), "changes stand out"


def test_second_date_has_its_own_nodata_collar(pair: ChangePair) -> None:
    pixels = _pixels(pair.scene_b.path)
    valid = pair.scene_b.landscape.valid
    assert (pixels[:, ~valid] == 0).all() and (pixels[:, valid] > 0).all()
    assert 0.02 < (~valid).mean() < 0.25


def test_change_pair_is_deterministic(tmp_path: Path) -> None:
    def draw(name: str, seed: int) -> tuple[ChangePair, np.ndarray]:
        p = make_change_pair(tmp_path / f"{name}a.tif", tmp_path / f"{name}b.tif", size=128, seed=seed)
        return p, _pixels(p.scene_b.path)

    (p1, b1), (p2, b2), (p3, b3) = draw("1", 3), draw("2", 3), draw("3", 4)
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(p1.change, p2.change)
    assert p1.transitions == p2.transitions
    assert (b1 != b3).mean() > 0.5 and (p1.change != p3.change).any()


def test_change_pair_passes_bands_dtype_and_nodata_to_both_dates(tmp_path: Path) -> None:
    p = make_change_pair(tmp_path / "a.tif", tmp_path / "b.tif", size=64, bands=3, nodata=65_535)
    for info in (p.scene_a, p.scene_b):
        with rasterio.open(info.path) as src:
            assert (src.count, src.dtypes[0], src.nodata) == (3, "uint16", 65_535)
            pixels = src.read()
        assert (pixels[:, ~info.landscape.valid] == 65_535).all()
        assert pixels[:, info.landscape.valid].max() <= 10_000


def test_change_pair_refuses_to_write_two_outputs_to_one_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file of their own"):
        make_change_pair(tmp_path / "a.tif", tmp_path / "b.tif", change_path=tmp_path / "a.tif", size=64)
    assert not list(tmp_path.iterdir())
