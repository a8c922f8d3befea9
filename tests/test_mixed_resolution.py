"""Mixed crop resolutions (the official high-resolution stage): one resolution per batch, drawn with the given
shares, the same on every DDP rank and after a resume; each batch's crops and iBOT masks at its resolution.
Real rasters (``shared/data/rasters``) for the data-module test.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from lightning.fabric.utilities.data import _set_sampler_epoch
from rasterio.windows import Window

from geodino.data import ChipListSampler, ChipRef, RandomChipSampler, RasterCorpus
from geodino.io import write_geoparquet
from geodino.train.data import (
    MultiCropDataset,
    PretrainDataModule,
    Resolution,
    ResolutionBatchSampler,
    SizedRef,
    resolutions,
)

#: The official high-resolution stage: (global, local, Gram) sides and the share of steps of each.
OFFICIAL = ([512, 768, 768, 768, 768], [112, 112, 168, 224, 336], [768, 1152, 1152, 1152, 1152])
OFFICIAL_SHARES = [0.3, 0.3, 0.3, 0.05, 0.05]
REFS = [ChipRef(i % 3, Window(8 * i, 0, 64, 64)) for i in range(4000)]


def batches(sampler: ResolutionBatchSampler) -> list[list[SizedRef]]:
    return list(sampler)


def test_resolutions_pair_size_lists() -> None:
    assert resolutions(*OFFICIAL)[1] == Resolution(768, 112, 1152)
    assert resolutions([256, 512], 112) == [Resolution(256, 112), Resolution(512, 112)]
    assert resolutions(256, 112, 512) == [Resolution(256, 112, 512)]
    with pytest.raises(ValueError, match="equal lengths"):
        resolutions([256, 512], [112, 112, 168])
    with pytest.raises(ValueError, match="equal lengths"):
        resolutions([], 112)


def test_ranks_draw_the_same_resolutions_with_the_given_shares() -> None:
    per_rank = [
        ResolutionBatchSampler(
            ChipListSampler(REFS, seed=5, rank=rank, world_size=2),
            batch_size=2,
            shares=OFFICIAL_SHARES,
            seed=5,
        )
        for rank in (0, 1)
    ]
    rank0, rank1 = (batches(sampler) for sampler in per_rank)
    assert len(rank0) == len(rank1) == len(per_rank[0]) == 1000
    assert [b[0].resolution for b in rank0] == [b[0].resolution for b in rank1]  # same step, same resolution
    assert all(len({item.resolution for item in batch}) == 1 for batch in rank0)  # one resolution a batch
    chips = [item.ref for batch in rank0 + rank1 for item in batch]
    assert sorted(chips) == sorted(REFS)  # the two ranks' batches hold every chip once
    counts = Counter(batch[0].resolution for batch in rank0)
    shares = np.array([counts[i] for i in range(5)]) / len(rank0)
    np.testing.assert_allclose(shares, OFFICIAL_SHARES, atol=0.04)  # 1000 draws: std <= 0.015

    per_rank[0].sampler.set_epoch(1)  # another epoch: another sequence
    assert [b[0].resolution for b in batches(per_rank[0])] != [b[0].resolution for b in rank0]


def test_resumed_sampler_continues_with_the_same_batches_and_resolutions() -> None:
    def sampler() -> ResolutionBatchSampler:
        return ResolutionBatchSampler(
            ChipListSampler(REFS[:200], seed=1), batch_size=4, shares=[1, 1, 2], seed=1
        )

    full = batches(sampler())
    resumed = sampler()
    resumed.sampler.load_state_dict(sampler().sampler.state_dict(consumed=7 * 4))  # 7 batches done
    assert len(resumed) == len(full) == 50
    assert batches(resumed) == full[7:]
    assert len({batch[0].resolution for batch in full}) == 3


def test_bad_shares_are_refused() -> None:
    chips = ChipListSampler(REFS[:8])
    for shares in ([], [0.5, 0.0], [1.0, -1.0]):
        with pytest.raises(ValueError, match="shares must be positive"):
            ResolutionBatchSampler(chips, batch_size=2, shares=shares, seed=0)


SIZES = {"global_crops_size": [32, 48], "local_crops_size": [16, 24], "gram_crops_size": [48, 96]}


@pytest.fixture(scope="module")
def chip_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus of two real rasters and a table of 24 of its 96 px chips, in one folder."""
    folder = tmp_path_factory.mktemp("mixed")
    rasters = shared_path("data", "rasters")
    corpus = RasterCorpus.from_paths(
        [rasters / name for name in ("RGB.byte.tif", "cogeo.tif")], bands=[1, 2, 3], progress=False
    )
    corpus.save(folder / "corpus.parquet")
    table = corpus.chip_table(
        RandomChipSampler(corpus.valid_maps, size=96, num_samples=24, seed=0).epoch_refs(0)
    )
    write_geoparquet(table, folder / "chips.parquet")
    return folder


def datamodule(folder: Path, **kwargs) -> PretrainDataModule:
    """Batches of 3 of the chip set at two resolutions, half of the steps each (``kwargs`` override)."""
    args = {
        "chips": str(folder / "chips.parquet"),
        "preset": "dinov3_vits16.lvd1689m",
        "batch_size": 3,
        "num_workers": 0,
        "local_crops_number": 2,
        "crop_pairs_ratios": [0.5, 0.5],
        **SIZES,
    }
    return PretrainDataModule(str(folder / "corpus.parquet"), **{**args, **kwargs})


def test_data_module_refuses_bad_resolutions(chip_set: Path) -> None:
    with pytest.raises(ValueError, match="crop_pairs_ratios has 3 values for 2 resolutions"):
        datamodule(chip_set, crop_pairs_ratios=[1, 1, 1])
    with pytest.raises(ValueError, match="shares must be positive"):
        datamodule(chip_set, crop_pairs_ratios=[1, 0])
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        datamodule(chip_set, global_crops_size=[32, 40])


def test_data_module_makes_each_batch_at_its_resolution(chip_set: Path) -> None:
    dm = datamodule(chip_set)
    dm.setup("fit")
    loader = dm.train_dataloader()
    expected = [dm.batch_sampler().resolution(0, b) for b in range(len(loader))]
    assert len(loader) == 8 and set(expected) == {0, 1}
    for batch, resolution in zip(loader, expected, strict=True):
        global_size, local_size, gram_size = dm.resolutions[resolution]
        assert batch["collated_global_crops"].shape == (6, 3, global_size, global_size)
        assert batch["collated_local_crops"].shape == (6, 3, local_size, local_size)
        assert batch["collated_gram_crops"].shape == (6, 3, gram_size, gram_size)
        patches = (global_size // 16) ** 2
        assert batch["collated_masks"].shape == (6, patches)
        assert batch["mask_indices_list"].max() < 6 * patches


def test_data_module_resumes_mid_epoch_and_refuses_other_batch_settings(chip_set: Path) -> None:
    dm = datamodule(chip_set)
    dm.setup("fit")
    full = list(dm.train_dataloader())
    state = {"sampler": dm.sampler.state_dict(consumed=3 * 3), "batches": dm._batch_config()}  # 3 batches
    resumed = datamodule(chip_set)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    loader = resumed.train_dataloader()
    rest = list(loader)
    assert len(rest) == len(full) - 3
    for got, want in zip(rest, full[3:], strict=True):
        for key in ("collated_global_crops", "collated_local_crops", "collated_gram_crops", "collated_masks"):
            assert torch.equal(got[key], want[key]), key
    _set_sampler_epoch(loader, 1)  # what Lightning calls at an epoch start reaches the chip sampler
    assert resumed.sampler.epoch == 1
    with pytest.raises(TypeError, match="SizedRef"):
        MultiCropDataset(resumed.corpus, resumed.augmentations)[resumed.sampler.epoch_refs(0)[0]]

    for change, saved_now in (
        ({"batch_size": 4}, "batch_size: saved 3, now 4"),
        ({"crop_pairs_ratios": [0.2, 0.8]}, r"shares: saved \[0.5, 0.5\], now \[0.2, 0.8\]"),
        ({"global_crops_size": [32, 64]}, "resolutions: saved"),
    ):
        with pytest.raises(ValueError, match=f"cannot resume with different batches .*{saved_now}"):
            datamodule(chip_set, **change).load_state_dict(state)
