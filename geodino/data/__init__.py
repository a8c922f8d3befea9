"""Data sources: synthetic scenes with ground truth (more readers and datasets to come)."""

from geodino.data.synthetic import (
    BAND_NAMES,
    CLASS_COLORS,
    LandCover,
    Landscape,
    SceneInfo,
    make_landscape,
    make_scene,
    render_reflectance,
)

__all__ = [
    "BAND_NAMES",
    "CLASS_COLORS",
    "LandCover",
    "Landscape",
    "SceneInfo",
    "make_landscape",
    "make_scene",
    "render_reflectance",
]
