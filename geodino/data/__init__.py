"""Data sources: synthetic scenes with ground truth (more readers and datasets to come)."""

from geodino.data.synthetic import (
    BAND_NAMES,
    CANOPY_NODATA,
    CHANGE_NODATA,
    CLASS_COLORS,
    ChangePair,
    LandCover,
    Landscape,
    SceneInfo,
    make_change_pair,
    make_landscape,
    make_scene,
    render_reflectance,
)
from geodino.data.tiling import (
    Chip,
    RasterFileError,
    RasterTiler,
    coverage_count,
    grid_windows,
    mosaic_owned,
    owned_windows,
    read_chip,
)

__all__ = [
    "BAND_NAMES",
    "CANOPY_NODATA",
    "CHANGE_NODATA",
    "CLASS_COLORS",
    "ChangePair",
    "Chip",
    "LandCover",
    "Landscape",
    "RasterFileError",
    "RasterTiler",
    "SceneInfo",
    "coverage_count",
    "grid_windows",
    "make_change_pair",
    "make_landscape",
    "make_scene",
    "mosaic_owned",
    "owned_windows",
    "read_chip",
    "render_reflectance",
]
