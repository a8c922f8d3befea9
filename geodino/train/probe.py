"""Dense k-NN probe of a backbone's patch features on labelled images, and a callback that runs it during
pretraining, so a run shows whether its features are learning land cover before it ends.

The probe: every ``patch`` x ``patch`` block of a label image gets its majority class (blocks that are mostly
"ignore" or mixed are dropped, :func:`patch_labels`); the backbone's ``x_norm_patchtokens`` of
non-overlapping windows (:func:`windows`, :func:`stitch`) are the features; a DINO weighted k-NN
(:func:`knn_predict`) classifies the patches of each held-out image from those of the others
(leave one image out; a single image is split into left and right halves), scored by accuracy and mean IoU
(:func:`accuracy_miou`). ``benchmarks/learning_signal.py`` uses the same functions.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from rasterio.windows import Window
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel

from geodino.data import ChipRef, CorpusDataset, RasterCorpus
from geodino.data.corpus import _open_raster
from geodino.models import DinoVisionTransformer, get_preset
from geodino.train.data import PretrainDataModule

__all__ = [
    "DenseKNNProbe",
    "accuracy_miou",
    "dense_features",
    "knn_predict",
    "patch_labels",
    "stitch",
    "windows",
]


def patch_labels(labels: np.ndarray, patch: int, min_purity: float, ignore_index: int | None) -> np.ndarray:
    """Majority class of each ``patch`` x ``patch`` block of ``labels [H, W]``, row-major ``[H/p · W/p]``.

    A block gets -1 (dropped) when its majority is ``ignore_index`` or covers less than ``min_purity`` of
    its pixels (ties go to the lower class id). ``H`` and ``W`` must be multiples of ``patch``; class ids are
    non-negative integers.
    """
    h, w = labels.shape[0] // patch, labels.shape[1] // patch
    if (h * patch, w * patch) != labels.shape:
        raise ValueError(f"labels {labels.shape} are not a whole number of {patch} px patches")
    blocks = labels.reshape(h, patch, w, patch).transpose(0, 2, 1, 3).reshape(h * w, patch * patch)
    counts = np.stack([(blocks == c).sum(1) for c in range(int(labels.max()) + 1)], axis=1)
    majority = counts.argmax(1)
    keep = counts.max(1) >= min_purity * patch * patch
    if ignore_index is not None:
        keep &= majority != ignore_index
    return np.where(keep, majority, -1)


def windows(image: Tensor, size: int) -> Tensor:
    """Non-overlapping ``size`` px windows of ``image [C, H, W]``: ``[H/size · W/size, C, size, size]``."""
    c, h, w = image.shape
    if h % size or w % size:
        raise ValueError(f"image {h} x {w} px is not a whole number of {size} px windows")
    tiles = image.reshape(c, h // size, size, w // size, size).permute(1, 3, 0, 2, 4)
    return tiles.reshape(-1, c, size, size)


def stitch(patches: Tensor, image_shape: tuple[int, int], size: int, patch: int) -> Tensor:
    """Per-window patch features ``[n_windows, (size/p)², D]`` to the image's row-major grid ``[N, D]``."""
    rows, cols, g = image_shape[0] // size, image_shape[1] // size, size // patch
    grid = patches.reshape(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4)
    return grid.reshape(rows * g * cols * g, -1)


@torch.no_grad()
def dense_features(backbone: DinoVisionTransformer, image: Tensor, window: int, batch: int = 8) -> Tensor:
    """``x_norm_patchtokens`` of the ``window`` px windows of ``image [C, H, W]`` (normalised), on the
    image's row-major patch grid: ``[H/p · W/p, D]`` float32 on the CPU. Windows go through ``backbone`` on
    its device, ``batch`` at a time, by its ``forward`` (so an FSDP-wrapped backbone gathers its
    parameters)."""
    device = next(backbone.parameters()).device
    tiles = windows(image, window)
    patches = [
        backbone(chunk.to(device), is_training=True)["x_norm_patchtokens"].float().cpu()
        for chunk in tiles.split(batch)
    ]
    return stitch(torch.cat(patches), image.shape[1:], window, backbone.patch_size)


def knn_predict(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, k: int = 20, temperature: float = 0.07
) -> Tensor:
    """DINO k-NN: the class with the largest sum of exp(cosine / temperature) over the ``k`` nearest
    neighbours.

    Args:
        train_x: ``[N, D]`` features; train_y: ``[N]`` class ids >= 0; test_x: ``[M, D]``.

    Returns:
        ``[M]`` predicted class ids.
    """
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    n_classes = int(train_y.max()) + 1
    out = []
    for chunk in test_x.split(2048):
        sim, idx = (chunk @ train_x.T).topk(min(k, len(train_x)), dim=1)
        votes = torch.zeros(len(chunk), n_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out)


def accuracy_miou(pred: Tensor, true: Tensor) -> tuple[float, float]:
    """Accuracy and mean IoU over the classes present in ``pred`` or ``true`` (``[M]`` class ids)."""
    classes = torch.unique(torch.cat([pred, true]))
    ious = [((pred == c) & (true == c)).sum() / ((pred == c) | (true == c)).sum() for c in classes]
    return float((pred == true).float().mean()), float(torch.stack(ious).mean())


def _scale_like_training(
    pixels: np.ndarray, dtype: str, i: int, corpus: RasterCorpus, datamodule: PretrainDataModule | None
) -> np.ndarray:
    """``pixels [C, H, W]`` of probe image ``i`` (``dtype``) scaled to [0, 1] with the training corpus's
    levels for that dtype when they are shared by dtype (or pooled), else with the probe corpus's own."""
    train = None if datamodule is None else datamodule.corpus
    if train is not None and train.scaling is not None and train.scaling_by in ("dtype", "corpus"):
        same = np.flatnonzero(train.index["dtype"].to_numpy() == dtype)
        if train.scaling_by == "corpus" or len(same):
            return train.scale(pixels, int(same[0]) if len(same) else 0)
    return corpus.scale(pixels, i)


class DenseKNNProbe(L.Callback):
    """Dense k-NN probe of the exported networks' patch features on labelled images, every ``every_n_steps``.

    The networks are the module's ``exported_backbones()``: the EMA teacher of
    :class:`~geodino.train.module.DINOv3Module` (``teacher``), or each student's EMA copy of
    :class:`~geodino.train.distill.DistillationModule` (by student name). For each, logs
    ``probe/<name>/knn_accuracy`` and ``probe/<name>/knn_miou`` (means over the leave-one-image-out folds;
    with one image, its left and right halves) at step 0 (the random or ``init_from`` start) and after every
    ``every_n_steps`` optimisation steps, to the trainer's logger and :attr:`history`, and prints them on
    rank 0.

    The images are read like the pretraining chips: with a :class:`~geodino.train.data.PretrainDataModule`,
    scaled by the training corpus's levels for their dtype (``scaling_by`` "dtype" or "corpus"; otherwise by
    their own percentiles, as a corpus of them would be) and normalised with the data module's mean / std;
    without one, by their own percentiles and the module's backbone preset. Files without a CRS, such as PNG
    tiles, are fine. Every rank runs the networks (an FSDP network needs all of them); the scores are the
    same on every rank. Compiled blocks compile once more for the window size.

    Args:
        images: Small image rasters, read whole into memory (a few thousand pixels a side at most; cropped
            to whole windows from the top left).
        labels: One class-id raster per image, on the same pixel grid.
        every_n_steps: Steps between probes.
        window: Window side, pixels (a multiple of the patch size).
        k: Neighbours of the k-NN.
        ignore_index: Class id that labels no class (LoveDA's 0), or None.
        min_purity: Smallest share of a patch's pixels its majority class must cover to be used.
        bands: 1-based bands of the images (as many as the training chips have).

    Raises:
        ValueError: No image, a different number of label rasters, or a non-positive step count or window;
            when training starts: labels not on their image's grid, an image smaller than a window (two
            windows wide for a single image), a window that is not a multiple of the patch size, or a band
            count other than the training chips'. Messages name the file.
    """

    def __init__(
        self,
        images: Sequence[str],
        labels: Sequence[str],
        every_n_steps: int = 1000,
        window: int = 224,
        k: int = 20,
        ignore_index: int | None = 0,
        min_purity: float = 0.5,
        bands: Sequence[int] = (1, 2, 3),
    ) -> None:
        if isinstance(images, str | os.PathLike) or isinstance(labels, str | os.PathLike):
            raise ValueError("images and labels must be lists of paths (one label raster per image)")
        if not images or len(images) != len(labels):
            raise ValueError(
                f"need one label raster per image, got {len(images)} images, {len(labels)} labels"
            )
        if every_n_steps < 1 or window < 1:
            raise ValueError(f"every_n_steps and window must be >= 1, got {every_n_steps} and {window}")
        self.images, self.labels = [os.fspath(p) for p in images], [os.fspath(p) for p in labels]
        self.every_n_steps, self.window, self.k = every_n_steps, window, k
        self.ignore_index, self.min_purity, self.bands = ignore_index, min_purity, list(bands)
        self.history: list[dict[str, Any]] = []  # {"step", "network", "knn_accuracy", "knn_miou"}
        self._data: list[tuple[Tensor, np.ndarray]] | None = None
        self._last_step = -1

    def _load(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[tuple[Tensor, np.ndarray]]:
        """Normalised pixels ``[C, H', W']`` and labels ``[H', W']`` of every probe image (or half image)."""
        patch = next(iter(pl_module.exported_backbones().values())).patch_size
        if self.window % patch:
            raise ValueError(f"probe window {self.window} px must be a multiple of the patch size {patch}")
        with warnings.catch_warnings():  # probe images need no CRS: no warning about pixel coordinates
            warnings.filterwarnings("ignore", message=".*have no CRS", category=UserWarning)
            corpus = RasterCorpus.from_paths(self.images, bands=self.bands, progress=False)
        datamodule = trainer.datamodule if isinstance(trainer.datamodule, PretrainDataModule) else None
        if datamodule is None:
            preset = get_preset(pl_module.hparams.backbone)
            mean, std = preset.mean, preset.std
        else:
            mean, std = datamodule.mean, datamodule.std
        if len(self.bands) != len(mean):
            raise ValueError(
                f"the probe reads {len(self.bands)} bands of {self.images[0]} but training normalises "
                f"{len(mean)}; set the probe's bands to the training chips' bands"
            )
        raw = CorpusDataset(corpus, scaled=False)
        mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (mean, std))
        parts = []
        for i, (image_path, label_path) in enumerate(zip(self.images, self.labels, strict=True)):
            row = corpus.index.iloc[i]
            chip = raw[ChipRef(i, Window(0, 0, int(row["width"]), int(row["height"])))]
            scaled = _scale_like_training(chip.image, row["dtype"], i, corpus, datamodule)
            with _open_raster(Path(label_path)) as src:  # missing or unreadable: the file and the fix
                labels = src.read(1)
            if labels.shape != chip.image.shape[1:]:
                raise ValueError(
                    f"{label_path}: labels {labels.shape} are not on the grid of {image_path} "
                    f"{chip.image.shape[1:]}; give one label raster per image, pixel for pixel"
                )
            smallest = (self.window, 2 * self.window if len(self.images) == 1 else self.window)
            if labels.shape[0] < smallest[0] or labels.shape[1] < smallest[1]:
                raise ValueError(
                    f"{image_path}: {labels.shape[0]} x {labels.shape[1]} px is smaller than the probe needs "
                    f"({smallest[0]} x {smallest[1]} px for {self.window} px windows); give a smaller window "
                    "or larger images"
                )
            rows, cols = (n // self.window * self.window for n in labels.shape)
            pixels = (torch.from_numpy(scaled) - mean) / std * torch.from_numpy(chip.valid)
            parts.append((pixels[:, :rows, :cols], labels[:rows, :cols]))
        if len(parts) == 1:  # one image: its left and right halves are the folds
            (pixels, labels), half = parts[0], parts[0][1].shape[1] // 2 // self.window * self.window
            parts = [(pixels[:, :, :half], labels[:, :half]), (pixels[:, :, half:], labels[:, half:])]
        return parts

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        if isinstance(model, FullyShardedDataParallel):
            # The step-0 probe runs an inner FSDP unit (the teacher) before the root's first forward, and
            # FSDP would take the first unit run for its root; summoning the root's own parameters
            # initialises the root first.
            with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=False):
                pass
        self._probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._probe(trainer, pl_module)

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if self._data is None:
            self._data = self._load(trainer, pl_module)
        for name, backbone in pl_module.exported_backbones().items():
            accuracy, miou = self._score(trainer, backbone)
            self.history.append({"step": step, "network": name, "knn_accuracy": accuracy, "knn_miou": miou})
            if trainer.logger is not None:
                metrics = {f"probe/{name}/knn_accuracy": accuracy, f"probe/{name}/knn_miou": miou}
                trainer.logger.log_metrics(metrics, step=step)
            rank_zero_info(
                f"step {step}: dense k-NN probe of {name}: accuracy {accuracy:.3f}, mIoU {miou:.3f}"
            )

    def _score(self, trainer: L.Trainer, backbone: torch.nn.Module) -> tuple[float, float]:
        """Mean (accuracy, mIoU) of the leave-one-image-out folds for ``backbone``'s features."""
        patch = backbone.patch_size
        features, targets, groups = [], [], []
        with trainer.precision_plugin.forward_context():
            for group, (pixels, labels) in enumerate(self._data):
                keep = torch.from_numpy(patch_labels(labels, patch, self.min_purity, self.ignore_index))
                features.append(dense_features(backbone, pixels, self.window)[keep >= 0])
                targets.append(keep[keep >= 0])
                groups.append(torch.full((int((keep >= 0).sum()),), group))
        x, y, g = torch.cat(features), torch.cat(targets).long(), torch.cat(groups)
        folds = [
            accuracy_miou(knn_predict(x[g != i], y[g != i], x[g == i], self.k), y[g == i])
            for i in range(len(self._data))
            if (g == i).any() and (g != i).any()
        ]
        if not folds:
            raise ValueError(f"the probe images {self.images} have no labelled patch to test on")
        accuracy, miou = (float(np.mean(values)) for values in zip(*folds, strict=True))
        return accuracy, miou
