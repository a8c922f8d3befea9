"""iBOT masked-patch loss (``dinov3/loss/ibot_patch_loss.py``, ``iBOTPatchLoss.forward_masked``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["iBOTPatchLoss"]


class iBOTPatchLoss(nn.Module):
    """Cross-entropy between teacher targets and student scores at the masked patches.

    Each masked patch contributes CE = −Σ_k p[k] · log_softmax(z / τ_s)[k] weighted by 1 / (number of
    masked patches in its image), so every masked image weighs the same; the weighted sum is divided by the
    number of global-crop images (masked or not, 2B per process). Teacher targets are the iBOT-head logits
    of the *unmasked* teacher crops at the masked positions, centred by
    :func:`~geodino.train.losses.sinkhorn_knopp` over all masked patches; they are detached here.

    Rows of ``student_logits`` / ``teacher_probs`` / ``masks_weight`` are the masked patches in the order of
    ``masks.flatten().nonzero()`` (image-major, then patch index), i.e.
    ``tokens.flatten(0, 1)[masks.flatten()]``; the indices and weights come from
    :func:`~geodino.train.augment.masked_patch_index` (the collate's ``mask_indices_list`` and
    ``masks_weight``), so the loss needs no device synchronisation.

    Args:
        student_temp: Student temperature τ_s.
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(
        self, student_logits: Tensor, teacher_probs: Tensor, masks_weight: Tensor, n_crops: int
    ) -> Tensor:
        """Masked-patch loss, in float32.

        Args:
            student_logits: Student iBOT-head outputs at the masked patches [M, K].
            teacher_probs: Teacher targets at the same patches [M, K], rows summing to 1.
            masks_weight: Per masked patch, 1 / (masked patches of its image) [M].
            n_crops: Global crops the masks were drawn on, masked or not (2B).

        Returns:
            Scalar loss.
        """
        n_masked = masks_weight.shape[0]
        if student_logits.shape[0] != n_masked or teacher_probs.shape[0] != n_masked:
            raise ValueError(
                f"expected {n_masked} masked-patch rows, got student {tuple(student_logits.shape)} and "
                f"teacher {tuple(teacher_probs.shape)}"
            )
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        patch_ce = -(teacher_probs.detach().float() * log_probs).sum(dim=-1)  # [M]
        return (patch_ce * masks_weight).sum() / n_crops
