"""Raster embedding, PCA rendering, writers and the ``geodino demo`` command, end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from torch import Tensor, nn

import geodino.models
from geodino.cli import main
from geodino.data import LandCover, make_scene
from geodino.inference import compute_stretch, embed_raster, pca_rgb, write_rgb_geotiff
from geodino.models import build_dinov3, get_preset

PRESET = get_preset("dinov3_vits16")


class PatchConv(nn.Module):
    """A patch-local stand-in backbone: features of a patch depend on that patch only."""

    def __init__(self, dim: int = PRESET.embed_dim, patch: int = 16) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def get_intermediate_layers(self, x: Tensor, *, n: int, reshape: bool, norm: bool) -> tuple[Tensor]:
        return (self.proj(x),)


def _tiny_vit(name: str = PRESET.name, **overrides) -> nn.Module:
    return build_dinov3(**{**get_preset(name).kwargs, "depth": 2, **overrides})


@pytest.fixture
def tiny_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CLI's random-init backbone a 2-block ViT-S (``build_backbone`` may not be exported yet)."""
    monkeypatch.setattr(geodino.models, "build_backbone", _tiny_vit, raising=False)


@pytest.fixture(scope="module")
def scene_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scene(tmp_path_factory.mktemp("scene") / "scene.tif", size=128, seed=1).path


def test_embed_raster_is_georeferenced_on_the_patch_grid(scene_path: Path) -> None:
    model = _tiny_vit().eval()
    fmap = embed_raster(model, scene_path, preset=PRESET, progress=False)
    with rasterio.open(scene_path) as src:
        assert fmap.transform == src.transform @ Affine.scale(16)
        assert fmap.crs == src.crs
    assert fmap.features.shape == (PRESET.embed_dim, 8, 8) and fmap.features.dtype == np.float32
    assert fmap.valid[2:6, 2:6].all()
    assert np.isfinite(fmap.features).all()
    assert (fmap.features[:, ~fmap.valid] == 0).all()


def test_tiles_stitch_to_the_whole_raster_result(scene_path: Path) -> None:
    model = PatchConv().eval()
    whole = embed_raster(model, scene_path, preset=PRESET, tile=128, overlap=0, progress=False)
    tiled = embed_raster(model, scene_path, preset=PRESET, tile=48, overlap=16, progress=False)
    np.testing.assert_allclose(tiled.features, whole.features, atol=1e-5)
    np.testing.assert_array_equal(tiled.valid, whole.valid)


def test_edge_tiles_are_padded_and_patches_masked_by_valid_fraction(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "odd.tif", size=120, seed=2)  # 7.5 patches a side
    model = PatchConv().eval()
    fmap = embed_raster(model, scene.path, preset=PRESET, tile=64, overlap=16, progress=False)
    whole = embed_raster(model, scene.path, preset=PRESET, tile=128, overlap=0, progress=False)
    assert fmap.features.shape[1:] == (8, 8)
    inside = np.pad(scene.classes != LandCover.NODATA, ((0, 8), (0, 8)))  # padding counts as nodata
    np.testing.assert_array_equal(fmap.valid, inside.reshape(8, 16, 8, 16).mean(axis=(1, 3)) >= 0.5)
    assert fmap.valid[3, 3] and not fmap.valid.all()
    np.testing.assert_allclose(fmap.features, whole.features, atol=1e-5)


def test_uint8_rasters_are_divided_by_255_and_uint16_stretched(tmp_path: Path) -> None:
    for dtype, expected_high in (("uint8", 255.0), ("uint16", None)):
        path = make_scene(tmp_path / f"{dtype}.tif", size=64, dtype=dtype).path
        with rasterio.open(path) as src:
            stretch = compute_stretch(src, (1, 2, 3))
            if expected_high is not None:
                assert stretch.low.tolist() == [0.0] * 3 and stretch.high.tolist() == [expected_high] * 3
            else:
                valid = src.read(1) > 0
                assert np.all(stretch.low >= 1) and np.all(stretch.high <= src.read()[:3, valid].max())


def test_pca_rgb_is_uint8_with_nodata_zero_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(32, 10, 12)).astype(np.float32)
    valid = np.ones((10, 12), dtype=bool)
    valid[0] = False
    image = pca_rgb(features, valid)
    assert image.shape == (3, 10, 12) and image.dtype == np.uint8
    assert (image[:, 0] == 0).all() and (image[:, 1:] >= 1).all()
    assert len(np.unique(image[0, 1:])) > 20
    np.testing.assert_array_equal(pca_rgb(features, valid), image)


def test_geotiff_writer_is_atomic_and_georeferenced(tmp_path: Path) -> None:
    transform = Affine(9.6, 0, 500_000, 0, -9.6, 5_300_000)
    image = np.full((3, 4, 5), 7, dtype=np.uint8)
    path = write_rgb_geotiff(tmp_path / "pca.tif", image, transform=transform, crs="EPSG:32633")
    assert [p.name for p in tmp_path.iterdir()] == ["pca.tif"]
    with rasterio.open(path) as src:
        assert (src.transform, src.crs.to_epsg(), src.nodata) == (transform, 32633, 0)
        np.testing.assert_array_equal(src.read(), image)
    with pytest.raises(ValueError, match="uint8"):
        write_rgb_geotiff(path, image.astype(np.float32), transform=transform, crs="EPSG:32633")
    assert [p.name for p in tmp_path.iterdir()] == ["pca.tif"]


def _write(path: Path, pixels: np.ndarray, **profile) -> Path:
    base = {"driver": "GTiff", "count": pixels.shape[0], "height": pixels.shape[1], "width": pixels.shape[2]}
    with rasterio.open(path, "w", dtype=pixels.dtype, **base, **profile) as dst:
        dst.write(pixels)
    return path


@pytest.mark.parametrize(
    ("pixels", "profile", "message"),
    [
        (np.ones((3, 32, 32), np.uint8), {}, "no CRS"),
        (
            np.ones((2, 32, 32), np.uint8),
            {"crs": "EPSG:32633", "transform": Affine(1, 0, 0, 0, -1, 10)},
            "at least 3",
        ),
        (
            np.zeros((3, 32, 32), np.uint16),
            {"crs": "EPSG:32633", "transform": Affine(1, 0, 0, 0, -1, 10), "nodata": 0},
            "every pixel",
        ),
    ],
    ids=["no-crs", "two-bands", "all-nodata"],
)
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_unusable_rasters_name_the_file_and_the_problem(
    tmp_path: Path, pixels: np.ndarray, profile: dict, message: str
) -> None:
    path = _write(tmp_path / "bad.tif", pixels, **profile)
    with pytest.raises(ValueError, match=message) as err:
        embed_raster(PatchConv(), path, preset=PRESET, progress=False)
    assert str(path) in str(err.value)


@pytest.mark.usefixtures("tiny_backbone")
def test_demo_writes_scene_pca_map_and_quicklook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "out"
    assert main(["demo", "--out", str(out), "--size", "128", "--seed", "3"]) == 0
    stdout = capsys.readouterr().out
    assert "RANDOM weights" in stdout and "--weights" in stdout and PRESET.checkpoint in stdout
    assert "128x128 px, EPSG:32633, GSD 0.6 m" in stdout

    with rasterio.open(out / "scene.tif") as scene, rasterio.open(out / "features_pca.tif") as pca:
        assert (pca.count, pca.dtypes) == (3, ("uint8",) * 3)
        assert pca.crs == scene.crs
        assert pca.transform == scene.transform @ Affine.scale(16)
        assert pca.bounds == pytest.approx(scene.bounds)
        assert pca.nodata == 0
        image = pca.read()
    assert image.std() > 0
    for name in ("scene.tif", "labels.tif", "features_pca.tif", "quicklook.png"):
        assert str(out / name) in stdout
    with Image.open(out / "quicklook.png") as png:
        png.verify()
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100
    assert sorted(p.name for p in out.iterdir()) == [
        "features_pca.tif",
        "labels.tif",
        "quicklook.png",
        "scene.tif",
    ]


def test_demo_refuses_an_out_path_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "results"
    target.write_text("not a folder")
    assert main(["demo", "--out", str(target), "--size", "64"]) == 2
    err = capsys.readouterr().err
    assert f"--out {target} exists and is not a directory" in err
    assert target.read_text() == "not a folder"


def test_demo_refuses_missing_weights_and_unknown_backbones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "none.pth")]) == 2
    assert "none.pth: no such file" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "o"), "--backbone", "dinov3_vitq99"]) == 2
    assert "unknown backbone 'dinov3_vitq99'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_demo_loads_given_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "vits.pth"
    weights.write_bytes(b"stand-in; load_backbone is replaced below")
    calls = []

    def load_backbone(name: str, weights: Path) -> nn.Module:
        calls.append((name, weights))
        return _tiny_vit(name)

    monkeypatch.setattr(geodino.models, "load_backbone", load_backbone, raising=False)
    assert main(["demo", "--out", str(tmp_path / "o"), "--size", "64", "--weights", str(weights)]) == 0
    assert calls == [(PRESET.name, weights)]
    stdout = capsys.readouterr().out
    assert "RANDOM" not in stdout and f"({weights.name})" in stdout


def test_demo_reports_a_checkpoint_that_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "other.pth"
    weights.write_bytes(b"not a checkpoint")
    assert main(["demo", "--out", str(tmp_path / "o"), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: cannot read" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "features_pca.tif").exists()


def test_python_dash_m_geodino_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "geodino", "demo", "--help"], capture_output=True, text=True, check=True
    )
    assert "--weights" in result.stdout and "--out" in result.stdout


@pytest.mark.skipif(not hasattr(geodino.models, "build_backbone"), reason="build_backbone not exported yet")
def test_demo_with_the_default_vit_s(tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path), "--size", "128"]) == 0
    assert (tmp_path / "features_pca.tif").is_file()
