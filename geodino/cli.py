"""Command line.

``geodino demo`` runs the whole pipeline on a synthetic scene, offline, in seconds. The data commands
build a training set from a raster corpus, each step writing one file the next step reads::

    geodino index rasters/ --out corpus.parquet          # GeoParquet index: footprints, CRS, GSD, bands
    geodino sample corpus.parquet --n 10000 --out chips.parquet   # random 512 px chips, nodata rejected
    geodino curate corpus.parquet --candidates 100000 --keep 10000 --out curated.parquet  # k-means balance
    geodino chips curated.parquet --corpus corpus.parquet --out chips.zarr   # materialise into zarr

``geodino fit --config recipes/<stage>.yaml`` pretrains through LightningCLI (every YAML key maps onto
a constructor argument of :class:`~geodino.train.DINOv3Module`, :class:`~geodino.train.PretrainDataModule`
or ``lightning.Trainer``); ``geodino distill --config recipes/distill_tiny.yaml`` trains with
:class:`~geodino.train.DistillationModule` instead.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from geodino.models import BackbonePreset


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geodino", description="DINOv3 satellite foundation models: GeoTIFF to maps."
    )
    parser.epilog = "geodino fit|distill --config RECIPE.yaml: pretraining, distillation (see recipes/)"
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="synthetic scene -> DINOv3 patch features -> PCA map and quicklook",
        description=(
            "Generate a synthetic 0.6 m scene, embed it with a DINOv3 backbone and write the PCA of the "
            "patch features as a GeoTIFF plus a PNG quicklook. Runs offline; without --weights the "
            "backbone is randomly initialised."
        ),
    )
    demo.add_argument(
        "--out", type=Path, default=Path("geodino-out"), help="output folder (default: %(default)s)"
    )
    demo.add_argument("--backbone", default="dinov3_vits16", help="preset name (default: %(default)s)")
    demo.add_argument("--weights", type=Path, help="local checkpoint of the backbone (.pth or .safetensors)")
    demo.add_argument("--size", type=int, default=512, help="scene side, pixels (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="scene seed (default: %(default)s)")

    index = commands.add_parser(
        "index",
        help="index rasters (folder, glob or files) into a GeoParquet corpus",
        description=(
            "Open every raster once and write a GeoParquet corpus: footprint (EPSG:4326), CRS, GSD, "
            "bands, dtype, nodata, a coarse valid-pixel map and per-band percentile scaling."
        ),
    )
    index.add_argument("sources", nargs="+", help="a folder (searched recursively), a glob, or files")
    index.add_argument("--out", type=Path, required=True, help="corpus file to write (.parquet)")
    index.add_argument(
        "--bands", nargs="+", help="bands to read: 1-based indexes or band descriptions (default: all)"
    )
    index.add_argument(
        "--nodata",
        type=float,
        help="fill value of the rasters that declare no nodata value or mask (e.g. a 0 collar); "
        "declared nodata values and masks are kept",
    )
    index.add_argument("--crs", help="read every raster in this CRS (WarpedVRT), e.g. EPSG:32633")
    index.add_argument("--gsd", type=_positive, help="read at this resolution, CRS units per pixel")
    index.add_argument(
        "--scaling-by",
        choices=["dtype", "raster", "corpus"],
        default="dtype",
        help="rasters that share their 2-98 %% scaling percentiles: those of one dtype (mixed sensors), each "
        "raster its own (one sensor, very different illumination; loses absolute radiometry between "
        "scenes) or the whole corpus (one sensor, keeps relative radiometry) (default: %(default)s)",
    )
    index.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable rasters with a warning instead of stopping"
    )

    sample = commands.add_parser(
        "sample",
        help="draw random chips uniformly over the valid area of a corpus into a chip table",
        description="Draw distinct random chips (SAT-493M style crops) into a GeoParquet chip table.",
    )
    sample.add_argument("corpus", type=Path, help="corpus file written by `geodino index`")
    sample.add_argument("--out", type=Path, required=True, help="chip table to write (.parquet)")
    sample.add_argument("--n", type=int, required=True, help="number of chips")
    sample.add_argument("--size", type=int, default=512, help="chip side, pixels (default: %(default)s)")
    sample.add_argument(
        "--max-nodata",
        type=float,
        default=0.5,
        help="largest nodata fraction of a chip (default: %(default)s)",
    )
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")

    curate = commands.add_parser(
        "curate",
        help="embed candidate chips, hierarchical k-means, keep a cluster-balanced subset",
        description=(
            "DINOv2/DINOv3 data curation: draw candidate chips, embed them with a backbone (CLS token), "
            "cluster with hierarchical k-means and keep a subset balanced across clusters."
        ),
    )
    curate.add_argument("corpus", type=Path, help="corpus file written by `geodino index`")
    curate.add_argument("--out", type=Path, required=True, help="curated chip table to write (.parquet)")
    curate.add_argument("--candidates", type=int, required=True, help="candidate chips to draw")
    curate.add_argument("--keep", type=int, required=True, help="chips to keep")
    curate.add_argument("--levels", type=int, nargs="+", default=[1000, 100, 10], help="clusters per level")
    curate.add_argument("--size", type=int, default=512, help="chip side, pixels (default: %(default)s)")
    curate.add_argument(
        "--embed-size", type=int, default=224, help="chips are resized to this side for the backbone"
    )
    curate.add_argument("--backbone", default="dinov3_vits16", help="preset name (default: %(default)s)")
    curate.add_argument("--weights", type=Path, help="local checkpoint of the backbone")
    curate.add_argument("--batch-size", type=int, default=32, help="chips per forward pass")
    curate.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")

    chips = commands.add_parser(
        "chips",
        help="materialise the chips of a chip table into a zarr chip store (resumable)",
        description="Read every chip of a chip table and write it into a zarr store, one chunk per chip.",
    )
    chips.add_argument("table", type=Path, help="chip table written by `geodino sample` or `geodino curate`")
    chips.add_argument("--corpus", type=Path, required=True, help="the corpus the table was drawn from")
    chips.add_argument("--out", type=Path, required=True, help="zarr store to write (.zarr)")
    chips.add_argument("--overwrite", action="store_true", help="replace an existing store")
    return parser


def _error(message: str) -> int:
    print(f"geodino: error: {message}", file=sys.stderr)
    return 2


def _prepare_out_dir(out: Path) -> str | None:
    """Create the output folder; the reason it cannot be used, or None."""
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a directory; give a folder path (it is created if missing)"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the output folder {out}: {err.strerror}; choose another --out"
    return None


def _label_colors(classes: np.ndarray) -> np.ndarray:
    """Land-cover codes [H, W] as display colours, uint8 [H, W, 3]."""
    from geodino.data import CLASS_COLORS

    lut = np.zeros((256, 3), dtype=np.uint8)
    for code, rgb in CLASS_COLORS.items():
        lut[code] = rgb
    return lut[classes]


def _backbone(preset: BackbonePreset, weights: Path | None, seed: int) -> nn.Module:
    """The preset's backbone with weights from a local file, or randomly initialised from ``seed``."""
    if weights is not None:
        from geodino.models import load_backbone

        return load_backbone(preset.name, weights=weights)
    import torch

    from geodino.models import build_backbone

    print(
        f"NOTE: {preset.name} has RANDOM weights, so the feature map shows texture, not meaning.\n"
        f"      For real features pass --weights /path/to/{preset.checkpoint}\n"
        "      (official DINOv3 weights from Meta, DINOv3 license; geodino never downloads them)."
    )
    with torch.random.fork_rng():  # reproducible without touching the caller's random state
        torch.manual_seed(seed)
        return build_backbone(preset.name)


def run_demo(out: Path, backbone: str, weights: Path | None, size: int, seed: int) -> int:
    """The ``demo`` subcommand; returns the exit status."""
    from geodino.data import make_scene
    from geodino.inference import embed_raster, pca_rgb, read_rgb, write_quicklook, write_rgb_geotiff
    from geodino.models import CheckpointError, get_preset

    try:
        preset = get_preset(backbone)
    except KeyError as err:
        return _error(str(err.args[0]))
    if size < 32:
        return _error(f"--size {size}: the scene needs at least 32 pixels a side")
    if weights is not None and not weights.is_file():
        return _error(
            f"--weights {weights}: no such file (geodino never downloads weights; give a local path)"
        )
    problem = _prepare_out_dir(out)
    if problem:
        return _error(problem)

    start = time.perf_counter()
    try:
        model = _backbone(preset, weights, seed).eval()
    except CheckpointError as err:  # unreadable, or does not fit this preset; the message says which
        return _error(str(err))
    scene = make_scene(out / "scene.tif", size=size, seed=seed, labels_path=out / "labels.tif")

    fmap = embed_raster(model, scene.path, preset=preset)
    pca = pca_rgb(fmap.features, fmap.valid)
    pca_path = write_rgb_geotiff(out / "features_pca.tif", pca, transform=fmap.transform, crs=fmap.crs)
    quicklook_path = out / "quicklook.png"
    rgb, _ = read_rgb(scene.path, max_size=1024)
    weights_note = "random weights" if weights is None else weights.name
    write_quicklook(
        quicklook_path,
        [
            ("input RGB (2-98 % stretch)", rgb.transpose(1, 2, 0)),
            (f"PCA of {preset.name} patch features", pca.transpose(1, 2, 0)),
            ("land cover (ground truth)", _label_colors(scene.classes)),
        ],
        title=f"geodino demo: synthetic scene seed {seed}, {weights_note}",
    )
    seconds = time.perf_counter() - start

    for name, path in (
        ("scene", scene.path),
        ("labels", scene.labels_path),
        ("PCA map", pca_path),
        ("quicklook", quicklook_path),
    ):
        print(f"{name:>10}: {path}")
    print(
        f"{size}x{size} px, {scene.crs.to_string()}, GSD {scene.gsd:g} m, patch grid "
        f"{fmap.shape[0]}x{fmap.shape[1]} at {scene.gsd * fmap.patch_size:g} m, backbone {preset.name} "
        f"({weights_note}), {seconds:.1f} s"
    )
    return 0


def _positive(value: str) -> float:
    """An argparse type: a number above 0."""
    number = float(value)
    if not number > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {value}")
    return number


def _check_output_file(path: Path, suffix: str, inputs: tuple[Path, ...] = ()) -> str | None:
    """The reason ``path`` cannot be written as an output file (one of the command's ``inputs`` included),
    or None."""
    if any(path.resolve() == p.resolve() for p in inputs):
        return f"--out {path} is an input of this command; give another file name"
    if path.suffix.lower() != suffix:
        return f"--out {path}: expected a {suffix} file name"
    if path.is_dir():
        return f"--out {path} is a directory; give a file name ending in {suffix}"
    if not path.parent.is_dir():
        return f"--out {path}: the folder {path.parent} does not exist; create it first"
    return None


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Show each distinct warning ``caught`` once.

    geodino's own (skipped files, fill value hints) become ``geodino: warning: ...`` lines on stderr;
    others (rasterio, numpy) are shown the usual way.
    """
    for w in {(w.category, str(w.message)): w for w in caught}.values():
        if w.category is UserWarning:
            print(f"geodino: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def run_index(args: argparse.Namespace) -> int:
    """The ``index`` subcommand."""
    from geodino.data import RasterCorpus, RasterFileError

    problem = _check_output_file(args.out, ".parquet")
    if problem:
        return _error(problem)
    bands = None if args.bands is None else [int(b) if b.isdigit() else b for b in args.bands]
    sources = args.sources[0] if len(args.sources) == 1 else args.sources
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            corpus = RasterCorpus.from_paths(
                sources,
                bands=bands,
                nodata=args.nodata,
                crs=args.crs,
                gsd=args.gsd,
                scaling_by=args.scaling_by,
                on_error="skip" if args.skip_bad else "raise",
            )
    except RasterFileError as err:
        skip = "" if args.skip_bad else " (--skip-bad indexes the other rasters and lists the bad ones)"
        return _error(f"{err}{skip}")
    except (FileNotFoundError, ValueError) as err:
        return _error(str(err))
    finally:
        _print_warnings(caught)
    corpus.save(args.out)
    index = corpus.index
    crs_count, valid = index["crs"].nunique(), int(index["valid_pixels"].sum())
    no_crs = int(index["crs"].isna().sum())
    crs_text = f"{crs_count} CRS" + (f" + {no_crs} in pixel coordinates (no CRS)" if no_crs else "")
    print(
        f"indexed {len(corpus)} raster(s), {crs_text}, {valid:,} valid pixels "
        f"({index['valid_fraction'].mean():.1%} valid on average) -> {args.out}"
    )
    return 0


def run_sample(args: argparse.Namespace) -> int:
    """The ``sample`` subcommand."""
    from geodino.data import RandomChipSampler, RasterCorpus
    from geodino.io import write_geoparquet

    problem = _check_output_file(args.out, ".parquet", (args.corpus,))
    if problem:
        return _error(problem)
    if not args.corpus.is_file():
        return _error(f"{args.corpus}: no such corpus file; write one with `geodino index`")
    try:
        corpus = RasterCorpus.load(args.corpus)
        sampler = RandomChipSampler(
            corpus.valid_maps, size=args.size, num_samples=args.n, max_nodata=args.max_nodata, seed=args.seed
        )
        refs = sampler.epoch_refs(0)
    except ValueError as err:
        return _error(str(err))
    table = corpus.chip_table(refs)
    write_geoparquet(table, args.out)
    per_raster = table["raster"].value_counts()
    print(f"{len(table)} chips of {args.size} px from {len(per_raster)} raster(s) -> {args.out}")
    return 0


def _chip_embedder(backbone: nn.Module, preset: BackbonePreset, size: int) -> Callable[[Tensor], Tensor]:
    """Chips ``float32 [B, C, H, W]`` in [0, 1] -> CLS embeddings ``[B, D]`` (normalised, resized)."""
    import torch
    import torch.nn.functional as F

    mean = torch.tensor(preset.mean).view(1, -1, 1, 1)
    std = torch.tensor(preset.std).view(1, -1, 1, 1)

    def embed(chips: Tensor) -> Tensor:
        x = F.interpolate(chips, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return backbone.forward_features((x - mean) / std)["x_norm_clstoken"]

    return embed


def run_curate(args: argparse.Namespace) -> int:
    """The ``curate`` subcommand."""
    from geodino.data import CorpusDataset, RandomChipSampler, RasterCorpus, curate, embed_chips
    from geodino.io import write_geoparquet
    from geodino.models import CheckpointError, get_preset

    problem = _check_output_file(args.out, ".parquet", (args.corpus,))
    if problem:
        return _error(problem)
    if not args.corpus.is_file():
        return _error(f"{args.corpus}: no such corpus file; write one with `geodino index`")
    try:
        preset = get_preset(args.backbone)
    except KeyError as err:
        return _error(str(err.args[0]))
    try:
        corpus = RasterCorpus.load(args.corpus)
    except ValueError as err:
        return _error(str(err))
    bands = len(corpus.index["bands"].iloc[0])
    if bands != len(preset.mean):
        return _error(
            f"{args.corpus} reads {bands} bands but {preset.name} takes {len(preset.mean)}; "
            "index the corpus with --bands (e.g. --bands red green blue)"
        )
    try:
        model = _backbone(preset, args.weights, args.seed).eval()
        refs = RandomChipSampler(
            corpus.valid_maps, size=args.size, num_samples=args.candidates, seed=args.seed
        ).epoch_refs(0)
        embeddings = embed_chips(
            CorpusDataset(corpus, refs),
            _chip_embedder(model, preset, args.embed_size),
            batch_size=args.batch_size,
        )
        curated = curate(corpus.chip_table(refs), embeddings, args.keep, levels=args.levels, seed=args.seed)
    except (CheckpointError, ValueError) as err:
        return _error(str(err))
    write_geoparquet(curated, args.out)
    print(f"kept {len(curated)} of {len(refs)} candidate chips, levels {args.levels} -> {args.out}")
    return 0


def run_chips(args: argparse.Namespace) -> int:
    """The ``chips`` subcommand."""
    import geopandas as gpd

    from geodino.data import CorpusDataset, RasterCorpus, RasterFileError, write_chip_store

    if args.out.suffix.lower() != ".zarr":
        return _error(f"--out {args.out}: expected a .zarr store name")
    if not args.out.parent.is_dir():
        return _error(f"--out {args.out}: the folder {args.out.parent} does not exist; create it first")
    if args.out.exists() and not args.out.is_dir():
        return _error(f"--out {args.out} is a file; a chip store is a folder: give another name")
    for path, how in ((args.table, "`geodino sample` or `geodino curate`"), (args.corpus, "`geodino index`")):
        if not path.is_file():
            return _error(f"{path}: no such file; write it with {how}")
    try:
        corpus = RasterCorpus.load(args.corpus)
        table = gpd.read_parquet(args.table)
        source = CorpusDataset(corpus, table, scaled=False)
        store = write_chip_store(args.out, source, chips=table, overwrite=args.overwrite)
    except (RasterFileError, ValueError, KeyError) as err:
        return _error(str(err))
    print(f"{len(store)} chips -> {args.out}")
    return 0


#: Commands handled by LightningCLI: geodino command -> (Lightning subcommand, module in ``geodino.train``).
LIGHTNING_COMMANDS = {
    "fit": ("fit", "DINOv3Module"),
    "distill": ("fit", "DistillationModule"),
}


def _newest_last_checkpoint(trainer: Any) -> Path | None:
    """The newest ``last*.ckpt`` in the folders of the ModelCheckpoint callbacks of a parsed trainer config
    that name their ``dirpath``: the file Lightning resumes from with ``ckpt_path="last"``. None if there
    is none (Lightning then starts from step 0, or looks in folders it derives itself)."""
    found = []
    for callback in (trainer or {}).get("callbacks") or []:
        dirpath = (callback.get("init_args") or {}).get("dirpath")
        if str(callback.get("class_path")).endswith("ModelCheckpoint") and dirpath:
            found += Path(dirpath).glob("last*.ckpt")  # Lightning's pattern: the stem starts with "last"
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def run_lightning(argv: Sequence[str]) -> int:
    """``geodino fit|distill --config recipe.yaml ...`` through LightningCLI. A checkpoint or raster
    that cannot be used (a previous stage's file missing, unreadable or of other networks; a ``ckpt_path``
    to resume from that is missing or cut short; a corpus missing or of other bands), a setting refused by
    a constructor, a run that diverged, a GPU out of memory and a Trainer setting this machine cannot run (a
    GPU recipe without a GPU) are reported in one line naming the file or the steps and the fix, without a
    traceback."""
    import torch
    from jsonargparse import lazy_instance
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI

    from geodino import train
    from geodino.train.base import check_resume_checkpoint

    class ResumeAsConfigured(LightningCLI):
        """LightningCLI whose ``ckpt_path`` resumes the run's state with the settings of the recipe and the
        command line."""

        def _parse_ckpt_path(self) -> None:
            """Checks ``ckpt_path`` (see :func:`~geodino.train.base.check_resume_checkpoint`) in place of
            LightningCLI's step that reads the whole file to replace the model's settings with the
            checkpoint's hyper-parameters (Lightning-AI/pytorch-lightning#20801, #21455): resuming a diverged
            run with ``--model.lr`` lowered would silently keep the old rate."""
            subcommand = self.config.get("subcommand")
            path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if path == "last":  # the file Lightning will take, if the recipe names its checkpoint folder
                path = _newest_last_checkpoint(self.config[subcommand].get("trainer"))
            if path is not None:
                check_resume_checkpoint(path)

    subcommand, module = LIGHTNING_COMMANDS[argv[0]]
    with warnings.catch_warnings():
        # The arguments always come through `args` (``distill`` becomes ``fit``); this warning is about that.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            ResumeAsConfigured(
                getattr(train, module),
                train.PretrainDataModule,
                args=[subcommand, *argv[1:]],
                trainer_defaults={
                    # the chip sampler shards itself over ranks; Lightning's would shard it again
                    "use_distributed_sampler": False,
                    # checkpoints whole or absent, also where $TMPDIR is on another file system
                    "plugins": [lazy_instance(train.AtomicCheckpointIO)],
                },
                save_config_kwargs={"overwrite": True},
            )
        # a file or setting refused (CheckpointError and RasterFileError are ValueErrors), a diverged run
        except (FileNotFoundError, ValueError, train.TrainingDiverged) as err:
            return _error(str(err))
        except MisconfigurationException as err:  # a Trainer setting that this machine cannot run
            hint = (
                "; the recipe asks for GPUs (trainer.accelerator: gpu) and torch finds none here: run it on "
                "a GPU machine, or here a tiny recipe (or --trainer.accelerator=cpu --trainer.devices=1)"
            )
            return _error(f"{err}{hint if 'gpu' in str(err).lower() else ''}")
        except torch.OutOfMemoryError as err:
            return _error(
                f"out of GPU memory ({next(iter(str(err).splitlines()), '')}). Per GPU, lower "
                "--data.batch_size, keep fewer activations with --model.activation_checkpointing=selective "
                "(ViT-L/16 at batch 128 on an H200: 89.5 -> 56.6 GiB) or =true, or shard the networks over "
                "several GPUs with --trainer.strategy=fsdp"
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``geodino`` console script and ``python -m geodino``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return run_lightning(argv)
    args = _parser().parse_args(argv)
    if args.command == "index":
        return run_index(args)
    if args.command == "sample":
        return run_sample(args)
    if args.command == "curate":
        return run_curate(args)
    if args.command == "chips":
        return run_chips(args)
    return run_demo(args.out, args.backbone, args.weights, args.size, args.seed)
