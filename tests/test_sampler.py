"""RandomChipSampler: valid-area uniform chips, nodata rejection, determinism, DDP/worker sharding, resume;
ChipListSampler: a fixed chip list permuted per epoch, sharded and resumable."""

from __future__ import annotations

import pickle
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import shared_path
from rasterio.windows import Window
from torch.utils.data import DataLoader, Dataset, get_worker_info

from geodino.data.sampler import ChipListSampler, RandomChipSampler
from geodino.data.synthetic import make_scene
from geodino.data.tiling import ChipRef, read_chip
from geodino.data.validity import ValidMap, read_valid_map

#: Real rasters and their nodata override (the Landsat 8 band has an undeclared zero fill).
RASTERS = {
    "RGB.byte.tif": None,  # rotated scene with a nodata collar
    "cogeo.tif": None,
    "L7_ETMs.tif": None,  # 349 x 352: smaller than a 512 px chip
    "rgbn.tif": None,
    "LC08_L1TP_224077_20200518_20200518_01_RT_B2_60m.TIF": 0,
    "rgb16.tif": None,  # 438 x 500: smaller than a 512 px chip
}
FULL = 4096  # max_side above every test raster's size: the valid map is the exact full-resolution mask

Source = tuple[Path, float | None]


def key(ref: ChipRef) -> tuple[int, int, int]:
    return ref.raster, int(ref.window.row_off), int(ref.window.col_off)


def valid_maps(sources: list[Source], max_side: int = FULL) -> list[ValidMap]:
    maps = []
    for path, nodata in sources:
        with rasterio.open(path) as src:
            maps.append(read_valid_map(src, nodata=nodata, max_side=max_side))
    return maps


def chi2_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's chi-square (cells with expected > 0); Q(df/2, x/2) via torch."""
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = torch.tensor((keep.sum() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Source:
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    make_scene(path, size=512, seed=0)  # 4-band uint16, nodata 0 collar
    return path, None


@pytest.fixture(scope="module")
def corpus(scene: Source) -> list[Source]:
    folder = shared_path("data", "rasters")
    return [*((folder / name, nodata) for name, nodata in RASTERS.items()), scene]


@pytest.fixture(scope="module")
def scene_map(scene: Source) -> ValidMap:
    return valid_maps([scene], max_side=64)[0]


# ------------------------------------------------------------------------------ where chips fall


def test_windows_lie_inside_rasters_or_at_zero(corpus: list[Source]) -> None:
    maps = valid_maps(corpus, max_side=128)
    refs = list(RandomChipSampler(maps, size=512, num_samples=300, seed=1, rank=0, world_size=1))
    assert len(refs) == len({key(r) for r in refs}) == 300
    for ref in refs:
        m, w = maps[ref.raster], ref.window
        assert (w.width, w.height) == (512, 512)
        assert 0 <= w.row_off <= max(m.height - 512, 0)
        assert 0 <= w.col_off <= max(m.width - 512, 0)
    drawn = {r.raster for r in refs}
    # rgb16 (438 x 500) is smaller than a chip: its one window starts at 0 and is padded on read.
    assert 5 in drawn
    # L7_ETMs holds 349 x 352 valid px < half a 512 px chip: never acceptable at max_nodata=0.5.
    assert 2 not in drawn


@pytest.mark.parametrize(("max_side", "size"), [(FULL, 128), (64, 256)])
def test_read_chips_respect_max_nodata(corpus: list[Source], max_side: int, size: int) -> None:
    maps = valid_maps(corpus, max_side=max_side)
    # Coarse maps misjudge about a one-cell strip along the nodata edge, at most two chip sides long.
    tol = 2 * max(max(m.cell_size) for m in maps) / size if max_side < FULL else 1e-12

    def actual_nodata(max_nodata: float) -> np.ndarray:
        sampler = RandomChipSampler(maps, size=size, num_samples=120, max_nodata=max_nodata, world_size=1)
        refs = sampler.epoch_refs(0)
        return np.array(
            [1 - read_chip(srcs[r.raster], r.window, nodata=corpus[r.raster][1]).valid.mean() for r in refs]
        )

    with ExitStack() as stack:
        srcs = [stack.enter_context(rasterio.open(path)) for path, _ in corpus]
        assert actual_nodata(0.1).max() <= 0.1 + tol
        assert actual_nodata(1.0).max() > 0.1 + tol  # without rejection the same draws do break the limit


def test_rasters_drawn_in_proportion_to_valid_pixels(corpus: list[Source]) -> None:
    maps = valid_maps(corpus)  # exact masks: the valid pixel counts are the truth
    refs = RandomChipSampler(maps, size=16, num_samples=6000, max_nodata=1.0, world_size=1).epoch_refs(0)
    observed = np.bincount([r.raster for r in refs], minlength=len(maps))
    pixels = np.array([m.valid.sum() for m in maps], dtype=float)
    assert chi2_pvalue(observed, pixels / pixels.sum() * len(refs)) > 1e-3
    area = np.array([m.height * m.width for m in maps], dtype=float)  # ignoring nodata is detectably off
    assert chi2_pvalue(observed, area / area.sum() * len(refs)) < 1e-6


def test_centres_uniform_over_valid_area(corpus: list[Source]) -> None:
    path, _ = corpus[0]  # RGB.byte.tif: a third of it is nodata collar
    with rasterio.open(path) as src:
        truth, coarse = read_valid_map(src, max_side=FULL).valid, read_valid_map(src, max_side=128)
    size = 8  # small, so that clamping at the raster edge hardly moves centres
    refs = RandomChipSampler([coarse], size=size, num_samples=8000, max_nodata=1.0, world_size=1).epoch_refs(
        0
    )
    h, w = truth.shape
    rows = np.array([int(r.window.row_off) for r in refs]) + size // 2
    cols = np.array([int(r.window.col_off) for r in refs]) + size // 2
    observed = np.bincount(rows * 4 // h * 4 + cols * 4 // w, minlength=16)  # 4 x 4 blocks
    block = (np.arange(h) * 4 // h)[:, None] * 4 + (np.arange(w) * 4 // w)[None, :]
    valid = np.bincount(block.ravel(), weights=truth.ravel(), minlength=16)
    assert chi2_pvalue(observed, valid / valid.sum() * len(refs)) > 1e-3
    area = np.bincount(block.ravel(), minlength=16).astype(float)
    assert chi2_pvalue(observed, area / area.sum() * len(refs)) < 1e-6


def test_centres_uniform_inside_coarse_cells() -> None:
    # 4 x 4 checkerboard of 128 px cells on a 512 px raster; count centres in 16 x 16 blocks of 32 px.
    cells = np.indices((4, 4)).sum(0) % 2 == 0
    refs = RandomChipSampler(
        [ValidMap(cells, 512, 512)], size=8, num_samples=4000, max_nodata=1.0, world_size=1
    ).epoch_refs(0)
    rows = np.array([int(r.window.row_off) for r in refs]) + 4
    cols = np.array([int(r.window.col_off) for r in refs]) + 4
    observed = np.bincount(rows // 32 * 16 + cols // 32, minlength=256)
    expected = np.kron(cells, np.ones((4, 4))).ravel() / 128 * len(refs)
    assert observed[expected == 0].sum() == 0
    assert chi2_pvalue(observed, expected) > 1e-3


# --------------------------------------------------------------------------------- determinism


def test_sequence_is_a_pure_function_of_seed_and_epoch(scene_map: ValidMap) -> None:
    def make(seed: int = 0, rank: int = 0, world_size: int = 1) -> RandomChipSampler:
        return RandomChipSampler(
            [scene_map], size=64, num_samples=90, seed=seed, rank=rank, world_size=world_size
        )

    np.random.seed(1)
    torch.manual_seed(1)
    first = make().epoch_refs(0)
    np.random.seed(2)  # global RNGs play no part
    torch.manual_seed(2)
    assert make(rank=2, world_size=3).epoch_refs(0) == first  # nor does the rank count
    assert len({key(r) for r in first}) == 90  # distinct windows
    assert make().epoch_refs(1) != first
    assert make(seed=1).epoch_refs(0) != first
    sampler = make()
    sampler.set_epoch(1)
    assert list(sampler) == make().epoch_refs(1)


def test_ranks_take_disjoint_equal_shards_of_the_global_sequence(scene_map: ValidMap) -> None:
    samplers = [
        RandomChipSampler([scene_map], size=64, num_samples=100, rank=r, world_size=3) for r in range(3)
    ]
    shards = [list(s) for s in samplers]
    assert [len(s) for s in samplers] == [len(s) for s in shards] == [33, 33, 33]
    used = samplers[0].epoch_refs(0)[:99]  # the 100th chip is dropped: 100 % 3 == 1
    for r, shard in enumerate(shards):
        assert shard == used[r::3]
    assert sorted(key(r) for shard in shards for r in shard) == sorted(map(key, used))


class _RecordWorker(Dataset):
    """Map-style dataset indexed by ChipRef, recording which DataLoader worker read each chip."""

    def __getitem__(self, ref: ChipRef) -> tuple[tuple[int, int, int], int]:
        info = get_worker_info()
        return key(ref), -1 if info is None else info.id


def test_dataloader_workers_get_disjoint_chips(scene_map: ValidMap) -> None:
    sampler = RandomChipSampler([scene_map], size=64, num_samples=40, rank=1, world_size=2, seed=5)
    loader = DataLoader(_RecordWorker(), sampler=sampler, batch_size=4, num_workers=2, collate_fn=list)
    items = [item for batch in loader for item in batch]
    assert [k for k, _ in items] == [key(r) for r in sampler]  # each chip read once, in order
    assert {worker for _, worker in items} == {0, 1}


# -------------------------------------------------------------------------------------- resume


def test_resume_continues_with_the_remaining_chips(scene_map: ValidMap) -> None:
    def make() -> RandomChipSampler:
        return RandomChipSampler([scene_map], size=64, num_samples=60, seed=7, rank=1, world_size=2)

    sampler = make()
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    pulled = [next(it) for _ in range(10)]  # a prefetching DataLoader pulls ahead of training
    assert pulled == full[:10] and sampler.state_dict()["consumed"] == 10
    state = sampler.state_dict(consumed=7)  # only 7 chips reached the model
    assert state == {
        "seed": 7,
        "epoch": 2,
        "consumed": 7,
        "num_samples": 60,
        "world_size": 2,
        "size": 64,
        "max_nodata": 0.5,
        "num_rasters": 1,
        "fingerprint": make().fingerprint,  # of the valid maps: the same for the same corpus
    }
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # Lightning calls set_epoch again with the restored epoch
    assert len(resumed) == 30  # the epoch's length: Lightning counts restored batches against it
    assert list(resumed) == full[7:]
    assert len(resumed) == 30  # the next pass is a whole epoch again
    resumed.set_epoch(3)
    fresh = make()
    fresh.set_epoch(3)
    assert list(resumed) == list(fresh)


def without_first_valid_cell(valid_map: ValidMap) -> ValidMap:
    valid = valid_map.valid.copy()
    valid.flat[np.flatnonzero(valid)[0]] = False
    return ValidMap(valid, valid_map.height, valid_map.width)


def test_load_state_rejects_another_configuration(scene_map: ValidMap) -> None:
    state = RandomChipSampler([scene_map], size=64, num_samples=60, world_size=2, rank=0).state_dict()
    others = {
        "world_size": {"world_size": 3},
        "size": {"size": 32},
        "num_samples": {"num_samples": 61},
        "num_rasters": {"valid_maps": [scene_map, scene_map]},
        # the raster indexed again with another nodata: one cell of its map becomes invalid
        "fingerprint": {"valid_maps": [without_first_valid_cell(scene_map)]},
    }
    for name, change in others.items():
        kwargs = {"valid_maps": [scene_map], "size": 64, "num_samples": 60, "world_size": 2, "rank": 0}
        with pytest.raises(ValueError, match=f"different configuration.*{name}"):
            RandomChipSampler(**{**kwargs, **change}).load_state_dict(state)
    # a state saved before the fingerprint existed still resumes, saying what it could not check
    older = {k: v for k, v in state.items() if k != "fingerprint"}
    with pytest.warns(UserWarning, match="state has no fingerprint.*older geodino"):
        RandomChipSampler([scene_map], size=64, num_samples=60, world_size=2, rank=0).load_state_dict(older)


# ---------------------------------------------------------------- torch.distributed (2 gloo processes)


def _ddp_worker(rank: int, init_file: str, out_dir: str, maps: list[ValidMap]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        kwargs = {"size": 64, "num_samples": 101, "seed": 3}
        sampler = RandomChipSampler(maps, **kwargs)  # rank and world size from torch.distributed
        sampler.set_epoch(1)
        refs = [key(r) for r in sampler]
        it = iter(sampler)
        for _ in range(8):  # prefetched ahead of the 5 chips trained on
            next(it)
        resumed = RandomChipSampler(maps, **kwargs)
        resumed.load_state_dict(sampler.state_dict(consumed=5))
        rest = [key(r) for r in resumed]
        gathered: list = [None, None]
        dist.all_gather_object(gathered, {"refs": refs, "rest": rest, "global": sampler.epoch_refs(1)})
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_disjoint_and_resumable(tmp_path: Path, scene_map: ValidMap) -> None:
    maps = [scene_map, ValidMap(np.ones((8, 8), dtype=bool), 300, 200)]
    # fork: the ranks inherit the imported modules instead of re-importing torch (seconds each).
    args = (str(tmp_path / "init"), str(tmp_path), maps)
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")
    views = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    assert views[0] == views[1]  # all_gather_object gave both ranks the same picture
    ranks = views[0]
    reference = RandomChipSampler(maps, size=64, num_samples=101, seed=3, world_size=1).epoch_refs(1)
    assert ranks[0]["global"] == ranks[1]["global"] == reference  # one global sequence on every rank
    a, b = ranks[0]["refs"], ranks[1]["refs"]
    assert len(a) == len(b) == 50  # 101 // 2; the last chip is dropped
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(map(key, reference[:100]))
    assert a == [key(r) for r in reference[0:100:2]]  # global positions rank, rank + world_size, ...
    for r in ranks:
        assert r["rest"] == r["refs"][5:]


# ---------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"valid_maps": []}, "valid_maps is empty"),
        ({"size": 0}, "size must be >= 1"),
        ({"max_nodata": -0.1}, r"max_nodata must be a fraction in \[0, 1\]"),
        ({"max_nodata": 1.5}, r"max_nodata must be a fraction in \[0, 1\]"),
        ({"max_nodata": float("nan")}, r"max_nodata must be a fraction in \[0, 1\]"),
        ({"valid_maps": [ValidMap(np.zeros((4, 4), bool), 100, 100)] * 2}, "no raster can give"),
        # One valid 25 x 25 px cell: 625 valid px, but a 64 px chip with <= 50 % nodata needs 2048.
        ({"valid_maps": [ValidMap(np.arange(16).reshape(4, 4) == 6, 100, 100)], "size": 64}, "needs 2048"),
        ({"num_samples": 1, "world_size": 2, "rank": 0}, "no chip to some"),
        ({"rank": 2, "world_size": 2}, "0 <= rank < world_size"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, match: str) -> None:
    base = {"valid_maps": [ValidMap(np.ones((4, 4), bool), 100, 100)], "size": 16, "num_samples": 8}
    with pytest.raises(ValueError, match=match):
        RandomChipSampler(**{**base, **kwargs})


def test_unreachable_chips_raise_instead_of_looping() -> None:
    # A raster smaller than the chip has one window only: 2 distinct chips can never be found.
    small = RandomChipSampler(
        [ValidMap(np.ones((4, 4), bool), 40, 40)], size=64, num_samples=2, max_nodata=0.9
    )
    with pytest.raises(ValueError, match="found only 1 distinct"):
        small.epoch_refs(0)
    # A checkerboard holds enough valid pixels, yet every window is half nodata.
    board = ValidMap(np.indices((64, 64)).sum(0) % 2 == 0, 64, 64)
    with pytest.raises(ValueError, match="found only 0 distinct"):
        list(RandomChipSampler([board], size=8, num_samples=4, max_nodata=0.2))
    with pytest.raises(ValueError, match="consumed must be in"):
        RandomChipSampler([board], size=8, num_samples=4).state_dict(consumed=5)


# ---------------------------------------------------------------- ChipListSampler


def chip_list(n: int) -> list[ChipRef]:
    """``n`` distinct chips of 3 rasters, mixed sizes (as a chip table may hold)."""
    rng = np.random.default_rng(5)
    return [
        ChipRef(int(rng.integers(3)), Window(int(4 * i), int(rng.integers(500)), 64 + i % 2 * 32, 64))
        for i in range(n)
    ]


def test_chip_list_sampler_permutes_the_whole_list_every_epoch() -> None:
    refs = chip_list(50)
    sampler = ChipListSampler(refs, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order, key=str) == sorted(refs, key=str)  # every chip exactly once
        assert order == ChipListSampler(refs, seed=3).epoch_refs(epoch)  # a function of (seed, epoch)
        orders.append(order)
    assert orders[0] != orders[1] != orders[2] != refs
    assert ChipListSampler(refs, seed=4).epoch_refs(0) != orders[0]
    assert list(ChipListSampler(refs, shuffle=False)) == refs


def test_chip_list_sampler_shards_and_resumes() -> None:
    refs, world = chip_list(23), 3
    ranks = [ChipListSampler(refs, seed=1, rank=r, world_size=world) for r in range(world)]
    for s in ranks:
        s.set_epoch(2)
    shards = [list(s) for s in ranks]
    assert [len(s) for s in ranks] == [len(shard) for shard in shards] == [7, 7, 7]  # 23 // 3, 2 dropped
    sequence = ranks[0].epoch_refs(2)
    for r, shard in enumerate(shards):
        assert shard == sequence[r:21:world]
    assert len({str(ref) for shard in shards for ref in shard}) == 21

    state = ranks[1].state_dict(consumed=4)
    resumed = ChipListSampler(refs, seed=1, rank=1, world_size=world)
    resumed.load_state_dict(state)
    assert list(resumed) == shards[1][4:]
    assert len(resumed) == 7
    with pytest.raises(ValueError, match=r"different configuration.*fingerprint"):
        ChipListSampler(
            [*refs[:-1], ChipRef(9, Window(0, 0, 64, 64))], rank=1, world_size=world
        ).load_state_dict(state)
    with pytest.raises(ValueError, match="gives no chip to some of the 3 ranks"):
        ChipListSampler(refs[:2], world_size=3, rank=0)
