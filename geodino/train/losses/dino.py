"""DINO loss on CLS tokens (``dinov3/loss/dino_clstoken_loss.py`` and ``SSLMetaArch.compute_losses``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOLoss", "DINOLossTerms"]


@dataclass(frozen=True)
class DINOLossTerms:
    """The two DINO terms and the official scales that combine them.

    With G global and L local student crops, the global term averages G·(G − 1) crop pairs (G² without
    diagonal removal) and the local term L·G pairs; each term is scaled by its share of all pairs, so with
    2 global and 8 local crops ``local_scale`` = 16/18 and ``global_scale`` = 2/18.

    Attributes:
        local_loss: Mean CE of the local student crops against every teacher global crop (scalar).
        global_loss: Mean CE of the global student crops against the teacher global crops of the other
            views (scalar).
        local_scale: Share of local pairs among all pairs.
        global_scale: Share of global pairs among all pairs.
    """

    local_loss: Tensor
    global_loss: Tensor
    local_scale: float
    global_scale: float

    def total(self, local_weight: float = 1.0) -> Tensor:
        """``local_scale · local_weight · local_loss + global_scale · global_loss``.

        Args:
            local_weight: Extra factor on the local term (the official ``dino.local_loss_weight_schedule``
                value when ``reweight_dino_local_loss`` is set, 1.0 otherwise).
        """
        return self.local_scale * local_weight * self.local_loss + self.global_scale * self.global_loss


class DINOLoss(nn.Module):
    """Cross-entropy between Sinkhorn-Knopp teacher targets and student CLS prototype scores.

    For a student crop s and teacher crop t of the same image, CE = −Σ_k p_t[k] · log_softmax(z_s / τ_s)[k]
    with τ_s = 0.1. Teacher targets come from :func:`~geodino.train.losses.sinkhorn_knopp` applied to the
    teacher's CLS logits of both global crops at once (there the caller sets the teacher temperature);
    they are detached here, so gradient reaches the student logits only.

    Args:
        student_temp: Student temperature τ_s.
        global_ignore_diagonal: Drop the same-view pairs (student global crop i vs teacher global crop i)
            from the global term, as the official ``dino.global_ignore_diagonal: true``.
    """

    def __init__(self, student_temp: float = 0.1, global_ignore_diagonal: bool = True) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.global_ignore_diagonal = global_ignore_diagonal

    def cross_entropy(self, student_logits: Tensor, teacher_probs: Tensor, ignore_diagonal: bool) -> Tensor:
        """Mean CE over all (student crop, teacher crop, image) triples, in float32.

        Args:
            student_logits: Student head outputs [S, B, K] (S crops of the same B images).
            teacher_probs: Teacher targets [T, B, K], rows summing to 1.
            ignore_diagonal: Leave out the pairs s == t (for s, t < min(S, T)).

        Returns:
            Scalar: the sum of CE over the kept pairs divided by B × (number of kept crop pairs).
        """
        # autocast would run the einsum (a batched matmul) in bf16: ~2 significant digits of the loss
        with torch.autocast(student_logits.device.type, enabled=False):
            log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
            pair_ce = -torch.einsum("sbk,tbk->st", log_probs, teacher_probs.detach().float())  # [S, T]
        n_student, n_teacher = pair_ce.shape
        n_pairs = n_student * n_teacher
        if ignore_diagonal:
            pair_ce = pair_ce.fill_diagonal_(0.0)
            n_pairs -= min(n_student, n_teacher)
        return pair_ce.sum() / (student_logits.shape[1] * n_pairs)

    def forward(
        self, student_global_logits: Tensor, student_local_logits: Tensor, teacher_probs: Tensor
    ) -> DINOLossTerms:
        """Local and global DINO terms with their official scales.

        Args:
            student_global_logits: Student DINO-head outputs for the global crops [G, B, K].
            student_local_logits: Student DINO-head outputs for the local crops [L, B, K], L ≥ 1.
            teacher_probs: Sinkhorn-Knopp targets of the teacher global crops [G, B, K].

        Returns:
            The two terms and their scales; ``.total()`` is the official DINO loss before
            ``dino.loss_weight``.
        """
        n_global, n_local = student_global_logits.shape[0], student_local_logits.shape[0]
        if n_local < 1:
            raise ValueError("the DINO loss needs at least one local crop (as the official SSLMetaArch)")
        global_pairs = n_global * (n_global - 1) if self.global_ignore_diagonal else n_global**2
        local_pairs = n_global * n_local
        return DINOLossTerms(
            local_loss=self.cross_entropy(student_local_logits, teacher_probs, ignore_diagonal=False),
            global_loss=self.cross_entropy(
                student_global_logits, teacher_probs, ignore_diagonal=self.global_ignore_diagonal
            ),
            local_scale=local_pairs / (global_pairs + local_pairs),
            global_scale=global_pairs / (global_pairs + local_pairs),
        )
