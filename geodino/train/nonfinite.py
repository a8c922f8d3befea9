"""Skipping optimizer steps whose gradients are not finite, without waiting for the GPU.

A NaN or infinite loss (a run diverging at too high a learning rate, a bf16 overflow, a chip of NaN pixels)
gives NaN or infinite gradients. One AdamW step with them turns every weight into NaN, the next EMA update
the teacher too, and a run left alone goes on writing NaN checkpoints for days. The official training reads
each step's loss on the host and aborts after three NaN losses in a row, after those weights are already
lost.

:class:`NonFiniteSteps` decides on the device instead. From the gradient norms that clipping computes anyway
it sets a flag per step that the optimizer step and the EMA update read as a tensor: fused AdamW takes it as
its ``found_inf`` (the protocol of ``torch.amp.GradScaler``) and then changes neither the parameters nor
the moments nor the step count, and :func:`ema_update_` uses momentum 1. So a skipped step changes nothing,
and no step waits for the GPU to say whether it was skipped. The host reads three counters only where it
waits for the GPU already (the steps that write the logs) and at the end of training, and stops the run
with :class:`TrainingDiverged` after ``max_consecutive`` skipped steps in a row.

The decision needs the same flag on every process: the norms are those of the gradients after DDP's
all-reduce, or summed over FSDP's shards (:func:`~geodino.train.base.clip_grad_norm`), so a NaN on one rank
skips the step on all of them. Under ``16-mixed`` the ``GradScaler`` passes its own ``found_inf``, found on
the same unscaled gradients, and its runs of overflowing steps stop a run only once its scale is below 1
(:class:`~geodino.train.base.SSLModule`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["NonFiniteSteps", "TrainingDiverged", "ema_update_"]


class TrainingDiverged(RuntimeError):
    """Optimizer steps in a row had non-finite gradients and were skipped: the run has diverged."""


class NonFiniteSteps:
    """This step's skip flag and the counts of skipped steps, kept on the training device.

    Args:
        max_consecutive: Skipped steps in a row at which :meth:`check` stops the run (the official training
            aborts at the third NaN loss in a row).

    Raises:
        ValueError: If ``max_consecutive`` < 1.
    """

    def __init__(self, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        #: 1.0 when the last step's gradients were not all finite (the step is skipped), else 0.0; float32 [].
        self.found = torch.zeros(())
        #: float32 [3]: skipped steps in a row up to the last step, the longest such run since the last
        #: :meth:`check`, and all skipped steps of this run.
        self.counts = torch.zeros(3)

    @property
    def total(self) -> Tensor:
        """Skipped steps since the start of this run (a float32 [] tensor on the device)."""
        return self.counts[2]

    def update(self, grad_norms: Sequence[Tensor]) -> Tensor:
        """Sets the flag of this step from its gradient norms and counts it; nothing is read on the host.

        Args:
            grad_norms: [] norms of all gradients that the optimizer steps with (one per clipped network).

        Returns:
            The flag, float32 []: 1.0 if a norm is NaN or infinite (skip the step), else 0.0.
        """
        norms = torch.stack([norm.float() for norm in grad_norms])
        self.found = (~torch.isfinite(norms).all()).float()
        counts = self.counts.to(norms.device)
        run = (counts[0] + 1) * self.found
        self.counts = torch.stack([run, torch.maximum(counts[1], run), counts[2] + self.found])
        return self.found

    def check(self, owner: str, step: int, *, stop: bool = True) -> None:
        """Stops the run if ``max_consecutive`` steps in a row were skipped since the last check.

        Reads three numbers from the device, so it waits for the steps before it: call it where the host
        waits anyway.

        Args:
            owner: The module's name, for the message.
            step: The step being run (the checked steps are those before it).
            stop: False where runs of skipped steps are expected (a ``GradScaler`` still lowering its
                scale): the runs seen so far are then let pass.

        Raises:
            TrainingDiverged: With the number of steps skipped and what to change.
        """
        _, longest, total = (int(value) for value in self.counts.tolist())
        self.counts = torch.stack([self.counts[0], self.counts[0], self.counts[2]])
        if longest < self.max_consecutive or not stop:
            return
        raise TrainingDiverged(
            f"{owner}: {longest} optimizer steps in a row before step {step} had NaN or infinite gradients "
            f"and were skipped ({total} skipped in this run, logged as train/skipped_steps), so the "
            "weights, the AdamW state and the EMA networks are still those from before them. The run "
            "has diverged: resume from the last checkpoint with a lower lr, a longer warm-up or a smaller "
            "clip_grad, and check the input chips for NaN or infinite pixels; max_skipped_steps sets how "
            "many skipped steps in a row stop a run"
        )


@torch.no_grad()
def ema_update_(ema: list[Tensor], online: list[Tensor], momentum: float, skip: Tensor) -> None:
    """θ_ema ← m·θ_ema + (1 − m)·θ in place, or θ_ema unchanged where ``skip`` is 1 (the step was skipped).

    ``skip`` is read on the device (momentum 1 instead of ``m``), so the host does not wait for it. Makes one
    temporary of the size of ``online``.

    Args:
        ema: The averaged parameters, updated in place.
        online: The trained parameters, in the same order and shapes.
        momentum: m of this step.
        skip: float32 [] flag of :meth:`NonFiniteSteps.update` (0.0 or 1.0).
    """
    skipped = skip.to(ema[0].device).bool()
    torch._foreach_mul_(ema, torch.where(skipped, 1.0, momentum))
    torch._foreach_add_(ema, torch._foreach_mul(online, torch.where(skipped, 0.0, 1.0 - momentum)))
