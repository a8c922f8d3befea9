"""Data layer: index, tile, sample, curate and store raster chips; synthetic scenes with ground truth."""

from geodino.data.chipstore import ChipStore, ChipStoreDataset, write_chip_store
from geodino.data.corpus import CorpusDataset, RasterCorpus, ReadSettings
from geodino.data.curation import (
    HierarchicalClusters,
    balanced_sample,
    curate,
    embed_chips,
    hierarchical_kmeans,
)
from geodino.data.loader import ChipBatch, ChipLoader, WorkerBatchSampler, collate_chips, column_bands
from geodino.data.sampler import ChipListSampler, RandomChipSampler
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
    ChipRef,
    RasterFileError,
    RasterTiler,
    coverage_count,
    grid_windows,
    mosaic_owned,
    owned_windows,
    read_chip,
)
from geodino.data.validity import ValidMap, read_valid_map

__all__ = [
    "BAND_NAMES",
    "CANOPY_NODATA",
    "CHANGE_NODATA",
    "CLASS_COLORS",
    "ChangePair",
    "Chip",
    "ChipBatch",
    "ChipListSampler",
    "ChipLoader",
    "ChipRef",
    "ChipStore",
    "ChipStoreDataset",
    "CorpusDataset",
    "HierarchicalClusters",
    "LandCover",
    "Landscape",
    "RandomChipSampler",
    "RasterCorpus",
    "RasterFileError",
    "RasterTiler",
    "ReadSettings",
    "SceneInfo",
    "ValidMap",
    "WorkerBatchSampler",
    "balanced_sample",
    "collate_chips",
    "column_bands",
    "coverage_count",
    "curate",
    "embed_chips",
    "grid_windows",
    "hierarchical_kmeans",
    "make_change_pair",
    "make_landscape",
    "make_scene",
    "mosaic_owned",
    "owned_windows",
    "read_chip",
    "read_valid_map",
    "render_reflectance",
    "write_chip_store",
]
