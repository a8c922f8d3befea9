"""Chip samplers for training: random chips over a corpus's valid area, or a fixed chip list in new orders.

Each epoch, :class:`RandomChipSampler` draws ``num_samples`` distinct ``size`` x ``size`` pixel windows
(:class:`~geodino.data.tiling.ChipRef`) whose centres are uniform over the *valid* pixels of the whole
corpus: a raster is picked with probability proportional to its valid pixels, then a valid coarse cell of
its :class:`~geodino.data.validity.ValidMap` uniformly, then a uniform position inside that cell. The
window around that centre is clamped inside the raster (a raster smaller than ``size`` gets the window at
0, which extends past the edge: reads are padded). Windows whose estimated nodata fraction exceeds
``max_nodata`` are rejected, and repeated windows are dropped.

:class:`ChipListSampler` yields a fixed list of chips (a chip table written by ``geodino sample`` or
``geodino curate``, or a chip store's table), every epoch in a new order.

For both, the epoch's global sequence is a pure function of ``(seed, epoch)`` and the configuration, never
of a global RNG: every DDP rank computes the same sequence and takes the shard ``rank, rank + world_size,
...``. (torchgeo's ``RandomGeoSampler`` draws from torch's global RNG, so unless each rank is seeded
differently all ranks train on the same chips.) With a map-style dataset indexed by :class:`ChipRef`, the
DataLoader hands each index to exactly one worker, so workers are disjoint too.

Lightning: build the trainer with ``Trainer(use_distributed_sampler=False)``, because by default Lightning
wraps any non-``DistributedSampler`` in a ``DistributedSamplerWrapper`` and would shard the shards again
(``_DataConnector._requires_distributed_sampler`` in ``lightning/pytorch/trainer/connectors/
data_connector.py``, lightning 2.6.6). Lightning calls ``set_epoch`` on the sampler at every epoch start
(``FitLoop.on_advance_start`` in ``lightning/pytorch/loops/fit_loop.py`` ->
``lightning.fabric.utilities.data._set_sampler_epoch``, which calls ``dataloader.sampler.set_epoch``,
and ``batch_sampler.sampler.set_epoch``, where they exist). For mid-epoch
resumption, save ``sampler.state_dict(consumed=batches_done * batch_size)`` in the checkpoint.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch.distributed as dist
from rasterio.windows import Window
from torch.utils.data import Sampler

from geodino.data.tiling import ChipRef
from geodino.data.validity import ValidMap

__all__ = ["ChipListSampler", "RandomChipSampler"]

#: Slack on the valid-fraction test, so that float rounding never rejects a window exactly at the limit.
_EPS = 1e-9
#: Candidate windows drawn per epoch at most, per requested chip (plus a constant), before giving up.
_DRAWS_PER_CHIP = 64
_MAX_BATCH = 1 << 20


class _EpochSampler(Sampler[ChipRef]):
    """Sharding over DDP ranks, epochs and mid-epoch resume of a global chip sequence per epoch.

    Subclasses give the sequence (:meth:`_epoch_rows`) and the configuration a saved state must match
    (:attr:`_config_keys`). Every rank yields ``num_samples // world_size`` chips per epoch, the shard
    ``rank, rank + world_size, ...`` (DDP needs equal lengths: the last ``num_samples % world_size`` chips
    of the sequence are dropped).
    """

    _config_keys: tuple[str, ...] = ("num_samples", "world_size")

    def __init__(self, num_samples: int, seed: int, rank: int | None, world_size: int | None) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if world_size is None:
            world_size = dist.get_world_size() if distributed else 1
        self.rank, self.world_size = int(rank), int(world_size)
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {seed}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, got {self.rank}, {self.world_size}"
            )
        if num_samples < self.world_size:
            raise ValueError(
                f"num_samples={num_samples} gives no chip to some of the {self.world_size} ranks; "
                f"use num_samples >= world_size"
            )
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.epoch = 0
        self._resume = 0  # chips of the current epoch to skip at the next __iter__ (load_state_dict)
        self._yielded = 0  # chips of the current epoch handed out on this rank (resume offset included)

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        """The epoch's global sequence as ``int64 [num_samples, 5]`` rows ``(raster, col_off, row_off,
        width, height)``."""
        raise NotImplementedError

    def epoch_refs(self, epoch: int) -> list[ChipRef]:
        """The global sequence of ``num_samples`` chips of ``epoch``, before sharding over ranks."""
        return [_ref(row) for row in self._epoch_rows(epoch)]

    @property
    def per_rank(self) -> int:
        """Chips per epoch on each rank: ``num_samples // world_size``."""
        return self.num_samples // self.world_size

    def __len__(self) -> int:
        """Chips in this rank's epoch: :attr:`per_rank`, also right after a resume.

        A resumed iteration yields only the ``per_rank - consumed`` chips that remain, but the length stays
        the epoch's: Lightning restores its batch counter and counts it against the loader's length, so a
        shorter length would end the resumed epoch early.
        """
        return self.per_rank

    @property
    def yielded(self) -> int:
        """Chips of the current epoch handed out on this rank so far, a resumed position included."""
        return self._yielded

    def __iter__(self) -> Iterator[ChipRef]:
        used = self.per_rank * self.world_size  # the global sequence less num_samples % world_size
        rows = self._epoch_rows(self.epoch)[self.rank : used : self.world_size]
        start, self._resume = self._resume, 0
        self._yielded = start
        for row in rows[start:]:
            self._yielded += 1
            yield _ref(row)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (a new sequence); a resumed position is kept only for the same epoch."""
        if epoch != self.epoch:
            self.epoch, self._resume, self._yielded = int(epoch), 0, 0

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The sampler's position, for resuming mid-epoch.

        Args:
            consumed: Chips of the current epoch actually used on this rank (e.g. batches done x batch
                size). Defaults to the chips yielded so far, which runs ahead of training when a
                DataLoader prefetches, so pass it explicitly when checkpointing during training. In DDP
                every rank consumes the same number, so one rank's state can be loaded on all ranks.

        Returns:
            ``seed``, ``epoch``, ``consumed`` and the configuration that a loading sampler must match.
        """
        consumed = self._yielded if consumed is None else int(consumed)
        if not 0 <= consumed <= self.per_rank:
            raise ValueError(f"consumed must be in [0, {self.per_rank}] chips per rank, got {consumed}")
        config = {k: getattr(self, k) for k in self._config_keys}
        return {"seed": self.seed, "epoch": self.epoch, "consumed": consumed, **config}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore seed, epoch and position: the next iteration starts after ``state["consumed"]`` chips.

        Raises:
            ValueError: If the state's configuration differs from this sampler's (its chips would differ).
        """
        unchecked = [k for k in self._config_keys if k not in state]
        if unchecked:
            warnings.warn(
                f"the saved {type(self).__name__} state has no {', '.join(unchecked)} (saved by an older "
                "geodino): resuming without checking it",
                stacklevel=2,
            )
        keys = [k for k in self._config_keys if k in state]
        diff = {k: (state[k], getattr(self, k)) for k in keys if state[k] != getattr(self, k)}
        if diff:
            detail = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume {type(self).__name__} with a different configuration ({detail})")
        if not 0 <= state["consumed"] <= self.per_rank:
            raise ValueError(f"consumed must be in [0, {self.per_rank}], got {state['consumed']}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._resume = self._yielded = int(state["consumed"])


def _ref(row: np.ndarray) -> ChipRef:
    """The :class:`ChipRef` of a row ``(raster, col_off, row_off, width, height)``."""
    raster, col, row_off, width, height = (int(v) for v in row)
    return ChipRef(raster, Window(col, row_off, width, height))


class RandomChipSampler(_EpochSampler):
    """Sample distinct random chips uniformly over the valid area of a corpus, sharded over DDP ranks.

    Args:
        valid_maps: One coarse valid-pixel map per raster; raster ``i`` is ``ChipRef.raster == i``.
        size: Chip side, pixels of each raster's grid.
        num_samples: Distinct chips per epoch over all ranks (the global sequence).
        max_nodata: Largest accepted nodata fraction of a chip (0-1), estimated on the coarse maps (error
            of about one coarse cell along the nodata edge); pixels outside the raster count as nodata.
        seed: Non-negative seed; the chips of an epoch depend only on ``(seed, epoch)`` and the arguments.
        rank: This process's rank; from ``torch.distributed`` when initialised, else 0.
        world_size: Number of ranks; from ``torch.distributed`` when initialised, else 1.

    Every rank yields ``num_samples // world_size`` chips per epoch (DDP needs equal lengths): the last
    ``num_samples % world_size`` chips of the global sequence are dropped. Resumable mid-epoch with
    ``state_dict(consumed=...)`` / ``load_state_dict``; a state records a fingerprint of the valid maps and
    raster sizes, so a run cannot resume on a different corpus (say one indexed again with another nodata).

    Memory: about 8 bytes per coarse cell of the maps (a summed-area table and the valid cell indices).

    Raises:
        ValueError: On empty ``valid_maps``, ``size < 1``, ``max_nodata`` outside [0, 1], a negative seed,
            ``num_samples < world_size``, a rank outside ``[0, world_size)``, or when no raster has enough
            valid area for one acceptable chip.
    """

    _config_keys = ("num_samples", "world_size", "size", "max_nodata", "num_rasters", "fingerprint")

    def __init__(
        self,
        valid_maps: Sequence[ValidMap],
        *,
        size: int = 512,
        num_samples: int,
        max_nodata: float = 0.5,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if not valid_maps:
            raise ValueError("valid_maps is empty: give one ValidMap per raster (see read_valid_map)")
        if size < 1:
            raise ValueError(f"size must be >= 1 pixel, got {size}")
        if not 0.0 <= max_nodata <= 1.0:  # also refuses NaN
            raise ValueError(f"max_nodata must be a fraction in [0, 1], got {max_nodata}")
        super().__init__(num_samples, seed, rank, world_size)
        self.size = int(size)
        self.max_nodata = float(max_nodata)
        self.num_rasters = len(valid_maps)
        self._index(valid_maps)

    def _index(self, valid_maps: Sequence[ValidMap]) -> None:
        """Flatten the maps into per-raster arrays for vectorised drawing and valid-fraction lookup."""
        maps = [np.asarray(m.valid, dtype=bool) for m in valid_maps]
        self._height = np.array([m.height for m in valid_maps], dtype=np.int64)
        self._width = np.array([m.width for m in valid_maps], dtype=np.int64)
        self._map_h = np.array([v.shape[0] for v in maps], dtype=np.int64)
        self._map_w = np.array([v.shape[1] for v in maps], dtype=np.int64)
        self._cell_h = self._height / self._map_h  # full-resolution pixels per cell
        self._cell_w = self._width / self._map_w
        self._n_valid = np.array([int(v.sum()) for v in maps], dtype=np.int64)
        digest = hashlib.sha256()  # of the maps and raster sizes: a state resumes only on the same corpus
        for v, height, width in zip(maps, self._height, self._width, strict=True):
            digest.update(np.array([height, width, *v.shape], dtype=np.int64).tobytes())
            digest.update(np.packbits(v).tobytes())
        self.fingerprint = digest.hexdigest()[:16]
        self._cells = np.concatenate([np.flatnonzero(v).astype(np.int32) for v in maps])
        self._cell_base = np.concatenate([[0], np.cumsum(self._n_valid)[:-1]])
        # Hand-rolled: ValidMap.window_fraction scores one window per call; a summed-area table of each map
        # gives the same overlap-weighted fraction for a whole batch of windows at once (see _integral).
        sats = [np.pad(v.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32), ((1, 0), (1, 0))) for v in maps]
        self._sat = np.concatenate([s.ravel() for s in sats])
        self._sat_base = np.concatenate([[0], np.cumsum([s.size for s in sats])[:-1]])
        self._key_base = np.concatenate([[0], np.cumsum(self._height * self._width)[:-1]])

        valid_pixels = self._n_valid * self._cell_h * self._cell_w
        # A window holds at most all of a raster's valid pixels: rasters with fewer than the least an
        # acceptable chip needs would always be rejected, so they are never drawn.
        need = (1.0 - self.max_nodata) * self.size**2
        usable = (valid_pixels > 0) & (valid_pixels >= need - _EPS * self.size**2)
        if not usable.any():
            raise ValueError(
                f"no raster can give a {self.size} x {self.size} px chip with at most {self.max_nodata:.0%} "
                f"nodata: that needs {need:.0f} valid pixels, the most valid raster has "
                f"{valid_pixels.max():.0f}; lower size, raise max_nodata or drop all-nodata rasters"
            )
        weights = np.where(usable, valid_pixels, 0.0)
        self._p = weights / weights.sum()

    # ------------------------------------------------------------------------------------ drawing

    def _integral(self, r: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Valid cells (fractional) of raster ``r`` in full-resolution rows ``[0, y)``, cols ``[0, x)``.

        The map is constant on each cell, so this integral is bilinear inside a cell: interpolating the
        summed-area table at the cell corners is exact.
        """
        h, w = self._map_h[r], self._map_w[r]
        yy = np.clip(y / self._cell_h[r], 0, h)
        xx = np.clip(x / self._cell_w[r], 0, w)
        i = np.minimum(np.floor(yy).astype(np.int64), h - 1)
        j = np.minimum(np.floor(xx).astype(np.int64), w - 1)
        fy, fx = yy - i, xx - j
        top = self._sat_base[r] + i * (w + 1) + j
        s00, s01 = self._sat[top], self._sat[top + 1]
        s10, s11 = self._sat[top + w + 1], self._sat[top + w + 2]
        return (1 - fy) * ((1 - fx) * s00 + fx * s01) + fy * ((1 - fx) * s10 + fx * s11)

    def _valid_fraction(self, r: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """Estimated valid fraction of the windows at ``(row, col)``, as ``ValidMap.window_fraction``."""
        r1, c1 = row + self.size, col + self.size
        cells = (
            self._integral(r, r1, c1)
            - self._integral(r, row, c1)
            - self._integral(r, r1, col)
            + self._integral(r, row, col)
        )
        return cells * self._cell_h[r] * self._cell_w[r] / self.size**2

    def _candidates(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw ``n`` windows and keep the accepted ones: ``(raster, row_off, col_off)`` int64 arrays."""
        r = rng.choice(self.num_rasters, size=n, p=self._p)
        cell = self._cells[self._cell_base[r] + rng.integers(0, self._n_valid[r])].astype(np.int64)
        ci, cj = np.divmod(cell, self._map_w[r])
        # Centre pixel uniform inside the cell, then the window around it clamped inside the raster.
        cy = np.minimum(np.floor((ci + rng.random(n)) * self._cell_h[r]), self._height[r] - 1)
        cx = np.minimum(np.floor((cj + rng.random(n)) * self._cell_w[r]), self._width[r] - 1)
        half = self.size // 2
        row = np.clip(cy.astype(np.int64) - half, 0, np.maximum(self._height[r] - self.size, 0))
        col = np.clip(cx.astype(np.int64) - half, 0, np.maximum(self._width[r] - self.size, 0))
        ok = self._valid_fraction(r, row, col) >= 1.0 - self.max_nodata - _EPS
        return r[ok], row[ok], col[ok]

    def _epoch_windows(self, epoch: int) -> np.ndarray:
        """The epoch's global sequence as ``int64 [num_samples, 3]`` rows ``(raster, row_off, col_off)``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
        kept = np.empty((0, 3), dtype=np.int64)
        drawn, budget = 0, _DRAWS_PER_CHIP * self.num_samples + 65536
        while len(kept) < self.num_samples:
            if drawn >= budget:
                raise ValueError(
                    f"found only {len(kept)} distinct {self.size} x {self.size} px chips with at most "
                    f"{self.max_nodata:.0%} nodata in {drawn} draws, need num_samples={self.num_samples}; "
                    f"lower num_samples or size, or raise max_nodata"
                )
            # Size the batch from the yield so far, so that an epoch takes a few batches.
            rate = max(len(kept) / drawn if drawn else 1.0, 0.01)
            n = int(min(max(1.25 * (self.num_samples - len(kept)) / rate, 1024), _MAX_BATCH))
            batch = np.stack(self._candidates(rng, n), axis=1)
            drawn += n
            kept = np.concatenate([kept, batch])
            # Drop repeated windows, keeping the first occurrence (the order stays the draw order).
            r, row, col = kept.T
            keys = self._key_base[r] + row * self._width[r] + col
            kept = kept[np.sort(np.unique(keys, return_index=True)[1])]
        return kept[: self.num_samples]

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        r, row, col = self._epoch_windows(epoch).T
        size = np.full_like(r, self.size)
        return np.stack([r, col, row, size, size], axis=1)

    def __repr__(self) -> str:
        return (
            f"RandomChipSampler({self.num_rasters} rasters, size={self.size}, "
            f"num_samples={self.num_samples}, max_nodata={self.max_nodata}, seed={self.seed}, "
            f"epoch={self.epoch}, rank={self.rank}/{self.world_size})"
        )


class ChipListSampler(_EpochSampler):
    """A fixed list of chips, every epoch in a new seeded order, sharded over DDP ranks.

    For training on a chip table (``geodino sample`` / ``geodino curate`` output, or a chip store's table,
    through :meth:`RasterCorpus.refs <geodino.data.corpus.RasterCorpus.refs>`): each epoch is the whole list
    permuted by ``(seed, epoch)``, each rank takes its shard ``rank, rank + world_size, ...`` and yields
    ``len(refs) // world_size`` chips; resumable mid-epoch like :class:`RandomChipSampler`.

    Args:
        refs: The chips (at least ``world_size``).
        shuffle: Permute the list every epoch; False keeps the list order.
        seed: Non-negative seed of the permutations.
        rank: This process's rank; from ``torch.distributed`` when initialised, else 0.
        world_size: Number of ranks; from ``torch.distributed`` when initialised, else 1.

    A saved state records a fingerprint of the list, so a run cannot resume on a different chip table.
    """

    _config_keys = ("num_samples", "world_size", "shuffle", "fingerprint")

    def __init__(
        self,
        refs: Sequence[ChipRef],
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(len(refs), seed, rank, world_size)
        self.shuffle = bool(shuffle)
        rows = [(r, w.col_off, w.row_off, w.width, w.height) for r, w in refs]
        self._rows = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
        self.fingerprint = hashlib.sha256(self._rows.tobytes()).hexdigest()[:16]

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not self.shuffle:
            return self._rows
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
        return self._rows[rng.permutation(self.num_samples)]

    def __repr__(self) -> str:
        return (
            f"ChipListSampler({self.num_samples} chips, shuffle={self.shuffle}, seed={self.seed}, "
            f"epoch={self.epoch}, rank={self.rank}/{self.world_size})"
        )
