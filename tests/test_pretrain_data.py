"""PretrainDataModule on a fixed chip set: a chip table (``geodino sample`` / ``geodino curate``) read from
the rasters, or the chip store written from it (``geodino chips``) read from zarr. Real rasters
(``shared/data/rasters``, RGB uint8).

1. One epoch of the table trains on every chip exactly once, in the sampler's order, with the samples of
   :class:`MultiCropDataset` on the corpus; the store gives bit-identical batches (same pixels, scaling,
   augmentation and masks); epochs differ in order and in every chip's crops.
2. Bad chip sets fail with the path and what to give: missing, not a chip table (the corpus file), a table
   of another corpus.
3. ``photometric_on="device"``: the colour operations run on the transferred batch
   (``on_after_batch_transfer``) and give the workers' batches; a batch that skipped the hook is refused.
4. ``geodino fit --data.chips=<store> --data.photometric_on=device`` trains through LightningCLI.
5. A run resumed with DataLoader workers trains on the uninterrupted run's batches, also from a checkpoint
   at an epoch's end.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import lightning as L
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from conftest import shared_path
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from geodino.cli import main
from geodino.data import CorpusDataset, RandomChipSampler, RasterCorpus, make_scene, write_chip_store
from geodino.io import write_geoparquet
from geodino.train.base import unpack_batch
from geodino.train.data import MultiCropDataset, PretrainDataModule, SizedRef

RASTERS = ("RGB.byte.tif", "cogeo.tif", "rgbn.tif")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain_tiny.yaml"
CHIPS, BATCH = 12, 4
#: Small crops: the tests check data flow, not the augmentation (tested in test_augment.py).
SIZES = {"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 2}


@pytest.fixture(scope="module")
def chip_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A corpus of 3 rasters, a table of 12 random 96 px chips of it and the chip store of that table."""
    folder = tmp_path_factory.mktemp("chipset")
    rasters = shared_path("data", "rasters")
    corpus = RasterCorpus.from_paths([rasters / name for name in RASTERS], bands=[1, 2, 3], progress=False)
    corpus.save(folder / "corpus.parquet")
    refs = RandomChipSampler(corpus.valid_maps, size=96, num_samples=CHIPS, seed=2).epoch_refs(0)
    table = corpus.chip_table(refs)
    write_geoparquet(table, folder / "chips.parquet")
    write_chip_store(
        folder / "chips.zarr", CorpusDataset(corpus, table, scaled=False), chips=table, progress=False
    )
    return {
        "corpus": folder / "corpus.parquet",
        "table": folder / "chips.parquet",
        "store": folder / "chips.zarr",
    }


def datamodule(corpus: Path, chips: Path | str, **kwargs) -> PretrainDataModule:
    args = {"preset": "dinov3_vits16.lvd1689m", "batch_size": BATCH, "num_workers": 0, **SIZES, **kwargs}
    dm = PretrainDataModule(str(corpus), chips=str(chips), **args)
    dm.setup("fit")
    return dm


def epoch_batches(dm: PretrainDataModule, epoch: int) -> list[dict]:
    dm.sampler.set_epoch(epoch)
    return list(dm.train_dataloader())


def test_chip_table_and_store_give_the_same_epoch_of_every_chip(chip_set: dict[str, Path]) -> None:
    from_table = datamodule(chip_set["corpus"], chip_set["table"])
    from_store = datamodule(chip_set["corpus"], chip_set["store"])
    assert from_table.store is None and from_store.store is not None
    table_refs = from_table.corpus.refs(gpd.read_parquet(chip_set["table"]))
    order = from_table.sampler.epoch_refs(0)
    assert len(order) == CHIPS and set(order) == set(table_refs)  # the whole table, each chip once

    batches = epoch_batches(from_table, 0)
    assert len(batches) == CHIPS // BATCH
    # the first batch is MultiCropDataset's samples of the epoch's first chips, collated
    dataset = MultiCropDataset(from_table.corpus, from_table.augmentations, seed=from_table.hparams.seed)
    want = from_table.collate([dataset[SizedRef(0, ref, 0)] for ref in order[:BATCH]])
    for key, value in want.items():
        torch.testing.assert_close(batches[0][key], value, rtol=0, atol=0, msg=key)
    # the store holds the raw pixels of the same windows: identical batches, bit for bit
    for got, expected in zip(epoch_batches(from_store, 0), batches, strict=True):
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    assert from_table.sampler.epoch_refs(1) != order  # a new order every epoch
    # and new views of every chip: the epoch is part of each chip's augmentation seed
    from_table.sampler.set_epoch(1)
    assert {item.epoch for batch in from_table.train_dataloader().batch_sampler for item in batch} == {1}
    for ref in order:
        views = [dataset[SizedRef(0, ref, epoch)] for epoch in (0, 1, 1)]
        assert not torch.equal(views[0]["global_crops"][0], views[1]["global_crops"][0])
        assert torch.equal(views[1]["global_crops"][0], views[2]["global_crops"][0])


def test_colour_on_the_device_gives_the_workers_batches(chip_set: dict[str, Path]) -> None:
    workers = epoch_batches(datamodule(chip_set["corpus"], chip_set["table"]), 0)
    on_device = datamodule(chip_set["corpus"], chip_set["table"], photometric_on="device")
    for deferred, want in zip(epoch_batches(on_device, 0), workers, strict=True):
        assert set(deferred) == {*want, "photometric"}
        with pytest.raises(ValueError, match=r"deferred.*never applied.*datamodule="):
            unpack_batch(deferred)
        # Lightning's transfer moves the tensors and leaves the draws (numpy) on the host
        got = on_device.on_after_batch_transfer(move_data_to_device(deferred, torch.device("cpu")), 0)
        assert set(got) == set(want)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=2e-6, msg=key)
    with pytest.raises(ValueError, match="photometric_on must be 'workers' or 'device', got 'gpu'"):
        datamodule(chip_set["corpus"], chip_set["table"], photometric_on="gpu")


def test_bad_chip_sets_name_the_path_and_the_fix(chip_set: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"missing\.parquet: no such chip table or chip store.*geodino chips"
    ):
        datamodule(chip_set["corpus"], tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match=r"corpus\.parquet: not a chip table: no columns \['col_off'"):
        datamodule(chip_set["corpus"], chip_set["corpus"])
    other = RasterCorpus.from_paths(
        [shared_path("data", "rasters", "cogeo.tif")], bands=[1, 2, 3], progress=False
    )
    other.save(tmp_path / "other.parquet")
    with pytest.raises(
        ValueError,
        match=r"chips\.zarr: chip table names 1 raster\(s\) not in the corpus.*RGB\.byte\.tif.*made from",
    ):
        datamodule(tmp_path / "other.parquet", chip_set["store"])
    # an epoch without a whole batch per process would end the run at once, as if it had succeeded
    with pytest.raises(ValueError, match=rf"chip set .*chips\.parquet \({CHIPS} chips\) gives each of the"):
        datamodule(chip_set["corpus"], chip_set["table"], batch_size=CHIPS + 1)
    with pytest.raises(ValueError, match=r"chips_per_epoch=3 gives .* 3 chips an epoch, fewer than"):
        PretrainDataModule(
            str(chip_set["corpus"]), preset="dinov3_vits16.lvd1689m", batch_size=4, chips_per_epoch=3, **SIZES
        ).setup("fit")


def test_fit_on_a_chip_store_with_colour_on_the_device_through_the_cli(
    chip_set: dict[str, Path], tmp_path: Path
) -> None:
    """Also shows that Lightning calls the data module's ``on_after_batch_transfer``: the steps refuse a batch
    whose colour operations were not applied."""
    args = [
        "fit",
        "--config",
        str(RECIPE),
        f"--data.corpus={chip_set['corpus']}",
        f"--data.chips={chip_set['store']}",
        f"--data.batch_size={BATCH}",
        "--data.num_workers=0",
        "--data.photometric_on=device",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks.init_args.dirpath={tmp_path}/checkpoints",  # the recipe's ModelCheckpoint
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
    ]
    assert main(args) == 0
    assert (tmp_path / "teacher_checkpoint.pth").is_file()


def write_reflectance(path: Path, nan_columns: int) -> None:
    """A 3-band float32 reflectance raster in [0, 1] (128 px, UTM) whose first columns are NaN nodata."""
    pixels = np.random.default_rng(0).uniform(0.05, 0.6, (3, 128, 128)).astype(np.float32)
    pixels[:, :, :nan_columns] = np.nan
    profile = {"driver": "GTiff", "width": 128, "height": 128, "count": 3, "dtype": "float32"}
    transform = Affine(0.6, 0, 500_000, 0, -0.6, 4_000_000)
    with rasterio.open(path, "w", **profile, crs="EPSG:32633", transform=transform, nodata=np.nan) as dst:
        dst.write(pixels)


def test_unscaled_corpus_nan_nodata_becomes_zero_and_integer_pixels_are_refused(
    tmp_path: Path,
) -> None:
    write_reflectance(tmp_path / "reflectance.tif", nan_columns=40)
    RasterCorpus.from_paths([tmp_path / "reflectance.tif"], scaling=None, progress=False).save(
        tmp_path / "float.parquet"
    )
    dm = PretrainDataModule(
        str(tmp_path / "float.parquet"),
        preset="dinov3_vits16.lvd1689m",
        batch_size=2,
        chips_per_epoch=4,
        chip_size=96,
        num_workers=0,
        **SIZES,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    chips = [loader.dataset.chips[item.ref] for batch in loader.batch_sampler for item in batch]
    assert any(np.isnan(chip.image).any() for chip in chips)  # the corpus hands the NaN on, unscaled
    for batch in loader:
        crops = {key: value for key, value in batch.items() if key.startswith("collated_")}
        assert {"collated_global_crops", "collated_local_crops"} <= set(crops)
        for key, value in crops.items():
            assert torch.isfinite(value).all(), key

    make_scene(tmp_path / "counts.tif", size=128, bands=3, dtype="uint16")
    RasterCorpus.from_paths([tmp_path / "counts.tif"], scaling=None, progress=False).save(
        tmp_path / "counts.parquet"
    )
    with pytest.raises(
        ValueError, match=r"counts\.parquet was indexed without scaling.*uint16.*geodino index"
    ):
        PretrainDataModule(str(tmp_path / "counts.parquet"), preset="dinov3_vits16.lvd1689m").setup("fit")


class BatchRecorder(L.LightningModule):
    """Records (step, epoch, batch index, sum of the global crops) of every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int, int, float]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        crops = batch["collated_global_crops"].sum().item()
        self.seen.append((self.global_step, self.current_epoch, batch_idx, crops))
        return self.weight.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def record_fit(chip_set: dict[str, Path], root: Path, ckpt_path: Path | None = None) -> list[tuple]:
    """6 steps of 3 batches an epoch, one DataLoader worker, a checkpoint every step into ``root``."""
    data = datamodule(chip_set["corpus"], chip_set["table"], num_workers=1)
    every_step = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[every_step] if ckpt_path is None else [],
        default_root_dir=root,
    )
    module = BatchRecorder()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize("step", [2, 3])
def test_resume_with_workers_continues_mid_epoch_and_after_an_epoch_end(
    chip_set: dict[str, Path], tmp_path: Path, step: int
) -> None:
    """A checkpoint after an epoch's last batch (step 3) goes on with the next epoch, not the one after.

    With workers Lightning creates the epoch's iterator before it sets the sampler's epoch; the saved epoch's
    empty remainder used to stand for the next epoch, which was skipped.
    """
    full = record_fit(chip_set, tmp_path / "full")
    assert [seen[1] for seen in full] == [0, 0, 0, 1, 1, 1]
    resumed = record_fit(chip_set, tmp_path / "resumed", ckpt_path=tmp_path / "full" / f"step={step}.ckpt")
    assert resumed == full[step:]


def test_resume_on_other_processes_names_the_way_on(chip_set: dict[str, Path]) -> None:
    """A checkpoint of 2 processes resumed by 1: refused, saying how to go on (the chips would differ)."""
    saved = datamodule(chip_set["corpus"], chip_set["table"])
    state = {"sampler": {**saved.sampler.state_dict(), "world_size": 2}, "batches": saved._batch_config()}
    with pytest.raises(ValueError, match=r"world_size: saved 2, now 1\); resume with .*model.continue_from"):
        datamodule(chip_set["corpus"], chip_set["table"]).load_state_dict(state)
