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

Mixed resolutions (the official high-resolution stage, ``crops.global_local_crop_pairs_ratios``): given lists
of global / local (/ Gram) crop sizes, every batch is made at one resolution, drawn per step with the given
shares by :class:`ResolutionBatchSampler`; the draw depends on (seed, epoch, batch index) only, so all DDP
ranks run the same resolution at the same step, as the official combined loader.

Exact resume: the augmentation of a chip is drawn from an RNG seeded by (seed, epoch, chip), the masks of a
batch from its chips' seeds and its resolution from its position, so a batch does not depend on which worker
made it or on what came before; the sampler's position is saved in the checkpoint
(:meth:`PretrainDataModule.state_dict`). A resumed run therefore sees exactly the batches the uninterrupted
run would have seen.

Lightning: build the Trainer with ``use_distributed_sampler=False`` (the sampler shards itself).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import geopandas as gpd
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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

__all__ = [
    "MultiCropCollate",
    "MultiCropDataset",
    "PretrainDataModule",
    "Resolution",
    "ResolutionBatchSampler",
    "SizedRef",
    "resolutions",
]


def chip_seed(seed: int, ref: ChipRef, epoch: int) -> int:
    """A 63-bit seed from the run seed, a chip's raster and window (pixels) and the epoch.

    The epoch is part of it so that a fixed chip set (``chips``) gets new crops, colours and masks every
    epoch, as the official loader's RNG gives them, instead of the first epoch's views again."""
    w = ref.window
    entropy = [seed, epoch, ref.raster, int(w.col_off), int(w.row_off), int(w.width), int(w.height)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class Resolution(NamedTuple):
    """Crop sides of one multi-crop resolution, pixels."""

    global_crops_size: int
    local_crops_size: int
    gram_crops_size: int | None = None


class SizedRef(NamedTuple):
    """A chip, the resolution (index into the data module's resolutions) to cut its crops at and the epoch
    it is drawn in (part of its augmentation's seed)."""

    resolution: int
    ref: ChipRef
    epoch: int


class MultiCropDataset(Dataset):
    """Chips of a corpus, indexed by :class:`SizedRef`, as multi-crop samples.

    Nodata pixels (``Chip.valid`` False, NaN included) are set to 0 after scaling, so padding and collars
    look the same in every raster.

    Args:
        corpus: The raster corpus (its scaling maps chips to [0, 1]).
        augmentations: One multi-crop augmentation per resolution; ``SizedRef.resolution`` picks one.
        seed: Run seed; with the chip's window and the epoch it seeds the chip's augmentation.
        store: Read the chips from this chip store (written from ``corpus`` by ``geodino chips``) instead
            of the rasters. The pixels, hence the samples, are the same.
        store_refs: The refs of the store's chips, in store order (``corpus.refs(store.chips)``, computed
            when None; pass them where they are already known).
    """

    def __init__(
        self,
        corpus: RasterCorpus,
        augmentations: Sequence[MultiCropAugmentation],
        seed: int = 0,
        store: ChipStore | None = None,
        store_refs: Sequence[ChipRef] | None = None,
    ) -> None:
        self.chips = CorpusDataset(corpus)
        self.augmentations = list(augmentations)
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

    def __getitem__(self, key: SizedRef) -> dict[str, Any]:
        if not isinstance(key, SizedRef):
            raise TypeError(f"index a MultiCropDataset with SizedRef(resolution, ref, epoch), got {key!r}")
        pixels, valid = self._read(key.ref)
        image = torch.where(torch.from_numpy(valid), torch.from_numpy(pixels), 0.0)  # NaN nodata too
        sample_seed = chip_seed(self.seed, key.ref, key.epoch)
        with torch.random.fork_rng(devices=[]):  # torchvision v2 draws from the global RNG
            torch.manual_seed(sample_seed)
            crops = self.augmentations[key.resolution](image)
        return {**crops, "seed": sample_seed}


@dataclass(frozen=True)
class MultiCropCollate:
    """Collate of :class:`MultiCropDataset` samples: crop-major stacks plus iBOT masks.

    The masks are drawn on the patch grid of the batch's global crops (``patch_size`` pixels per patch),
    from an RNG seeded by the samples' seeds, so a batch's masks depend only on its chips.
    """

    patch_size: int
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_sample_probability: float = 0.5

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rng = np.random.default_rng([s["seed"] for s in samples])
        crops = [{k: v for k, v in s.items() if k != "seed"} for s in samples]
        height, width = crops[0]["global_crops"][0].shape[-2:]
        grid = MaskingGenerator((height // self.patch_size, width // self.patch_size))
        return collate_multicrop(crops, grid, rng, self.mask_ratio_min_max, self.mask_sample_probability)


def _check_shares(shares: Sequence[float]) -> None:
    """Raises ``ValueError`` unless ``shares`` (of the steps per resolution) are positive numbers."""
    if not shares or any(not share > 0 for share in shares):
        raise ValueError(f"resolution shares must be positive numbers, got {list(shares)}")


class ResolutionBatchSampler(Sampler[list[SizedRef]]):
    """Batches of a chip sampler's chips, each at one resolution drawn with the given shares.

    The resolution of batch ``b`` of epoch ``e`` is drawn from ``numpy`` seeded by ``(seed, e, b)``: the
    same on every DDP rank (each rank has the same batches per epoch) and the same after a resume (the chip
    sampler's restored position gives ``b``), as the official combined loader, which draws one loader per
    step from a seed shared by all ranks. The last incomplete batch of an epoch is dropped.

    Lightning calls ``set_epoch`` on :attr:`sampler` (``batch_sampler.sampler``) at every epoch start.

    Args:
        sampler: The chip sampler (:class:`~geodino.data.RandomChipSampler` or
            :class:`~geodino.data.ChipListSampler`).
        batch_size: Chips per batch.
        shares: Share of the batches of each resolution (positive; normalised to sum 1).
        seed: Run seed.
    """

    def __init__(
        self,
        sampler: RandomChipSampler | ChipListSampler,
        batch_size: int,
        shares: Sequence[float],
        seed: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_shares(shares)
        self.sampler, self.batch_size, self.seed = sampler, batch_size, seed
        self.shares = np.asarray(shares, dtype=np.float64) / np.sum(shares)

    def resolution(self, epoch: int, batch: int) -> int:
        """The resolution index of batch ``batch`` of ``epoch``."""
        if len(self.shares) == 1:
            return 0
        return int(np.random.default_rng([self.seed, epoch, batch]).choice(len(self.shares), p=self.shares))

    def __len__(self) -> int:
        """Batches per epoch on this rank, also right after a resume (see the chip sampler's length)."""
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[list[SizedRef]]:
        refs: list[ChipRef] = []
        for ref in self.sampler:
            refs.append(ref)
            if len(refs) == self.batch_size:
                # the chip sampler's position counts whole batches, a resumed offset included
                epoch = self.sampler.epoch
                resolution = self.resolution(epoch, self.sampler.yielded // self.batch_size - 1)
                yield [SizedRef(resolution, r, epoch) for r in refs]
                refs = []


def resolutions(
    global_crops_size: int | Sequence[int],
    local_crops_size: int | Sequence[int],
    gram_crops_size: int | Sequence[int] | None = None,
) -> list[Resolution]:
    """The resolutions of crop sizes given as one value or one value per resolution.

    Lists pair up element by element (they must have the same length); a single value serves every
    resolution.

    Raises:
        ValueError: Lists of different lengths, or an empty list.
    """
    sizes = {"global_crops_size": global_crops_size, "local_crops_size": local_crops_size}
    sizes["gram_crops_size"] = gram_crops_size
    lengths = {name: len(v) for name, v in sizes.items() if isinstance(v, Sequence)}
    if len(set(lengths.values())) > 1 or 0 in lengths.values():
        raise ValueError(
            f"crop size lists must have one value per resolution and equal lengths, got lengths {lengths}"
        )
    n = next(iter(lengths.values()), 1)
    per_resolution = {name: list(v) if isinstance(v, Sequence) else [v] * n for name, v in sizes.items()}
    return [Resolution(*values) for values in zip(*per_resolution.values(), strict=True)]


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
        global_crops_size: Side of the global crops, pixels; a list for mixed resolutions (one side per
            resolution, e.g. the official high-resolution stage's ``[512, 768, 768, 768, 768]``).
        local_crops_size: Side of the local crops, pixels; a list (``[112, 112, 168, 224, 336]``) pairs
            with a list of global sizes, one value serves every resolution.
        local_crops_number: Local crops per image.
        global_crops_scale: Area fraction range of the global crops.
        local_crops_scale: Area fraction range of the local crops.
        gram_crops_size: Side of the Gram-teacher crops (Gram stages), None otherwise; a list (``[768,
            1152, 1152, 1152, 1152]``) pairs with the global sizes.
        crop_pairs_ratios: Share of the steps at each resolution (official
            ``crops.global_local_crop_pairs_ratios``, ``[0.3, 0.3, 0.3, 0.05, 0.05]``); None: equal shares.
        flips: ``"dihedral"``, ``"horizontal"`` or ``"none"`` (see the augmentation).
        rgb_bands: Positions of red, green, blue among the corpus bands, None for no colour operations.
        mask_ratio_min_max: iBOT masking ratio range.
        mask_sample_probability: Fraction of global crops that are masked.
        photometric_on: Where the colour operations (jitter, grayscale, blur, solarize) and normalisation of
            the global and local crops run: ``"workers"`` (the DataLoader workers, as the official code) or
            ``"device"`` (the whole batch at once after it reaches the GPU, in
            :meth:`on_after_batch_transfer`; a worker then makes ~2.7x more images per second). The random
            draws are made in the workers either way, so the batches are the same up to float rounding and
            resume stays exact.
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
        global_crops_size: int | list[int] = 256,
        local_crops_size: int | list[int] = 112,
        local_crops_number: int = 8,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        gram_crops_size: int | list[int] | None = None,
        crop_pairs_ratios: list[float] | None = None,
        flips: str = "dihedral",
        rgb_bands: tuple[int, int, int] | None = (0, 1, 2),
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        mask_sample_probability: float = 0.5,
        photometric_on: str = "workers",
    ) -> None:
        super().__init__()
        if photometric_on not in ("workers", "device"):
            raise ValueError(f"photometric_on must be 'workers' or 'device', got {photometric_on!r}")
        self.save_hyperparameters()
        backbone = get_preset(preset)
        #: Per-band normalisation of the [0, 1] chips (the preset's unless given).
        self.mean = tuple(backbone.mean if mean is None else mean)
        self.std = tuple(backbone.std if std is None else std)
        mean, std = self.mean, self.std
        self.resolutions = resolutions(global_crops_size, local_crops_size, gram_crops_size)
        for resolution in self.resolutions:
            if resolution.global_crops_size % backbone.patch_size:
                raise ValueError(
                    f"global_crops_size {resolution.global_crops_size} must be a multiple of the patch size "
                    f"{backbone.patch_size}"
                )
        if crop_pairs_ratios is not None and len(crop_pairs_ratios) != len(self.resolutions):
            raise ValueError(
                f"crop_pairs_ratios has {len(crop_pairs_ratios)} values for {len(self.resolutions)} "
                "resolutions (crop size lists); give one share per resolution"
            )
        self.shares = [1.0] * len(self.resolutions) if crop_pairs_ratios is None else list(crop_pairs_ratios)
        _check_shares(self.shares)
        self.augmentations = [
            MultiCropAugmentation(
                mean,
                std,
                global_crops_size=resolution.global_crops_size,
                local_crops_size=resolution.local_crops_size,
                local_crops_number=local_crops_number,
                global_crops_scale=global_crops_scale,
                local_crops_scale=local_crops_scale,
                gram_crops_size=resolution.gram_crops_size,
                flips=flips,
                rgb_bands=rgb_bands,
                defer_photometric=photometric_on == "device",
            )
            for resolution in self.resolutions
        ]
        self.num_bands = self.augmentations[0].num_bands
        self.collate = MultiCropCollate(backbone.patch_size, mask_ratio_min_max, mask_sample_probability)
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
            if bands != self.num_bands:
                raise ValueError(
                    f"{self.hparams.corpus} reads {bands} bands but the normalisation has "
                    f"{self.num_bands} values; select bands with `geodino index --bands` or "
                    "give mean/std with one value per band"
                )
            self._check_scaled()
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
            self._check_a_batch_per_rank()
            if self._sampler_state is not None:
                self._restore_sampler()

    def _check_a_batch_per_rank(self) -> None:
        """Refuses an epoch that gives a rank fewer chips than a batch: Lightning would end the run at
        once, successfully, with nothing trained, checkpointed or exported."""
        sampler, batch_size = self.sampler, self.hparams.batch_size
        if sampler.per_rank >= batch_size:
            return
        if self.hparams.chips is None:
            epoch = f"chips_per_epoch={sampler.num_samples}"
        else:
            epoch = f"the chip set {self.hparams.chips} ({sampler.num_samples} chips)"
        raise ValueError(
            f"{epoch} gives each of the {sampler.world_size} processes {sampler.per_rank} chips an epoch, "
            f"fewer than batch_size={batch_size}: no batch to train on; give at least batch_size x "
            f"processes = {batch_size * sampler.world_size} chips an epoch, or a smaller batch_size"
        )

    def _check_scaled(self) -> None:
        """Refuses a corpus indexed without scaling whose rasters hold integers: the augmentation takes
        [0, 1] pixels and would clip every count above 1 (a float corpus without scaling is taken as
        reflectance in [0, 1])."""
        if self.corpus.scaling is not None:
            return
        integer = sorted({d for d in self.corpus.index["dtype"] if np.issubdtype(np.dtype(d), np.integer)})
        if integer:
            raise ValueError(
                f"{self.hparams.corpus} was indexed without scaling, but its rasters hold "
                f"{', '.join(integer)} pixels, which the augmentation would clip to 1 (it takes [0, 1]); "
                "index them with scaling (`geodino index` scales to the 2-98 % percentiles by default)"
            )

    def _chip_set(self, path: str) -> list[ChipRef]:
        """The chips of a chip table or chip store of the corpus (opening the store into :attr:`store`)."""
        made_by = "`geodino sample`, `geodino curate` (a table) or `geodino chips` (a store)"
        if os.path.isdir(path):
            self.store = ChipStore(path)
            table = self.store.chips
            if self.store.bands != self.num_bands:
                raise ValueError(
                    f"{path}: the chip store holds {self.store.bands} bands but the normalisation has "
                    f"{self.num_bands} values"
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
        """Batches of ``batch_size`` images (:meth:`batch_sampler`); the last incomplete batch of an epoch is
        dropped."""
        dataset = MultiCropDataset(
            self.corpus,
            self.augmentations,
            seed=self.hparams.seed,
            store=self.store,
            store_refs=self.chip_set if self.store is not None else None,
        )
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_sampler=self.batch_sampler(),
            num_workers=workers,
            collate_fn=self.collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Applies deferred colour operations (``photometric_on="device"``) where the batch now is.

        ``collated_global_crops`` and ``collated_local_crops`` come in [0, 1] with their draws
        (``photometric``, left on the host by the transfer) and leave normalised; other batches pass through.
        """
        draws = batch.pop("photometric", None)
        if draws is not None:
            photometric = self.augmentations[0].photometric
            for key, crop_draws in draws.items():
                batch[f"collated_{key}"] = photometric(batch[f"collated_{key}"], crop_draws)
        return batch

    def batch_sampler(self) -> ResolutionBatchSampler:
        """The batches of the chip sampler (after :meth:`setup`), each with its resolution."""
        return ResolutionBatchSampler(self.sampler, self.hparams.batch_size, self.shares, self.hparams.seed)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position: chips consumed by the batches processed so far this epoch (per rank).

        ``processed`` rather than ``completed``: Lightning saves a mid-epoch checkpoint after the step but
        before it marks the batch completed, and resumes after the processed batch.
        """
        if self.sampler is None or self.trainer is None:
            return {}
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {
            "sampler": self.sampler.state_dict(consumed=batches * self.hparams.batch_size),
            "batches": self._batch_config(),
        }

    def _batch_config(self) -> dict[str, Any]:
        """What a resumed run must keep for its batches and their resolutions to be the saved run's."""
        return {
            "batch_size": self.hparams.batch_size,
            "resolutions": [list(r) for r in self.resolutions],
            "shares": self.shares,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the sampler's position (applied when the sampler is built in :meth:`setup`).

        Raises:
            ValueError: The checkpoint's batch size, crop resolutions or their shares differ from this data
                module's (the resumed batches would not continue the saved run's).
        """
        saved, current = state_dict.get("batches"), self._batch_config()
        if saved is not None and saved != current:
            diff = ", ".join(
                f"{k}: saved {saved.get(k)}, now {v}" for k, v in current.items() if saved.get(k) != v
            )
            raise ValueError(
                f"cannot resume with different batches ({diff}); keep the saved run's data settings"
            )
        self._sampler_state = state_dict.get("sampler")
        if self.sampler is not None and self._sampler_state is not None:
            self._restore_sampler()

    def _restore_sampler(self) -> None:
        """Loads the saved sampler position; a position with no whole batch left in its epoch (a checkpoint
        at an epoch's last step) becomes the start of the next epoch.

        Lightning goes on with the next epoch there, but with DataLoader workers it creates the epoch's
        iterator before it sets the sampler's epoch: left at the saved epoch, that iterator is empty, and
        the next epoch would be skipped.
        """
        try:
            self.sampler.load_state_dict(self._sampler_state)
        except ValueError as err:
            raise ValueError(
                f"{err}; resume with the saved run's processes (num_nodes x devices) and chips, or go on "
                "from its checkpoint as a new stage with --model.continue_from (fresh chips)"
            ) from None
        if self.sampler.per_rank - self.sampler.yielded < self.hparams.batch_size:
            self.sampler.set_epoch(self.sampler.epoch + 1)
