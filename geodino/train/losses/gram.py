"""Gram anchoring loss (``dinov3/loss/gram_loss.py``, ``SSLMetaArch.get_gram_teacher_output``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GramLoss", "resize_patch_features"]


def resize_patch_features(x: Tensor, grid_in: tuple[int, int], grid_out: tuple[int, int]) -> Tensor:
    """Resample a patch-token sequence on its 2-D grid, as the official Gram-teacher downsampling.

    The tokens are laid out as the [B, D, h, w] map and resized with bicubic interpolation
    (``align_corners=False``, ``antialias=False``: the official ``gram.global_teacher_resize_method`` and
    ``..._antialias``). Used to bring the Gram teacher's features of a 2× crop (e.g. 32×32 patches for
    512 px) to the student grid (16×16 for 256 px) *before* :class:`GramLoss` normalises them. The dtype is
    kept (bicubic on float16/bfloat16 CPU tensors depends on the PyTorch build; pass float32 there).

    Args:
        x: Patch tokens [B, h_in·w_in, D] in row-major order.
        grid_in: Input grid (h_in, w_in).
        grid_out: Output grid (h_out, w_out).

    Returns:
        Patch tokens [B, h_out·w_out, D] in row-major order.
    """
    h_in, w_in = grid_in
    if x.shape[1] != h_in * w_in:
        raise ValueError(f"{x.shape[1]} tokens do not fill a {h_in}x{w_in} grid")
    maps = x.transpose(1, 2).unflatten(-1, (h_in, w_in))  # [B, D, h_in, w_in]
    maps = F.interpolate(maps, size=tuple(grid_out), mode="bicubic", align_corners=False, antialias=False)
    return maps.flatten(-2).transpose(1, 2)


class GramLoss(nn.Module):
    """Mean squared difference of per-image patch-similarity (Gram) matrices, in float32.

    Every patch vector is L2-normalised (official ``gram.normalized: true``), G = X Xᵀ ∈ [P, P] is formed per
    image (``gram.img_level: true`` of the Gram-anchoring configs), and the loss is the mean over all
    B·P·P entries of (G_student − G_teacher)². The teacher features are detached (the official Gram teacher
    runs frozen under ``no_grad``).

    Optional official variants, both off in every released config: ``remove_neg`` zeroes negative
    similarities in both matrices; ``remove_only_teacher_neg`` zeroes negative teacher similarities and the
    student similarities at entries where both are negative. Not reproduced: batch-level Gram matrices
    (``img_level: false``) and the un-normalised variant (``normalized: false``).

    Args:
        remove_neg: Clamp negative similarities of both matrices to 0.
        remove_only_teacher_neg: Clamp negative teacher similarities to 0, and student ones where the teacher
            is negative too. Exclusive with ``remove_neg``.
    """

    def __init__(self, remove_neg: bool = False, remove_only_teacher_neg: bool = False) -> None:
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg are exclusive")
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg

    def forward(self, student_patches: Tensor, teacher_patches: Tensor) -> Tensor:
        """Gram loss.

        Args:
            student_patches: Student ``x_norm_patchtokens`` of the (masked) global crops [B, P, D].
            teacher_patches: Gram-teacher ``x_norm_patchtokens`` on the same grid [B, P, D] (see
                :func:`resize_patch_features` for a teacher run at higher resolution).

        Returns:
            Scalar loss.
        """
        if student_patches.shape != teacher_patches.shape:
            raise ValueError(
                f"student {tuple(student_patches.shape)} and teacher {tuple(teacher_patches.shape)} differ"
            )
        student = F.normalize(student_patches.float(), dim=-1)
        teacher = F.normalize(teacher_patches.detach().float(), dim=-1)
        with torch.autocast(student.device.type, enabled=False):  # float32 Gram matrices under autocast too
            student_sim = student @ student.transpose(-1, -2)  # [B, P, P]
            teacher_sim = teacher @ teacher.transpose(-1, -2)
        if self.remove_neg:
            student_sim = student_sim.clamp(min=0.0)
            teacher_sim = teacher_sim.clamp(min=0.0)
        elif self.remove_only_teacher_neg:
            student_sim = torch.where((student_sim < 0) & (teacher_sim < 0), 0.0, student_sim)
            teacher_sim = teacher_sim.clamp(min=0.0)
        return F.mse_loss(student_sim, teacher_sim)
