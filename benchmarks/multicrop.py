"""Multi-crop augmentation throughput on one CPU core: geodino's MultiCropAugmentation against the official
DINOv3 pipeline (torchvision v1 transforms on PIL images, ``dinov3/data/augmentations.py``).

Both turn the same 512 px RGB chips into 2 global crops of 256 px and 8 local crops of 112 px: random
resized crops (bicubic), flips, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, Gaussian
blur (kernel 9, sigma 0.1-2) applied with the probabilities the official code ends up using (0, 0.9, 0.5:
its ``GaussianBlur`` keeps the image with probability ``p``), solarize p 0.2 on the second global crop,
normalisation. geodino
works on float tensors in [0, 1] of any band count (and adds 90 degree rotations); the official pipeline
works on 8-bit RGB PIL images. The chips come from a generated scene (``make_scene``). One thread; the
pipelines alternate over ``--repeats`` rounds and the table gives the median images/s per core.

    python benchmarks/multicrop.py              # ~3 min
    python benchmarks/multicrop.py --markdown   # also writes the section of benchmarks/RESULTS.md

A DataLoader worker runs one such pipeline, so images/s per core x workers bounds what ``geodino fit`` can
feed a GPU (an H200 trains ViT-L/16 at ~250 images/s, see the GPU section of RESULTS.md). With
``photometric_on="device"`` a worker only cuts and resizes the crops (``defer_photometric=True``) and the
colour operations run on the whole batch on the GPU; the table also times that batched part on this core
(batches of ``--chips`` images), which a GPU does at a small fraction of that cost.

A second table times the whole ``PretrainDataModule`` path in one process (``num_workers=0``: chip read
from a GeoTIFF, scaling, crops, iBOT masks, collate) on random 512 px chips of a generated 4096 px scene:
what a worker does per image in either mode.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import torch
from PIL import Image
from results_md import markdown_table, write_section
from torchvision import transforms as T

from geodino.data import RasterCorpus, make_scene
from geodino.models.presets import SAT_MEAN, SAT_STD
from geodino.train import PretrainDataModule, collate_multicrop
from geodino.train.augment import MultiCropAugmentation
from geodino.train.masking import MaskingGenerator

CHIP = 512
OFFICIAL = "official DINOv3 (torchvision v1, PIL uint8)"


def read_chips(n: int) -> list[np.ndarray]:
    """``n`` RGB chips [3, CHIP, CHIP] in [0, 1] (float32) from a generated 2048 px scene."""
    with tempfile.TemporaryDirectory() as folder:
        scene = make_scene(Path(folder) / "scene.tif", size=2048, seed=3, bands=3)
        with rasterio.open(scene.path) as src:
            pixels = src.read().astype(np.float32)
    low, high = np.percentile(pixels, [2, 98])
    pixels = np.clip((pixels - low) / (high - low), 0, 1).astype(np.float32)
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 2048 - CHIP, size=(n, 2))
    return [pixels[:, r : r + CHIP, c : c + CHIP].copy() for r, c in corners]


def official_pipeline() -> Callable[[Image.Image], list[torch.Tensor]]:
    """``DataAugmentationDINO`` of the official code with the SAT normalisation (torchvision v1, PIL)."""
    bicubic = T.InterpolationMode.BICUBIC
    color = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)])

    def blur(p: float) -> T.RandomApply:
        return T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)

    normalize = T.Compose([T.ToTensor(), T.Normalize(SAT_MEAN, SAT_STD)])
    crop_global = T.Compose(
        [T.RandomResizedCrop(256, scale=(0.32, 1.0), interpolation=bicubic), T.RandomHorizontalFlip()]
    )
    crop_local = T.Compose(
        [T.RandomResizedCrop(112, scale=(0.05, 0.32), interpolation=bicubic), T.RandomHorizontalFlip()]
    )
    global1 = T.Compose([color, blur(0.0), normalize])
    global2 = T.Compose([color, blur(0.9), T.RandomSolarize(128, p=0.2), normalize])
    local = T.Compose([color, blur(0.5), normalize])

    def crops(image: Image.Image) -> list[torch.Tensor]:
        return [global1(crop_global(image)), global2(crop_global(image))] + [
            local(crop_local(image)) for _ in range(8)
        ]

    return crops


def images_per_s(run: Callable[[object], object], inputs: list) -> float:
    """Images per second of ``run`` over ``inputs`` (one multi-crop per input)."""
    start = time.perf_counter()
    for item in inputs:
        run(item)
    return len(inputs) / (time.perf_counter() - start)


def batched_colour(tensors: list[torch.Tensor]) -> Callable[[object], None]:
    """The deferred colour operations of the crops of ``tensors`` as one batch: a run over ``tensors`` times
    only the batched :class:`~geodino.train.photometric.PhotometricAugmentation` calls, once per round."""
    aug = MultiCropAugmentation(SAT_MEAN, SAT_STD, defer_photometric=True)
    batch = collate_multicrop([aug(t) for t in tensors], MaskingGenerator((16, 16)), np.random.default_rng(0))

    def run(_: object) -> None:
        for key, draws in batch["photometric"].items():
            aug.photometric(batch[f"collated_{key}"], draws)

    return once_per(run, len(tensors))


def rate_table(runs: dict[str, tuple[Callable, list]], repeats: int, baseline: str) -> list[list[str]]:
    """Rows (name, median images/s with range, ms per image, ratio to ``baseline``), runs alternating."""
    for run, inputs in runs.values():  # warm-up
        images_per_s(run, inputs[:2])
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run, inputs) in runs.items():
            rates[name].append(images_per_s(run, inputs))
    reference = statistics.median(rates[baseline])
    rows = []
    for name, values in rates.items():
        median = statistics.median(values)
        rows.append(
            [
                name,
                f"{median:.1f} ({min(values):.1f}-{max(values):.1f})",
                f"{1e3 / median:.1f}",
                f"{median / reference:.2f}x",
            ]
        )
    return rows


def datamodule_runs(folder: Path, images: int) -> dict[str, tuple[Callable, list]]:
    """One pass over ``images`` images of PretrainDataModule batches (16 per batch), per colour mode; in the
    device mode, what the workers do (the colour operations are the batched part of the first table)."""
    scene = make_scene(folder / "big.tif", size=4096, seed=4, bands=3)
    corpus = RasterCorpus.from_paths([scene.path], progress=False)
    corpus.save(folder / "corpus.parquet")
    names = {
        "workers": "PretrainDataModule, colour in the workers",
        "device": "PretrainDataModule, colour on the device: the workers' part",
    }
    runs = {}
    for mode, name in names.items():
        dm = PretrainDataModule(
            str(folder / "corpus.parquet"),
            preset="dinov3_vitl16.sat493m",
            batch_size=16,
            chips_per_epoch=10_000,
            num_workers=0,
            photometric_on=mode,
        )
        dm.setup("fit")
        loader = iter(dm.train_dataloader())
        runs[name] = (once_per(lambda _, loader=loader: next(loader), 16), list(range(images)))
    return runs


def once_per(run: Callable[[object], None], batch: int) -> Callable[[object], None]:
    """Calls ``run`` on every ``batch``-th item, so a run over N items makes N / batch batches."""
    state = {"i": 0}

    def step(item: object) -> None:
        if state["i"] % batch == 0:
            run(item)
        state["i"] += 1

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chips", type=int, default=16, help="chips per round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", action="store_true", help="write the RESULTS.md section")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    chips = read_chips(args.chips)
    tensors = [torch.from_numpy(c) for c in chips]
    images = [Image.fromarray(np.round(c.transpose(1, 2, 0) * 255).astype(np.uint8)) for c in chips]
    runs = {
        "geodino MultiCropAugmentation (float tensors)": (MultiCropAugmentation(SAT_MEAN, SAT_STD), tensors),
        "geodino, colour on the device: the workers' part": (
            MultiCropAugmentation(SAT_MEAN, SAT_STD, defer_photometric=True),
            tensors,
        ),
        "geodino, colour on the device: the batched part, on this core": (batched_colour(tensors), tensors),
        OFFICIAL: (official_pipeline(), images),
    }
    header = ["pipeline", "images/s per core (min-max)", "ms per image", "vs official"]
    lines = markdown_table(header, rate_table(runs, args.repeats, OFFICIAL))
    with tempfile.TemporaryDirectory() as folder:
        loader_runs = datamodule_runs(Path(folder), 4 * args.chips)
        baseline = next(iter(loader_runs))
        header = ["one process", "images/s per core (min-max)", "ms per image", "vs colour in the workers"]
        loader_lines = markdown_table(header, rate_table(loader_runs, args.repeats, baseline))
    print("\n".join([*lines, "", *loader_lines]))
    if args.markdown:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        header = [
            f"## Multi-crop augmentation on one CPU core ({stamp})",
            "",
            f"`python benchmarks/multicrop.py --markdown`: {args.chips} chips of {CHIP} px x {args.repeats} "
            "rounds, 2 x 256 + 8 x 112 px crops per image, one thread.",
            "",
        ]
        data_header = [
            "",
            f"Through `PretrainDataModule` in one process ({4 * args.chips} images in batches of 16 per "
            "round, random 512 px chips of a generated 4096 px GeoTIFF):",
            "",
        ]
        write_section("multicrop", header + lines + data_header + loader_lines)


if __name__ == "__main__":
    main()
