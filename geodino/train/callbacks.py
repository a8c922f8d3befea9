"""Lightning callbacks of pretraining: export of the EMA teacher in the official checkpoint layout."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

__all__ = ["ExportTeacher"]


class ExportTeacher(L.Callback):
    """Writes the EMA teacher as an official ``teacher_checkpoint.pth`` when training ends (rank 0 writes).

    With :class:`~geodino.train.distill.DistillationModule` it writes one file per student,
    ``<name>_teacher_checkpoint.pth`` beside ``path``.

    The file is what :func:`geodino.models.load_backbone` reads and what the next stage's ``init_from`` /
    ``gram_from`` take (see :meth:`~geodino.train.module.DINOv3Module.export_teacher`); it is written
    atomically, so a killed run never leaves a truncated export.

    Args:
        path: Output file; default ``<trainer.default_root_dir>/teacher_checkpoint.pth``.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path or Path(trainer.default_root_dir) / "teacher_checkpoint.pth"
        written = pl_module.export_teacher(path)  # every rank: gathering an FSDP teacher is collective
        if trainer.is_global_zero:
            for file in written if isinstance(written, list) else [written]:
                print(f"teacher exported to {file}")
