"""Synthetic very-high-resolution satellite scenes: a georeferenced GeoTIFF plus its ground truth.

A scene is made in steps so that later products can share one landscape:

1. :func:`make_landscape` draws the land cover (a :class:`Landscape`): field parcels from a warped
   Voronoi (Worley) tessellation, clustered forest and a town of buildings, a lake, straight roads and
   the rotated footprint of the acquisition, which leaves a nodata collar at the raster edges.
2. :func:`render_reflectance` turns the land cover into surface reflectance per band with per-parcel
   variation and class textures (crop rows, tree crowns, building shadows, sensor noise).
3. Optionally, a canopy height model (CHM, metres above ground) of the same landscape: forest stands
   8-35 m tall whose crowns are the bright crown texture of the rendering (taller where the image
   shows a sunlit crown, lower in the dark gaps between crowns), low crops and grass, 0 elsewhere.
4. :func:`make_change_pair` adds a second acquisition date of the same place with known land-cover
   changes (clear-cuts, a construction site, a pond, a new road) and with the nuisance differences a
   change detector must ignore: another footprint, illumination, haze, crop phenology and sensor noise.

Everything is deterministic from one seed: the landscape, the rendering, the canopy and the second
date draw from separate random streams, so each product of a seed is the same whether or not the
others are made. Sizes of landscape features are given in metres and converted with the ground
sample distance (GSD), so a scene at 0.3 m looks like the same place at 0.6 m.

Band order of the written GeoTIFF: red, green, blue, near-infrared (``BAND_NAMES``); band descriptions
and colour interpretation are set, so RGB readers find the bands by name. ``uint16`` pixels are
reflectance x 10 000 (GDAL scale 1e-4); ``uint8`` pixels are a visual product mapping reflectance
0-0.3 to 1-255. Valid pixels never equal ``nodata``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp

__all__ = [
    "BAND_NAMES",
    "BAND_WAVELENGTHS_NM",
    "CANOPY_NODATA",
    "CHANGE_NODATA",
    "CLASS_COLORS",
    "DEFAULT_ORIGIN",
    "UINT8_WHITE",
    "UINT16_SCALE",
    "ChangePair",
    "LandCover",
    "Landscape",
    "SceneInfo",
    "footprint_mask",
    "make_change_pair",
    "make_landscape",
    "make_scene",
    "render_reflectance",
    "road_mask",
    "smooth_field",
    "to_digital_numbers",
    "town_layout",
    "voronoi_parcels",
]

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
#: Canopy height outside the footprint (the float32 canopy GeoTIFF's nodata); valid heights are >= 0 m.
CANOPY_NODATA = -9999.0
#: Change mask and transition code outside the footprint of either date (the change GeoTIFF's nodata).
CHANGE_NODATA = 255


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

# Canopy heights, metres.
_STAND_HEIGHT_M = (8.0, 35.0)  # top height of a forest stand
_STAND_VARIATION_M = 1.5  # standard deviation of the top height within a stand
_STAND_VARIATION_SCALE_M = 25.0  # its correlation length
_CROP_HEIGHT_M = (0.3, 1.0)  # fully grown crop, scaled by the parcel's greenness
_GRASS_HEIGHT_M = (0.05, 0.5)

# Second date: one change event per this many hectares of scene (at least one of each), sizes in metres.
_HA_PER_CLEARCUT = 5.0
_HA_PER_SITE = 10.0
_HA_PER_POND = 10.0
_HA_PER_NEW_ROAD = 20.0
_CLEARCUT_M = (30.0, 60.0)  # side of a felled block
_SITE_M = (70.0, 100.0)  # side of a construction site
_POND_RADIUS_M = (8.0, 15.0)
# Second date: haze path reflectance per band relative to blue, proportional to wavelength^-2.
_HAZE_SPECTRUM = np.array([(480 / nm) ** 2 for nm in BAND_WAVELENGTHS_NM], dtype=np.float32)


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

    def clipped(self, footprint: np.ndarray) -> Landscape:
        """The landscape as one acquisition sees it: ``NODATA`` and no roof outside ``footprint``.

        Args:
            footprint: bool [H, W], True inside the acquisition footprint.
        """
        return replace(
            self,
            classes=np.where(footprint, self.classes, np.uint8(LandCover.NODATA)),
            roof=np.where(footprint, self.roof, np.int8(-1)),
        )


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
        canopy_path: the canopy height GeoTIFF (same grid), or None when not written.
        canopy_height: vegetation height above ground, metres, float32 [H, W]; ``CANOPY_NODATA``
            outside the footprint; None when not made.
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
    canopy_path: Path | None = None
    canopy_height: np.ndarray | None = field(default=None, repr=False)

    @property
    def classes(self) -> np.ndarray:
        """Ground-truth :class:`LandCover` codes, uint8 [H, W]."""
        return self.landscape.classes

    @property
    def shape(self) -> tuple[int, int]:
        """Raster (height, width) in pixels."""
        return self.landscape.classes.shape


@dataclass(frozen=True)
class ChangePair:
    """Two acquisition dates of one synthetic place, with the land-cover changes between them known.

    Attributes:
        scene_a: the first date; identical to :func:`make_scene` with the same arguments.
        scene_b: the second date on the same grid: changed land cover, its own footprint, illumination,
            haze, crop phenology and sensor noise.
        change: 1 where the land cover changed, 0 where not, ``CHANGE_NODATA`` outside the footprint of
            either date; uint8 [H, W].
        transitions: number of changed pixels per (class at date A, class at date B), most first.
        change_path: the change GeoTIFF (band 1 ``change``, band 2 ``transition``), or None.
    """

    scene_a: SceneInfo
    scene_b: SceneInfo
    change: np.ndarray = field(repr=False)
    transitions: dict[tuple[LandCover, LandCover], int]
    change_path: Path | None

    @property
    def valid(self) -> np.ndarray:
        """Pixels inside the footprints of both dates, bool [H, W]."""
        return self.change != CHANGE_NODATA

    @property
    def changed_fraction(self) -> float:
        """Share of the pixels valid on both dates whose land cover changed."""
        return float((self.change == 1).sum() / max(int(self.valid.sum()), 1))

    @property
    def transition(self) -> np.ndarray:
        """Transition code 10 x (class at date A) + (class at date B) where changed, uint8 [H, W].

        0 where unchanged and ``CHANGE_NODATA`` outside either footprint; e.g. 25 is forest to bare soil.
        """
        code = _transition_code(self.scene_a.classes, self.scene_b.classes)
        return np.where(self.valid, np.where(self.change == 1, code, 0), CHANGE_NODATA).astype(np.uint8)


def _transition_code(class_a: np.ndarray | int, class_b: np.ndarray | int) -> np.ndarray | int:
    """Code of a land-cover transition: 10 x class at date A + class at date B (at most 77)."""
    return 10 * class_a + class_b


@dataclass(frozen=True)
class _GroundTexture:
    """Brightness variation that belongs to the ground, so it is the same on every acquisition date.

    Attributes:
        parcel_gain: brightness factor per parcel (mean 1, std 0.06), float32 [n_parcels].
        crowns: tree-crown field (zero mean, unit std), crowns about 4 m across, float32 [H, W].
        patches: soil and grass patches (zero mean, unit std), about 13 m across, float32 [H, W].
        ripples: water ripples (zero mean, unit std), about 50 m across, float32 [H, W].
    """

    parcel_gain: np.ndarray
    crowns: np.ndarray
    patches: np.ndarray
    ripples: np.ndarray


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


def _rotated_rectangle(
    shape: tuple[int, int], centre: tuple[float, float], half_sides: tuple[float, float], angle: float
) -> np.ndarray:
    """Pixels whose centres lie in a rectangle turned by ``angle`` radians, bool [H, W].

    Args:
        shape: (height, width) in pixels.
        centre: (row, col) of the rectangle centre in pixel-edge coordinates (0 is the top edge).
        half_sides: half of the (across, down) sides before rotation, pixels.
        angle: rotation, radians.
    """
    r = np.arange(shape[0], dtype=np.float32)[:, None] + 0.5 - centre[0]
    c = np.arange(shape[1], dtype=np.float32)[None, :] + 0.5 - centre[1]
    u = math.cos(angle) * c + math.sin(angle) * r
    v = -math.sin(angle) * c + math.cos(angle) * r
    return (np.abs(u) < half_sides[0]) & (np.abs(v) < half_sides[1])


def footprint_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Rotated acquisition footprint: a square tilted by 3-9 degrees, slightly smaller than the raster.

    Leaves a nodata collar a few pixels wide along the edges and wedges at the corners, like an
    orthorectified strip cut to a map grid.

    Returns:
        bool [H, W], True inside the footprint.
    """
    height, width = shape
    angle = math.radians(rng.uniform(3.0, 9.0)) * rng.choice([-1.0, 1.0])
    return _rotated_rectangle(shape, (height / 2, width / 2), (0.485 * width, 0.485 * height), angle)


def _straight_road(rng: np.random.Generator, shape: tuple[int, int], gsd: float) -> np.ndarray:
    """One straight road, 5-8 m wide, through a point in the central 60 % of the scene, bool [H, W]."""
    height, width = shape
    r = np.arange(height, dtype=np.float32)[:, None]
    c = np.arange(width, dtype=np.float32)[None, :]
    r0, c0 = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    angle = rng.uniform(0.0, math.pi)
    half_width_px = rng.uniform(*_ROAD_WIDTH_M) / gsd / 2
    return np.abs((r - r0) * math.cos(angle) - (c - c0) * math.sin(angle)) < half_width_px


def road_mask(rng: np.random.Generator, shape: tuple[int, int], gsd: float) -> np.ndarray:
    """Straight roads across the scene, one per ``_SCENE_PER_ROAD_M`` of scene width (at least one).

    Args:
        rng: random generator.
        shape: (height, width) in pixels.
        gsd: ground sample distance, metres per pixel.

    Returns:
        bool [H, W], True on a road.
    """
    n_roads = max(1, round(max(shape) * gsd / _SCENE_PER_ROAD_M))
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n_roads):
        mask |= _straight_road(rng, shape, gsd)
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
    smooth field; straight roads cross everything, including water (bridges). Pixels outside the
    rotated acquisition footprint (:func:`footprint_mask`) are ``NODATA``.

    Args:
        rng: random generator.
        shape: (height, width) in pixels.
        gsd: ground sample distance, metres per pixel.

    Returns:
        The :class:`Landscape`.
    """
    world, footprint = _draw_world(rng, shape, gsd)
    return world.clipped(footprint)


def _draw_world(rng: np.random.Generator, shape: tuple[int, int], gsd: float) -> tuple[Landscape, np.ndarray]:
    """The land cover of :func:`make_landscape` on every pixel, and the footprint it is clipped to.

    A second acquisition date sees the place through another footprint, so it needs the land cover
    outside the first one too.

    Returns:
        The unclipped :class:`Landscape` (no ``NODATA``) and the footprint, bool [H, W].
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
    footprint = footprint_mask(rng, shape)
    roof[classes != LandCover.BUILDING] = -1
    world = Landscape(
        classes=classes,
        parcel=parcel,
        greenness=rng.beta(2.0, 1.2, size=n_parcels).astype(np.float32),
        row_angle=rng.uniform(0.0, math.pi, size=n_parcels).astype(np.float32),
        row_period_m=rng.uniform(2.5, 6.0, size=n_parcels).astype(np.float32),
        roof=roof,
        gsd=gsd,
    )
    return world, footprint


def _draw_ground_texture(rng: np.random.Generator, landscape: Landscape) -> _GroundTexture:
    """Draw the :class:`_GroundTexture` of a landscape's grid and parcels (not of its classes)."""
    shape, gsd = landscape.classes.shape, landscape.gsd
    return _GroundTexture(
        parcel_gain=rng.normal(1.0, 0.06, size=landscape.greenness.shape).astype(np.float32),
        crowns=smooth_field(rng, shape, 1.2 / gsd),
        patches=smooth_field(rng, shape, 4.0 / gsd),
        ripples=smooth_field(rng, shape, 15.0 / gsd),
    )


def _class_texture(landscape: Landscape, texture: _GroundTexture) -> np.ndarray:
    """Multiplicative brightness texture per pixel (mean about 1), float32 [H, W]."""
    classes = landscape.classes
    brightness = np.ones(classes.shape, dtype=np.float32)
    forest = classes == LandCover.FOREST
    brightness[forest] = np.clip(1.0 + 0.3 * texture.crowns[forest], 0.35, 1.6)
    for cls, amplitude in ((LandCover.GRASSLAND, 0.07), (LandCover.BARE_SOIL, 0.09), (LandCover.ROAD, 0.04)):
        sel = classes == cls
        brightness[sel] = 1.0 + amplitude * texture.patches[sel]
    water = classes == LandCover.WATER
    brightness[water] = 1.0 + 0.05 * texture.ripples[water]
    return brightness


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


def _surface_reflectance(landscape: Landscape, texture: _GroundTexture) -> np.ndarray:
    """Noise-free surface reflectance of a landscape with its ground texture, float32 [4, H, W].

    Per-class spectra (cropland mixes green crop and soil by the parcel's greenness, roofs take their
    material) times the per-parcel gain, class textures and crop rows; building shadows x 0.45.
    Pixels outside the footprint are not zeroed.
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

    brightness = (
        texture.parcel_gain[landscape.parcel] * _class_texture(landscape, texture) * _crop_rows(landscape)
    )
    brightness[on_roof] = 1.0
    brightness[_shadow(landscape)] *= 0.45
    return refl * brightness[None]


def _render(rng: np.random.Generator, landscape: Landscape) -> tuple[np.ndarray, _GroundTexture]:
    """:func:`render_reflectance` of all 4 bands, and the ground texture drawn for it."""
    texture = _draw_ground_texture(rng, landscape)
    refl = _surface_reflectance(landscape, texture)
    refl = refl * rng.normal(1.0, 0.02, size=refl.shape).astype(np.float32)
    refl[:, ~landscape.valid] = 0.0
    return refl, texture


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
    return _render(rng, landscape)[0][:n_bands]


def _canopy_height(rng: np.random.Generator, landscape: Landscape, texture: _GroundTexture) -> np.ndarray:
    """Canopy height model: height of the vegetation above the ground, metres.

    Forest: each stand (parcel) has a top height of 8-35 m that varies smoothly within the stand
    (std 1.5 m, over about 25 m). A pixel reaches ``top x (0.8 + 0.15 x crowns)``, at most the top
    height and at least 10 % of it, where ``crowns`` is the crown field of the ground texture, which
    also makes the rendered crowns bright: crown tops are the sunlit crowns of the image, the dark gaps
    between crowns are lower. Cropland: 0.3-1 m per parcel when fully grown, times the parcel's
    greenness. Grassland (fields and gardens): 0.05-0.5 m per parcel, varying with the grass patches.
    Water, bare soil, buildings and roads: 0.

    Args:
        rng: random generator (a stream of its own, so the scene does not depend on it).
        landscape: the land cover.
        texture: the ground texture the scene was rendered with.

    Returns:
        float32 [H, W], metres in [0, 35]; ``CANOPY_NODATA`` outside the footprint.
    """
    classes, parcel = landscape.classes, landscape.parcel
    n_parcels = len(landscape.greenness)
    stand_top = rng.uniform(*_STAND_HEIGHT_M, size=n_parcels).astype(np.float32)
    variation = smooth_field(rng, classes.shape, _STAND_VARIATION_SCALE_M / landscape.gsd)
    crop = rng.uniform(*_CROP_HEIGHT_M, size=n_parcels).astype(np.float32) * landscape.greenness
    grass = rng.uniform(*_GRASS_HEIGHT_M, size=n_parcels).astype(np.float32)

    top = np.clip(stand_top[parcel] + _STAND_VARIATION_M * variation, *_STAND_HEIGHT_M)
    forest = top * np.clip(0.8 + 0.15 * texture.crowns, 0.1, 1.0)
    meadow = grass[parcel] * np.clip(1.0 + 0.3 * texture.patches, 0.4, 1.6)
    height = np.select(
        [
            ~landscape.valid,
            classes == LandCover.FOREST,
            classes == LandCover.CROPLAND,
            classes == LandCover.GRASSLAND,
        ],
        [CANOPY_NODATA, forest, crop[parcel], meadow],
        0.0,
    )
    return height.astype(np.float32)


def _event_count(area_ha: float, ha_per_event: float) -> int:
    """Number of change events of one kind in a scene of ``area_ha`` hectares: at least one."""
    return max(1, round(area_ha / ha_per_event))


def _pick_pixels(rng: np.random.Generator, candidates: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` distinct random pixels among ``candidates`` (bool [H, W]), (row, col) int64 [k, 2]."""
    flat = np.flatnonzero(candidates)
    chosen = rng.choice(flat, size=min(n, flat.size), replace=False)
    return np.stack(np.unravel_index(chosen, candidates.shape), axis=1)


def _blocks(
    rng: np.random.Generator,
    shape: tuple[int, int],
    gsd: float,
    centres: np.ndarray,
    sides_m: tuple[float, float],
) -> np.ndarray:
    """Rectangles around ``centres`` ((row, col) [k, 2]), sides drawn in ``sides_m`` metres, any angle.

    Sides are at most a third of the scene, so that small scenes are not changed all over.

    Returns:
        Their union, bool [H, W].
    """
    mask = np.zeros(shape, dtype=bool)
    for r, c in centres:
        half_sides = np.minimum(rng.uniform(*sides_m, size=2) / gsd, min(shape) / 3) / 2
        angle = rng.uniform(0.0, math.pi)
        mask |= _rotated_rectangle(shape, (r + 0.5, c + 0.5), (half_sides[0], half_sides[1]), angle)
    return mask


def _ponds(rng: np.random.Generator, shape: tuple[int, int], gsd: float, centres: np.ndarray) -> np.ndarray:
    """Three-lobed ponds around ``centres`` ((row, col) [k, 2]), radius 8-15 m +-15 %.

    Returns:
        Their union, bool [H, W].
    """
    r = np.arange(shape[0], dtype=np.float32)[:, None]
    c = np.arange(shape[1], dtype=np.float32)[None, :]
    mask = np.zeros(shape, dtype=bool)
    for r0, c0 in centres:
        radius = rng.uniform(*_POND_RADIUS_M) / gsd
        phase = rng.uniform(0.0, 2 * math.pi)
        dr, dc = r - r0, c - c0
        mask |= np.hypot(dr, dc) < radius * (1.0 + 0.15 * np.sin(3 * np.arctan2(dr, dc) + phase))
    return mask


def _develop(rng: np.random.Generator, world: Landscape, seen: np.ndarray) -> Landscape:
    """The land cover at the second date: the first date's with clear-cuts, construction, ponds, roads.

    Each event is centred on a pixel seen on both dates; there is one clear-cut per 5 ha of scene and
    one construction site and one pond per 10 ha, one new road per 20 ha, at least one of each where
    its land cover exists. In this order:

    - clear-cut: a 30-60 m block of forest felled to bare soil;
    - construction: a 70-100 m site on cropland turns into bare ground with new buildings and streets
      on a lot grid (:func:`town_layout`);
    - pond: a pond 8-15 m in radius dug in open land (cropland, grassland or bare soil);
    - new road: a straight road 5-8 m wide across the scene, around buildings, bridging water.

    Args:
        rng: random generator.
        world: the unclipped landscape of the first date.
        seen: bool [H, W], pixels inside the footprints of both dates.

    Returns:
        The unclipped landscape of the second date (same parcels and parcel attributes).
    """
    shape, gsd = world.classes.shape, world.gsd
    area_ha = world.classes.size * gsd**2 / 1e4
    classes, roof = world.classes.copy(), world.roof.copy()

    forest = classes == LandCover.FOREST
    centres = _pick_pixels(rng, forest & seen, _event_count(area_ha, _HA_PER_CLEARCUT))
    classes[_blocks(rng, shape, gsd, centres, _CLEARCUT_M) & forest] = LandCover.BARE_SOIL

    crop = classes == LandCover.CROPLAND
    centres = _pick_pixels(rng, crop & seen, _event_count(area_ha, _HA_PER_SITE))
    site = _blocks(rng, shape, gsd, centres, _SITE_M) & crop
    building, street, site_roof = town_layout(rng, shape, gsd, site)
    classes[site] = LandCover.BARE_SOIL
    classes[street] = LandCover.ROAD
    classes[building] = LandCover.BUILDING
    roof = np.where(building, site_roof, roof)

    open_land = np.isin(classes, [LandCover.CROPLAND, LandCover.GRASSLAND, LandCover.BARE_SOIL])
    centres = _pick_pixels(rng, open_land & seen, _event_count(area_ha, _HA_PER_POND))
    classes[_ponds(rng, shape, gsd, centres) & open_land] = LandCover.WATER

    for _ in range(_event_count(area_ha, _HA_PER_NEW_ROAD)):
        classes[_straight_road(rng, shape, gsd) & (classes != LandCover.BUILDING)] = LandCover.ROAD
    return replace(world, classes=classes, roof=roof)


def _phenology(rng: np.random.Generator, greenness: np.ndarray) -> np.ndarray:
    """Crop greenness (0-1) per parcel at the second date, float32 [n_parcels].

    A seasonal shift shared by all parcels (+-0.15), a change per parcel (std 0.15) and 15 % of the
    parcels harvested (greenness 0.05): no change of land cover, but of the cropland spectra.
    """
    season = rng.uniform(-0.15, 0.15)
    grown = greenness + season + rng.normal(0.0, 0.15, size=greenness.shape)
    harvested = rng.random(greenness.shape) < 0.15
    return np.clip(np.where(harvested, 0.05, grown), 0.0, 1.0).astype(np.float32)


def _reacquire(rng: np.random.Generator, landscape: Landscape, texture: _GroundTexture) -> np.ndarray:
    """Reflectance of the second date: the same ground texture under other conditions, float32 [4, H, W].

    The surface reflectance times a sun-elevation gain (0.85-1.15, all bands) and a calibration gain
    per band (std 2 %), plus haze: path reflectance 0.005-0.02 in blue, falling with wavelength^-2
    towards the near-infrared and varying by +-50 % over about 150 m; then 1.5-3 % multiplicative
    sensor noise. 0 outside the footprint.
    """
    gain = (rng.uniform(0.85, 1.15) * rng.normal(1.0, 0.02, size=4)).astype(np.float32)
    variation = smooth_field(rng, landscape.classes.shape, 150.0 / landscape.gsd)
    haze = rng.uniform(0.005, 0.02) * np.clip(1.0 + 0.5 * variation, 0.0, None)
    refl = _surface_reflectance(landscape, texture) * gain[:, None, None]
    refl += _HAZE_SPECTRUM[:, None, None] * haze
    refl *= rng.normal(1.0, rng.uniform(0.015, 0.03), size=refl.shape).astype(np.float32)
    refl[:, ~landscape.valid] = 0.0
    return refl


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


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent random streams of a seed: landscape, rendering, canopy height and second date.

    Children of one ``SeedSequence``: each product draws the same numbers whether or not the others
    are made.
    """
    return np.random.default_rng(seed).spawn(4)


def _grid(gsd: float, crs: str, origin: tuple[float, float]) -> tuple[Affine, CRS]:
    """North-up pixel-to-CRS transform with the upper-left corner at ``origin`` (metres), and the CRS."""
    return Affine(gsd, 0.0, origin[0], 0.0, -gsd, origin[1]), CRS.from_user_input(crs)


def _profile(
    shape: tuple[int, int], count: int, dtype: str, nodata: float, transform: Affine, crs: CRS, **creation
) -> dict:
    """Rasterio profile of a tiled, DEFLATE-compressed GeoTIFF (256-pixel tiles unless overridden)."""
    return {
        "driver": "GTiff",
        "width": shape[1],
        "height": shape[0],
        "count": count,
        "dtype": dtype,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        **creation,
    }


def _write_scene(
    path: Path,
    reflectance: np.ndarray,
    landscape: Landscape,
    transform: Affine,
    crs: CRS,
    *,
    dtype: str,
    nodata: int,
    block_size: int,
    seed: int,
) -> SceneInfo:
    """Quantise reflectance ([bands, H, W], 0-1) to ``dtype`` and write it with band metadata."""
    bands = reflectance.shape[0]
    pixels = to_digital_numbers(reflectance, landscape.valid, dtype, nodata)
    profile = _profile(
        pixels.shape[1:],
        bands,
        dtype,
        nodata,
        transform,
        crs,
        blockxsize=block_size,
        blockysize=block_size,
        predictor=2,
        interleave="pixel",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined][
            :bands
        ]
        dst.scales = (UINT8_WHITE / 255 if dtype == "uint8" else 1 / UINT16_SCALE,) * bands
        for i in range(bands):
            dst.set_band_description(i + 1, BAND_NAMES[i])
            dst.update_tags(i + 1, wavelength_nm=str(BAND_WAVELENGTHS_NM[i]))
        dst.update_tags(generator="geodino.data.synthetic", seed=str(seed), gsd_m=str(landscape.gsd))
    return SceneInfo(
        path=path,
        labels_path=None,
        transform=transform,
        crs=crs,
        gsd=landscape.gsd,
        bands=BAND_NAMES[:bands],
        dtype=dtype,
        nodata=nodata,
        seed=seed,
        landscape=landscape,
    )


def _write_labels(path: Path, classes: np.ndarray, transform: Affine, crs: CRS) -> None:
    profile = _profile(classes.shape, 1, "uint8", int(LandCover.NODATA), transform, crs)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(classes, 1)
        dst.write_colormap(1, {int(k): (*rgb, 255) for k, rgb in CLASS_COLORS.items()})
        dst.set_band_description(1, "land cover")
        dst.update_tags(1, **{f"class_{int(c)}": c.name.lower() for c in LandCover})


def _write_canopy(path: Path, height: np.ndarray, transform: Affine, crs: CRS) -> None:
    profile = _profile(height.shape, 1, "float32", CANOPY_NODATA, transform, crs, predictor=3)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(height, 1)
        dst.set_band_description(1, "canopy_height_m")
        dst.units = ("m",)


def _write_change(path: Path, pair: ChangePair) -> None:
    profile = _profile(pair.change.shape, 2, "uint8", CHANGE_NODATA, pair.scene_a.transform, pair.scene_a.crs)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.stack([pair.change, pair.transition]))
        dst.set_band_description(1, "change")
        dst.set_band_description(2, "transition")
        dst.update_tags(1, value_0="unchanged", value_1="changed")
        dst.update_tags(
            2,
            value_0="unchanged",
            **{
                f"value_{_transition_code(a, b)}": f"{a.name.lower()} to {b.name.lower()}"
                for a, b in pair.transitions
            },
        )


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
    canopy_path: str | Path | None = None,
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
        canopy_path: if given, also write the canopy height model there (float32 metres above
            ground, same grid, band "canopy_height_m", nodata ``CANOPY_NODATA``); the scene itself is
            the same with or without it.

    Returns:
        :class:`SceneInfo` with the transform, CRS and ground truth.

    Raises:
        ValueError: an argument out of range (the message says which and what is allowed).
    """
    _check_args(size, bands, gsd, dtype, nodata, block_size)
    transform, crs_obj = _grid(gsd, crs, origin)
    land_rng, render_rng, canopy_rng, _ = _streams(seed)
    landscape = make_landscape(land_rng, (size, size), gsd)
    reflectance, texture = _render(render_rng, landscape)
    info = _write_scene(
        Path(path),
        reflectance[:bands],
        landscape,
        transform,
        crs_obj,
        dtype=dtype,
        nodata=nodata,
        block_size=block_size,
        seed=seed,
    )
    labels = Path(labels_path) if labels_path is not None else None
    if labels is not None:
        _write_labels(labels, landscape.classes, transform, crs_obj)
    canopy = Path(canopy_path) if canopy_path is not None else None
    height = None
    if canopy is not None:
        height = _canopy_height(canopy_rng, landscape, texture)
        _write_canopy(canopy, height, transform, crs_obj)
    return replace(info, labels_path=labels, canopy_path=canopy, canopy_height=height)


def _transition_counts(
    classes_a: np.ndarray, classes_b: np.ndarray
) -> dict[tuple[LandCover, LandCover], int]:
    """Number of pixels per (class at date A, class at date B) among the given pixels, most first."""
    pairs, counts = np.unique(np.stack([classes_a, classes_b]), axis=1, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return {(LandCover(pairs[0, i]), LandCover(pairs[1, i])): int(counts[i]) for i in order}


def make_change_pair(
    path_a: str | Path,
    path_b: str | Path,
    *,
    change_path: str | Path | None = None,
    size: int = 512,
    bands: int = 4,
    gsd: float = 0.6,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = DEFAULT_ORIGIN,
    seed: int = 0,
    nodata: int = 0,
    dtype: str = "uint16",
    block_size: int = 256,
) -> ChangePair:
    """Write two acquisition dates of one synthetic place with known land-cover change.

    Date A is exactly the scene of :func:`make_scene` with the same arguments. Date B, on the same
    grid, sees the place after clear-cuts, construction of new buildings on cropland, a new pond and
    a new road (about 10-15 % of the pixels of a 512 x 512 scene at 0.6 m, 9 ha; small scenes, which
    still get one event of each kind, change more: about 25 % at 128 x 128), through its own rotated
    footprint, and with the differences a change detector must ignore: crop phenology (greener or
    browner parcels, harvests), another sun elevation and calibration, spatially varying haze and new
    sensor noise. Tree crowns, soil patches and parcel brightness stay where they were; new buildings
    cast new shadows. The random draws of date B come from a stream of their own, in this order:
    footprint, land-cover changes, phenology, acquisition.

    Args:
        path_a: output GeoTIFF of date A (parent folder must exist); overwritten if present.
        path_b: output GeoTIFF of date B, same format.
        change_path: if given, also write the change there: uint8, same grid, nodata ``CHANGE_NODATA``
            outside the footprint of either date; band 1 "change" (1 changed, 0 unchanged), band 2
            "transition" (10 x class at A + class at B where changed, e.g. 25 forest to bare soil; 0
            unchanged; the codes present are named in the band's tags).
        size: width and height, pixels.
        bands: 3 (red, green, blue) or 4 (plus near-infrared), in that order.
        gsd: ground sample distance, metres per pixel.
        crs: a projected CRS in metres.
        origin: (x, y) of the upper-left corner in ``crs``, metres.
        seed: seed of every random draw; equal seeds give identical files.
        nodata: value outside the acquisition footprints (0, or above the valid range of ``dtype``).
        dtype: "uint16" (reflectance x 10 000) or "uint8" (visual product).
        block_size: side of the GeoTIFF's internal tiles, pixels (a multiple of 16).

    Returns:
        :class:`ChangePair` with both scenes, the change mask and the transitions.

    Raises:
        ValueError: an argument out of range, or two outputs on the same file.
    """
    _check_args(size, bands, gsd, dtype, nodata, block_size)
    outputs = [Path(p) for p in (path_a, path_b, change_path) if p is not None]
    if len({p.resolve() for p in outputs}) < len(outputs):
        raise ValueError(
            f"outputs {[str(p) for p in outputs]}: each date and the change need a file of their own"
        )
    transform, crs_obj = _grid(gsd, crs, origin)
    land_rng, render_rng, _, change_rng = _streams(seed)
    world, footprint_a = _draw_world(land_rng, (size, size), gsd)
    landscape_a = world.clipped(footprint_a)
    reflectance_a, texture = _render(render_rng, landscape_a)
    footprint_b = footprint_mask(change_rng, (size, size))
    world_b = _develop(change_rng, world, footprint_a & footprint_b)
    landscape_b = replace(world_b, greenness=_phenology(change_rng, world.greenness)).clipped(footprint_b)
    reflectance_b = _reacquire(change_rng, landscape_b, texture)

    written = {"dtype": dtype, "nodata": nodata, "block_size": block_size, "seed": seed}
    scene_a = _write_scene(outputs[0], reflectance_a[:bands], landscape_a, transform, crs_obj, **written)
    scene_b = _write_scene(outputs[1], reflectance_b[:bands], landscape_b, transform, crs_obj, **written)
    seen = landscape_a.valid & landscape_b.valid
    changed = seen & (landscape_a.classes != landscape_b.classes)
    pair = ChangePair(
        scene_a=scene_a,
        scene_b=scene_b,
        change=np.where(seen, changed, CHANGE_NODATA).astype(np.uint8),
        transitions=_transition_counts(landscape_a.classes[changed], landscape_b.classes[changed]),
        change_path=Path(change_path) if change_path is not None else None,
    )
    if pair.change_path is not None:
        _write_change(pair.change_path, pair)
    return pair
