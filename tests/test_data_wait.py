"""DataWaitMonitor: the share of the loop's time spent waiting for batches, on a clock that the test moves
(3 s per batch fetched, 1 s per training step), and the one warning with the fix."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from geodino.train import DataWaitMonitor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowChips(Dataset):
    """Batches that take ``fetch_s`` seconds of the clock to make."""

    def __init__(self, clock: Clock, fetch_s: float) -> None:
        self.clock, self.fetch_s = clock, fetch_s

    def __len__(self) -> int:
        return 100

    def __getitem__(self, index: int) -> torch.Tensor:
        self.clock.now += self.fetch_s
        return torch.ones(4)


class OneSecondSteps(L.LightningModule):
    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.clock.now += 1.0
        return self.layer(batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(
    fetch_s: float, steps: int = 80, checkpoint: Path | None = None, ckpt_path: Path | None = None
) -> tuple[float, list[str]]:
    """Trains ``steps`` steps (from ``ckpt_path`` if given, saving ``checkpoint`` at the end if given);
    returns the last logged share and the warnings."""
    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DataWaitMonitor(threshold=0.5, warmup_steps=20, window_steps=50, clock=clock)],
    )
    loader = DataLoader(SlowChips(clock, fetch_s), batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(OneSecondSteps(clock), loader, ckpt_path=ckpt_path)
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)
    advice = [str(w.message) for w in caught if "waited for batches" in str(w.message)]
    return float(trainer.callback_metrics["train/data_wait"]), advice


def test_share_of_time_waiting_and_one_warning_after_the_warm_up() -> None:
    share, advice = fit(fetch_s=3.0)
    assert share == pytest.approx(0.75)  # 3 s of every 4 s, steps 76-80
    assert len(advice) == 1 and "75% of the time over steps 21-70" in advice[0]
    assert "data.num_workers" in advice[0] and "photometric_on=device" in advice[0]


def test_a_resumed_run_is_judged_after_its_own_warm_up(tmp_path) -> None:
    """The judged steps count from where the run (re)starts: a run resumed at step 80 is judged over steps
    101-150."""
    first = fit(fetch_s=3.0, steps=80, checkpoint=tmp_path / "step80.ckpt")
    assert len(first[1]) == 1
    share, advice = fit(fetch_s=3.0, steps=160, ckpt_path=tmp_path / "step80.ckpt")
    assert share == pytest.approx(0.75)
    assert len(advice) == 1 and "75% of the time over steps 101-150" in advice[0]


def test_a_loader_that_keeps_up_gives_no_warning() -> None:
    share, advice = fit(fetch_s=0.0)
    assert share == 0.0 and advice == []
