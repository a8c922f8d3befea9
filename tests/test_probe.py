"""Dense k-NN probe (``geodino.train.probe``): patch labels, window features, metrics, and the callback that
probes the EMA teacher during a Lightning fit, on synthetic scenes with their land-cover maps and, where the
shared data is present, on the LoveDA tiles.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import rasterio
import torch
from conftest import shared_path
from lightning.pytorch.loggers import CSVLogger

from geodino.data import RasterCorpus, make_scene
from geodino.models import build_backbone
from geodino.train import DenseKNNProbe, DINOv3Module, DistillationModule, PretrainDataModule
from geodino.train.probe import accuracy_miou, dense_features, knn_predict, patch_labels

PRESET = "dinov3_vits16.lvd1689m"
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
HEADS = {
    f"{head}_head_{key}": value
    for head in ("dino", "ibot")
    for key, value in (("n_prototypes", 128), ("hidden_dim", 64), ("bottleneck_dim", 32))
}


def test_patch_labels_majority_purity_ignore_and_order() -> None:
    labels = np.zeros((8, 12), np.uint8)
    labels[:4, :4] = 3  # pure
    labels[:4, 4:8] = 2
    labels[:2, 4:8] = 0  # half ignore: majority tie broken towards the lower id, ignore
    labels[:4, 8:] = 5
    labels[0, 8:11] = 1  # 13 / 16 = 81 % class 5
    labels[4:, :4] = 6
    labels[4:6, :3] = 7  # 10 / 16 = 62 % class 6
    labels[4:, 4:8] = 4
    labels[4:, 8:] = 0  # all ignore
    np.testing.assert_array_equal(patch_labels(labels, 4, 0.75, 0), [3, -1, 5, -1, 4, -1])
    np.testing.assert_array_equal(patch_labels(labels, 4, 0.6, 0), [3, -1, 5, 6, 4, -1])
    np.testing.assert_array_equal(patch_labels(labels, 4, 0.6, None), [3, -1, 5, 6, 4, 0])  # 0 is a class
    with pytest.raises(ValueError, match="whole number"):
        patch_labels(labels[:, :10], 4, 0.75, 0)


def test_accuracy_miou_known_values() -> None:
    acc, miou = accuracy_miou(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 1]))
    assert acc == pytest.approx(0.6)
    assert miou == pytest.approx((1 / 2 + 2 / 4 + 0) / 3)  # class 2: predicted, never true


def test_knn_separates_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    y = torch.arange(150) % 3
    x = centres[y] + torch.randn(150, 8, generator=g)
    pred = knn_predict(x[:100], y[:100], x[100:], k=10)
    assert accuracy_miou(pred, y[100:])[0] > 0.95


def test_dense_features_are_each_windows_patch_tokens_on_the_image_grid() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(PRESET, **TINY).eval()
    image = torch.randn(3, 64, 96)
    features = dense_features(backbone, image, window=32, batch=4)
    assert features.shape == (4 * 6, 64)
    # window (row 1, column 2) covers patches rows 2-3, columns 4-5 of the 4 x 6 grid
    with torch.no_grad():
        window = backbone.forward_features(image[None, :, 32:64, 64:96])["x_norm_patchtokens"][0]
    grid = features.reshape(4, 6, 64)
    torch.testing.assert_close(grid[2:4, 4:6].reshape(4, 64), window)


def _labelled_scenes(folder: Path, n: int) -> tuple[list[str], list[str]]:
    images, labels = [], []
    for seed in range(n):
        scene, label = folder / f"scene{seed}.tif", folder / f"labels{seed}.tif"
        make_scene(scene, size=256, bands=3, seed=seed, labels_path=label)
        images.append(str(scene))
        labels.append(str(label))
    return images, labels


def tiny_module() -> DINOv3Module:
    return DINOv3Module(PRESET, backbone_overrides=TINY, freeze_last_layer=0, lr={"peak": 1e-3}, **HEADS)


def _fit(tmp_path: Path, probe: DenseKNNProbe, steps: int, module: L.LightningModule | None = None) -> Path:
    """A tiny fit of ``module`` (a tiny DINOv3Module by default) with ``probe``, logging to CSV; returns the
    metrics file."""
    scene = make_scene(tmp_path / "train.tif", size=256, bands=3, seed=9)
    RasterCorpus.from_paths([scene.path], progress=False).save(tmp_path / "corpus.parquet")
    data = PretrainDataModule(
        str(tmp_path / "corpus.parquet"),
        preset=PRESET,
        batch_size=2,
        chips_per_epoch=16,
        chip_size=64,
        num_workers=0,
        global_crops_size=32,
        local_crops_size=16,
        local_crops_number=2,
    )
    module = tiny_module() if module is None else module
    logger = CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[probe],
    )
    trainer.fit(module, data)
    return Path(logger.log_dir) / "metrics.csv"


def test_probe_callback_logs_the_teacher_probe_every_n_steps(tmp_path: Path) -> None:
    images, labels = _labelled_scenes(tmp_path, 2)
    probe = DenseKNNProbe(images, labels, every_n_steps=2, window=64, k=5, ignore_index=None)
    metrics = _fit(tmp_path, probe, steps=4)
    assert [(h["step"], h["network"]) for h in probe.history] == [
        (0, "teacher"),
        (2, "teacher"),
        (4, "teacher"),
    ]
    for record in probe.history:
        assert 0 < record["knn_miou"] <= 1
        assert 1 / 6 < record["knn_accuracy"] <= 1  # synthetic land cover: well above chance
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("probe/teacher/knn_miou")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert float(rows[-1]["probe/teacher/knn_accuracy"]) == pytest.approx(probe.history[-1]["knn_accuracy"])


def test_probe_callback_probes_every_distilled_student(tmp_path: Path) -> None:
    teacher = tiny_module().export_teacher(tmp_path / "teacher.pth")
    students = [
        {"name": name, "backbone": PRESET, "backbone_overrides": {**TINY, "depth": depth}}
        for name, depth in (("one", 1), ("two", 2))
    ]
    module = DistillationModule(
        PRESET, str(teacher), students, backbone_overrides=TINY, freeze_last_layer=0, **HEADS
    )
    images, labels = _labelled_scenes(tmp_path, 2)
    probe = DenseKNNProbe(images, labels, every_n_steps=1, window=64, k=5, ignore_index=None)
    metrics = _fit(tmp_path, probe, steps=1, module=module)
    assert [(h["step"], h["network"]) for h in probe.history] == [
        (0, "one"),
        (0, "two"),
        (1, "one"),
        (1, "two"),
    ]
    header = next(csv.reader(metrics.open()))
    assert {"probe/one/knn_miou", "probe/two/knn_accuracy"} <= set(header)


def test_probe_bad_inputs_name_the_file_and_the_fix(tmp_path: Path) -> None:
    images, labels = _labelled_scenes(tmp_path, 1)
    with pytest.raises(ValueError, match="lists of paths"):
        DenseKNNProbe(images[0], labels[0])
    with pytest.raises(ValueError, match="one label raster per image"):
        DenseKNNProbe(images, labels * 2)
    small = tmp_path / "small.tif"
    with rasterio.open(labels[0]) as src:
        profile = {**src.profile, "width": 128, "height": 128}
        with rasterio.open(small, "w", **profile) as dst:
            dst.write(src.read(window=((0, 128), (0, 128))))
    failures = [
        ({"labels": [str(small)]}, rf"{small}.*not on the grid of {images[0]}"),
        ({"window": 40}, "window 40 px must be a multiple of the patch size 16"),
        ({"window": 192}, rf"{images[0]}: 256 x 256 px is smaller than the probe needs \(192 x 384 px"),
        ({"bands": [1, 2]}, "reads 2 bands .* training normalises 3; set the probe's bands"),
    ]
    not_a_raster = tmp_path / "labels.txt"
    not_a_raster.write_text("not a raster")
    failures += [({"labels": [str(not_a_raster)]}, rf"{not_a_raster}: cannot read raster")]
    for change, message in failures:
        probe = DenseKNNProbe(**{"images": images, "labels": labels, "window": 64, **change})
        with pytest.raises(ValueError, match=message):
            _fit(tmp_path, probe, steps=1)
    missing = DenseKNNProbe(images, [str(tmp_path / "gone.png")], window=64)
    with pytest.raises(FileNotFoundError, match=r"gone\.png: no such raster file"):
        _fit(tmp_path, missing, steps=1)


def test_probe_on_loveda_tiles(tmp_path: Path) -> None:
    """The three LoveDA tiles (PNG, no CRS), leave one tile out, at the random start of a fit."""
    folder = shared_path("data", "landcover", "loveda")
    images = sorted(str(p) for p in (folder / "img").glob("*.png"))
    labels = [str(folder / "ann" / Path(p).name) for p in images]
    probe = DenseKNNProbe(images, labels, every_n_steps=1000, window=256, k=20)
    _fit(tmp_path, probe, steps=1)
    (record,) = probe.history  # step 0 only
    assert 0.2 < record["knn_accuracy"] < 1 and 0 < record["knn_miou"] < record["knn_accuracy"]
