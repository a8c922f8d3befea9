"""Inference on rasters: tiled DINOv3 patch features, PCA renderings and their writers."""

from geodino.inference.features import (
    FeatureMap,
    Stretch,
    check_georeferenced,
    compute_stretch,
    embed_raster,
    normalize,
    pca_rgb,
    read_rgb,
    select_rgb_bands,
    tile_spans,
    write_quicklook,
    write_rgb_geotiff,
)

__all__ = [
    "FeatureMap",
    "Stretch",
    "check_georeferenced",
    "compute_stretch",
    "embed_raster",
    "normalize",
    "pca_rgb",
    "read_rgb",
    "select_rgb_bands",
    "tile_spans",
    "write_quicklook",
    "write_rgb_geotiff",
]
