"""A raster corpus: the index of a set of GeoTIFFs that pretraining, curation and training read through.

:meth:`RasterCorpus.from_paths` opens every raster once and records what later stages need without
reopening it: the footprint in EPSG:4326, CRS, ground sample distance (GSD), grid size, bands, dtype,
nodata, a coarse valid-pixel map (:class:`~geodino.data.validity.ValidMap`) and per-band percentiles
that map raw digital numbers (uint8, uint16 reflectance, int16, float) to the model's input range [0, 1].
The index is a ``geopandas.GeoDataFrame`` saved as GeoParquet.

The percentiles are taken over the valid pixels of decimated reads, pooled over groups of rasters
(``scaling_by``):

- ``"dtype"`` (default): the rasters of one dtype share their levels. For a corpus mixing sensors by
  storage type (uint8 RGB beside uint16 or int16 reflectance): each dtype spans [0, 1], instead of the
  rasters of the narrower range coming out as a dark sliver of it.
- ``"raster"``: each raster has its own levels. For scenes of one sensor with very different illumination
  (season, sun elevation, haze): every scene is stretched to full contrast, which loses the absolute
  radiometry between scenes (a dark scene looks like a bright one).
- ``"corpus"``: one set of levels for all rasters. For one sensor, keeping the relative radiometry between
  scenes.

Each raster is read on its **read grid**: its own pixel grid, or, when a target ``crs`` and/or ``gsd`` is
given, the grid of a ``rasterio.vrt.WarpedVRT`` reprojecting it on the fly. Chip windows (:class:`ChipRef`,
chip tables) are in pixels of the read grid.

Rasters without a CRS (image chips such as PNG or JPEG tiles, GeoTIFFs without georeferencing) are indexed
on their pixel grid when the corpus reads native grids: their ``crs`` and ``epsg`` are null, their GSD comes
from their transform (1 "pixel" per pixel when they have none: rasterio's identity transform) and their
footprint ``geometry`` (in the index and in chip tables) is null. Pretraining reads their pixels like any
other's. They cannot be reprojected: with a target ``crs`` or ``gsd`` they are refused.

Typical use::

    corpus = RasterCorpus.from_paths("scenes/", bands=["red", "green", "blue"])
    corpus.save("corpus.parquet")
    corpus = RasterCorpus.load("corpus.parquet")
    dataset = CorpusDataset(corpus, refs=[ChipRef(0, Window(0, 0, 224, 224))])
    chip = dataset[0]  # chip.image float32 [3, 224, 224] in [0, 1]
"""

from __future__ import annotations

import glob
import json
import math
import operator
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
import torch.utils.data
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform
from rasterio.warp import transform as transform_coords
from rasterio.windows import Window
from tqdm.auto import tqdm

from geodino.data.tiling import (
    Chip,
    ChipRef,
    RasterFileError,
    _gdal_reason,
    _has_valid_pixel,
    _open,
    _override,
    _read_error,
    _valid_mask,
    read_chip,
)
from geodino.data.validity import ValidMap, read_valid_map
from geodino.io import write_geoparquet

__all__ = ["CorpusDataset", "RasterCorpus", "ReadSettings"]

#: Longest side (pixels) of the decimated read used for the scaling sample and the fill check.
_DECIMATED_SIDE = 512
#: Most pixels per band pooled over the corpus for the scaling percentiles.
_SCALING_SAMPLES = 1_000_000
#: Points per edge when densifying footprints before reprojection (rasterio's transform_bounds default).
_RASTER_EDGE_POINTS = 21
#: Chips are small: a few points per edge keep their reprojected edges accurate.
_CHIP_EDGE_POINTS = 4
#: Fill values that :func:`_undeclared_fill` reports besides the dtype's extremes.
_COMMON_FILLS = (0, -9999)
#: Key of the corpus settings in the GeoParquet metadata.
_SETTINGS_KEY = "geodino.corpus"
_VALID_MAP_COLUMNS = ("valid_map", "valid_map_rows", "valid_map_cols")
#: Columns of a saved corpus that hold the per-raster scaling levels (:meth:`RasterCorpus.save`).
_SCALING_COLUMNS = ("scaling_low", "scaling_high")

Band = int | str
Handle = rasterio.DatasetReader | WarpedVRT
#: Which rasters share their scaling percentiles; see the module docstring.
ScalingBy = Literal["dtype", "raster", "corpus"]


@dataclass(frozen=True)
class ReadSettings:
    """How every raster of a corpus is read (see :meth:`RasterCorpus.from_paths`).

    Attributes:
        bands: Band selection (1-based indexes or descriptions), None for all bands but alpha.
        nodata: Fill value of the rasters that declare neither a nodata value nor a mask (an undeclared
            fill value), or None; see :func:`_nodata_override`.
        crs: Target CRS (WKT) of the read grids, None for native grids.
        gsd: Target ``(x, y)`` resolution in target-CRS units per pixel, or None.
        resampling: ``rasterio.enums.Resampling`` name used when reprojecting.
    """

    bands: tuple[Band, ...] | None = None
    nodata: float | None = None
    crs: str | None = None
    gsd: tuple[float, float] | None = None
    resampling: str = "bilinear"

    @property
    def warp(self) -> bool:
        """Whether rasters are read through a WarpedVRT."""
        return self.crs is not None or self.gsd is not None


def _find_rasters(sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Absolute paths of a folder's GeoTIFFs (recursive, sorted), a glob's matches, or a list of paths."""
    if isinstance(sources, str | os.PathLike):
        text = str(sources)
        if Path(text).is_dir():
            paths = [
                p for p in Path(text).rglob("*") if p.suffix.lower() in (".tif", ".tiff") and p.is_file()
            ]
        elif any(ch in text for ch in "*?["):
            paths = [Path(p) for p in glob.glob(text, recursive=True)]
        else:
            paths = [Path(text)] if Path(text).is_file() else []
        paths = sorted(os.path.abspath(p) for p in paths)
    else:
        paths = [os.path.abspath(p) for p in sources]
    if not paths:
        raise FileNotFoundError(
            f"no rasters found in {sources!r} (a folder is searched recursively for *.tif / *.tiff; for "
            "other formats, e.g. PNG chips, give a glob such as 'chips/**/*.png')"
        )
    return paths


def _describe_bands(descriptions: Sequence[str | None]) -> str:
    return ", ".join(f"{i} {d!r}" if d else str(i) for i, d in enumerate(descriptions, 1))


def _band_indexes(src: rasterio.DatasetReader, path: str, bands: Sequence[Band] | None) -> list[int]:
    """1-based indexes of ``bands`` (indexes or case-insensitive descriptions) in ``src``; by default every
    band but an alpha band, which is the others' mask (read as a band, its all-valid mask would mark
    transparent pixels valid)."""
    if bands is None:
        return [i for i in range(1, src.count + 1) if src.colorinterp[i - 1] != ColorInterp.alpha]
    names = {d.lower(): i for i, d in enumerate(src.descriptions, 1) if d}
    indexes = []
    for band in bands:
        index = names.get(band.lower()) if isinstance(band, str) else int(band)
        if index is None or not 1 <= index <= src.count:
            raise RasterFileError(
                f"{path}: has no band {band!r}; its bands are: {_describe_bands(src.descriptions)}. Select "
                "bands every raster has (bands=[...], geodino index --bands) or leave this file out"
            )
        indexes.append(index)
    return indexes


def _undeclared_fill(data: np.ndarray) -> float | None:
    """The likely fill value of ``data [C, h, w]`` read from a raster that declares no nodata, or None.

    Fill collars (rotated scenes, partial tiles) touch the raster's edges: a value equal in every band
    on at least a quarter of the border pixels, that is 0, -9999 or the dtype's extreme (e.g. 65535 in
    uint16, -32768 in int16), is reported.
    """
    ring = np.concatenate([data[:, 0], data[:, -1], data[:, 1:-1, 0], data[:, 1:-1, -1]], axis=1)
    same = (ring == ring[:1]).all(axis=0)
    values, counts = np.unique(ring[0][same], return_counts=True)
    if not values.size or counts.max() < ring.shape[1] / 4:
        return None
    value = values[counts.argmax()].item()
    limits = np.iinfo(data.dtype) if np.issubdtype(data.dtype, np.integer) else np.finfo(data.dtype)
    return value if any(value == v for v in (*_COMMON_FILLS, limits.min, limits.max)) else None


def _nodata_override(src: rasterio.DatasetReader, bands: Sequence[int], nodata: float | None) -> float | None:
    """The corpus' ``nodata`` where it applies to ``src``, else None (the file's own nodata and masks).

    It applies to a raster that declares no nodata value and no mask or alpha band for ``bands``, when
    their dtype can hold it: a corpus may mix files with an undeclared fill value (say 0) with files
    whose declared nodata (-32768 in int16) or mask must keep working, and uint16 files with a -9999 fill
    value meant for int16 files.
    """
    if nodata is None or src.nodata is not None:
        return None
    if not all(MaskFlags.all_valid in src.mask_flag_enums[b - 1] for b in bands):
        return None
    return _override(nodata, np.result_type(*[src.dtypes[b - 1] for b in bands]))


def _sample_pixels(
    src: rasterio.DatasetReader,
    bands: list[int],
    nodata: float | None,
    n_samples: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float | None]:
    """Valid pixels of a decimated read, and the undeclared fill value.

    Args:
        nodata: The nodata override that applies to ``src`` (:func:`_nodata_override`), or None.

    Returns:
        Up to ``n_samples`` valid pixels ``float64 [C, n]`` of a read at most ``_DECIMATED_SIDE`` pixels on
        the long side (from overviews where present), and the likely fill value (:func:`_undeclared_fill`)
        when the file declares neither nodata nor a mask and ``nodata`` does not mask it, else None.
    """
    scale = max(1.0, max(src.height, src.width) / _DECIMATED_SIDE)
    shape = max(1, math.ceil(src.height / scale)), max(1, math.ceil(src.width / scale))
    data = src.read(bands, out_shape=(len(bands), *shape))
    valid = _valid_mask(src, data, bands, out_shape=shape, nodata=nodata)
    unmasked = all(MaskFlags.all_valid in src.mask_flag_enums[b - 1] for b in bands)
    fill = _undeclared_fill(data) if src.nodata is None and unmasked else None
    fill = None if fill == nodata else fill
    pixels = data[:, valid].astype(np.float64)
    if pixels.shape[1] > n_samples:
        pixels = pixels[:, rng.choice(pixels.shape[1], n_samples, replace=False)]
    return pixels, fill


def _warped_grid(src: rasterio.DatasetReader, settings: ReadSettings) -> dict[str, Any]:
    """Target ``crs``, ``transform``, ``width`` and ``height`` (pixels) of ``src`` read with ``settings``."""
    crs = src.crs if settings.crs is None else CRS.from_wkt(settings.crs)
    transform, width, height = calculate_default_transform(
        src.crs, crs, src.width, src.height, *src.bounds, resolution=settings.gsd
    )
    return {"crs": crs, "transform": transform, "width": width, "height": height}


def _open_vrt(
    src: rasterio.DatasetReader, grid: dict[str, Any], settings: ReadSettings, nodata: float | None
) -> WarpedVRT:
    """A WarpedVRT of ``src`` on ``grid``.

    Pixels outside the source get the nodata value (``nodata``, the override that applies to ``src``, else
    its own); with none known, the VRT keeps the source's alpha band or gets one added after the source
    bands.
    """
    marker = src.nodata if nodata is None else nodata
    has_alpha = any(MaskFlags.alpha in flags for flags in src.mask_flag_enums)
    masking = {"nodata": marker, "src_nodata": marker} if marker is not None else {"add_alpha": not has_alpha}
    return WarpedVRT(src, **grid, resampling=Resampling[settings.resampling], **masking)


def _alpha_band(handle: Handle, count: int) -> int | None:
    """The alpha band a :func:`_open_vrt` added after the ``count`` source bands, or None.

    Read explicitly: GDAL reports the alpha as the bands' mask only for sources of 1-3 bands
    (rasterio issue #1454).
    """
    return handle.count if handle.count > count else None


def _read_valid_map(
    handle: Handle, bands: list[int], nodata: float | None, max_side: int, alpha: int | None
) -> ValidMap:
    valid_map = read_valid_map(handle, bands, nodata=nodata, max_side=max_side)
    if alpha is None:
        return valid_map
    inside = handle.read(alpha, out_shape=valid_map.valid.shape) > 0
    return ValidMap(valid_map.valid & inside, valid_map.height, valid_map.width)


def _changed_since_indexed(src: rasterio.DatasetReader, row: pd.Series, warped: bool) -> str:
    """What of ``src`` differs from its index ``row`` (band count, dtype of the bands, and, read on its own
    grid, its size), or "" when nothing does."""
    if src.count != row["count"]:
        return f"{row['count']} bands indexed, {src.count} now"
    dtype = str(np.result_type(*[src.dtypes[b - 1] for b in row["bands"]]))
    if dtype != row["dtype"]:
        return f"{row['dtype']} indexed, {dtype} now"
    if not warped and (src.width, src.height) != (row["width"], row["height"]):
        return f"{row['width']} x {row['height']} px indexed, {src.width} x {src.height} now"
    return ""


def _open_raster(path: Path) -> rasterio.DatasetReader:
    """:func:`_open` without rasterio's ``NotGeoreferencedWarning``, which a raster without geotransform
    (e.g. a PNG chip) raises on every opening: the corpus reads it on its pixel grid (identity transform),
    and :meth:`RasterCorpus.from_paths` warns once about all such rasters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return _open(path)


def _footprints(crs: CRS, transform: Affine, windows: np.ndarray, points: int) -> np.ndarray:
    """Footprint polygons in EPSG:4326 of pixel ``windows`` (``[n, 4]``: col_off, row_off, width, height).

    Each edge is densified to ``points`` points before reprojection, so curved edges stay accurate.
    """
    t = np.arange(points) / points
    c0, r0, w, h = (col[:, None] for col in np.asarray(windows, dtype=np.float64).T)
    zero = 0 * t
    cols = np.concatenate([c0 + t * w, c0 + w + zero, c0 + w - t * w, c0 + zero], axis=1)
    rows = np.concatenate([r0 + zero, r0 + t * h, r0 + h + zero, r0 + h - t * h], axis=1)
    x, y = transform @ (cols, rows)
    lon, lat = transform_coords(crs, "EPSG:4326", np.ravel(x), np.ravel(y))
    return shapely.polygons(np.stack([lon, lat], axis=-1).reshape(*cols.shape, 2))


#: What rasterio raises for a CRS it cannot transform from (a local or engineering CRS, say LOCAL_CS that
#: GDAL writes for an unknown projection). ``CPLE_BaseError`` is rasterio's GDAL error base, not exported
#: by ``rasterio.errors``.
_CRS_ERRORS = (CRSError, CPLE_BaseError)


def _crs_error(path: str, crs: CRS, error: BaseException) -> RasterFileError:
    """The :class:`RasterFileError` for a raster whose ``crs`` cannot be transformed to another CRS."""
    return RasterFileError(
        f"{path}: its CRS ({crs.to_string() or crs.to_wkt()[:60]}) cannot be transformed to Earth "
        f"coordinates ({_gdal_reason(error)[:120]}): a local or engineering CRS locates nothing; assign the "
        f"real one with `rio edit-info --crs EPSG:xxxx {path}`, or leave the file out"
    )


def _index_raster(
    path: str, settings: ReadSettings, valid_map_side: int, n_samples: int, rng: np.random.Generator
) -> tuple[dict[str, Any], ValidMap, np.ndarray, float | None]:
    """Index row, valid map, scaling sample ``[C, n]`` and undeclared fill value of one raster.

    A raster without CRS gets a row in pixel coordinates (``crs``, ``epsg`` and ``geometry`` None).

    Raises:
        RasterFileError: The raster has no CRS and ``settings`` reproject (target ``crs`` / ``gsd``).
    """
    with _open_raster(Path(path)) as src:
        if src.crs is None and settings.warp:
            raise RasterFileError(
                f"{path} has no CRS, so it cannot be read on the corpus' target grid (crs / gsd); assign "
                f"one with `rio edit-info --crs EPSG:xxxx {path}`, or index without crs / gsd to read it "
                "on its own pixel grid"
            )
        indexes = _band_indexes(src, path, settings.bands)
        nodata = _nodata_override(src, indexes, settings.nodata)
        try:
            grid = _warped_grid(src, settings) if settings.warp else None
        except _CRS_ERRORS as e:
            raise _crs_error(path, src.crs, e) from e
        try:
            sample, fill = _sample_pixels(src, indexes, nodata, n_samples, rng)
            vrt = None if grid is None else _open_vrt(src, grid, settings, nodata)
            with nullcontext(src) if vrt is None else vrt as handle:
                alpha = _alpha_band(handle, src.count)
                valid_map = _read_valid_map(handle, indexes, nodata, valid_map_side, alpha)
                grid_crs, transform, height, width = handle.crs, handle.transform, handle.height, handle.width
                gsd_x, gsd_y = handle.res
            if not valid_map.valid.any() and not _has_valid_pixel(src, indexes, nodata):
                marker = src.nodata if nodata is None else nodata
                raise RasterFileError(
                    f"{path}: all pixels are nodata / masked (nodata {marker}); nothing to read. Check its "
                    "nodata value (nodata=, geodino index --nodata) or leave the file out"
                )
        except RasterioError as e:
            raise _read_error(path, "raster", e) from e
        whole = np.array([[0, 0, width, height]])
        try:
            footprint = (
                None if grid_crs is None else _footprints(grid_crs, transform, whole, _RASTER_EDGE_POINTS)[0]
            )
        except _CRS_ERRORS as e:
            raise _crs_error(path, grid_crs, e) from e
        row = {
            "raster": path,
            "crs": None if grid_crs is None else grid_crs.to_wkt(),
            "epsg": None if grid_crs is None else grid_crs.to_epsg(),
            "gsd_x": gsd_x,
            "gsd_y": gsd_y,
            "height": height,
            "width": width,
            "count": src.count,
            "bands": indexes,
            "dtype": str(np.result_type(*[src.dtypes[b - 1] for b in indexes])),
            "nodata": src.nodata if nodata is None else nodata,
            "band_descriptions": [d or "" for d in src.descriptions],
            "transform": list(transform)[:6],
            "valid_fraction": valid_map.valid_fraction,
            "valid_pixels": round(valid_map.valid_pixels),
            "geometry": footprint,
        }
    return row, valid_map, sample, fill


def _scaling_groups(dtypes: Sequence[str], scaling_by: ScalingBy) -> np.ndarray:
    """``int64 [R]``: per raster (of ``dtypes``), the group whose valid pixels are pooled for its levels."""
    if scaling_by == "raster":
        return np.arange(len(dtypes), dtype=np.int64)
    if scaling_by == "dtype":
        return np.unique(np.asarray(dtypes), return_inverse=True)[1].astype(np.int64)
    return np.zeros(len(dtypes), dtype=np.int64)


def _percentile_levels(
    samples: Sequence[np.ndarray], groups: np.ndarray, percentiles: tuple[float, float]
) -> np.ndarray:
    """``float64 [R, 2, C]``: per raster, the ``percentiles`` of the pooled samples of its group.

    Args:
        samples: Valid pixels ``[C, n_r]`` of each of the R rasters.
        groups: ``int [R]``, the group of each raster (:func:`_scaling_groups`).
        percentiles: ``(low, high)`` percentiles.

    A group without any sampled pixel (rasters valid only in slivers the decimated reads miss) gets the
    levels of the whole corpus' samples.
    """
    levels = np.empty((len(samples), 2, samples[0].shape[0]))
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        pixels = np.concatenate([samples[i] for i in members], axis=1)
        pixels = pixels if pixels.shape[1] else np.concatenate(samples, axis=1)
        levels[members] = np.percentile(pixels, percentiles, axis=1)
    return levels


def _warn_files(message: str, items: list[tuple[str, str]]) -> None:
    warnings.warn(message + "".join(f"\n  {path}: {why}" for path, why in items), UserWarning, stacklevel=3)


def _warn_no_crs(rows: Sequence[dict[str, Any]]) -> None:
    """Warn once, with their count and an example, when some of the index ``rows`` have no CRS."""
    paths = [row["raster"] for row in rows if row["crs"] is None]
    if paths:
        warnings.warn(
            f"{len(paths)} of {len(rows)} raster(s) have no CRS (e.g. {paths[0]}): indexed in pixel "
            "coordinates; no footprints (null geometry in the index and chip tables). Assign a CRS (rio "
            "edit-info --crs) where the geography matters",
            UserWarning,
            stacklevel=3,
        )


class RasterCorpus:
    """Index of a set of rasters, with valid maps and per-band scaling; see the module docstring.

    Build with :meth:`from_paths` (or :meth:`from_torchgeo`), persist with :meth:`save` / :meth:`load`.
    Chips from :meth:`read` come out in each raster's own dtype (the index's ``dtype`` column: the common
    type of its selected bands), so a corpus may mix dtypes; :meth:`scale` (and :class:`CorpusDataset`)
    turn them into ``float32``.

    Attributes:
        index: ``GeoDataFrame``, one row per raster: ``raster`` (absolute path), ``geometry`` (footprint
            in EPSG:4326; null without CRS), ``crs`` (WKT of the read grid; null without CRS: pixel
            coordinates), ``epsg`` (nullable), ``gsd_x`` / ``gsd_y`` (CRS units per pixel; transform units,
            1.0 for a raster without geotransform), ``height`` / ``width`` (read grid, pixels), ``count``
            (bands in the file), ``bands`` (selected 1-based indexes), ``dtype``, ``nodata`` (the file's, or
            the corpus' where it applies; NaN if none), ``band_descriptions``, ``transform`` (read grid, 6
            affine coefficients), ``valid_fraction``, ``valid_pixels``.
        valid_maps: One coarse :class:`ValidMap` per raster, on its read grid.
        settings: How the rasters are read.
        percentiles: ``(low, high)`` percentiles of the scaling, or None (no scaling).
        scaling_by: Which rasters share their levels: ``"dtype"``, ``"raster"`` or ``"corpus"`` (see the
            module docstring).
        scaling: ``float64 [R, 2, C]``: per raster (row ``i`` for raster ``i``), the per-band values that
            :meth:`scale` maps to 0 and 1; the rasters of one group have identical rows. None for no
            scaling.
    """

    #: Most dataset handles one process keeps open (the least recently used one is closed).
    max_open = 64

    def __init__(
        self,
        index: gpd.GeoDataFrame,
        valid_maps: list[ValidMap],
        settings: ReadSettings,
        *,
        percentiles: tuple[float, float] | None = None,
        scaling_by: ScalingBy = "dtype",
        scaling: np.ndarray | None = None,
    ) -> None:
        self.index = index
        self.valid_maps = valid_maps
        self.settings = settings
        self.percentiles = percentiles
        self.scaling_by = scaling_by
        self.scaling = scaling
        self._handles: OrderedDict[int, tuple[rasterio.DatasetReader, Handle]] = OrderedDict()
        self._pid: int | None = None

    # ------------------------------------------------------------------------------------- building

    @classmethod
    def from_paths(
        cls,
        sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        bands: Sequence[Band] | None = None,
        nodata: float | None = None,
        crs: str | CRS | None = None,
        gsd: float | tuple[float, float] | None = None,
        resampling: str = "bilinear",
        scaling: tuple[float, float] | None = (2.0, 98.0),
        scaling_by: ScalingBy = "dtype",
        valid_map_side: int = 1024,
        on_error: Literal["raise", "skip"] = "raise",
        progress: bool = True,
    ) -> RasterCorpus:
        """Index rasters, opening each once.

        Args:
            sources: A folder (searched recursively for ``*.tif`` / ``*.tiff``, any case; sorted), a glob
                pattern, or a list of paths.
            bands: Bands to read, as 1-based indexes or band descriptions (case-insensitive); all bands but
                an alpha band (the mask of the others) by default, in which case every raster must have the
                same number of bands.
            nodata: Fill value of the rasters that declare neither a nodata value nor a mask (an undeclared
                fill value, e.g. a 0 collar): their pixels of this value are invalid. Files with a declared
                nodata value or mask keep theirs, and files whose dtype cannot hold the value (-9999 in
                uint16) are read as they are; the index's ``nodata`` column shows what applies to each.
            crs: Target CRS (anything ``CRS.from_user_input`` takes) to read every raster in, through a
                WarpedVRT; native grids by default (rasters without CRS are then read in pixel coordinates,
                see the module docstring, with one warning giving their count).
            gsd: Target resolution in target-CRS units per pixel (one value or ``(x, y)``); with ``crs``
                None, the rasters are resampled in their own CRS.
            resampling: ``rasterio.enums.Resampling`` name used when reprojecting.
            scaling: ``(low, high)`` percentiles of the valid pixels of each band (decimated reads, pooled
                as ``scaling_by`` says) that :meth:`scale` maps to 0 and 1; None for no scaling.
            scaling_by: Pool the percentiles over the rasters of one dtype (``"dtype"``), take them per
                raster (``"raster"``) or over the whole corpus (``"corpus"``); see the module docstring.
            valid_map_side: Longest side of the coarse valid maps, cells.
            on_error: "raise" on the first bad raster, or "skip" bad rasters with one warning listing them.
            progress: Show a progress bar.

        Raises:
            FileNotFoundError: Nothing found in ``sources`` (or a listed file is missing, with "raise").
            RasterFileError: A raster is unreadable (corrupt, truncated), has no CRS while ``crs`` or
                ``gsd`` is given, has no valid pixel, lacks a selected band or has a different number of
                bands than the others; with "skip", when no raster is left. Messages name the file.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if scaling_by not in get_args(ScalingBy):
            raise ValueError(f"scaling_by must be one of {get_args(ScalingBy)}, got {scaling_by!r}")
        if resampling not in Resampling.__members__:
            raise ValueError(f"unknown resampling {resampling!r}; one of {sorted(Resampling.__members__)}")
        bands = [bands] if isinstance(bands, int | str) else bands
        gsd = (gsd, gsd) if isinstance(gsd, int | float) else gsd
        settings = ReadSettings(
            bands=None if bands is None else tuple(bands),
            nodata=nodata,
            crs=None if crs is None else CRS.from_user_input(crs).to_wkt(),
            gsd=None if gsd is None else (float(gsd[0]), float(gsd[1])),
            resampling=resampling,
        )
        paths = _find_rasters(sources)
        rng = np.random.default_rng(0)  # which pixels the scaling sample keeps; fixed for reproducibility
        n_samples = max(1024, _SCALING_SAMPLES // len(paths))
        rows, valid_maps, samples, fills, skipped = [], [], [], [], []
        for path in tqdm(paths, desc="indexing rasters", unit="raster", disable=not progress):
            try:
                row, valid_map, sample, fill = _index_raster(path, settings, valid_map_side, n_samples, rng)
                if rows and bands is None and row["count"] != rows[0]["count"]:
                    raise RasterFileError(
                        f"{path}: has {row['count']} bands but {rows[0]['raster']} has {rows[0]['count']}; "
                        "select common bands with bands=[...] (1-based indexes or descriptions). "
                        f"Its bands are: {_describe_bands(row['band_descriptions'])}"
                    )
            except (RasterFileError, FileNotFoundError) as e:
                if on_error == "raise":
                    raise
                skipped.append((path, str(e)))
                continue
            rows.append(row)
            valid_maps.append(valid_map)
            samples.append(sample)
            if fill is not None:
                fills.append((path, fill))
        if skipped:
            _warn_files(f"skipped {len(skipped)} unreadable raster(s):", skipped)
        if not rows:
            raise RasterFileError(f"no readable raster in {sources!r}: all {len(paths)} were skipped")
        _warn_no_crs(rows)
        if fills:
            hint = fills[0][1]
            _warn_files(
                f"{len(fills)} raster(s) declare no nodata value or mask but have a border of one value, "
                "probably an undeclared fill value that now counts as valid data. Mask it with "
                f"nodata={hint} (geodino index --nodata {hint}; it applies to every raster without a "
                f"declared nodata value or mask) or declare it in the file (rio edit-info --nodata {hint} "
                "FILE):",
                [(path, f"border value {value}") for path, value in fills],
            )
        index = gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")
        index["epsg"] = pd.array(index["epsg"], dtype="Int64")
        index["nodata"] = index["nodata"].astype(np.float64)
        percentiles = None if scaling is None else (float(scaling[0]), float(scaling[1]))
        groups = _scaling_groups(index["dtype"], scaling_by)
        levels = None if percentiles is None else _percentile_levels(samples, groups, percentiles)
        if percentiles is not None and scaling_by == "corpus" and index["dtype"].nunique() > 1:
            _warn_files(
                "the scaling percentiles are pooled over rasters of different dtypes (scaling_by='corpus'), "
                "so the rasters of the narrower range will come out nearly black (e.g. uint8 beside uint16 "
                "reflectance); pool them per dtype with scaling_by='dtype' (geodino index --scaling-by "
                "dtype):",
                [(str(p), str(d)) for p, d in zip(index["raster"], index["dtype"], strict=True)],
            )
        return cls(
            index, valid_maps, settings, percentiles=percentiles, scaling_by=scaling_by, scaling=levels
        )

    @classmethod
    def from_torchgeo(cls, dataset: Any, **kwargs: Any) -> RasterCorpus:
        """Index the files of a torchgeo ``RasterDataset`` (its ``index['filepath']``).

        The dataset's band selection (``band_indexes``) is used unless ``bands`` is given. Rasters are read
        on their native grids; pass ``crs=dataset.crs, gsd=dataset.res`` to read on torchgeo's grid.

        Args:
            dataset: A torchgeo (>= 0.7) ``RasterDataset`` with one file per scene (all bands in it).
            **kwargs: Keyword arguments of :meth:`from_paths`.
        """
        if getattr(dataset, "separate_files", False):
            raise ValueError(
                f"{type(dataset).__name__} stores one band per file (separate_files); a RasterCorpus needs "
                "all bands of a scene in one file (stack them, e.g. with gdalbuildvrt -separate)"
            )
        kwargs.setdefault("bands", getattr(dataset, "band_indexes", None))
        return cls.from_paths([str(p) for p in dataset.index["filepath"]], **kwargs)

    # ---------------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the corpus (index, valid maps, settings) as GeoParquet, atomically.

        Valid maps are columns (``valid_map``: ``np.packbits`` bytes, ``valid_map_rows`` / ``_cols``: the
        coarse shape), and so are the scaling levels (``scaling_low`` / ``scaling_high``: ``[C]`` floats per
        raster, absent without scaling); the settings (read settings, ``percentiles``, ``scaling_by``) are
        JSON in the file's pandas metadata (``DataFrame.attrs``).
        """
        path = Path(path)
        table = self.index.copy()
        table["valid_map"] = [np.packbits(vm.valid).tobytes() for vm in self.valid_maps]
        table["valid_map_rows"] = [vm.valid.shape[0] for vm in self.valid_maps]
        table["valid_map_cols"] = [vm.valid.shape[1] for vm in self.valid_maps]
        if self.scaling is not None:
            for j, column in enumerate(_SCALING_COLUMNS):
                table[column] = list(self.scaling[:, j])
        settings = {
            "read": asdict(self.settings),
            "percentiles": self.percentiles,
            "scaling_by": self.scaling_by,
        }
        table.attrs = {_SETTINGS_KEY: json.dumps(settings)}  # pyarrow writes attrs into the file metadata
        write_geoparquet(table, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RasterCorpus:
        """Read a corpus written by :meth:`save`, without opening the rasters.

        Files saved before ``scaling_by`` existed (one pooled ``scaling`` ``[2, C]`` in the settings) load
        with ``scaling_by="corpus"``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: ``path`` is not a saved corpus.
        """
        table = gpd.read_parquet(path)
        if _SETTINGS_KEY not in table.attrs:
            raise ValueError(f"{path}: not a RasterCorpus file (no {_SETTINGS_KEY!r} metadata)")
        saved = json.loads(table.attrs[_SETTINGS_KEY])
        shapes = zip(*(table[k] for k in (*_VALID_MAP_COLUMNS, "height", "width")), strict=True)
        valid_maps = [
            ValidMap(
                np.unpackbits(np.frombuffer(bits, np.uint8), count=r * c).astype(bool).reshape(r, c), h, w
            )
            for bits, r, c, h, w in shapes
        ]
        scaling_by, scaling = _saved_scaling(table, saved)
        index = table.drop(columns=[*_VALID_MAP_COLUMNS, *_SCALING_COLUMNS], errors="ignore")
        index.attrs = {}
        # Parquet lists come back as numpy arrays: restore the Python lists from_paths builds.
        for column, kind in (("bands", int), ("band_descriptions", str), ("transform", float)):
            index[column] = [[kind(v) for v in values] for values in index[column]]
        settings = ReadSettings(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in saved["read"].items()}
        )
        percentiles = saved["percentiles"]
        return cls(
            index,
            valid_maps,
            settings,
            percentiles=None if percentiles is None else tuple(percentiles),
            scaling_by=scaling_by,
            scaling=scaling,
        )

    # -------------------------------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self.index)

    def open(self, i: int) -> Handle:
        """Dataset handle of raster ``i`` on its read grid (a ``WarpedVRT`` when reprojecting).

        Opened on first use in the current process and kept open (at most :attr:`max_open`), so a corpus
        can be handed to ``DataLoader`` workers (forked or spawned): a handle inherited through ``fork`` is
        never reused.

        Raises:
            FileNotFoundError: The raster was moved or deleted since it was indexed.
            RasterFileError: It cannot be opened any more, or its band count, dtype or (on its own grid)
                size changed since it was indexed.
        """
        if self._pid != os.getpid():
            # After fork the parent's handles (and GDAL file offsets) must not be shared: open our own.
            self._handles, self._pid = OrderedDict(), os.getpid()
        if i in self._handles:
            self._handles.move_to_end(i)
            return self._handles[i][1]
        row = self.index.iloc[i]
        path = Path(row["raster"])
        if not path.exists():
            raise FileNotFoundError(f"{path}: raster {i} of the corpus no longer exists (moved or deleted?)")
        src = _open_raster(path)
        changed = _changed_since_indexed(src, row, self.settings.warp)
        if changed:
            src.close()
            raise RasterFileError(
                f"{path}: raster {i} changed since it was indexed ({changed}); index the rasters again "
                "(geodino index) and sample new chips from that corpus"
            )
        handle: Handle = src
        if self.settings.warp:
            grid = {"crs": CRS.from_wkt(row["crs"]), "transform": Affine(*row["transform"])}
            grid |= {"width": int(row["width"]), "height": int(row["height"])}
            handle = _open_vrt(
                src, grid, self.settings, _nodata_override(src, row["bands"], self.settings.nodata)
            )
        self._handles[i] = (src, handle)
        if len(self._handles) > self.max_open:
            _close(*self._handles.popitem(last=False)[1])
        return handle

    def close(self) -> None:
        """Close this process's dataset handles (they are reopened on next use)."""
        if self._pid == os.getpid():
            for src, handle in self._handles.values():
                _close(src, handle)
        self._handles, self._pid = OrderedDict(), None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = OrderedDict(), None  # dataset handles do not pickle
        return state

    def read(self, ref: ChipRef) -> Chip:
        """Read a chip: a window (read-grid pixels, may extend past the raster) of one raster.

        Returns:
            The :class:`Chip`: ``image [C, h, w]`` of the selected bands in the raster's dtype, ``path``
            the raster file.

        Raises:
            RasterFileError: The read failed (the message names the file and window).
        """
        i, window = ref
        row = self.index.iloc[i]
        try:
            handle = self.open(i)
            nodata = _nodata_override(self._handles[i][0], row["bands"], self.settings.nodata)
            chip = read_chip(handle, window, bands=row["bands"], nodata=nodata)
            alpha = _alpha_band(handle, int(row["count"]))
            if alpha is not None:
                chip.valid &= read_chip(handle, window, bands=[alpha], fill=0).image[0] > 0
        except RasterioError as e:
            raise _read_error(row["raster"], f"chip {window}", e) from e
        chip.path = Path(row["raster"])
        return chip

    def scale(self, image: np.ndarray, raster: int) -> np.ndarray:
        """Map ``image [..., C, h, w]`` of raster ``raster`` to ``float32`` in [0, 1] per band.

        Uses the raster's levels (``scaling[raster]``, ``[2, C]``). Values are clipped; NaN becomes 0 (the
        chip's ``valid`` mask marks it). Without scaling the image is only converted to ``float32``.

        Args:
            image: Pixels ``[..., C, h, w]`` in the raster's units.
            raster: Index of the raster in the corpus (``ChipRef.raster``).
        """
        image = np.asarray(image)
        if self.scaling is None:
            return image.astype(np.float32, copy=False)
        bands = self.scaling.shape[2]
        if image.ndim < 3 or image.shape[-3] != bands:
            raise ValueError(f"expected [..., {bands}, h, w] pixels, got shape {image.shape}")
        low, high = (v.astype(np.float32)[:, None, None] for v in self.scaling[raster])
        # one new array, then in place: 4.7x faster than chained temporaries on a 512 px uint16 chip
        out = image.astype(np.float32, copy=False) - low
        out /= np.where(high > low, high - low, 1)  # a constant band maps to 0
        np.clip(out, 0, 1, out=out)
        if image.dtype.kind == "f":  # integer pixels have no NaN
            np.nan_to_num(out, copy=False, nan=0.0)
        return out

    # ---------------------------------------------------------------------------------- chip tables

    def chip_table(self, refs: Sequence[ChipRef]) -> gpd.GeoDataFrame:
        """Chip table of ``refs``, one row per ref in order (see the shared data contract).

        Columns: ``raster``, ``col_off``, ``row_off``, ``width``, ``height`` (int64, read-grid pixels),
        ``crs`` (WKT; null for a raster without CRS), ``valid_fraction`` (estimated from the valid map)
        and ``geometry`` (footprint in EPSG:4326; null for a raster without CRS).
        """
        raster = np.array([r.raster for r in refs], dtype=np.int64)
        win = np.array([[w.col_off, w.row_off, w.width, w.height] for _, w in refs], dtype=np.int64)
        win = win.reshape(-1, 4)
        geometry = np.empty(len(refs), dtype=object)
        for i in np.unique(raster):
            row, at = self.index.iloc[i], raster == i
            if pd.isna(row["crs"]):
                continue  # pixel coordinates only: no footprint
            crs, transform = CRS.from_wkt(row["crs"]), Affine(*row["transform"])
            geometry[at] = _footprints(crs, transform, win[at], _CHIP_EDGE_POINTS)
        columns = {"raster": self.index["raster"].to_numpy()[raster]}
        columns |= {k: win[:, j] for j, k in enumerate(("col_off", "row_off", "width", "height"))}
        columns["crs"] = self.index["crs"].to_numpy()[raster]
        columns["valid_fraction"] = [self.valid_maps[i].window_fraction(w) for i, w in refs]
        return gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(geometry, crs="EPSG:4326"))

    def refs(self, table: pd.DataFrame) -> list[ChipRef]:
        """The :class:`ChipRef` s of a chip table's rows, matching rasters by path.

        Raises:
            ValueError: The table lacks a column of the chip-table contract (``raster``, ``col_off``,
                ``row_off``, ``width``, ``height``), or a row names a raster that is not in the corpus.
        """
        columns = ("raster", "col_off", "row_off", "width", "height")
        missing_columns = [c for c in columns if c not in table.columns]
        if missing_columns:
            raise ValueError(f"not a chip table: no columns {missing_columns}")
        lookup = {path: i for i, path in enumerate(self.index["raster"])}
        missing = sorted(set(table["raster"]) - lookup.keys())
        if missing:
            raise ValueError(f"chip table names {len(missing)} raster(s) not in the corpus: {missing}")
        values = (table[k].to_numpy() for k in columns)
        return [
            ChipRef(lookup[p], Window(int(c), int(r), int(w), int(h)))
            for p, c, r, w, h in zip(*values, strict=True)
        ]

    def __repr__(self) -> str:
        return (
            f"RasterCorpus({len(self)} rasters, {self.settings}, percentiles={self.percentiles}, "
            f"scaling_by={self.scaling_by!r})"
        )


def _saved_scaling(table: pd.DataFrame, saved: dict[str, Any]) -> tuple[ScalingBy, np.ndarray | None]:
    """``scaling_by`` and the levels ``float64 [R, 2, C]`` (or None) of a table written by :meth:`save`.

    Files from before ``scaling_by`` hold one pooled ``scaling`` ``[2, C]`` in ``saved`` (the settings):
    it becomes every raster's row, with ``scaling_by="corpus"``.
    """
    if "scaling_by" not in saved:
        pooled = saved["scaling"]
        rows = None if pooled is None else np.repeat(np.asarray(pooled, np.float64)[None], len(table), axis=0)
        return "corpus", rows
    if saved["percentiles"] is None:
        return saved["scaling_by"], None
    columns = [np.stack(table[column].to_list()).astype(np.float64) for column in _SCALING_COLUMNS]
    return saved["scaling_by"], np.stack(columns, axis=1)


def _close(src: rasterio.DatasetReader, handle: Handle) -> None:
    if handle is not src:
        handle.close()
    src.close()


class CorpusDataset(torch.utils.data.Dataset):
    """Map-style dataset of chips of a :class:`RasterCorpus`, scaled for a model.

    Indexed by a :class:`ChipRef` (so a sampler yielding refs drives it), or by position in ``refs``.
    Returns the :class:`Chip` with ``image`` ``float32 [C, h, w]`` scaled to [0, 1] by
    :meth:`RasterCorpus.scale` (unscaled ``float32`` if the corpus has no scaling). Picklable for
    ``DataLoader`` workers: the corpus opens its files lazily in each process.

    Args:
        corpus: The corpus.
        refs: Chips for integer indexing: a list of :class:`ChipRef` or a chip table.
        scaled: Scale chips to float32 [0, 1]; False keeps raw pixel values, in the corpus' common dtype
            (``numpy.result_type`` of its rasters' dtypes, e.g. uint16 for uint8 + uint16), so that every chip
            has one dtype (e.g. to store raw chips).
    """

    def __init__(
        self,
        corpus: RasterCorpus,
        refs: Sequence[ChipRef] | pd.DataFrame | None = None,
        *,
        scaled: bool = True,
    ) -> None:
        self.corpus = corpus
        self.scaled = scaled
        self.dtype = np.result_type(*corpus.index["dtype"])
        if isinstance(refs, pd.DataFrame):
            refs = corpus.refs(refs)
        self.refs = None if refs is None else list(refs)

    def __len__(self) -> int:
        if self.refs is None:
            raise TypeError("a CorpusDataset without refs is indexed by ChipRef and has no length")
        return len(self.refs)

    def __getitem__(self, key: ChipRef | int) -> Chip:
        if not isinstance(key, ChipRef):
            if self.refs is None:
                raise TypeError(f"index a CorpusDataset without refs by ChipRef, got {type(key).__name__}")
            key = self.refs[operator.index(key)]
        chip = self.corpus.read(key)
        chip.image = (
            self.corpus.scale(chip.image, key.raster)
            if self.scaled
            else chip.image.astype(self.dtype, copy=False)
        )
        return chip
