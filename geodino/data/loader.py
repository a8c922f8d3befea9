"""Chips to model batches, fast: collation, a threaded window reader and a block-aware batch sampler.

A model wants ``float32`` batches ``[B, C, H, W]``; a chip source gives one :class:`~geodino.data.tiling.Chip`
at a time, in the source dtype. Which tool to use depends on the source:

- Windows of plain raster files (a :class:`~geodino.data.tiling.RasterTiler`'s grid, or any list of
  :class:`~geodino.data.tiling.ChipRef`, e.g. random windows from a sampler): :class:`ChipLoader`, a few
  reading threads in the calling process. Each thread holds its own rasterio handles (they are not
  thread-safe) and GDAL decodes without the Python GIL, so the threads decode blocks on several cores at
  once, with no worker processes to start and no batches to pickle between processes. Each thread reads a
  chip into a reused scratch array and converts it to ``float32`` in the one copy into its slot of the batch;
  batch arrays are reused once the consumer has released them. No ``torch`` op runs on the CPU path (with
  ``num_workers=0``, torch's OpenMP threads spin on small CPU ops).
- Any other map-style chip source (e.g. one that warps): ``torch.utils.data.DataLoader`` with
  :func:`collate_chips` as ``collate_fn`` and, with worker processes, :class:`WorkerBatchSampler`.

Why block affinity: a tiled GeoTIFF is decoded a whole block (e.g. 512 x 512 pixels, DEFLATE) at a time,
and each rasterio handle caches the blocks *it* decoded. When two threads or worker processes read
neighbouring chips, both decode the blocks those chips share, doubling the work. So each thread (or
worker) is given one vertical band of every raster: the chips of a raster are split by the column of
their centre into bands holding equal numbers of chips (:func:`column_bands`); only the blocks on a band
border are decoded twice. :class:`ChipLoader` still delivers batches in chip order.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError
from rasterio.windows import Window
from torch.utils.data import Sampler

from geodino.data.tiling import (
    Chip,
    ChipRef,
    RasterFileError,
    RasterTiler,
    _default_fill,
    _open,
    _read_error,
    _valid_mask,
)

__all__ = ["ChipBatch", "ChipLoader", "WorkerBatchSampler", "collate_chips", "column_bands"]

#: Rasters a reading thread keeps open at once (least recently used closed first), so that a corpus of
#: thousands of files does not exhaust file descriptors.
MAX_OPEN_PER_THREAD = 16


# ------------------------------------------------------------------------------------------- batch


@dataclass
class ChipBatch:
    """A batch of chips for a model.

    Attributes:
        image: ``float32 [B, C, H, W]`` pixels in source units (no scaling); pixels outside the raster hold
            the fill value.
        valid: ``bool [B, H, W]``; False at nodata / masked pixels and outside the raster.
        windows: The window of each chip, in its raster's source pixels.
        transforms: Affine transform of each chip (chip pixel ``(col, row)`` -> world ``(x, y)``).
        crs: CRS of each chip's raster.
        paths: Source file of each chip.
        owned: Owned part of each window for stitching (see :func:`~geodino.data.tiling.mosaic_owned`),
            or None entries when unknown.
    """

    image: torch.Tensor
    valid: torch.Tensor
    windows: list[Window]
    transforms: list[Affine]
    crs: list[CRS | None]
    paths: list[Path | None]
    owned: list[Window | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def pin_memory(self) -> ChipBatch:
        """Copy of the batch with the tensors in page-locked memory (``DataLoader(pin_memory=True)`` calls
        this), so that ``.to("cuda", non_blocking=True)`` overlaps the copy with compute."""
        return replace(self, image=self.image.pin_memory(), valid=self.valid.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = True) -> ChipBatch:
        """Copy of the batch with the tensors on ``device`` (metadata lists are shared)."""
        return replace(
            self,
            image=self.image.to(device, non_blocking=non_blocking),
            valid=self.valid.to(device, non_blocking=non_blocking),
        )


def collate_chips(chips: Sequence[Chip]) -> ChipBatch:
    """Stack chips into a :class:`ChipBatch`: one copy of each chip into a preallocated ``float32`` array.

    Use as ``DataLoader(source, batch_size=..., collate_fn=collate_chips)``.

    Args:
        chips: Chips of equal band count and size, ``image [C, H, W]`` in any real dtype.

    Returns:
        The batch; ``image`` is ``float32 [B, C, H, W]``, ``valid`` ``bool [B, H, W]``.

    Raises:
        ValueError: No chips, or chips of different shapes (the message names the first odd one).
    """
    if not chips:
        raise ValueError("collate_chips needs at least one chip")
    shape = chips[0].image.shape
    for i, chip in enumerate(chips):
        if chip.image.shape != shape or chip.valid.shape != shape[1:]:
            raise ValueError(
                f"chip {i} ({chip.path}, {chip.window}) has image {chip.image.shape} / valid "
                f"{chip.valid.shape}, chip 0 has {shape} / {shape[1:]}: all chips of a batch need one size"
            )
    image = np.empty((len(chips), *shape), dtype=np.float32)
    valid = np.empty((len(chips), *shape[1:]), dtype=bool)
    for i, chip in enumerate(chips):
        image[i] = chip.image  # the uint16 -> float32 conversion happens in this one copy
        valid[i] = chip.valid
    return ChipBatch(
        image=torch.from_numpy(image),
        valid=torch.from_numpy(valid),
        windows=[c.window for c in chips],
        transforms=[c.transform for c in chips],
        crs=[c.crs for c in chips],
        paths=[c.path for c in chips],
        owned=[c.owned for c in chips],
    )


# ------------------------------------------------------------------------------------- block bands


def column_bands(refs: Sequence[ChipRef], parts: int) -> list[int]:
    """Split the chips of each raster into ``parts`` vertical bands of (nearly) equal chip counts.

    Chips are ranked by the column of their window centre (ties keep their order in ``refs``), so each
    band is a contiguous range of columns and two bands share at most the blocks along their border.

    Args:
        refs: Chip windows, each in the source pixels of raster ``ref.raster``.
        parts: Number of bands (threads or workers), >= 1.

    Returns:
        The band (``0 .. parts - 1``) of each chip, in ``refs`` order.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    band = np.zeros(len(refs), dtype=np.int64)
    rasters = np.array([r.raster for r in refs], dtype=np.int64)
    centres = np.array([float(r.window.col_off) + float(r.window.width) / 2 for r in refs])
    for raster in np.unique(rasters):
        members = np.flatnonzero(rasters == raster)
        order = members[np.argsort(centres[members], kind="stable")]
        band[order] = np.arange(len(order)) * parts // len(order)
    return band.tolist()


def _as_refs(windows: Sequence[Window | ChipRef]) -> list[ChipRef]:
    return [w if isinstance(w, ChipRef) else ChipRef(0, w) for w in windows]


class WorkerBatchSampler(Sampler[list[int]]):
    """Batches for a ``DataLoader`` with worker processes, each worker reading its own band of the raster.

    A ``DataLoader`` hands batch ``k`` to worker ``k % num_workers``. This sampler orders the batches so
    that worker ``w`` gets consecutive runs of chips from band ``w`` of :func:`column_bands`, so no two
    workers decode the same GeoTIFF blocks (the default sampler sends consecutive batches of one block row
    to alternating workers, and both decode it). Batches therefore come out interleaved between bands;
    each carries its windows, so stitching is unaffected.

    Use as ``DataLoader(tiler, batch_sampler=WorkerBatchSampler(tiler.windows, 8, num_workers=2),
    num_workers=2, collate_fn=collate_chips)``.

    Args:
        windows: The chip windows of the source, in its index order: windows of one raster (a
            :class:`~geodino.data.tiling.RasterTiler`'s ``windows``) or :class:`ChipRef` s.
        batch_size: Chips per batch; each band's last batch may be smaller.
        num_workers: The ``DataLoader``'s ``num_workers`` (0 gives plain consecutive batches).
    """

    def __init__(self, windows: Sequence[Window | ChipRef], batch_size: int, *, num_workers: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        bands = column_bands(_as_refs(windows), max(num_workers, 1))
        runs: list[list[int]] = [[] for _ in range(max(num_workers, 1))]
        for i, b in enumerate(bands):
            runs[b].append(i)
        per_worker = [[run[j : j + batch_size] for j in range(0, len(run), batch_size)] for run in runs]
        # Round-robin interleave: position k * W + w goes to worker w. Once a shorter band runs out, the
        # remaining batches of the longer ones go to whichever worker is next (bands of a raster differ by
        # at most one chip, so this is a tail of at most a batch per raster).
        self._batches = [
            batches[k]
            for k in range(max(len(b) for b in per_worker))
            for batches in per_worker
            if k < len(batches)
        ]

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self._batches)


# ------------------------------------------------------------------------------------ threaded reads

#: Batch arrays of one iteration, each with a weak reference to the view last handed out.
_Pool = list[tuple[np.ndarray, "weakref.ref[np.ndarray]"]]


class _Raster(NamedTuple):
    """A reading thread's open raster and what every chip of it needs."""

    src: rasterio.DatasetReader
    bands: list[int]
    fill: float
    transform: Affine
    crs: CRS
    scratch: np.ndarray  # [C, H, W] in the source dtype: where GDAL writes each chip


@dataclass
class _PendingBatch:
    """A batch being filled by the reading threads; ``ready`` is set once every chip is read (or failed)."""

    indices: range
    image: np.ndarray
    valid: np.ndarray
    transforms: list[Affine | None]
    crs: list[CRS | None]
    paths: list[Path | None]
    remaining: int
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    ready: threading.Event = field(default_factory=threading.Event)

    def chip_done(self, error: BaseException | None = None) -> None:
        """Count one chip as read (or failed with ``error``); the last one wakes the consumer."""
        with self.lock:
            self.error = self.error or error
            self.remaining -= 1
            if self.remaining == 0:
                self.ready.set()


def _read_into(
    raster: _Raster, window: Window, nodata: float | None, image: np.ndarray, valid: np.ndarray
) -> None:
    """Read ``window`` (may extend past the raster) into ``image [C, H, W]`` and ``valid [H, W]``.

    :func:`~geodino.data.tiling.read_chip` written in place: same pixels and mask, but GDAL writes into the
    thread's reused ``scratch`` chip (no new array per chip, no padded intermediate) and the conversion to
    ``image``'s dtype happens in the one copy out of it. Masking the source dtype is cheaper than letting
    GDAL write ``float32`` and masking that (2.6 vs 3.5 ms per 512 px uint16 chip, warm block cache).
    """
    src = raster.src
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height), c0 + int(window.width)
    ir0, ic0, ir1, ic1 = max(r0, 0), max(c0, 0), min(r1, src.height), min(c1, src.width)
    if (ir0, ic0, ir1, ic1) != (r0, c0, r1, c1):
        image.fill(raster.fill)
        valid.fill(False)
    if ir1 <= ir0 or ic1 <= ic0:
        return
    inner = Window(ic0, ir0, ic1 - ic0, ir1 - ir0)
    sl = (slice(ir0 - r0, ir1 - r0), slice(ic0 - c0, ic1 - c0))
    data = src.read(raster.bands, window=inner, out=raster.scratch[:, : ir1 - ir0, : ic1 - ic0])
    valid[sl] = _valid_mask(src, data, raster.bands, window=inner, nodata=nodata)
    image[(slice(None), *sl)] = data


class ChipLoader:
    """Batches of chips read from raster files by a few threads, in chip order.

    Each thread opens its own handle of every raster it reads (at most :data:`MAX_OPEN_PER_THREAD` at a
    time) and reads the chips of one column band of each raster (:func:`column_bands`), each into a reused
    scratch chip and from there, converted, into its slot of the batch array. Up to ``prefetch`` batches are
    in flight; a batch array is reused only after every tensor and view of its batch is gone, so batches may
    be kept. Iterate it once per epoch; each iteration starts and joins its own threads, and a reading error
    is raised from the iteration.

    Measured on 2 cores (``benchmarks/RESULTS.md``, 8192 px uint16 DEFLATE raster): 2 threads deliver
    1.7-1.8x the chips/s of 1 thread at the same CPU per chip, 1.55-1.6x a plain rasterio loop.

    Args:
        rasters: Raster files (GeoTIFFs or anything GDAL reads without warping); ``ChipRef.raster``
            indexes this list.
        refs: The chips, in delivery order; all windows of one size (pixels), may extend past the raster.
        batch_size: Chips per batch (the last batch may be smaller).
        bands: 1-based band indexes to read from every raster; all bands by default (then all rasters
            need the band count of the first chip's raster).
        fill: Value of pixels outside a raster; defaults to the nodata value (if the dtype can hold it),
            else 0.
        nodata: Value marking invalid pixels, overriding each file's nodata and masks where its dtype can hold
            it (not -9999 in uint16).
        owned: Owned window of each chip, carried into :attr:`ChipBatch.owned`.
        aoi_mask: For chips of one raster clipped to an area of interest: ``bool [h, w]`` True inside the
            AOI for a window (e.g. :meth:`~geodino.data.tiling.RasterTiler.aoi_mask`), ANDed into
            :attr:`ChipBatch.valid`.
        threads: Reading threads (>= 1); one per core is the sweet spot.
        prefetch: Batches in flight (>= 1); memory is about ``(prefetch + 2) x batch_size x C x H x W x 4``
            bytes.

    Raises:
        ValueError: No chips, windows of different sizes, a ``ChipRef`` outside ``rasters``, or
            non-positive ``batch_size`` / ``threads`` / ``prefetch``.
        FileNotFoundError / RasterFileError: The first chip's raster is missing or unreadable (other
            rasters are checked when first read, from the iteration).
    """

    def __init__(
        self,
        rasters: Sequence[str | os.PathLike[str]],
        refs: Sequence[ChipRef],
        batch_size: int,
        *,
        bands: Sequence[int] | None = None,
        fill: float | None = None,
        nodata: float | None = None,
        owned: Sequence[Window] | None = None,
        aoi_mask: Callable[[Window], np.ndarray | None] | None = None,
        threads: int = 2,
        prefetch: int = 4,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("threads", threads), ("prefetch", prefetch)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not refs:
            raise ValueError("ChipLoader needs at least one chip")
        self.rasters = [Path(p) for p in rasters]
        self.refs = list(refs)
        bad = [r for r in self.refs if not 0 <= r.raster < len(self.rasters)]
        if bad:
            raise ValueError(f"chip {bad[0]} refers to raster {bad[0].raster}; there are {len(self.rasters)}")
        sizes = {(int(r.window.height), int(r.window.width)) for r in self.refs}
        if len(sizes) != 1:
            raise ValueError(f"all chip windows need one size to form batches, got sizes {sorted(sizes)}")
        (self.height, self.width) = sizes.pop()
        if owned is not None and len(owned) != len(self.refs):
            raise ValueError(f"got {len(owned)} owned windows for {len(self.refs)} chips")
        self.owned = list(owned) if owned is not None else None
        self.aoi_mask = aoi_mask
        self.batch_size, self.threads, self.prefetch = batch_size, threads, prefetch
        self.bands = None if bands is None else [int(b) for b in bands]
        self.fill, self.nodata = fill, nodata
        with _open(self.rasters[self.refs[0].raster]) as src:
            self.count = src.count if self.bands is None else len(self.bands)
        self._band = column_bands(self.refs, threads)

    @classmethod
    def from_tiler(
        cls, tiler: RasterTiler, batch_size: int, *, threads: int = 2, prefetch: int = 4
    ) -> ChipLoader:
        """The loader for a tiler's grid: same windows, bands, fill, nodata, AOI and owned windows."""
        return cls(
            [tiler.path],
            [ChipRef(0, w) for w in tiler.windows],
            batch_size,
            bands=tiler.bands,
            fill=tiler.fill,
            nodata=tiler.nodata_override,
            aoi_mask=tiler.aoi_mask if tiler.aoi is not None else None,
            owned=tiler.owned,
            threads=threads,
            prefetch=prefetch,
        )

    def __len__(self) -> int:
        """Number of batches."""
        return -(-len(self.refs) // self.batch_size)

    def __iter__(self) -> Iterator[ChipBatch]:
        tasks: list[queue.SimpleQueue[tuple[_PendingBatch, int] | None]] = [
            queue.SimpleQueue() for _ in range(self.threads)
        ]
        stop = threading.Event()
        workers = [
            threading.Thread(
                target=self._read_loop, args=(q, stop), name=f"geodino-chip-reader-{i}", daemon=True
            )
            for i, q in enumerate(tasks)
        ]
        for w in workers:
            w.start()
        pending: deque[_PendingBatch] = deque()
        pool: _Pool = []
        try:
            for start in range(0, len(self.refs), self.batch_size):
                pending.append(self._submit(start, tasks, pool))
                if len(pending) < self.prefetch:
                    continue
                yield self._finish(pending.popleft())
            while pending:
                yield self._finish(pending.popleft())
        finally:
            stop.set()
            for q in tasks:
                q.put(None)
            for w in workers:
                w.join()

    def _image_array(self, pool: _Pool, n: int) -> np.ndarray:
        """A ``float32 [n, C, H, W]`` batch array, reusing a pooled one that is no longer in use.

        Hand-rolled because a new array of a 512 px batch (33.5 MB) is mapped fresh from the OS, which
        zeroes every page on first touch: measured 12.7 vs 11.9 ms CPU per 512 px chip (+7 %). Each batch
        gets a new view of a pooled array; the tensor handed out keeps that view alive (``torch.from_numpy``
        holds it), so the array is reused only once every tensor and view of the batch is gone.
        """
        shape = (n, self.count, self.height, self.width)
        for i, (array, lent) in enumerate(pool):
            if lent() is None and array.shape == shape:
                view = array.view()
                pool[i] = (array, weakref.ref(view))
                return view
        array = np.empty(shape, dtype=np.float32)
        view = array.view()
        if len(pool) < self.prefetch + 2:
            pool.append((array, weakref.ref(view)))
        return view

    def _submit(
        self,
        start: int,
        tasks: list[queue.SimpleQueue],
        pool: _Pool,
    ) -> _PendingBatch:
        indices = range(start, min(start + self.batch_size, len(self.refs)))
        n = len(indices)
        batch = _PendingBatch(
            indices=indices,
            image=self._image_array(pool, n),
            valid=np.empty((n, self.height, self.width), dtype=bool),
            transforms=[None] * n,
            crs=[None] * n,
            paths=[None] * n,
            remaining=n,
        )
        for slot, i in enumerate(indices):
            tasks[self._band[i]].put((batch, slot))
        return batch

    def _finish(self, batch: _PendingBatch) -> ChipBatch:
        batch.ready.wait()
        if batch.error is not None:
            raise batch.error
        return ChipBatch(
            image=torch.from_numpy(batch.image),
            valid=torch.from_numpy(batch.valid),
            windows=[self.refs[i].window for i in batch.indices],
            transforms=batch.transforms,  # type: ignore[arg-type]  # all filled: no error was reported
            crs=batch.crs,
            paths=batch.paths,
            owned=[self.owned[i] for i in batch.indices]
            if self.owned is not None
            else [None] * len(batch.indices),
        )

    def _read_loop(self, tasks: queue.SimpleQueue, stop: threading.Event) -> None:
        """Body of one reading thread: its own handles, its own queue of (batch, slot) tasks."""
        opened: OrderedDict[int, _Raster] = OrderedDict()
        try:
            while (task := tasks.get()) is not None:
                batch, slot = task
                if stop.is_set():
                    batch.chip_done()
                    continue
                try:
                    self._read_chip(opened, batch, slot)
                    batch.chip_done()
                except BaseException as e:  # reported to the consumer, which re-raises it
                    batch.chip_done(e)
        finally:
            for raster in opened.values():
                raster.src.close()

    def _open(self, opened: OrderedDict[int, _Raster], index: int) -> _Raster:
        """This thread's handle of raster ``index``, opened and checked on first use."""
        raster = opened.get(index)
        if raster is not None:
            opened.move_to_end(index)
            return raster
        path = self.rasters[index]
        src = _open(path)
        bands = self.bands or list(range(1, src.count + 1))
        if not all(1 <= b <= src.count for b in bands) or len(bands) != self.count:
            src.close()
            raise RasterFileError(
                f"{path}: has {src.count} bands; the batch reads {self.count} bands "
                f"({self.bands or 'all'}): pass bands= valid for every raster"
            )
        if src.crs is None:
            src.close()
            raise RasterFileError(
                f"{path} has no CRS; assign one with `rio edit-info --crs EPSG:xxxx {path}`"
            )
        dtype = np.result_type(*[src.dtypes[b - 1] for b in bands])
        fill = self.fill if self.fill is not None else _default_fill(src, self.nodata, dtype)
        scratch = np.empty((len(bands), self.height, self.width), dtype=dtype)
        opened[index] = raster = _Raster(src, bands, fill, src.transform, src.crs, scratch)
        if len(opened) > MAX_OPEN_PER_THREAD:
            opened.popitem(last=False)[1].src.close()
        return raster

    def _read_chip(self, opened: OrderedDict[int, _Raster], batch: _PendingBatch, slot: int) -> None:
        ref = self.refs[batch.indices[slot]]
        raster = self._open(opened, ref.raster)
        try:
            _read_into(raster, ref.window, self.nodata, batch.image[slot], batch.valid[slot])
        except RasterioIOError as e:
            raise _read_error(self.rasters[ref.raster], f"chip {ref.window}", e) from e
        inside = None if self.aoi_mask is None else self.aoi_mask(ref.window)
        if inside is not None:
            batch.valid[slot] &= inside
        batch.transforms[slot] = raster.transform @ Affine.translation(ref.window.col_off, ref.window.row_off)
        batch.crs[slot] = raster.crs
        batch.paths[slot] = self.rasters[ref.raster]
