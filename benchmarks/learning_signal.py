"""Learning signal of tiny DINOv3 pretraining on real imagery: frozen-feature probes on land cover.

Pretraining sees images only, never labels:

1. a corpus (:meth:`geodino.data.RasterCorpus.from_paths`, bands 1 2 3) of the three LoveDA tiles (1024²,
   0.3 m; PNGs without a CRS, indexed in pixel coordinates) and
   the uint8 RGB rasters of ``shared/data/rasters`` (``cogeo.tif`` 0.6 m aerial, ``rgbn.tif`` 5 m,
   ``RGB.byte.tif`` Landsat 7; the uint16 ``rgb16.tif`` is left out, as in the recorded results, which were
   measured when the corpus scaling was pooled over all rasters and it would have squashed the uint8 ones);
2. stage 1: :class:`~geodino.train.DINOv3Module` + :class:`~geodino.train.PretrainDataModule` through a
   ``lightning.Trainer`` from random init (a tiny ViT of the ``dinov3_vits16`` preset), teacher exported by
   :class:`~geodino.train.ExportTeacher`;
3. stage 2, twice from the stage-1 teacher (``init_from``), same steps and schedules: (a) plain continued
   pretraining, (b) Gram anchoring (``gram=True``, Gram teacher = the stage-1 teacher, never refreshed;
   Gram crops 2x the global crops). The teacher is also exported halfway through.

Probes on frozen teacher backbones (random init = the stage-1 teacher before its first step, same seed):

- dense: ``x_norm_patchtokens`` of non-overlapping ``--window`` px windows, one feature per 16 px patch,
  labelled with the majority class of its 16 x 16 label block (dropped when that is "ignore" or covers
  less than ``--purity`` of the block);
- global: ``x_norm_clstoken`` of 128 px windows of the LoveDA tiles, labelled with their majority class
  (dropped below 50 % purity);
- k-NN: k = 20, cosine similarity, votes weighted by exp(similarity / 0.07) (the DINO k-NN);
- linear: multinomial logistic regression on standardised features, L2 ``--linear-wd``, full-batch L-BFGS.

Splits (scores are means over the folds; no fold trains and tests on the same pixels, and the windows
never straddle a split): ``loveda tiles`` leave one LoveDA tile out (3 folds: the tiles differ a lot in
class mix, e.g. tile 2 is mostly forest, which the others hardly have); ``loveda quadrants`` train on three
512 px quadrants of every tile and test on the fourth (4 folds); ``potsdam halves`` left / right 256 px
halves of the Potsdam tile (2 folds; Potsdam, 5 cm, is not in the pretraining corpus).

Floors: always predicting the majority class of the training tiles, and a probe on the raw normalised pixels
of each patch (768 values; for windows, their mean over the window's patches).

    python benchmarks/learning_signal.py                # ~20 min on 2 idle CPU cores
    python benchmarks/learning_signal.py --markdown     # also write the section of benchmarks/RESULTS.md
    python benchmarks/learning_signal.py --steps 10 --stage2-steps 10  # a smoke run (~4 min)

Stages whose configuration is unchanged are reused from ``--work`` (each stage folder keeps its config in
``record.json``), until one is retrained.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from PIL import Image
from results_md import RESULTS, markdown_table, write_section
from torch import Tensor
from tqdm.auto import tqdm

from geodino.data import RasterCorpus
from geodino.inference.features import normalize
from geodino.models import build_backbone, get_preset
from geodino.models.checkpoint import read_state_dict
from geodino.train import DINOv3Module, ExportTeacher, PretrainDataModule
from geodino.train.probe import accuracy_miou, knn_predict, patch_labels, stitch, windows

PRESET = "dinov3_vits16.lvd1689m"
SHARED = Path(os.environ.get("GEODINO_SHARED", Path(__file__).resolve().parents[2] / "shared"))
#: uint8 RGB scenes of ``shared/data/rasters`` (bands 1 2 3 are red, green, blue).
RGB_RASTERS = ("cogeo.tif", "rgbn.tif", "RGB.byte.tif")
#: Label value that marks pixels without a class, in LoveDA and Potsdam.
IGNORE = 0
#: Side of the windows whose CLS token is the global feature, pixels.
GLOBAL_WINDOW = 128
#: Purity a window needs to get a global label.
GLOBAL_PURITY = 0.5
#: Row of the table that always predicts the most frequent class of the training images.
MAJORITY = "majority class of the training images"
KNN_K = 20


# ----------------------------------------------------------------------------------------- corpus


def build_corpus(data: Path, work: Path) -> Path:
    """Index the LoveDA tiles (PNGs without CRS: pixel coordinates) and the RGB rasters into
    ``work/corpus.parquet``."""
    path = work / "corpus.parquet"
    if path.exists():
        return path
    work.mkdir(parents=True, exist_ok=True)
    loveda = sorted((data / "landcover/loveda/img").glob("*.png"))
    rasters = [data / "rasters" / name for name in RGB_RASTERS]
    RasterCorpus.from_paths([*loveda, *rasters], bands=[1, 2, 3]).save(path)
    return path


# ---------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Stage:
    """One training run: ``DINOv3Module`` and ``PretrainDataModule`` keywords, steps, exports, seed."""

    name: str
    model: dict[str, Any]
    data: dict[str, Any]
    steps: int
    exports: tuple[int, ...]  # steps after which the teacher is exported (the last one included)
    seed: int  # of the weights, chips, augmentation and masks


class ExportEvery(L.Callback):
    """Exports the EMA teacher to ``folder/teacher_step{n}.pth`` after each of the given step counts."""

    def __init__(self, folder: Path, steps: Sequence[int]) -> None:
        self.folder, self.steps = folder, set(steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step in self.steps:
            pl_module.export_teacher(self.folder / f"teacher_step{trainer.global_step}.pth")


class LossHistory(L.Callback):
    """Keeps the total loss (and the Gram term, when present) of every step."""

    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict[str, Tensor], *args: Any
    ) -> None:
        self.losses.append({k: float(outputs[k]) for k in ("loss", "gram_loss") if k in outputs})


def run_stage(stage: Stage, work: Path, reuse: bool) -> tuple[dict[str, Any], bool]:
    """Train one stage, or with ``reuse`` take the run in ``work/<name>`` when its config matches.

    Returns:
        The stage's record: ``config``, ``seconds`` (training wall time), ``losses`` (per step) and
        ``teachers`` (``{step: teacher file}``; step 0 of a stage from random init is the untrained
        teacher); and whether the stage was trained now.
    """
    folder = work / stage.name
    config = {"model": stage.model, "data": stage.data, "steps": stage.steps, "seed": stage.seed}
    record_file = folder / "record.json"
    if reuse and record_file.exists():
        record = json.loads(record_file.read_text())
        if record["config"] == json.loads(json.dumps(config)):
            print(f"{stage.name}: reusing {folder}", file=sys.stderr)
            return record, False
    folder.mkdir(parents=True, exist_ok=True)
    L.seed_everything(stage.seed, verbose=False)
    module = DINOv3Module(**stage.model, seed=stage.seed)
    teachers = {}
    if stage.model.get("init_from") is None:
        teachers[0] = str(module.export_teacher(folder / "teacher_step0.pth"))
    history = LossHistory()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=stage.steps,
        default_root_dir=folder,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the chip sampler shards itself
        callbacks=[
            ExportTeacher(folder / "teacher_checkpoint.pth"),
            ExportEvery(folder, stage.exports),
            history,
            TQDMProgressBar(refresh_rate=10),  # shows progress in logs too (rich draws only on a terminal)
        ],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=PretrainDataModule(**stage.data, seed=stage.seed))
    seconds = time.perf_counter() - start
    teachers |= {step: str(folder / f"teacher_step{step}.pth") for step in stage.exports}
    record = {"config": config, "seconds": seconds, "losses": history.losses, "teachers": teachers}
    record_file.write_text(json.dumps(record))
    return json.loads(record_file.read_text()), True  # the same JSON types as a reused record


def stages(args: argparse.Namespace, corpus: Path, work: Path) -> list[Stage]:
    """Stage 1 from random init, then stage 2 without and with Gram anchoring from its teacher.

    Both stage-2 runs use seed + 1, so they see the same chips, which are not stage 1's.
    """
    arch = {"depth": args.depth, "embed_dim": args.embed_dim, "num_heads": args.num_heads}
    heads = {
        f"{head}_head_{key}": value
        for head in ("dino", "ibot")
        for key, value in (("n_prototypes", args.prototypes), ("hidden_dim", 384), ("bottleneck_dim", 128))
    }
    common = {
        "backbone": PRESET,
        "backbone_overrides": arch,
        "drop_path_rate": 0.1,
        **heads,
        "momentum": {"peak": args.momentum},
        "freeze_last_layer": max(1, args.steps // 20),
        "layer_decay": 0.98,
        "clip_grad": 3.0,
    }
    data = {
        "corpus": str(corpus),
        "preset": PRESET,
        "batch_size": args.batch_size,
        "chip_size": args.chip_size,
        "num_workers": args.num_workers,
        "global_crops_size": args.global_size,
        "local_crops_size": args.local_size,
        "local_crops_number": 4,
    }
    stage1 = Stage(
        "stage1",
        {
            **common,
            "lr": {"start": 0.0, "peak": args.lr, "warmup": args.steps // 10},
            "teacher_temp": {"start": 0.04, "peak": 0.07, "warmup": args.steps // 3},
        },
        {**data, "chips_per_epoch": args.steps * args.batch_size},
        args.steps,
        (args.steps,),
        args.seed,
    )
    n = args.stage2_steps
    continued = {
        **common,
        "init_from": str(work / "stage1" / f"teacher_step{args.steps}.pth"),
        "freeze_last_layer": 0,
        "lr": {"start": 0.0, "peak": args.stage2_lr, "warmup": n // 10},
        "teacher_temp": {"peak": 0.07},
    }
    data2 = {**data, "chips_per_epoch": n * args.batch_size}
    exports = (n // 2, n)
    gram = {
        "gram": True,
        "gram_loss_weight": {"start": 0.0, "peak": args.gram_weight, "warmup": n // 10},
    }
    return [
        stage1,
        Stage("stage2_plain", continued, data2, n, exports, args.seed + 1),
        Stage(
            "stage2_gram",
            {**continued, **gram},
            {**data2, "gram_crops_size": 2 * args.global_size},
            n,
            exports,
            args.seed + 1,
        ),
    ]


# ------------------------------------------------------------------------------------ probe data


@dataclass(frozen=True)
class ProbeImage:
    """A labelled image of a probe: normalised pixels ``[3, H, W]``, class labels ``[H, W]`` and the group
    (tile, quadrant or half) whose images are held out together."""

    name: str
    group: int
    image: Tensor
    labels: np.ndarray


def read_rgb_png(path: Path) -> np.ndarray:
    """``uint8 [3, H, W]`` of an RGB PNG."""
    return np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)


def quadrants(image: Tensor, labels: np.ndarray) -> list[tuple[Tensor, np.ndarray]]:
    """The four quadrants of ``image [C, H, W]`` and ``labels [H, W]``, row-major."""
    h, w = labels.shape[0] // 2, labels.shape[1] // 2
    return [(image[:, r : r + h, c : c + w], labels[r : r + h, c : c + w]) for r in (0, h) for c in (0, w)]


def probe_splits(data: Path, corpus: RasterCorpus) -> dict[str, list[ProbeImage]]:
    """The probe images of each split, scaled as in pretraining; a split's groups are its folds.

    - ``loveda tiles``: the 3 LoveDA tiles, one group each (leave one tile out);
    - ``loveda quadrants``: the 12 quadrants (512 px) of the tiles, grouped by position (train on 3
      quadrants of every tile, test on the 4th of every tile);
    - ``potsdam halves``: the left and right halves of the Potsdam tile.

    Pixels go through the corpus scaling (2-98 % percentiles pooled over its uint8 rasters, to [0, 1]) and
    the preset's mean / std, as the pretraining crops.
    """
    preset = get_preset(PRESET)

    def load(folder: Path, name: str) -> tuple[Tensor, np.ndarray]:
        rgb = corpus.scale(read_rgb_png(folder / "img" / name), 0)  # raster 0: the uint8 rasters' levels
        labels = np.asarray(Image.open(folder / "ann" / name))
        return normalize(rgb, np.ones(labels.shape, bool), preset), labels

    loveda = data / "landcover/loveda"
    tiles = [(p.stem, *load(loveda, p.name)) for p in sorted((loveda / "img").glob("*.png"))]
    potsdam = data / "landcover/potsdam"
    image, labels = load(potsdam, next((potsdam / "img").glob("*.png")).name)
    half = labels.shape[1] // 2
    return {
        "loveda tiles": [ProbeImage(name, i, image, labels) for i, (name, image, labels) in enumerate(tiles)],
        "loveda quadrants": [
            ProbeImage(f"{name}q{q}", q, *part)
            for name, image, labels in tiles
            for q, part in enumerate(quadrants(image, labels))
        ],
        "potsdam halves": [
            ProbeImage("left", 0, image[:, :, :half], labels[:, :half]),
            ProbeImage("right", 1, image[:, :, half:], labels[:, half:]),
        ],
    }


# ---------------------------------------------------------------------------------------- features

#: Features of one image: dense ``[n_patches, D]`` (row-major over the patch grid), global ``[n_windows, D]``.
Features = tuple[Tensor, Tensor]
Extractor = Callable[[Tensor], Features]


def backbone_extractor(weights: Path, overrides: dict[str, int], window: int) -> Extractor:
    """Dense (``x_norm_patchtokens`` of ``window`` px windows) and global (``x_norm_clstoken`` of
    :data:`GLOBAL_WINDOW` px windows) features of a teacher file's backbone, in eval mode."""
    backbone = build_backbone(PRESET, **overrides).eval()
    backbone.load_state_dict(read_state_dict(weights))

    @torch.no_grad()
    def extract(image: Tensor) -> Features:
        dense = backbone.forward_features(windows(image, window))["x_norm_patchtokens"]
        cls = backbone.forward_features(windows(image, GLOBAL_WINDOW))["x_norm_clstoken"]
        return stitch(dense, image.shape[1:], window, backbone.patch_size), cls

    return extract


def pixel_extractor(patch: int) -> Extractor:
    """Raw normalised pixels of each ``patch`` px patch (``[N, 3·p²]``) and their mean over each window."""

    def extract(image: Tensor) -> Features:
        dense = windows(image, patch).flatten(1)
        per_window = GLOBAL_WINDOW // patch
        grid = dense.reshape(image.shape[1] // patch, image.shape[2] // patch, -1)
        pooled = windows(grid.permute(2, 0, 1), per_window).mean(dim=(2, 3))
        return dense, pooled

    return extract


# ------------------------------------------------------------------------------------------ probes


def linear_predict(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, weight_decay: float, max_iter: int = 100
) -> Tensor:
    """Multinomial logistic regression on standardised features (mean cross-entropy + wd·‖W‖², L-BFGS).

    Args:
        train_x: ``[N, D]`` features; train_y: ``[N]`` class ids >= 0; test_x: ``[M, D]``.

    Returns:
        ``[M]`` predicted class ids.
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    z = (train_x - mean) / std
    weight = torch.zeros(int(train_y.max()) + 1, z.shape[1], requires_grad=True)
    bias = torch.zeros(weight.shape[0], requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, train_y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (((test_x - mean) / std) @ weight.T + bias).argmax(1)


Probe = Callable[[Tensor, Tensor, Tensor], Tensor]


def leave_one_group_out(x: Tensor, y: Tensor, groups: Tensor, probe: Probe) -> list[tuple[float, float]]:
    """(accuracy, mIoU) of each fold, which tests on one group's samples and trains on all the others.

    Args:
        x: ``[N, D]`` features; y: ``[N]`` class ids >= 0; groups: ``[N]`` group ids.
    """
    folds = []
    for group in torch.unique(groups):
        test = groups == group
        folds.append(accuracy_miou(probe(x[~test], y[~test], x[test]), y[test]))
    return folds


def majority_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor) -> Tensor:
    """Always the most frequent training class."""
    return torch.full((len(test_x),), int(torch.bincount(train_y).argmax()))


#: Probe name -> ``{"<split> <kind> <probe>": [(accuracy, mIoU) per fold]}``.
Scores = dict[str, list[tuple[float, float]]]


def evaluate(
    extract: Extractor, splits: dict[str, list[ProbeImage]], patch: int, purity: float, weight_decay: float
) -> Scores:
    """Majority, k-NN and linear scores of one feature extractor, per fold.

    Kinds: ``dense`` (patch features, every split) and ``global`` (window features, the LoveDA splits).
    """
    probes: dict[str, Probe] = {
        "majority": majority_probe,
        "knn": partial(knn_predict, k=KNN_K),
        "linear": lambda x, y, t: linear_predict(x, y, t, weight_decay),
    }
    out = {}
    for split, images in splits.items():
        features = [extract(img.image) for img in images]
        kinds = {"dense": (0, patch, purity)}
        if split.startswith("loveda"):
            kinds["global"] = (1, GLOBAL_WINDOW, GLOBAL_PURITY)
        for kind, (which, size, min_purity) in kinds.items():
            xs, ys, gs = [], [], []
            for img, feats in zip(images, features, strict=True):
                y = torch.from_numpy(patch_labels(img.labels, size, min_purity, IGNORE))
                xs.append(feats[which][y >= 0])
                ys.append(y[y >= 0])
                gs.append(torch.full_like(ys[-1], img.group))
            x, y, g = torch.cat(xs), torch.cat(ys), torch.cat(gs)
            for name, probe in probes.items():
                out[f"{split} {kind} {name}"] = leave_one_group_out(x, y, g, probe)
    return out


# ---------------------------------------------------------------------------------------- reporting


def label_counts(splits: dict[str, list[ProbeImage]], patch: int, purity: float) -> list[str]:
    """One line per image of the tile splits: kept patches per class."""
    lines = []
    for split in ("loveda tiles", "potsdam halves"):
        for img in splits[split]:
            y = patch_labels(img.labels, patch, purity, IGNORE)
            counts = np.bincount(y[y >= 0])
            lines.append(
                f"{split.split()[0]} {img.name}: {int((y >= 0).sum())} / {y.size} patches kept; per class "
                + ", ".join(f"{c}: {n}" for c, n in enumerate(counts) if n)
            )
    return lines


def table(rows: dict[str, Scores], columns: Sequence[str], majority_row: str) -> list[str]:
    """Markdown table: one row per model, mean accuracy / mIoU (%) over the folds of each column.

    ``columns`` are ``"<split> <kind> <probe>"`` keys; the ``majority_row`` reads the majority probe.
    """
    cells = []
    for name, scores in rows.items():
        row = [name]
        for column in columns:
            if name == majority_row:
                column = column.rsplit(" ", 1)[0] + " majority"
            acc, miou = np.mean(scores[column], axis=0)
            row.append(f"{100 * acc:.1f} / {100 * miou:.1f}")
        cells.append(row)
    return markdown_table(["features", *(c.replace("knn", "k-NN") for c in columns)], cells)


def loss_summary(record: dict[str, Any]) -> str:
    """Mean total loss (and Gram loss) over the first and last 10 % of a stage's steps."""
    losses = record["losses"]
    n = max(1, len(losses) // 10)
    parts = []
    for key in ("loss", "gram_loss"):
        if key in losses[0]:
            first = np.mean([step[key] for step in losses[:n]])
            last = np.mean([step[key] for step in losses[-n:]])
            parts.append(f"{key} {first:.3f} -> {last:.3f}")
    return ", ".join(parts)


def teachers(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Table row name -> teacher file of every exported step of the stages."""
    stage1 = records["stage1"]["teachers"]
    out = {
        f"stage 1, {'random init' if step == '0' else f'{step} steps'}": path for step, path in stage1.items()
    }
    for name, label in (("stage2_plain", "no Gram"), ("stage2_gram", "Gram")):
        for step, path in records[name]["teachers"].items():
            out[f"stage 2 ({label}), +{step} steps"] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "data", help="shared data folder")
    ap.add_argument("--work", type=Path, default=None, help="corpus and checkpoints (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=300, help="stage-1 steps (default 300)")
    ap.add_argument("--stage2-steps", type=int, default=300, help="steps of each stage 2 (default 300)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="stage-1 peak LR (default 1e-3)")
    ap.add_argument("--stage2-lr", type=float, default=5e-4, help="stage-2 peak LR (default 5e-4)")
    ap.add_argument("--momentum", type=float, default=0.99, help="teacher EMA momentum (default 0.99)")
    ap.add_argument("--gram-weight", type=float, default=2.0, help="Gram loss weight after warmup (2)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--embed-dim", type=int, default=192)
    ap.add_argument("--num-heads", type=int, default=3)
    ap.add_argument("--prototypes", type=int, default=1024, help="DINO and iBOT head prototypes")
    ap.add_argument("--chip-size", type=int, default=128, help="sampled chip side, px (default 128)")
    ap.add_argument("--global-size", type=int, default=112, help="global crop side, px (default 112)")
    ap.add_argument("--local-size", type=int, default=48, help="local crop side, px (default 48)")
    ap.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (default 1)")
    ap.add_argument("--window", type=int, default=256, help="dense-probe window side, px (default 256)")
    ap.add_argument("--purity", type=float, default=0.75, help="least majority fraction of a labelled patch")
    ap.add_argument("--linear-wd", type=float, default=1e-4, help="L2 weight of the linear probe (1e-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the data worker takes the other core)",
    )
    ap.add_argument("--markdown", action="store_true", help=f"write the section into {RESULTS}")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    started, t0 = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    work = a.work or Path(tempfile.mkdtemp(prefix="geodino-learning-signal-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", file=sys.stderr)
    corpus_path = build_corpus(a.data, work)
    records, trained = {}, False
    for stage in stages(a, corpus_path, work):  # a retrained stage makes the later ones stale
        records[stage.name], now = run_stage(stage, work, reuse=not trained)
        trained |= now
    train_seconds = sum(r["seconds"] for r in records.values())

    corpus = RasterCorpus.load(corpus_path)
    splits = probe_splits(a.data, corpus)
    patch = get_preset(PRESET).patch_size
    overrides = {"depth": a.depth, "embed_dim": a.embed_dim, "num_heads": a.num_heads}
    extractors = {"raw pixels": pixel_extractor(patch)}
    extractors |= {
        name: backbone_extractor(Path(path), overrides, a.window) for name, path in teachers(records).items()
    }
    rows = {}
    for name, extract in tqdm(extractors.items(), desc="probing", unit="model"):
        rows[name] = evaluate(extract, splits, patch, a.purity, a.linear_wd)
    rows = {MAJORITY: rows["raw pixels"], **rows}
    total_seconds = time.perf_counter() - t0
    (work / "scores.json").write_text(json.dumps(rows, indent=1))

    dense = [f"{split} dense {probe}" for split in splits for probe in ("knn", "linear")]
    pooled = [
        f"{split} global {probe}"
        for split in ("loveda tiles", "loveda quadrants")
        for probe in ("knn", "linear")
    ]
    lines = [
        f"## Learning signal of tiny CPU pretraining ({started})",
        "",
        f"`python benchmarks/learning_signal.py {' '.join(sys.argv[1:])}`: ViT ({a.depth} blocks, "
        f"{a.embed_dim}-dim, {a.num_heads} heads, patch {patch}; preset `{PRESET}` otherwise), batch "
        f"{a.batch_size}, {a.chip_size} px chips, global crops {a.global_size} px, 4 local crops "
        f"{a.local_size} px; stage 1 {a.steps} steps (peak LR {a.lr}), each stage 2 {a.stage2_steps} steps "
        f"(peak LR {a.stage2_lr}, Gram weight {a.gram_weight}); seed {a.seed}. Corpus: the 3 LoveDA tiles + "
        f"{', '.join(RGB_RASTERS)} (images only).",
        "",
        f"- {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"this run {total_seconds / 60:.1f} min; training {train_seconds / 60:.1f} min (recorded per stage)",
        *(
            f"- {name}: {r['seconds'] / 60:.1f} min, {loss_summary(r)} (first -> last 10 % of steps)"
            for name, r in records.items()
        ),
        f"- probe patches ({patch} px; majority class ≥ {a.purity:.0%} of the block and not ignore):",
        *(f"  - {line}" for line in label_counts(splits, patch, a.purity)),
        "",
        "Accuracy / mIoU (%) of frozen teacher features, mean over the folds. Splits: `loveda tiles` leave "
        "one tile out (3 folds); `loveda quadrants` train on 3 quadrants (512 px) of every tile, test on the "
        "4th (4 folds); `potsdam halves` left / right 256 px halves (2 folds; Potsdam is not in the corpus). "
        f"Dense: one feature per {patch} px patch ({a.window} px windows); global: CLS of {GLOBAL_WINDOW} px "
        f"windows. k-NN: k = {KNN_K}, cosine, weighted; linear: logistic regression, L2 {a.linear_wd}.",
        "",
        *table(rows, dense, MAJORITY),
        "",
        *table(rows, pooled, MAJORITY),
        "",
    ]
    print("\n".join(lines))
    if a.markdown:
        write_section("learning_signal", lines)
        print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
