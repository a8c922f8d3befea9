"""Lightning callbacks of pretraining: export of the EMA teacher in the official checkpoint layout, and the
share of time the training loop waits for batches."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["DataWaitMonitor", "ExportTeacher"]


class ExportTeacher(L.Callback):
    """Writes the EMA teacher as an official ``teacher_checkpoint.pth`` when training ends (rank 0 writes),
    and brings each ModelCheckpoint's ``last.ckpt`` to that step.

    With :class:`~geodino.train.distill.DistillationModule` it writes one file per student,
    ``<name>_teacher_checkpoint.pth`` beside ``path``.

    The file is what :func:`geodino.models.load_backbone` reads and what the next stage's ``init_from`` /
    ``gram_from`` take (see :meth:`~geodino.train.module.DINOv3Module.export_teacher`); it is written
    atomically, so a killed run never leaves a truncated export. The next stage's ``continue_from`` takes
    ``last.ckpt``: Lightning writes a final one only when the run saved no checkpoint before, so a run whose
    ``max_steps`` is no multiple of ``every_n_train_steps`` would leave it behind the export.

    Args:
        path: Output file; default ``<trainer.default_root_dir>/teacher_checkpoint.pth``.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._saved_step: int | None = None  # the step of this run's latest checkpoint

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saved_step = checkpoint["global_step"]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path or Path(trainer.default_root_dir) / "teacher_checkpoint.pth"
        written = pl_module.export_teacher(path)  # every rank: gathering an FSDP teacher is collective
        if trainer.is_global_zero:
            for file in written if isinstance(written, list) else [written]:
                print(f"teacher exported to {file}")
        if self._saved_step not in (None, trainer.global_step):  # with none yet, ModelCheckpoint writes it
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.last_model_path:
                    trainer.save_checkpoint(callback.last_model_path)  # every rank: FSDP gathers


class DataWaitMonitor(L.Callback):
    """Logs ``train/data_wait``, the share of the training loop's time spent waiting for the next batch, and
    warns once when the DataLoader does not keep up.

    The wait of a step is the host's time from the end of the previous step to the start of this one: the
    fetch of the batch (which blocks while the workers have none ready), its transfer and the hooks around
    it. While the GPU is the bottleneck the host waits inside the steps instead, for room in the launch
    queue, so the share stays small; while the workers are, the GPU idles for about that share of the
    time. Each logged value covers the steps since the previous log (``Trainer(log_every_n_steps)``), as
    Lightning's ``SimpleProfiler`` row ``train_dataloader_next`` does for the whole run, but with nothing
    added to the steps: no profiler and no wait for the GPU.

    Args:
        threshold: Share of the time above which it warns (once per run, on global rank 0).
        warmup_steps: Steps of a run (or of a resumed run) left out of the decision (the first batches also
            wait for the workers to start, the first steps for compilation).
        window_steps: Steps after the warm-up over which the share is judged, once.
        clock: Seconds, monotonic (``time.perf_counter``).
    """

    def __init__(
        self,
        threshold: float = 0.1,
        warmup_steps: int = 20,
        window_steps: int = 100,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.threshold = threshold
        self.warmup_steps = warmup_steps
        self.window_steps = window_steps
        self.clock = clock
        self._reset(first_step=0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(first_step=trainer.global_step)  # a resumed run starts counting again

    def _reset(self, first_step: int) -> None:
        self._first_step = first_step
        self._step_end = self.clock()  # the end of the last batch's step
        self._wait = 0.0  # the current batch's wait
        self._log_wait = self._log_time = 0.0  # seconds waited, and in all, since the last log
        self._window_wait = self._window_time = 0.0  # the same over the judged steps
        self._judged = False
        self._logged_step = -1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._wait = self.clock() - self._step_end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        now = self.clock()
        spent, self._step_end = now - self._step_end, now
        step = trainer.global_step  # optimizer steps done: the logs are written when it reaches a multiple
        self._log_wait += self._wait
        self._log_time += spent
        after_warmup = step - self._first_step - self.warmup_steps
        if after_warmup > 0 and not self._judged:
            self._window_wait += self._wait
            self._window_time += spent
            if after_warmup == self.window_steps:
                self._judged = True
                self._judge(trainer)
        if step % trainer.log_every_n_steps or step == self._logged_step:  # (once under accumulation)
            return
        self._logged_step = step
        pl_module.log("train/data_wait", self._log_wait / max(self._log_time, 1e-9))
        self._log_wait = self._log_time = 0.0

    def _judge(self, trainer: L.Trainer) -> None:
        """Warns, with the settings of :class:`~geodino.train.data.PretrainDataModule` to change, if the loop
        waited more than ``threshold`` of the judged steps' time."""
        share = self._window_wait / max(self._window_time, 1e-9)
        if share <= self.threshold:
            return
        settings = getattr(trainer.datamodule, "hparams", {})
        rank_zero_warn(
            f"the training loop waited for batches {share:.0%} of the time over steps "
            f"{trainer.global_step - self.window_steps + 1}-{trainer.global_step}: the DataLoader workers do "
            f"not keep up. Raise data.num_workers (now {settings.get('num_workers', '?')}), set "
            f"data.photometric_on=device (now {settings.get('photometric_on', '?')}; on a GPU the colour "
            "operations then run there), or train on a chip store (geodino chips) instead of the rasters"
        )
