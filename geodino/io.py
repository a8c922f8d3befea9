"""Writing outputs safely: a file appears complete or not at all.

Every geodino output (GeoTIFFs, GeoParquet tables, exported checkpoints) is written to a temporary file
beside its destination and moved over it with ``os.replace`` (atomic on POSIX and Windows within one
file system), so an interrupted job never leaves a partial file that looks complete.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import geopandas as gpd

__all__ = ["atomic_output", "write_geoparquet"]


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Give a temporary path beside ``path``, moved over ``path`` (``os.replace``) when the block succeeds.

    Readers never see a half-written file; on error the temporary file is removed and ``path`` is left
    as it was. The written file is synced to disk before the rename, so a crash right after it cannot
    leave an empty file under the final name either.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_geoparquet(table: gpd.GeoDataFrame, path: str | os.PathLike) -> Path:
    """Write a GeoDataFrame as GeoParquet, atomically; returns the path."""
    path = Path(path)
    with atomic_output(path) as tmp:
        table.to_parquet(tmp)
    return path
