"""Lightning checkpoints written atomically beside their final name.

Lightning's :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` writes a local checkpoint through an
fsspec transaction: a temporary file in ``$TMPDIR``, then ``shutil.move``. Where ``$TMPDIR`` is on another
file system than the run's folder (a node-local disk on most clusters), the move falls back to copying into
the final name, so a job killed during the copy leaves a ``last.ckpt`` cut short, which every restart with
``--ckpt_path last`` then fails to read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from geodino.io import atomic_output

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves a local checkpoint to a temporary file in its own folder, synced, then renamed over the final
    name (:func:`geodino.io.atomic_output`): a checkpoint file is whole or absent, never cut short. Remote
    paths (``s3://...``) are left to Lightning. ``geodino fit`` and ``geodino distill`` use it; give it to
    a :class:`~lightning.pytorch.Trainer` as ``plugins=[AtomicCheckpointIO()]``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        fs, local = fsspec.core.url_to_fs(str(path))
        if not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(local)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            torch.save(checkpoint, tmp)
