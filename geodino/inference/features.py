"""From a GeoTIFF to a georeferenced map of DINOv3 patch features, and its PCA false-colour rendering.

Reading: the RGB bands are found by band description or colour interpretation (or given as 1-based
indexes), scaled to [0, 1] and normalised with the backbone preset's mean and std:

* ``uint8`` rasters are divided by 255 (they are already display products);
* any other type (``uint16`` reflectance, ``float32``, ...) gets a per-band linear 2-98 percentile
  stretch computed once over the valid pixels of the whole raster (on a decimated read of at most
  about a million pixels), so every tile of a raster is scaled the same way.

Embedding: the raster is cut into overlapping square tiles on the patch grid; each tile keeps the
features of its central part (the overlap is split half-way between neighbours), so tile seams see
context from both sides. Edge tiles are padded to whole patches. Nodata pixels enter the model as the
mean colour (0 after normalisation) and a patch is valid when at least ``min_valid`` of its pixels
are. The feature map's transform is the raster's scaled by the patch size: one feature pixel per
patch, same CRS and upper-left corner.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.io import DatasetReader
from rasterio.windows import Window
from torch import nn
from tqdm.auto import tqdm

from geodino.io import atomic_output
from geodino.models import BackbonePreset, get_preset

#: Percentiles of the per-band linear stretch of non-uint8 rasters.
DEFAULT_PERCENTILES = (2.0, 98.0)
#: Pixels read (at most, about) to estimate the stretch of a large raster.
STRETCH_SAMPLE_PIXELS = 1_000_000
_RGB_NAMES = (("red", "r"), ("green", "g"), ("blue", "b"))
_RGB_INTERP = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)


@dataclass(frozen=True)
class Stretch:
    """Per-band linear scaling of raw pixel values to [0, 1]: ``(x - low) / (high - low)``, clipped.

    Attributes:
        low: value mapped to 0 per band, float64 [C].
        high: value mapped to 1 per band, float64 [C].
    """

    low: np.ndarray
    high: np.ndarray

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Scale raw pixels [C, H, W] to float32 [C, H, W] in [0, 1]."""
        low = self.low.astype(np.float32)[:, None, None]
        span = (self.high - self.low).astype(np.float32)[:, None, None]
        return np.clip((pixels.astype(np.float32) - low) / span, 0.0, 1.0)


@dataclass(frozen=True)
class FeatureMap:
    """Patch features of a raster on its patch grid.

    Attributes:
        features: float32 [E, h, w], one E-dimensional feature per patch; 0 where not ``valid``.
        valid: bool [h, w], patches with enough valid (non-nodata) pixels.
        transform: affine transform of the patch grid (the raster's scaled by ``patch_size``).
        crs: CRS of the raster.
        patch_size: raster pixels per patch side.
        source: the embedded raster.
    """

    features: np.ndarray
    valid: np.ndarray
    transform: Affine
    crs: CRS
    patch_size: int
    source: Path

    @property
    def shape(self) -> tuple[int, int]:
        """Patch grid (h, w)."""
        return self.valid.shape


def check_georeferenced(src: DatasetReader) -> None:
    """Raise if a raster cannot be placed on a map.

    Raises:
        ValueError: no CRS, or no geotransform (identity transform).
    """
    if src.crs is None:
        raise ValueError(
            f"{src.name}: the raster has no CRS, so its features cannot be georeferenced; assign the "
            f"right one, e.g. `rio edit-info --crs EPSG:32633 {src.name}`"
        )
    if src.transform == Affine.identity():
        raise ValueError(
            f"{src.name}: the raster has no geotransform (pixel grid only); write one, e.g. "
            f"`rio edit-info --transform '[x_res, 0, x_min, 0, -y_res, y_max]' {src.name}`"
        )


def select_rgb_bands(src: DatasetReader, rgb_bands: Sequence[int] | None = None) -> tuple[int, int, int]:
    """1-based indexes of the red, green and blue bands of a raster.

    Looks for band descriptions "red"/"green"/"blue" (or "r"/"g"/"b", any case), then for the RGB
    colour interpretation; a 3-band raster without either is taken as R, G, B.

    Args:
        src: open raster.
        rgb_bands: explicit indexes (red, green, blue), checked against the band count.

    Raises:
        ValueError: fewer than 3 bands, bad explicit indexes, or more than 3 unlabelled bands.
    """
    if src.count < 3:
        raise ValueError(f"{src.name}: {src.count} band(s); RGB features need at least 3 (red, green, blue)")
    if rgb_bands is not None:
        bands = tuple(int(b) for b in rgb_bands)
        if len(bands) != 3 or not all(1 <= b <= src.count for b in bands):
            raise ValueError(f"{src.name}: rgb_bands={rgb_bands} must be 3 indexes in 1..{src.count}")
        return bands  # type: ignore[return-value]
    names = [(d or "").strip().lower() for d in src.descriptions]
    by_name = [next((i + 1 for i, n in enumerate(names) if n in options), None) for options in _RGB_NAMES]
    if all(by_name):
        return tuple(by_name)  # type: ignore[return-value]
    interp = list(src.colorinterp)
    by_interp = [interp.index(ci) + 1 if ci in interp else None for ci in _RGB_INTERP]
    if all(by_interp):
        return tuple(by_interp)  # type: ignore[return-value]
    if src.count == 3:
        return (1, 2, 3)
    raise ValueError(
        f"{src.name}: cannot tell which of its {src.count} bands are red, green and blue (no band "
        "descriptions or colour interpretation); pass them explicitly, e.g. rgb_bands=(3, 2, 1)"
    )


def compute_stretch(
    src: DatasetReader, bands: Sequence[int], percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> Stretch:
    """Scaling of a raster's bands to [0, 1]: /255 for uint8, else a per-band percentile stretch.

    The percentiles are taken over valid pixels of a nearest-neighbour decimated read of at most about
    ``STRETCH_SAMPLE_PIXELS`` pixels.

    Args:
        src: open raster.
        bands: 1-based band indexes.
        percentiles: (low, high) percentiles mapped to 0 and 1.

    Raises:
        ValueError: every pixel of the bands is nodata.
    """
    if all(src.dtypes[b - 1] == "uint8" for b in bands):
        return Stretch(low=np.zeros(len(bands)), high=np.full(len(bands), 255.0))
    factor = max(1.0, math.sqrt(src.height * src.width / STRETCH_SAMPLE_PIXELS))
    out_shape = (len(bands), max(1, round(src.height / factor)), max(1, round(src.width / factor)))
    sample = src.read(list(bands), out_shape=out_shape, masked=True, resampling=Resampling.nearest)
    valid = ~np.ma.getmaskarray(sample).any(axis=0)
    if not valid.any():
        raise ValueError(
            f"{src.name}: every pixel of bands {list(bands)} is nodata (nodata={src.nodata}); check the "
            "file's nodata value (`rio info`) or the band selection"
        )
    values = np.asarray(sample.data[:, valid], dtype=np.float64)
    low, high = np.percentile(values, percentiles, axis=1)
    return Stretch(low=low, high=np.maximum(high, low + 1e-6))


def _read_rgb(
    src: DatasetReader,
    bands: Sequence[int],
    stretch: Stretch,
    window: Window | None = None,
    out_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """RGB in [0, 1] (float32 [3, H, W], 0 on nodata) and valid pixels (bool [H, W]) of a window."""
    shape = None if out_shape is None else (len(bands), *out_shape)
    pixels = src.read(list(bands), window=window, out_shape=shape, masked=True, resampling=Resampling.nearest)
    valid = ~np.ma.getmaskarray(pixels).any(axis=0)
    rgb = stretch.apply(pixels.data)
    rgb[:, ~valid] = 0.0
    return rgb, valid


def read_rgb(
    path: str | os.PathLike,
    *,
    rgb_bands: Sequence[int] | None = None,
    stretch: Stretch | None = None,
    window: Window | None = None,
    max_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read the RGB bands of a GeoTIFF (or a window of it) scaled to [0, 1].

    Args:
        path: raster file.
        rgb_bands: 1-based (red, green, blue) indexes; found from band metadata when None.
        stretch: scaling to [0, 1]; computed over the whole raster when None (see module docs).
        window: pixel window to read; the whole raster when None.
        max_size: if set, decimate (nearest) so the longer side has at most this many pixels.

    Returns:
        RGB float32 [3, H, W] in [0, 1] (0 on nodata) and the valid-pixel mask, bool [H, W].
    """
    with rasterio.open(path) as src:
        bands = select_rgb_bands(src, rgb_bands)
        stretch = stretch if stretch is not None else compute_stretch(src, bands)
        height, width = (src.height, src.width) if window is None else (int(window.height), int(window.width))
        out_shape = None
        if max_size is not None and max(height, width) > max_size:
            scale = max_size / max(height, width)
            out_shape = (max(1, round(height * scale)), max(1, round(width * scale)))
        return _read_rgb(src, bands, stretch, window, out_shape)


def normalize(rgb: np.ndarray, valid: np.ndarray, preset: BackbonePreset) -> torch.Tensor:
    """Normalise [0, 1] RGB with the preset's mean and std; nodata pixels become 0 (the mean colour).

    Args:
        rgb: float32 [3, H, W] in [0, 1].
        valid: bool [H, W].
        preset: backbone preset whose ``mean``/``std`` the weights expect.

    Returns:
        float32 tensor [3, H, W].
    """
    mean = np.asarray(preset.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(preset.std, dtype=np.float32)[:, None, None]
    return torch.from_numpy(np.where(valid, (rgb - mean) / std, 0.0).astype(np.float32))


def tile_spans(n: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Overlapping tiles along one axis and the part of the axis each one owns.

    Tiles start every ``tile - overlap`` units, the last one flush with the end; the overlap between
    neighbours is split half-way. Units are whatever the caller uses (patches here).

    Args:
        n: axis length.
        tile: tile length (the whole axis when ``n <= tile``).
        overlap: minimum overlap of neighbouring tiles, ``0 <= overlap < tile``.

    Returns:
        (start, stop, own_start, own_stop) per tile; the owned parts partition ``range(n)``.
    """
    if n <= tile:
        return [(0, n, 0, n)]
    starts = [*range(0, n - tile, tile - overlap), n - tile]
    cuts = [0, *((a + tile + b) // 2 for a, b in itertools.pairwise(starts)), n]
    return [(s, s + tile, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def _embed_window(
    model: nn.Module,
    src: DatasetReader,
    bands: Sequence[int],
    stretch: Stretch,
    preset: BackbonePreset,
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Features of one tile given by its (start, stop) patch rows and columns.

    Reads the window (clipped to the raster), pads it to whole patches as nodata, normalises it and
    runs the model.

    Returns:
        Final-layer patch features, float32 [E, h, w], and each patch's fraction of valid pixels,
        float [h, w].
    """
    patch = preset.patch_size
    height, width = (rows[1] - rows[0]) * patch, (cols[1] - cols[0]) * patch
    window = Window.from_slices(
        (rows[0] * patch, min(rows[1] * patch, src.height)),
        (cols[0] * patch, min(cols[1] * patch, src.width)),
    )
    rgb, ok = _read_rgb(src, bands, stretch, window)
    pad = ((0, height - ok.shape[0]), (0, width - ok.shape[1]))
    rgb, ok = np.pad(rgb, ((0, 0), *pad)), np.pad(ok, pad)
    param = next(model.parameters())
    x = normalize(rgb, ok, preset)[None].to(device=param.device, dtype=param.dtype)
    (features,) = model.get_intermediate_layers(x, n=1, reshape=True, norm=True)
    expected = (1, preset.embed_dim, height // patch, width // patch)
    if tuple(features.shape) != expected:
        raise ValueError(
            f"the model gave features {tuple(features.shape)} for a {height}x{width} tile, expected "
            f"{expected}: is it the {preset.name} backbone?"
        )
    fraction = ok.reshape(height // patch, patch, width // patch, patch).mean(axis=(1, 3))
    return features[0].float().cpu().numpy(), fraction


def _check_tiling(tile: int, overlap: int, patch: int) -> None:
    if tile <= 0 or tile % patch:
        raise ValueError(f"tile={tile}: must be a positive multiple of the patch size {patch} pixels")
    if overlap < 0 or overlap % patch or overlap >= tile:
        raise ValueError(f"overlap={overlap}: must be a multiple of {patch} pixels in [0, tile={tile})")


def embed_raster(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    preset: BackbonePreset | str,
    tile: int = 512,
    overlap: int = 64,
    rgb_bands: Sequence[int] | None = None,
    stretch: Stretch | None = None,
    min_valid: float = 0.5,
    progress: bool = True,
) -> FeatureMap:
    """Embed a GeoTIFF with a DINOv3 backbone, tile by tile, into a georeferenced patch-feature map.

    The model runs under ``torch.inference_mode`` on the device and dtype of its parameters; put it
    in eval mode first. The patch grid covers the raster rounded up to whole patches.

    Args:
        model: backbone with ``get_intermediate_layers(x, n=1, reshape=True, norm=True)``.
        path: raster with a CRS, a geotransform and at least 3 bands.
        preset: the backbone's preset (or its name): normalisation, patch size and width.
        tile: tile side, pixels (a multiple of the patch size).
        overlap: minimum overlap of neighbouring tiles, pixels (a multiple of the patch size).
        rgb_bands: 1-based (red, green, blue) band indexes; found from band metadata when None.
        stretch: scaling to [0, 1]; from the whole raster when None (see module docs).
        min_valid: fraction of valid pixels a patch needs to be valid.
        progress: show a tqdm progress bar over tiles.

    Returns:
        :class:`FeatureMap` with features float32 [E, ceil(H/p), ceil(W/p)].

    Raises:
        ValueError: a raster without CRS/geotransform, fewer than 3 bands, all nodata, or bad tiling.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    patch = preset.patch_size
    _check_tiling(tile, overlap, patch)
    path = Path(path)
    with rasterio.open(path) as src:
        check_georeferenced(src)
        bands = select_rgb_bands(src, rgb_bands)
        stretch = stretch if stretch is not None else compute_stretch(src, bands)
        grid = (math.ceil(src.height / patch), math.ceil(src.width / patch))
        features = np.zeros((preset.embed_dim, *grid), dtype=np.float32)
        valid = np.zeros(grid, dtype=bool)
        row_spans = tile_spans(grid[0], tile // patch, overlap // patch)
        col_spans = tile_spans(grid[1], tile // patch, overlap // patch)
        bar = tqdm(
            total=len(row_spans) * len(col_spans),
            desc=f"embedding {path.name}",
            unit="tile",
            disable=not progress,
        )
        with torch.inference_mode(), bar:
            for rows, cols in itertools.product(row_spans, col_spans):
                tile_features, fraction = _embed_window(
                    model, src, bands, stretch, preset, rows[:2], cols[:2]
                )
                own = np.s_[rows[2] - rows[0] : rows[3] - rows[0], cols[2] - cols[0] : cols[3] - cols[0]]
                features[:, rows[2] : rows[3], cols[2] : cols[3]] = tile_features[(slice(None), *own)]
                valid[rows[2] : rows[3], cols[2] : cols[3]] = fraction[own] >= min_valid
                bar.update()
        t = src.transform  # composed with a scaling by the patch size: one feature pixel per patch
        transform, crs = Affine(t.a * patch, t.b * patch, t.c, t.d * patch, t.e * patch, t.f), src.crs
    features[:, ~valid] = 0.0
    return FeatureMap(
        features=features, valid=valid, transform=transform, crs=crs, patch_size=patch, source=path
    )


def pca_rgb(
    features: np.ndarray,
    valid: np.ndarray,
    n_components: int = 3,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> np.ndarray:
    """Project features on their first principal components and scale each to uint8 for display.

    The principal axes come from the exact eigendecomposition of the covariance of the valid features
    (deterministic; each axis signed so its largest loading is positive). Each component is stretched
    linearly between its ``percentiles`` over valid patches to 1-255; invalid patches are 0 (nodata).

    Args:
        features: float [E, h, w].
        valid: bool [h, w].
        n_components: components to keep (3 for an RGB rendering).
        percentiles: (low, high) percentiles of each component mapped to 1 and 255.

    Returns:
        uint8 [n_components, h, w].

    Raises:
        ValueError: fewer valid patches than ``n_components + 1``, or more components than features.
    """
    dim = features.shape[0]
    samples = torch.from_numpy(features.reshape(dim, -1)[:, valid.ravel()].T).double()  # [N, E]
    if samples.shape[0] <= n_components or n_components > dim:
        raise ValueError(
            f"PCA with {n_components} components needs more than {n_components} valid patches and at most "
            f"{dim} features; got {samples.shape[0]} valid patches of {valid.size}"
        )
    centred = samples - samples.mean(dim=0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # eigenvalues ascending
    axes = vectors[:, -n_components:].flip(-1)  # [E, n]
    signs = torch.sign(axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)))
    projected = (centred @ (axes * signs)).numpy()  # [N, n]
    low, high = np.percentile(projected, percentiles, axis=0)
    scaled = np.clip((projected - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)
    out = np.zeros((n_components, valid.size), dtype=np.uint8)
    out[:, valid.ravel()] = np.rint(1 + 254 * scaled).T.astype(np.uint8)
    return out.reshape(n_components, *valid.shape)


def write_rgb_geotiff(
    path: str | os.PathLike,
    image: np.ndarray,
    *,
    transform: Affine,
    crs: CRS,
    nodata: int = 0,
    descriptions: Sequence[str] = ("pc1", "pc2", "pc3"),
) -> Path:
    """Write a uint8 image as a tiled, DEFLATE-compressed GeoTIFF, atomically.

    Args:
        path: output file; its folder must exist.
        image: uint8 [C, h, w] (C = len(descriptions)).
        transform: affine transform of the image grid (e.g. :attr:`FeatureMap.transform`).
        crs: CRS of ``transform``.
        nodata: value of invalid pixels.
        descriptions: band descriptions.

    Returns:
        ``path``.
    """
    path = Path(path)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != len(descriptions):
        raise ValueError(
            f"{path}: expected uint8 [{len(descriptions)}, h, w], got {image.dtype} {image.shape}"
        )
    profile = {
        "driver": "GTiff",
        "count": image.shape[0],
        "height": image.shape[1],
        "width": image.shape[2],
        "dtype": "uint8",
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "photometric": "RGB" if image.shape[0] == 3 else "MINISBLACK",
    }
    with atomic_output(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(image)
        for i, description in enumerate(descriptions, start=1):
            dst.set_band_description(i, description)
    return path


def write_quicklook(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, np.ndarray]],
    *,
    title: str | None = None,
    panel_inches: float = 4.0,
    dpi: int = 100,
) -> Path:
    """Write images side by side as a PNG, atomically (matplotlib, no pyplot state).

    Panels are drawn over the same extent, so maps of different resolution (a raster and its patch
    grid) line up; each is shown with nearest-neighbour interpolation.

    Args:
        path: output PNG; its folder must exist.
        panels: (title, image) pairs; images are [H, W, 3] uint8 or float in [0, 1].
        title: figure title.
        panel_inches: width of each panel, inches.
        dpi: resolution, dots per inch.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(panel_inches * len(panels), panel_inches + (0.6 if title else 0.3)), dpi=dpi)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    aspect = panels[0][1].shape[0] / panels[0][1].shape[1]  # height / width of the first panel
    for ax, (name, image) in zip(axes, panels, strict=True):
        ax.imshow(image, interpolation="nearest", extent=(0.0, 1.0, 0.0, aspect))
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
