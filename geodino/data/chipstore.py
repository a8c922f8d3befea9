"""Chip store: sampled or curated chips materialised once into a zarr (v3) store, read fast for training.

Reading a chip from a GeoTIFF decodes every internal tile the window touches (from whichever rasters, maybe
warped) and pads at the edges; a chip store holds each chip as one compressed chunk per array.

Layout of a store folder ``PATH`` (a zarr v3 group)::

    zarr.json         group attributes: format "geodino.chipstore", version, count (N), bands (C),
                      height (H), width (W), dtype, batch_size (B), complete (bool) and, once complete,
                      crs (list of WKT strings, "" for chips without CRS) and raster (list of source
                      paths, "" when unknown)
    image/            [N, C, H, W] source dtype, chunk (1, C, H, W), compressed
    valid/            [N, H, W] bool, chunk (1, H, W), compressed
    transform/        [N, 6] float64: affine (a, b, c, d, e, f) of each chip (chip pixel -> world in its CRS)
    window/           [N, 4] int64: (col_off, row_off, width, height) in source pixels
    crs/              [N] int32: index into the ``crs`` attribute
    raster/           [N] int32: index into the ``raster`` attribute
    chips.parquet     the chip table (GeoParquet, geometry in EPSG:4326, null for chips without CRS), given
                      or built from the above
    batches/<b>/      while writing only: commit record of batch b (chips b*B .. b*B+B-1) in its attributes

Writing is split into batches of B consecutive chips, one dask task each. A task reads its chips from the
source and writes their ``image`` and ``valid`` chunks (chunk-aligned, so no two tasks touch one chunk),
then *commits* the batch by creating the group ``batches/<b>`` whose attributes hold the chips' windows,
transforms, CRSs and paths. zarr's ``LocalStore`` writes every key to a temporary file and renames it
into place (``zarr/storage/_local.py: _atomic_write``), so a record exists only complete and only after
the chunks it vouches for. Chunk presence itself cannot serve as the marker: with the default
``array.write_empty_chunks=False`` zarr skips (and deletes) chunks equal to the fill value
(``zarr/core/codec_pipeline.py``: ``chunk_array.all_equal(fill_value)`` -> ``byte_setter.delete()``), e.g.
an all-nodata chip. Once every batch is committed, the metadata arrays and the chip table are written
from the records and ``complete`` is set last; an interrupted write leaves ``complete`` False, and
calling :func:`write_chip_store` again writes only the uncommitted batches. A new store is created in
``PATH.partial`` and renamed into place, so ``PATH`` never lacks its arrays.

Typical use::

    store = write_chip_store("chips.zarr", RasterTiler("scene.tif", size=256))
    loader = DataLoader(ChipStoreDataset(store), num_workers=4, collate_fn=list)
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import dask
import geopandas as gpd
import numpy as np
import shapely
import torch.utils.data
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from tqdm.auto import tqdm
from tqdm.dask import TqdmCallback
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec

from geodino.data.tiling import Chip, RasterFileError

__all__ = ["ChipStore", "ChipStoreDataset", "write_chip_store"]

FORMAT = "geodino.chipstore"
VERSION = 1
TABLE = "chips.parquet"
WINDOW_COLUMNS = ["col_off", "row_off", "width", "height"]


class _Spec(NamedTuple):
    """What all chips of a store share: band count, height and width (pixels), dtype."""

    bands: int
    height: int
    width: int
    dtype: str


def _check_chip(chip: Chip, index: int, spec: _Spec, window: np.ndarray | None) -> None:
    """Raise :class:`RasterFileError` naming the file and chip when ``chip`` does not fit the store."""
    where = f"{chip.path or 'source'}, chip {index}"
    if (*chip.image.shape, str(chip.image.dtype)) != spec or chip.valid.shape != spec[1:3]:
        raise RasterFileError(
            f"{where}: image {chip.image.shape} {chip.image.dtype} (valid {chip.valid.shape}) differs "
            f"from the store's ({spec.bands}, {spec.height}, {spec.width}) {spec.dtype}; all chips of a "
            "store share band count, size and dtype (to rewrite a store from another source use "
            "overwrite=True)"
        )
    if any(v != int(v) for v in chip.window.flatten()):
        raise ValueError(f"{where}: window {chip.window} is not on whole source pixels")
    if window is not None and not np.array_equal(window, chip.window.flatten()):
        raise ValueError(f"{where}: window {chip.window} differs from row {index} of the chip table {window}")


# ------------------------------------------------------------------------------------------- write


def _write_batch(
    path: Path, source_bytes: bytes, batch: int, rows: range, spec: _Spec, windows: np.ndarray | None
) -> Exception | None:
    """Write chips ``rows`` (batch number ``batch``) and commit them; return the error instead of raising.

    The source is unpickled here so that each task has its own dataset handles: GDAL handles must not be
    shared between threads. Errors are returned, not raised, so that the other batches still run and
    commit (dask would raise on the first failure while other threads keep writing in the background).
    """
    try:
        source = pickle.loads(source_bytes)
        root = zarr.open_group(path, mode="r+")
        image, valid = root["image"], root["valid"]
        record: dict[str, list] = {"window": [], "transform": [], "crs": [], "raster": []}
        for i in rows:
            chip = source[i]
            _check_chip(chip, i, spec, None if windows is None else windows[i])
            image[i] = chip.image
            valid[i] = chip.valid
            record["window"].append([int(v) for v in chip.window.flatten()])  # col_off, row_off, w, h
            record["transform"].append(list(chip.transform)[:6])
            record["crs"].append("" if chip.crs is None else chip.crs.to_wkt())
            record["raster"].append(str(chip.path) if chip.path else "")
        # Strings are coded per batch (distinct values first) to keep records small.
        for key in ("crs", "raster"):
            values = list(dict.fromkeys(record[key]))
            record[key] = [values.index(v) for v in record[key]]
            record[f"{key}_values"] = values
        zarr.create_group(path, path=f"batches/{batch}", attributes=record)
    except Exception as e:
        return e
    return None


def _committed(root: zarr.Group) -> dict[int, dict]:
    """Commit records of the written batches, by batch number."""
    batches = root["batches"].groups() if "batches" in root else []
    return {int(name): dict(group.attrs) for name, group in batches}


@dataclass
class _Meta:
    """Per-chip metadata: rows of unwritten chips hold -1 (windows, indexes) and NaN (transforms)."""

    window: np.ndarray  # [N, 4] int64
    transform: np.ndarray  # [N, 6] float64
    crs: np.ndarray  # [N] int32 into crs_values
    raster: np.ndarray  # [N] int32 into raster_values
    crs_values: list[str]
    raster_values: list[str]
    written: np.ndarray  # [N] bool


def _merge(records: dict[int, dict], n: int, batch_size: int) -> _Meta:
    """Metadata of all ``n`` chips from the batch commit records."""
    index = np.full(n, -1, np.int32)
    meta = _Meta(np.full((n, 4), -1), np.full((n, 6), np.nan), index, index.copy(), [], [], np.zeros(n, bool))
    for batch, rec in sorted(records.items()):
        sl = slice(batch * batch_size, batch * batch_size + len(rec["window"]))
        meta.window[sl], meta.transform[sl], meta.written[sl] = rec["window"], rec["transform"], True
        for key in ("crs", "raster"):  # batch codes -> store codes
            values: list[str] = getattr(meta, f"{key}_values")
            values += [v for v in dict.fromkeys(rec[f"{key}_values"]) if v not in values]
            to_store = np.array([values.index(v) for v in rec[f"{key}_values"]], np.int32)
            getattr(meta, key)[sl] = to_store[rec[key]]
    return meta


def _check_same_chips(root: zarr.Group, path: Path, windows: np.ndarray | None) -> None:
    """Refuses to resume, or to return as written, a store whose written chips have other windows than the
    chip table's ``windows`` ``[N, 4]`` (say the table was sampled again with another seed): their pixels
    would pass for the table's chips."""
    if windows is None:
        return
    if root.attrs["complete"]:
        stored, written = root["window"][:], np.ones(len(windows), bool)
    else:
        meta = _merge(_committed(root), root.attrs["count"], root.attrs["batch_size"])
        stored, written = meta.window, meta.written
    differ = np.flatnonzero(written & (stored != windows).any(axis=1))
    if differ.size:
        i = int(differ[0])
        raise ValueError(
            f"{path}: chip {i} was written from window {tuple(int(v) for v in stored[i])} but the chip table "
            f"gives {tuple(int(v) for v in windows[i])} ({', '.join(WINDOW_COLUMNS)}): the store was started "
            "from another chip table; pass overwrite=True (geodino chips --overwrite) to rewrite it"
        )


def _chip_table(meta: _Meta) -> gpd.GeoDataFrame:
    """Chip table (contract columns) with footprints reprojected to EPSG:4326; chips without CRS (code
    ``""``) get a null ``crs`` and ``geometry``."""
    w, h = meta.window[:, 2:3].astype(float), meta.window[:, 3:4].astype(float)
    cols = np.concatenate([np.zeros_like(w), w, w, np.zeros_like(w)], axis=1)  # corners UL, UR, LR, LL
    rows = np.concatenate([np.zeros_like(h), np.zeros_like(h), h, h], axis=1)
    a, b, c, d, e, f = (meta.transform[:, k : k + 1] for k in range(6))
    footprint = shapely.polygons(np.stack([a * cols + b * rows + c, d * cols + e * rows + f], axis=-1))
    geometry = gpd.GeoSeries(np.empty(len(footprint), object), crs="EPSG:4326")
    for code, wkt in enumerate(meta.crs_values):
        sel = meta.crs == code
        if wkt:
            geometry[sel] = gpd.GeoSeries(footprint[sel], crs=wkt).to_crs("EPSG:4326").to_numpy()
    table = {
        "raster": np.array(meta.raster_values, object)[meta.raster],
        **{name: meta.window[:, k] for k, name in enumerate(WINDOW_COLUMNS)},
        "crs": np.array([wkt or None for wkt in meta.crs_values], object)[meta.crs],
    }
    return gpd.GeoDataFrame(table, geometry=geometry, crs="EPSG:4326")


def _finalise(root: zarr.Group, path: Path, chips: gpd.GeoDataFrame | None) -> None:
    """Write metadata arrays and chip table from the commit records, then mark the store complete."""
    meta = _merge(_committed(root), root.attrs["count"], root.attrs["batch_size"])
    for name in ("window", "transform", "crs", "raster"):
        root.create_array(name, data=getattr(meta, name), overwrite=True)
    table = _chip_table(meta) if chips is None else chips
    tmp = path / f"{TABLE}.partial"
    table.to_parquet(tmp)
    os.replace(tmp, path / TABLE)  # atomic: a table file is always whole
    root.attrs.update({"crs": meta.crs_values, "raster": meta.raster_values, "complete": True})
    del root["batches"]  # records are redundant once complete


def _create(path: Path, first: Chip, n: int, batch_size: int, codec: BytesBytesCodec) -> zarr.Group:
    """A new, empty store of ``n`` chips shaped like ``first``, built aside and renamed into place."""
    if first.image.ndim != 3:
        raise RasterFileError(f"{first.path}, chip 0: image of shape {first.image.shape} is not [C, H, W]")
    spec = _Spec(*first.image.shape, str(first.image.dtype))
    _check_chip(first, 0, spec, None)
    c, h, w = first.image.shape
    tmp = path.with_name(f"{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while creating
    attrs = {"format": FORMAT, "version": VERSION, "count": n, **spec._asdict(), "batch_size": batch_size}
    root = zarr.open_group(tmp, mode="w-", attributes={**attrs, "complete": False})
    for name, shape, dtype, dims in [
        ("image", (n, c, h, w), first.image.dtype, ("chip", "band", "y", "x")),
        ("valid", (n, h, w), bool, ("chip", "y", "x")),
    ]:
        root.create_array(
            name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype, compressors=codec, fill_value=0,
            dimension_names=dims,
        )  # fmt: skip
    root.create_group("batches")
    os.replace(tmp, path)  # a store folder exists only with its arrays
    return zarr.open_group(path, mode="r+")


def _open_root(path: Path, mode: str = "r") -> zarr.Group:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such chip store")
    try:
        root = zarr.open_group(path, mode=mode)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{path} is not a zarr store: {e}") from e
    if root.attrs.get("format") != FORMAT:
        raise ValueError(f"{path} is not a geodino chip store (no format={FORMAT!r} attribute)")
    return root


def write_chip_store(
    path: str | os.PathLike[str],
    source: Sequence[Chip],
    *,
    chips: gpd.GeoDataFrame | None = None,
    compressor: BytesBytesCodec | None = None,
    batch_size: int = 64,
    scheduler: str = "threads",
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ChipStore:
    """Write every chip of ``source`` into a zarr chip store (see the module docstring), resuming if needed.

    If ``path`` holds an incomplete store, only its uncommitted batches are written (the source must be
    the same: same chip count, band count, size and dtype). A complete store is returned as is.

    Args:
        path: Store folder.
        source: Map-style sequence of :class:`Chip` (e.g. a :class:`~geodino.data.tiling.RasterTiler`),
            all of one band count, ``H x W`` size (pixels) and dtype; picklable, as for DataLoader
            workers (each task reads from its own copy). A chip without CRS (from a raster in pixel
            coordinates) is stored with CRS code ``""``, read back with ``crs`` None and a null footprint.
        chips: Chip table of ``source`` (one row per chip, in order) to store; its windows must equal the
            chips'. Built from the chips when None (footprints in EPSG:4326).
        compressor: zarr bytes-to-bytes codec of the ``image`` and ``valid`` chunks; default Blosc zstd,
            level 3, byte shuffle. Kept from the store when resuming.
        batch_size: Chips per dask task and per commit (a crash loses at most one batch per worker).
            Kept from the store when resuming.
        scheduler: dask scheduler: "threads" (default; rasterio and the codecs release the GIL),
            "processes" or "synchronous".
        num_workers: Parallel tasks; dask's default (CPU count) when None.
        overwrite: Delete anything at ``path`` first.
        progress: Show a progress bar over batches.

    Returns:
        The complete store.

    Raises:
        ValueError: ``source`` is empty, ``chips`` does not match it, or ``path`` holds something else
            than a chip store of this source (the message suggests overwrite=True).
        RasterFileError: A chip differs from the first in band count, size or dtype (the message names
            the file and chip index). Batches written before the error stay committed.
    """
    path, n = Path(path), len(source)
    if n == 0:
        raise ValueError(f"{path}: the chip source is empty; nothing to store")
    if chips is not None and (
        len(chips) != n or not {"raster", "crs", *WINDOW_COLUMNS} <= set(chips.columns)
    ):
        raise ValueError(
            f"{path}: the chip table must have one row per chip ({n}) and the columns raster, crs, "
            f"{', '.join(WINDOW_COLUMNS)}; got {len(chips)} rows, columns {list(chips.columns)}"
        )
    windows = None if chips is None else chips[WINDOW_COLUMNS].to_numpy(np.int64)
    if overwrite and path.exists():
        shutil.rmtree(path)
    if path.exists():
        root = _open_root(path, mode="r+")
        if root.attrs["count"] != n:
            raise ValueError(
                f"{path}: the store holds {root.attrs['count']} chips but the source has {n}; resume only "
                "with the source the store was started with, or pass overwrite=True to rewrite it"
            )
        _check_same_chips(root, path, windows)
        if root.attrs["complete"]:
            return ChipStore(path)
    else:
        codec = compressor or BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
        root = _create(path, source[0], n, batch_size, codec)
    spec = _Spec(*(root.attrs[k] for k in _Spec._fields))
    batch_size = root.attrs["batch_size"]
    done = _committed(root)
    todo = [b for b in range(-(-n // batch_size)) if b not in done]
    try:
        source_bytes = pickle.dumps(source)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise TypeError(f"the chip source {type(source).__name__} must be picklable: {e}") from e
    write = dask.delayed(_write_batch, pure=False)
    tasks = [
        write(path, source_bytes, b, range(b * batch_size, min(n, (b + 1) * batch_size)), spec, windows)
        for b in todo
    ]
    with TqdmCallback(tqdm_class=tqdm, desc=f"writing {path.name}", disable=not progress):
        errors = [e for e in dask.compute(*tasks, scheduler=scheduler, num_workers=num_workers) if e]
    if errors:
        written = sum(len(rec["window"]) for rec in _committed(root).values())
        errors[0].add_note(
            f"{len(errors)} of {len(todo)} batches failed; {written} of {n} chips are written in {path}: "
            "fix the error and call write_chip_store again to write the rest"
        )
        raise errors[0]
    _finalise(root, path, chips)
    return ChipStore(path)


# -------------------------------------------------------------------------------------------- read


class ChipStore:
    """A chip store on disk (see the module docstring): ``len``, ``store[i] -> Chip``, ``store.chips``.

    Per-chip metadata is loaded at opening; pixels are read on demand, one ``image`` and one ``valid``
    chunk per chip. The zarr arrays are opened lazily by each process that reads, so a store can be handed
    to DataLoader worker processes.

    Args:
        path: Store folder written by :func:`write_chip_store`.
        allow_incomplete: Open a store whose writing was interrupted; only its written chips (see
            :attr:`written`) can be read, and it has no chip table yet.

    Raises:
        FileNotFoundError: No such folder.
        ValueError: The folder is not a chip store, or the store is incomplete and ``allow_incomplete``
            is False (the message says how to resume it).
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        root = _open_root(self.path)
        attrs = root.attrs.asdict()
        self.complete: bool = attrs["complete"]
        self.count: int = attrs["count"]
        self.bands, self.height, self.width = attrs["bands"], attrs["height"], attrs["width"]
        self.dtype = np.dtype(attrs["dtype"])  # pixels: [bands, height, width] of this dtype
        if self.complete:
            arrays = {name: root[name][:] for name in ("window", "transform", "crs", "raster")}
            meta = _Meta(**arrays, crs_values=attrs["crs"], raster_values=attrs["raster"],
                         written=np.ones(self.count, bool))  # fmt: skip
        else:
            meta = _merge(_committed(root), self.count, attrs["batch_size"])
            if not allow_incomplete:
                raise ValueError(
                    f"{self.path}: incomplete chip store ({meta.written.sum()} of {self.count} chips "
                    "written); resume it by calling write_chip_store with the same path and source, or "
                    "open it with allow_incomplete=True to read the written chips"
                )
        self._meta = meta
        self._crs = [CRS.from_wkt(wkt) if wkt else None for wkt in meta.crs_values]
        self._arrays: tuple[zarr.Array, zarr.Array] | None = None
        self._pid: int | None = None

    @property
    def written(self) -> np.ndarray:
        """``bool [N]``: which chips are written (all, in a complete store)."""
        return self._meta.written

    @cached_property
    def chips(self) -> gpd.GeoDataFrame:
        """The chip table (contract columns, geometry in EPSG:4326), one row per chip; ``crs`` and
        ``geometry`` are null for chips without CRS."""
        if not self.complete:
            raise ValueError(f"{self.path}: incomplete chip store has no chip table yet; resume writing it")
        return gpd.read_parquet(self.path / TABLE)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None or self._pid != os.getpid():
            root = zarr.open_group(self.path, mode="r")
            self._arrays, self._pid = (root["image"], root["valid"]), os.getpid()
        image, valid = self._arrays
        return image[index], valid[index]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"], state["_pid"] = None, None  # reopened by the process that unpickles
        state.pop("chips", None)
        return state

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Chip:
        if not -self.count <= index < self.count:
            raise IndexError(f"chip index {index} out of range for {self.count} chips in {self.path}")
        index %= self.count
        meta = self._meta
        if not meta.written[index]:
            raise ValueError(f"{self.path}: chip {index} is not written yet; resume with write_chip_store")
        image, valid = self._read(index)
        raster = meta.raster_values[meta.raster[index]]
        return Chip(
            image=image,
            valid=valid,
            window=Window(*(int(v) for v in meta.window[index])),
            transform=Affine(*meta.transform[index]),
            crs=self._crs[meta.crs[index]],
            path=Path(raster) if raster else None,
        )

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"incomplete, {self.written.sum()} written"
        return (
            f"ChipStore({str(self.path)!r}, {self.count} chips of {self.bands} x {self.height} x "
            f"{self.width} {self.dtype}, {state})"
        )


class ChipStoreDataset(torch.utils.data.Dataset):
    """Map-style torch Dataset over a :class:`ChipStore`: ``dataset[i]`` is ``transform(store[i])``.

    Picklable for DataLoader workers (each worker opens the zarr arrays itself). :class:`Chip` s do not
    collate with torch's default collate: pass a ``transform`` returning tensors, or ``collate_fn``.

    Args:
        store: A store, or the path of a complete one.
        transform: Called on each :class:`Chip`; the chip itself is returned when None.
    """

    def __init__(
        self, store: ChipStore | str | os.PathLike[str], transform: Callable[[Chip], Any] | None = None
    ) -> None:
        self.store = store if isinstance(store, ChipStore) else ChipStore(store)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> Any:
        chip = self.store[index]
        return chip if self.transform is None else self.transform(chip)
