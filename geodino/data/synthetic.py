"""Synthetic very-high-resolution satellite scenes: a georeferenced GeoTIFF plus its land-cover truth.

A scene is made in two steps so that later products can share one landscape:

1. :func:`make_landscape` draws the land cover (a :class:`Landscape`): field parcels from a warped
   Voronoi (Worley) tessellation, clustered forest and a town of buildings, a lake, straight roads and
   the rotated footprint of the acquisition, which leaves a nodata collar at the raster edges.
2. :func:`render_reflectance` turns the land cover into surface reflectance per band with per-parcel
   variation and class textures (crop rows, tree crowns, building shadows, sensor noise).

Everything is deterministic from one seed: the landscape and the rendering draw from separate random
streams, so a second acquisition date or a canopy-height raster can be derived from the same
:class:`Landscape` without changing it. Sizes of landscape features are given in metres and converted
with the ground sample distance (GSD), so a scene at 0.3 m looks like the same place at 0.6 m.

Band order of the written GeoTIFF: red, green, blue, near-infrared (``BAND_NAMES``); band descriptions
and colour interpretation are set, so RGB readers find the bands by name. ``uint16`` pixels are
reflectance x 10 000 (GDAL scale 1e-4); ``uint8`` pixels are a visual product mapping reflectance
0-0.3 to 1-255. Valid pixels never equal ``nodata``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp

#: Band names in file order; the first three are the visible RGB bands.
BAND_NAMES = ("red", "green", "blue", "nir")
#: Centre wavelengths in nanometres (typical VHR sensor), written as band tags.
BAND_WAVELENGTHS_NM = (660, 545, 480, 830)
#: Upper-left corner (x, y) in metres of the default scene in UTM zone 33N (EPSG:32633), Lower Austria.
DEFAULT_ORIGIN = (500_000.0, 5_300_000.0)
#: Reflectance to uint16 digital numbers: DN = reflectance x 10 000.
UINT16_SCALE = 10_000.0
#: Reflectance mapped to 255 in the uint8 visual product.
UINT8_WHITE = 0.3


class LandCover(IntEnum):
    """Classes of the ground-truth map; 0 is nodata (outside the acquisition footprint)."""

    NODATA = 0
    WATER = 1
    FOREST = 2
    CROPLAND = 3
    GRASSLAND = 4
    BARE_SOIL = 5
    BUILDING = 6
    ROAD = 7


#: Display colours (RGB, 0-255) of each class, written as the label raster's colour table.
CLASS_COLORS: dict[LandCover, tuple[int, int, int]] = {
    LandCover.NODATA: (0, 0, 0),
    LandCover.WATER: (31, 120, 180),
    LandCover.FOREST: (27, 110, 32),
    LandCover.CROPLAND: (240, 200, 60),
    LandCover.GRASSLAND: (150, 220, 110),
    LandCover.BARE_SOIL: (170, 120, 80),
    LandCover.BUILDING: (220, 40, 40),
    LandCover.ROAD: (120, 120, 120),
}

# Surface reflectance (0-1) per class in BAND_NAMES order: red, green, blue, nir.
_SPECTRA: dict[LandCover, tuple[float, float, float, float]] = {
    LandCover.WATER: (0.025, 0.045, 0.055, 0.012),
    LandCover.FOREST: (0.028, 0.052, 0.030, 0.330),
    LandCover.CROPLAND: (0.035, 0.075, 0.035, 0.420),  # green crop; mixed with soil per parcel
    LandCover.GRASSLAND: (0.055, 0.085, 0.045, 0.300),
    LandCover.BARE_SOIL: (0.190, 0.155, 0.120, 0.250),
    LandCover.ROAD: (0.110, 0.110, 0.100, 0.130),
}
# Roof materials: red tile, grey concrete, dark bitumen, bright metal.
_ROOF_SPECTRA = np.array(
    [
        (0.230, 0.110, 0.080, 0.260),
        (0.150, 0.150, 0.150, 0.170),
        (0.070, 0.070, 0.075, 0.080),
        (0.320, 0.330, 0.340, 0.340),
    ],
    dtype=np.float32,
)

# Landscape scales, metres.
_PARCEL_SIZE_M = 70.0  # Voronoi cell spacing of field parcels
_PARCEL_WARP_M = 6.0  # amplitude of the boundary warp
_LOT_SIZE_M = 24.0  # building lot spacing in town
_STREET_WIDTH_M = 5.0
_ROAD_WIDTH_M = (5.0, 8.0)
_SCENE_PER_ROAD_M = 250.0  # one straight road per this much scene width
_WATER_FRACTION = 0.08
_SHADOW_OFFSET_M = (1.8, 1.2)  # building shadow (down, right): sun from the north-west


@dataclass(frozen=True)
class Landscape:
    """Land cover of a scene on its pixel grid, before any rendering.

    Attributes:
        classes: :class:`LandCover` codes, uint8 [H, W]; ``NODATA`` outside the footprint.
        parcel: parcel index per pixel, int32 [H, W], indexing the per-parcel arrays below.
        greenness: fraction of green vegetation (0-1) per parcel, float32 [n_parcels].
        row_angle: crop-row direction per parcel, radians, float32 [n_parcels].
        row_period_m: crop-row spacing per parcel, metres, float32 [n_parcels].
        roof: roof material index (into the roof spectra) per pixel, int8 [H, W], -1 off buildings.
        gsd: ground sample distance, metres per pixel.
    """

    classes: np.ndarray
    parcel: np.ndarray
    greenness: np.ndarray
    row_angle: np.ndarray
    row_period_m: np.ndarray
    roof: np.ndarray
    gsd: float

    @property
    def valid(self) -> np.ndarray:
        """Pixels inside the acquisition footprint, bool [H, W]."""
        return self.classes != LandCover.NODATA


@dataclass(frozen=True)
class SceneInfo:
    """A synthetic scene written to disk.

    Attributes:
        path: the multispectral GeoTIFF.
        labels_path: the land-cover GeoTIFF (same grid), or None when not written.
        transform: pixel-to-CRS affine transform (upper-left origin, metres).
        crs: coordinate reference system of ``transform``.
        gsd: ground sample distance, metres per pixel.
        bands: band names in file order.
        dtype: pixel type of the scene, "uint16" or "uint8".
        nodata: value of pixels outside the footprint.
        seed: the seed the scene was drawn from.
        landscape: the ground truth (classes uint8 [H, W] and per-parcel attributes).
    """

    path: Path
    labels_path: Path | None
    transform: Affine
    crs: CRS
    gsd: float
    bands: tuple[str, ...]
    dtype: str
    nodata: int
    seed: int
    landscape: Landscape

    @property
    def classes(self) -> np.ndarray:
        """Ground-truth :class:`LandCover` codes, uint8 [H, W]."""
        return self.landscape.classes

    @property
    def shape(self) -> tuple[int, int]:
        """Raster (height, width) in pixels."""
        return self.landscape.classes.shape


def _fast_fft_length(n: int) -> int:
    """Smallest 5-smooth integer (only factors 2, 3 and 5) >= n: a fast FFT length."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _fft_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """White noise low-pass filtered with a Gaussian of std ``scale_px`` pixels, float32 [H, W].

    Drawn on a padded grid of fast FFT lengths and cropped, so opposite edges are not correlated.
    """
    pad = math.ceil(3 * scale_px)
    padded = (_fast_fft_length(shape[0] + pad), _fast_fft_length(shape[1] + pad))
    noise = rng.standard_normal(padded, dtype=np.float32)
    fy = np.fft.fftfreq(padded[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(padded[1]).astype(np.float32)[None, :]
    kernel = np.exp(-2.0 * (np.pi * scale_px) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=padded)[: shape[0], : shape[1]].astype(np.float32)


def _upsample_bilinear(coarse: np.ndarray, shape: tuple[int, int], factor: int) -> np.ndarray:
    """Bilinear resampling of a grid whose cells are ``factor`` pixels (one cell of margin), [H, W]."""
    r = (np.arange(shape[0], dtype=np.float32) + 0.5) / factor + 0.5
    c = (np.arange(shape[1], dtype=np.float32) + 0.5) / factor + 0.5
    r0, c0 = r.astype(np.int64), c.astype(np.int64)
    wr, wc = (r - r0)[:, None], (c - c0)[None, :]
    r0, c0 = r0[:, None], c0[None, :]
    top = (1 - wc) * coarse[r0, c0] + wc * coarse[r0, c0 + 1]
    bottom = (1 - wc) * coarse[r0 + 1, c0] + wc * coarse[r0 + 1, c0 + 1]
    return (1 - wr) * top + wr * bottom


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Gaussian random field with zero mean and unit standard deviation.

    White noise low-pass filtered in the Fourier domain with a Gaussian of standard deviation
    ``scale_px``. Fields smoother than 8 pixels are drawn on a grid coarser by ``scale_px / 4`` and
    resampled bilinearly, so large correlation lengths cost no more than small ones.

    Args:
        rng: random generator.
        shape: (height, width) in pixels.
        scale_px: correlation length, pixels.

    Returns:
        float32 [height, width].
    """
    factor = max(1, int(scale_px // 4)) if scale_px >= 8 else 1
    if factor == 1:
        field = _fft_field(rng, shape, scale_px)
    else:
        coarse_shape = (math.ceil(shape[0] / factor) + 2, math.ceil(shape[1] / factor) + 2)
        field = _upsample_bilinear(_fft_field(rng, coarse_shape, scale_px / factor), shape, factor)
    return ((field - field.mean()) / max(float(field.std()), 1e-12)).astype(np.float32)


def voronoi_parcels(
    rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray, cell_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Worley tessellation: each pixel takes the nearest of one jittered seed per grid cell.

    Only the 3 x 3 neighbouring cells are searched, so the cost is 9 passes over the image whatever
    the number of parcels.

    Args:
        rng: random generator.
        rows: (possibly warped) row coordinate of every pixel, float32 [H, W], pixels.
        cols: (possibly warped) column coordinate of every pixel, float32 [H, W], pixels.
        cell_px: seed spacing, pixels.

    Returns:
        Parcel index per pixel, int32 [H, W], and the seed (row, col) of every parcel, float32
        [n_parcels, 2], pixels (seeds of the one-cell border lie outside the image).
    """
    height, width = rows.shape
    ny, nx = math.ceil(height / cell_px) + 2, math.ceil(width / cell_px) + 2
    seed_r = ((np.arange(ny)[:, None] - 1 + rng.random((ny, nx))) * cell_px).astype(np.float32)
    seed_c = ((np.arange(nx)[None, :] - 1 + rng.random((ny, nx))) * cell_px).astype(np.float32)
    cell_r = np.clip(np.floor(rows / cell_px).astype(np.int32) + 1, 1, ny - 2)
    cell_c = np.clip(np.floor(cols / cell_px).astype(np.int32) + 1, 1, nx - 2)
    best = np.full(rows.shape, np.inf, dtype=np.float32)
    parcel = np.zeros(rows.shape, dtype=np.int32)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            r, c = cell_r + dr, cell_c + dc
            dist = (rows - seed_r[r, c]) ** 2 + (cols - seed_c[r, c]) ** 2
            closer = dist < best
            best = np.where(closer, dist, best)
            parcel = np.where(closer, r * nx + c, parcel)
    return parcel, np.stack([seed_r.ravel(), seed_c.ravel()], axis=1)


def footprint_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Rotated acquisition footprint: a square tilted by 3-9 degrees, slightly smaller than the raster.

    Leaves a nodata collar a few pixels wide along the edges and wedges at the corners, like an
    orthorectified strip cut to a map grid.

    Returns:
        bool [H, W], True inside the footprint.
    """
    height, width = shape
    angle = math.radians(rng.uniform(3.0, 9.0)) * rng.choice([-1.0, 1.0])
    r = np.arange(height, dtype=np.float32)[:, None] + 0.5 - height / 2
    c = np.arange(width, dtype=np.float32)[None, :] + 0.5 - width / 2
    u = math.cos(angle) * c + math.sin(angle) * r
    v = -math.sin(angle) * c + math.cos(angle) * r
    return (np.abs(u) < 0.485 * width) & (np.abs(v) < 0.485 * height)


def road_mask(rng: np.random.Generator, shape: tuple[int, int], gsd: float) -> np.ndarray:
    """Straight roads across the scene, one per ``_SCENE_PER_ROAD_M`` of scene width (at least one).

    Args:
        rng: random generator.
        shape: (height, width) in pixels.
        gsd: ground sample distance, metres per pixel.

    Returns:
        bool [H, W], True on a road.
    """
    height, width = shape
    n_roads = max(1, round(max(height, width) * gsd / _SCENE_PER_ROAD_M))
    r = np.arange(height, dtype=np.float32)[:, None]
    c = np.arange(width, dtype=np.float32)[None, :]
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n_roads):
        r0, c0 = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        angle = rng.uniform(0.0, math.pi)
        half_width_px = rng.uniform(*_ROAD_WIDTH_M) / gsd / 2
        mask |= np.abs((r - r0) * math.cos(angle) - (c - c0) * math.sin(angle)) < half_width_px
    return mask


def town_layout(
    rng: np.random.Generator, shape: tuple[int, int], gsd: float, urban: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Buildings on a rotated lot grid inside the urban area, streets around blocks of 2 x 4 lots.

    A lot gets a building only when it lies wholly inside ``urban``, so buildings are never cut by the
    town boundary.

    Args:
        rng: random generator.
        shape: (height, width) in pixels.
        gsd: ground sample distance, metres per pixel.
        urban: bool [H, W], pixels of urban parcels.

    Returns:
        ``building`` bool [H, W], ``street`` bool [H, W] (urban pixels on block edges) and ``roof``
        int8 [H, W] (roof material index, -1 off buildings).
    """
    height, width = shape
    angle = rng.uniform(0.0, math.pi / 2)
    y = np.arange(height, dtype=np.float32)[:, None] * gsd
    x = np.arange(width, dtype=np.float32)[None, :] * gsd
    u = (x * math.cos(angle) + y * math.sin(angle)) / _LOT_SIZE_M
    v = (-x * math.sin(angle) + y * math.cos(angle)) / _LOT_SIZE_M
    lot_u, lot_v = np.floor(u).astype(np.int32), np.floor(v).astype(np.int32)
    lot_u -= lot_u.min()
    lot_v -= lot_v.min()
    n_u = int(lot_u.max()) + 1
    lot = lot_v * n_u + lot_u
    n_lots = int(lot.max()) + 1
    frac_u, frac_v = u - np.floor(u), v - np.floor(v)
    street_frac = _STREET_WIDTH_M / _LOT_SIZE_M
    # blocks of 2 x 4 lots between streets; the lot edges inside a block are gardens
    street = urban & (
        ((lot_u % 2 == 0) & (frac_u < street_frac)) | ((lot_v % 4 == 0) & (frac_v < street_frac))
    )
    lo = street_frac + rng.uniform(0.05, 0.2, size=(2, n_lots)).astype(np.float32)
    hi = rng.uniform(0.7, 0.92, size=(2, n_lots)).astype(np.float32)
    built_lot = rng.random(n_lots) < 0.85
    urban_share = np.bincount(lot.ravel(), weights=urban.ravel(), minlength=n_lots) / np.maximum(
        np.bincount(lot.ravel(), minlength=n_lots), 1
    )
    built_lot &= urban_share > 0.999
    building = (
        built_lot[lot]
        & (frac_u > lo[0][lot])
        & (frac_u < hi[0][lot])
        & (frac_v > lo[1][lot])
        & (frac_v < hi[1][lot])
    )
    roof = np.where(building, rng.integers(0, len(_ROOF_SPECTRA), size=n_lots)[lot], -1).astype(np.int8)
    return building, street, roof


def make_landscape(rng: np.random.Generator, shape: tuple[int, int], gsd: float) -> Landscape:
    """Draw the land cover of a scene.

    Parcels are assigned forest or town where a smooth zoning field is high (so both cluster),
    otherwise cropland, grassland or bare soil; a lake covers the top ``_WATER_FRACTION`` of another
    smooth field; straight roads cross everything, including water (bridges).

    Args:
        rng: random generator.
        shape: (height, width) in pixels.
        gsd: ground sample distance, metres per pixel.

    Returns:
        The :class:`Landscape`.
    """
    height, width = shape
    rows = np.arange(height, dtype=np.float32)[:, None].repeat(width, axis=1)
    cols = np.arange(width, dtype=np.float32)[None, :].repeat(height, axis=0)
    warp_px = _PARCEL_WARP_M / gsd
    rows_w = rows + warp_px * smooth_field(rng, shape, 25.0 / gsd)
    cols_w = cols + warp_px * smooth_field(rng, shape, 25.0 / gsd)
    parcel, seeds = voronoi_parcels(rng, rows_w, cols_w, _PARCEL_SIZE_M / gsd)
    n_parcels = len(seeds)

    seed_r = np.clip(seeds[:, 0].astype(np.int64), 0, height - 1)
    seed_c = np.clip(seeds[:, 1].astype(np.int64), 0, width - 1)
    town_zone = smooth_field(rng, shape, 90.0 / gsd)[seed_r, seed_c] > 0.6
    forest_zone = smooth_field(rng, shape, 70.0 / gsd)[seed_r, seed_c] > 0.4
    open_use = rng.choice(
        [LandCover.CROPLAND, LandCover.GRASSLAND, LandCover.BARE_SOIL], size=n_parcels, p=[0.55, 0.3, 0.15]
    )
    parcel_use = np.where(forest_zone, LandCover.FOREST, open_use).astype(np.uint8)
    classes = parcel_use[parcel]

    water_field = smooth_field(rng, shape, 45.0 / gsd)
    water = water_field > np.quantile(water_field, 1.0 - _WATER_FRACTION)
    urban = town_zone[parcel] & ~water
    building, street, roof = town_layout(rng, shape, gsd, urban)
    classes = np.where(urban, np.uint8(LandCover.GRASSLAND), classes)  # gardens
    classes[street] = LandCover.ROAD
    classes[building] = LandCover.BUILDING
    classes[water] = LandCover.WATER
    classes[road_mask(rng, shape, gsd)] = LandCover.ROAD
    classes[~footprint_mask(rng, shape)] = LandCover.NODATA
    roof[classes != LandCover.BUILDING] = -1
    return Landscape(
        classes=classes,
        parcel=parcel,
        greenness=rng.beta(2.0, 1.2, size=n_parcels).astype(np.float32),
        row_angle=rng.uniform(0.0, math.pi, size=n_parcels).astype(np.float32),
        row_period_m=rng.uniform(2.5, 6.0, size=n_parcels).astype(np.float32),
        roof=roof,
        gsd=gsd,
    )


def _class_texture(rng: np.random.Generator, landscape: Landscape) -> np.ndarray:
    """Multiplicative brightness texture per pixel (mean about 1), float32 [H, W]."""
    shape, gsd, classes = landscape.classes.shape, landscape.gsd, landscape.classes
    texture = np.ones(shape, dtype=np.float32)
    crowns = smooth_field(rng, shape, 1.2 / gsd)  # tree crowns, about 4 m across
    patches = smooth_field(rng, shape, 4.0 / gsd)
    ripples = smooth_field(rng, shape, 15.0 / gsd)
    forest = classes == LandCover.FOREST
    texture[forest] = np.clip(1.0 + 0.3 * crowns[forest], 0.35, 1.6)
    for cls, amplitude in ((LandCover.GRASSLAND, 0.07), (LandCover.BARE_SOIL, 0.09), (LandCover.ROAD, 0.04)):
        sel = classes == cls
        texture[sel] = 1.0 + amplitude * patches[sel]
    water = classes == LandCover.WATER
    texture[water] = 1.0 + 0.05 * ripples[water]
    return texture


def _crop_rows(landscape: Landscape) -> np.ndarray:
    """Brightness modulation of crop rows on cropland (+-8 %), 1 elsewhere, float32 [H, W]."""
    height, width = landscape.classes.shape
    y = np.arange(height, dtype=np.float32)[:, None] * landscape.gsd
    x = np.arange(width, dtype=np.float32)[None, :] * landscape.gsd
    angle = landscape.row_angle[landscape.parcel]
    phase = (x * np.cos(angle) + y * np.sin(angle)) / landscape.row_period_m[landscape.parcel]
    rows = 1.0 + 0.08 * np.sin(2 * np.pi * phase)
    return np.where(landscape.classes == LandCover.CROPLAND, rows, 1.0).astype(np.float32)


def _shadow(landscape: Landscape) -> np.ndarray:
    """Ground pixels in a building's cast shadow, bool [H, W]."""
    building = landscape.classes == LandCover.BUILDING
    dr, dc = (max(1, round(m / landscape.gsd)) for m in _SHADOW_OFFSET_M)
    cast = np.zeros_like(building)
    cast[dr:, dc:] = building[:-dr, :-dc]
    return cast & ~building


def render_reflectance(rng: np.random.Generator, landscape: Landscape, n_bands: int = 4) -> np.ndarray:
    """Surface reflectance of a landscape.

    Per-class spectra (cropland mixes green crop and soil by the parcel's greenness, roofs take their
    material), a per-parcel brightness factor (+-6 %), class textures, crop rows, building shadows
    (x 0.45) and 2 % multiplicative sensor noise.

    Args:
        rng: random generator (use a stream separate from the landscape's).
        landscape: the land cover.
        n_bands: 3 (red, green, blue) or 4 (plus near-infrared).

    Returns:
        Reflectance (0-1), float32 [n_bands, H, W]; 0 outside the footprint.
    """
    classes = landscape.classes
    spectra = np.zeros((len(LandCover), 4), dtype=np.float32)
    for cls, values in _SPECTRA.items():
        spectra[cls] = values
    refl = spectra[classes].transpose(2, 0, 1)  # [4, H, W]
    green = landscape.greenness[landscape.parcel]
    crop = classes == LandCover.CROPLAND
    crop_spectrum = green[crop] * spectra[LandCover.CROPLAND][:, None]
    refl[:, crop] = crop_spectrum + (1.0 - green[crop]) * spectra[LandCover.BARE_SOIL][:, None]
    on_roof = landscape.roof >= 0
    refl[:, on_roof] = _ROOF_SPECTRA[landscape.roof[on_roof]].T

    parcel_gain = rng.normal(1.0, 0.06, size=landscape.greenness.shape).astype(np.float32)
    brightness = parcel_gain[landscape.parcel] * _class_texture(rng, landscape) * _crop_rows(landscape)
    brightness[on_roof] = 1.0
    brightness[_shadow(landscape)] *= 0.45
    noise = rng.normal(1.0, 0.02, size=refl.shape).astype(np.float32)
    refl = refl * brightness[None] * noise
    refl[:, ~landscape.valid] = 0.0
    return refl[:n_bands]


def to_digital_numbers(reflectance: np.ndarray, valid: np.ndarray, dtype: str, nodata: int) -> np.ndarray:
    """Quantise reflectance to the stored pixel type.

    Args:
        reflectance: float32 [C, H, W], 0-1.
        valid: bool [H, W], pixels inside the footprint.
        dtype: "uint16" (DN = reflectance x 10 000, clipped to 1-10 000) or "uint8" (reflectance
            0-``UINT8_WHITE`` mapped to 1-255).
        nodata: value written outside the footprint.

    Returns:
        [C, H, W] of ``dtype``.
    """
    top = 255 if dtype == "uint8" else int(UINT16_SCALE)
    gain = 255 / UINT8_WHITE if dtype == "uint8" else UINT16_SCALE
    dn = np.clip(np.rint(reflectance * gain), 1, top).astype(dtype)
    dn[:, ~valid] = nodata
    return dn


def _check_args(size: int, bands: int, gsd: float, dtype: str, nodata: int, block_size: int) -> None:
    if block_size < 16 or block_size % 16:
        raise ValueError(f"block_size={block_size}: GeoTIFF tiles must be a positive multiple of 16 pixels")
    if size < 32:
        raise ValueError(f"size={size}: a scene needs at least 32 x 32 pixels")
    if bands not in (3, 4):
        raise ValueError(f"bands={bands}: choose 3 (red, green, blue) or 4 (plus near-infrared)")
    if not gsd > 0:
        raise ValueError(f"gsd={gsd}: the ground sample distance must be positive (metres per pixel)")
    if dtype not in ("uint8", "uint16"):
        raise ValueError(f"dtype={dtype!r}: choose 'uint8' or 'uint16'")
    top = 255 if dtype == "uint8" else int(UINT16_SCALE)
    if 1 <= nodata <= top or not 0 <= nodata <= np.iinfo(dtype).max:
        raise ValueError(
            f"nodata={nodata} collides with valid {dtype} pixels (1-{top}) or does not fit; "
            f"use 0 or a value in {top + 1}-{np.iinfo(dtype).max}"
        )


def _write_labels(path: Path, classes: np.ndarray, transform: Affine, crs: CRS) -> None:
    profile = {
        "driver": "GTiff",
        "width": classes.shape[1],
        "height": classes.shape[0],
        "count": 1,
        "dtype": "uint8",
        "crs": crs,
        "transform": transform,
        "nodata": int(LandCover.NODATA),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(classes, 1)
        dst.write_colormap(1, {int(k): (*rgb, 255) for k, rgb in CLASS_COLORS.items()})
        dst.set_band_description(1, "land cover")
        dst.update_tags(1, **{f"class_{int(c)}": c.name.lower() for c in LandCover})


def make_scene(
    path: str | Path,
    *,
    size: int = 512,
    bands: int = 4,
    gsd: float = 0.6,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = DEFAULT_ORIGIN,
    seed: int = 0,
    nodata: int = 0,
    dtype: str = "uint16",
    labels_path: str | Path | None = None,
    block_size: int = 256,
) -> SceneInfo:
    """Write a synthetic very-high-resolution scene as a tiled, DEFLATE-compressed GeoTIFF.

    Args:
        path: output GeoTIFF (parent folder must exist); overwritten if present.
        size: width and height, pixels.
        bands: 3 (red, green, blue) or 4 (plus near-infrared), in that order.
        gsd: ground sample distance, metres per pixel.
        crs: a projected CRS in metres (any string ``rasterio.crs.CRS.from_user_input`` accepts).
        origin: (x, y) of the upper-left corner in ``crs``, metres.
        seed: seed of every random draw; equal seeds give identical files.
        nodata: value outside the acquisition footprint (0, or above the valid range of ``dtype``).
        dtype: "uint16" (reflectance x 10 000) or "uint8" (visual product).
        labels_path: if given, also write the land-cover map there (uint8, same grid, colour table).
        block_size: side of the GeoTIFF's internal tiles, pixels (a multiple of 16).

    Returns:
        :class:`SceneInfo` with the transform, CRS and ground truth.

    Raises:
        ValueError: an argument out of range (the message says which and what is allowed).
    """
    _check_args(size, bands, gsd, dtype, nodata, block_size)
    path = Path(path)
    crs_obj = CRS.from_user_input(crs)
    transform = Affine(gsd, 0.0, origin[0], 0.0, -gsd, origin[1])  # north-up, upper-left origin
    land_rng, render_rng = np.random.default_rng(seed).spawn(2)
    landscape = make_landscape(land_rng, (size, size), gsd)
    reflectance = render_reflectance(render_rng, landscape, bands)
    pixels = to_digital_numbers(reflectance, landscape.valid, dtype, nodata)

    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": bands,
        "dtype": dtype,
        "crs": crs_obj,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": block_size,
        "blockysize": block_size,
        "compress": "deflate",
        "predictor": 2,
        "interleave": "pixel",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined][
            :bands
        ]
        dst.scales = (UINT8_WHITE / 255 if dtype == "uint8" else 1 / UINT16_SCALE,) * bands
        for i in range(bands):
            dst.set_band_description(i + 1, BAND_NAMES[i])
            dst.update_tags(i + 1, wavelength_nm=str(BAND_WAVELENGTHS_NM[i]))
        dst.update_tags(generator="geodino.data.synthetic", seed=str(seed), gsd_m=str(gsd))

    labels = Path(labels_path) if labels_path is not None else None
    if labels is not None:
        _write_labels(labels, landscape.classes, transform, crs_obj)
    return SceneInfo(
        path=path,
        labels_path=labels,
        transform=transform,
        crs=crs_obj,
        gsd=gsd,
        bands=BAND_NAMES[:bands],
        dtype=dtype,
        nodata=nodata,
        seed=seed,
        landscape=landscape,
    )
