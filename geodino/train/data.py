"""Pretraining data: chips of a raster corpus, multi-crop augmented, with iBOT masks.

:class:`PretrainDataModule` joins the data layer and the augmentation: a :class:`~geodino.data.RasterCorpus`
(written by ``geodino index``) is sampled by :class:`~geodino.data.RandomChipSampler` (SAT-493M style:
distinct random chips uniform over the valid area, disjoint across DDP ranks), or, given ``chips``, a fixed
chip set is shuffled every epoch by :class:`~geodino.data.ChipListSampler`: a chip table (``geodino sample``
or the balanced ``geodino curate``, read from the rasters) or a chip store (``geodino chips``, read from
zarr, so the rasters need not be on the training machine; the corpus file still gives the scaling). Each
chip is scaled to [0, 1], cut into global / local (/ Gram) crops by
:class:`~geodino.train.augment.MultiCropAugmentation`, and batches get their iBOT masks in
:func:`~geodino.train.augment.collate_multicrop`.

Exact resume: the augmentation of a chip is drawn from an RNG seeded by (seed, chip), and the masks of a
batch from its chips' seeds, so a batch does not depend on which worker made it or on what came before;
the sampler's position is saved in the checkpoint (:meth:`PretrainDataModule.state_dict`). A resumed run
therefore sees exactly the batches the uninterrupted run would have seen.

Lightning: build the Trainer with ``use_distributed_sampler=False`` (the sampler shards itself).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from geodino.data import (
    ChipListSampler,
    ChipRef,
    ChipStore,
    CorpusDataset,
    RandomChipSampler,
    RasterCorpus,
)
from geodino.models import get_preset
from geodino.train.augment import MultiCropAugmentation, collate_multicrop
from geodino.train.masking import MaskingGenerator

__all__ = ["MultiCropCollate", "MultiCropDataset", "PretrainDataModule"]


def chip_seed(seed: int, ref: ChipRef) -> int:
    """A 63-bit seed from the run seed and a chip's raster and window (pixels)."""
    w = ref.window
    entropy = [seed, ref.raster, int(w.col_off), int(w.row_off), int(w.width), int(w.height)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class MultiCropDataset(Dataset):
    """Chips of a corpus, indexed by :class:`~geodino.data.ChipRef`, as multi-crop samples.

    Nodata pixels (``Chip.valid`` False) are set to 0 after scaling, so padding and collars look the same
    in every raster.

    Args:
        corpus: The raster corpus (its scaling maps chips to [0, 1]).
        augmentation: The multi-crop augmentation.
        seed: Run seed; with the chip's window it seeds the chip's augmentation.
        store: Read the chips from this chip store (written from ``corpus`` by ``geodino chips``) instead
            of the rasters. The pixels, hence the samples, are the same.
        store_refs: The refs of the store's chips, in store order (``corpus.refs(store.chips)``, computed
            when None; pass them where they are already known).
    """

    def __init__(
        self,
        corpus: RasterCorpus,
        augmentation: MultiCropAugmentation,
        seed: int = 0,
        store: ChipStore | None = None,
        store_refs: Sequence[ChipRef] | None = None,
    ) -> None:
        self.chips = CorpusDataset(corpus)
        self.augmentation = augmentation
        self.seed = seed
        self.store = store
        if store is not None and store_refs is None:
            store_refs = corpus.refs(store.chips)
        self._store_positions = {ref: i for i, ref in enumerate(store_refs or ())}

    def _read(self, ref: ChipRef) -> tuple[np.ndarray, np.ndarray]:
        """The chip's pixels scaled to [0, 1] ``float32 [C, h, w]`` and its valid mask ``bool [h, w]``."""
        if self.store is None:
            chip = self.chips[ref]
            return chip.image, chip.valid
        position = self._store_positions.get(ref)
        if position is None:
            raise KeyError(f"{ref} is not a chip of the store {self.store.path}")
        chip = self.store[position]
        return self.chips.corpus.scale(chip.image, ref.raster), chip.valid

    def __getitem__(self, ref: ChipRef) -> dict[str, Any]:
        pixels, valid = self._read(ref)
        image = torch.from_numpy(pixels) * torch.from_numpy(valid)
        sample_seed = chip_seed(self.seed, ref)
        with torch.random.fork_rng(devices=[]):  # torchvision v2 draws from the global RNG
            torch.manual_seed(sample_seed)
            crops = self.augmentation(image)
        return {**crops, "seed": sample_seed}


@dataclass(frozen=True)
class MultiCropCollate:
    """Collate of :class:`MultiCropDataset` samples: crop-major stacks plus iBOT masks.

    The masks' RNG is seeded from the samples' seeds, so a batch's masks depend only on its chips.
    """

    mask_generator: MaskingGenerator
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_sample_probability: float = 0.5

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rng = np.random.default_rng([s["seed"] for s in samples])
        crops = [{k: v for k, v in s.items() if k != "seed"} for s in samples]
        return collate_multicrop(
            crops, self.mask_generator, rng, self.mask_ratio_min_max, self.mask_sample_probability
        )


class PretrainDataModule(L.LightningDataModule):
    """Multi-crop batches from a raster corpus for :class:`~geodino.train.module.DINOv3Module`.

    Args:
        corpus: Corpus file written by ``geodino index`` (GeoParquet).
        chips: A fixed chip set to train on, every epoch all of it in a new order (``chips_per_epoch``,
            ``chip_size`` and ``max_nodata`` then do not apply): a chip table (GeoParquet written by
            ``geodino sample`` or ``geodino curate``) or a chip store folder (``geodino chips``), both of
            ``corpus``. None: new random chips every epoch.
        preset: Backbone preset whose normalisation (mean, std) and patch size the crops use, e.g.
            ``dinov3_vitl16.sat493m``; ``mean`` / ``std`` override it (one value per band).
        batch_size: Images per GPU per step.
        chips_per_epoch: Distinct chips per epoch over all ranks.
        chip_size: Side of the sampled chips, pixels (SAT-493M: 512).
        max_nodata: Largest nodata fraction of a chip.
        num_workers: DataLoader worker processes per GPU.
        seed: Run seed (chips, augmentation, masks).
        mean: Per-band normalisation mean (default: the preset's).
        std: Per-band normalisation std (default: the preset's).
        global_crops_size: Side of the global crops, pixels.
        local_crops_size: Side of the local crops, pixels.
        local_crops_number: Local crops per image.
        global_crops_scale: Area fraction range of the global crops.
        local_crops_scale: Area fraction range of the local crops.
        gram_crops_size: Side of the Gram-teacher crops (Gram stages), None otherwise.
        flips: ``"dihedral"``, ``"horizontal"`` or ``"none"`` (see the augmentation).
        rgb_bands: Positions of red, green, blue among the corpus bands, None for no colour operations.
        mask_ratio_min_max: iBOT masking ratio range.
        mask_sample_probability: Fraction of global crops that are masked.
    """

    def __init__(
        self,
        corpus: str,
        chips: str | None = None,
        preset: str = "dinov3_vitl16.sat493m",
        batch_size: int = 16,
        chips_per_epoch: int = 10_000,
        chip_size: int = 512,
        max_nodata: float = 0.5,
        num_workers: int = min(8, os.cpu_count() or 1),
        seed: int = 0,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        global_crops_size: int = 256,
        local_crops_size: int = 112,
        local_crops_number: int = 8,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        gram_crops_size: int | None = None,
        flips: str = "dihedral",
        rgb_bands: tuple[int, int, int] | None = (0, 1, 2),
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        mask_sample_probability: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        backbone = get_preset(preset)
        mean = backbone.mean if mean is None else mean
        std = backbone.std if std is None else std
        patch_size = backbone.patch_size
        if global_crops_size % patch_size:
            raise ValueError(
                f"global_crops_size {global_crops_size} must be a multiple of the patch size {patch_size}"
            )
        self.augmentation = MultiCropAugmentation(
            mean,
            std,
            global_crops_size=global_crops_size,
            local_crops_size=local_crops_size,
            local_crops_number=local_crops_number,
            global_crops_scale=global_crops_scale,
            local_crops_scale=local_crops_scale,
            gram_crops_size=gram_crops_size,
            flips=flips,
            rgb_bands=rgb_bands,
        )
        grid = global_crops_size // patch_size
        self.collate = MultiCropCollate(
            MaskingGenerator((grid, grid)), mask_ratio_min_max, mask_sample_probability
        )
        self.corpus: RasterCorpus | None = None
        self.store: ChipStore | None = None
        self.chip_set: list[ChipRef] | None = None  # the refs of ``chips`` (in table or store order)
        self.sampler: RandomChipSampler | ChipListSampler | None = None
        self._sampler_state: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        """Loads the corpus and builds the sampler (after the process group exists, so it shards)."""
        if self.corpus is None:
            if not os.path.isfile(self.hparams.corpus):
                raise FileNotFoundError(
                    f"{self.hparams.corpus}: no such corpus; write one with `geodino index`"
                )
            self.corpus = RasterCorpus.load(self.hparams.corpus)
            bands = len(self.corpus.index["bands"].iloc[0])
            if bands != self.augmentation.num_bands:
                raise ValueError(
                    f"{self.hparams.corpus} reads {bands} bands but the normalisation has "
                    f"{self.augmentation.num_bands} values; select bands with `geodino index --bands` or "
                    "give mean/std with one value per band"
                )
        if self.sampler is None:
            if self.hparams.chips is None:
                self.sampler = RandomChipSampler(
                    self.corpus.valid_maps,
                    size=self.hparams.chip_size,
                    num_samples=self.hparams.chips_per_epoch,
                    max_nodata=self.hparams.max_nodata,
                    seed=self.hparams.seed,
                )
            else:
                self.chip_set = self._chip_set(self.hparams.chips)
                self.sampler = ChipListSampler(self.chip_set, seed=self.hparams.seed)
            if self._sampler_state is not None:
                self.sampler.load_state_dict(self._sampler_state)

    def _chip_set(self, path: str) -> list[ChipRef]:
        """The chips of a chip table or chip store of the corpus (opening the store into :attr:`store`)."""
        made_by = "`geodino sample`, `geodino curate` (a table) or `geodino chips` (a store)"
        if os.path.isdir(path):
            self.store = ChipStore(path)
            table = self.store.chips
            if self.store.bands != self.augmentation.num_bands:
                raise ValueError(
                    f"{path}: the chip store holds {self.store.bands} bands but the normalisation has "
                    f"{self.augmentation.num_bands} values"
                )
        elif os.path.isfile(path):
            table = gpd.read_parquet(path)
        else:
            raise FileNotFoundError(f"{path}: no such chip table or chip store; write one with {made_by}")
        try:
            return self.corpus.refs(table)
        except ValueError as err:
            raise ValueError(
                f"{path}: {err}; give a chip table or store made from the corpus {self.hparams.corpus} by "
                f"{made_by}"
            ) from None

    def train_dataloader(self) -> DataLoader:
        """Batches of ``batch_size`` images; the last incomplete batch of an epoch is dropped."""
        dataset = MultiCropDataset(
            self.corpus,
            self.augmentation,
            seed=self.hparams.seed,
            store=self.store,
            store_refs=self.chip_set if self.store is not None else None,
        )
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=self.collate,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
            persistent_workers=workers > 0,
        )

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position: chips consumed by the batches processed so far this epoch (per rank).

        ``processed`` rather than ``completed``: Lightning saves a mid-epoch checkpoint after the step but
        before it marks the batch completed, and resumes after the processed batch.
        """
        if self.sampler is None or self.trainer is None:
            return {}
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"sampler": self.sampler.state_dict(consumed=batches * self.hparams.batch_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the sampler's position (applied when the sampler is built in :meth:`setup`)."""
        self._sampler_state = state_dict.get("sampler")
        if self.sampler is not None and self._sampler_state is not None:
            self.sampler.load_state_dict(self._sampler_state)
