"""Where a raster has data: a decimated valid-pixel map, for area weighting and nodata rejection.

Sampling random chips uniformly over the *valid* area of a corpus, and rejecting chips that are mostly
nodata, needs to know where each raster has data without reading it at full resolution every time. A
:class:`ValidMap` is that knowledge: a boolean mask on a coarse grid (at most ``max_side`` cells on the
long side, read through overviews where the file has them), plus the full-resolution size it stands for.

Cell ``(i, j)`` of the mask covers full-resolution rows ``[i * height / h, (i + 1) * height / h)`` and
columns likewise; a cell is valid when its sampled pixel is valid (nearest-neighbour decimation), so
fractions are estimates with an error of about one cell along the footprint's edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.windows import Window

from geodino.data.tiling import _valid_mask

__all__ = ["ValidMap", "read_valid_map"]


@dataclass(frozen=True)
class ValidMap:
    """Coarse valid-pixel mask of one raster.

    Attributes:
        valid: ``bool [h, w]`` on the coarse grid; True where the raster has data.
        height: Full-resolution raster height, pixels.
        width: Full-resolution raster width, pixels.
    """

    valid: np.ndarray
    height: int
    width: int

    @property
    def cell_size(self) -> tuple[float, float]:
        """Full-resolution pixels per coarse cell, ``(rows, cols)``."""
        h, w = self.valid.shape
        return self.height / h, self.width / w

    @property
    def valid_fraction(self) -> float:
        """Fraction of the raster's pixels that are valid (0-1)."""
        return float(self.valid.mean())

    @property
    def valid_pixels(self) -> float:
        """Estimated number of valid full-resolution pixels."""
        return self.valid_fraction * self.height * self.width

    def window_fraction(self, window: Window) -> float:
        """Estimated valid fraction (0-1) of a full-resolution ``window``; outside the raster is invalid.

        Each coarse cell is weighted by its overlap with the window, so a window smaller than a cell
        gets that cell's value.
        """
        ch, cw = self.cell_size
        r0, c0 = float(window.row_off), float(window.col_off)
        r1, c1 = r0 + float(window.height), c0 + float(window.width)
        wr = _overlap_weights(r0, r1, ch, self.valid.shape[0])
        wc = _overlap_weights(c0, c1, cw, self.valid.shape[1])
        total = float(window.height) * float(window.width)
        if total <= 0:
            return 0.0
        return float(wr @ self.valid.astype(np.float64) @ wc) / total


def _overlap_weights(a: float, b: float, cell: float, n: int) -> np.ndarray:
    """Overlap (full-resolution pixels) of ``[a, b)`` with each of ``n`` cells of ``cell`` pixels."""
    edges = np.arange(n + 1) * cell
    return np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0.0, None)


def read_valid_map(
    src: rasterio.DatasetReader,
    bands: Sequence[int] | None = None,
    *,
    nodata: float | None = None,
    max_side: int = 1024,
) -> ValidMap:
    """Read the valid-pixel map of an open raster at most ``max_side`` cells on its long side.

    Validity follows :func:`geodino.data.tiling.read_chip`: nodata (declared or ``nodata``), mask bands or
    alpha (a pixel is valid when any selected band is), and NaN in float bands.

    Args:
        src: An open rasterio dataset.
        bands: 1-based band indexes; all bands by default.
        nodata: Value marking invalid pixels, overriding the file's nodata and masks.
        max_side: Longest side of the coarse grid, cells; a smaller raster is read at full resolution.

    Returns:
        The :class:`ValidMap`.
    """
    bands = list(range(1, src.count + 1)) if bands is None else [int(b) for b in bands]
    scale = max(1.0, max(src.height, src.width) / max_side)
    shape = (max(1, math.ceil(src.height / scale)), max(1, math.ceil(src.width / scale)))
    if shape == (src.height, src.width):
        window = Window(0, 0, src.width, src.height)
        data = src.read(bands, window=window)
        valid = _valid_mask(src, data, bands, window=window, nodata=nodata)
    else:
        data = src.read(bands, out_shape=(len(bands), *shape))
        valid = _valid_mask(src, data, bands, out_shape=shape, nodata=nodata)
    return ValidMap(valid=np.ascontiguousarray(valid, dtype=bool), height=src.height, width=src.width)
