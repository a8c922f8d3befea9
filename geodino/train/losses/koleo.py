"""KoLeo regulariser (``dinov3/loss/koleo_loss.py``, ``KoLeoLoss``).

Kozachenko-Leonenko differential-entropy estimator (Sablayrolles et al., 2018, "Spreading vectors for
similarity search"): it pushes every sample away from its nearest neighbour in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """−mean log(distance to the nearest neighbour) of L2-normalised vectors, in float32.

    Neighbours are searched within the given batch only: in training this is the per-GPU batch of one
    global crop (official ``dino.koleo_loss_distributed: false``), with no communication between
    processes. Input [C, B, D] treats each of the C crops as a separate batch and averages the C losses,
    which is the official ``sum(koleo(x) for x in student_global_cls) / n_global_crops``; the caller then
    multiplies by ``koleo_loss_weight`` (0.1) × number of global crops (2).

    The nearest neighbour maximises the inner product, the sample itself excluded (its score is set to −∞;
    the official −1 differs only when every other sample is exactly antipodal) and no gradient flows
    through the choice; the distance is ``pairwise_distance(x, y, eps=1e-8)`` = ‖x − y + 1e-8‖₂ as in the
    official ``nn.PairwiseDistance(2, eps=1e-8)``, and −log(distance + 1e-8) is averaged.

    Args:
        eps: Stabiliser of the normalisation, the pairwise distance and the logarithm.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """KoLeo loss.

        Args:
            x: Features [B, D] or [C, B, D] (student global-crop ``x_norm_clstoken``, before the head); B ≥ 2.

        Returns:
            Scalar loss (mean over C crops of the per-crop loss).
        """
        if x.shape[-2] < 2:
            raise ValueError(f"KoLeo needs at least 2 samples per batch, got shape {tuple(x.shape)}")
        x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            dots = x @ x.transpose(-1, -2)  # [..., B, B]
            dots.diagonal(dim1=-2, dim2=-1).fill_(-torch.inf)
            neighbour = dots.argmax(dim=-1)  # [..., B]
        nearest = torch.take_along_dim(x, neighbour.unsqueeze(-1), dim=-2)  # [..., B, D]
        distance = F.pairwise_distance(x, nearest, p=2, eps=self.eps)  # [..., B]
        return -torch.log(distance + self.eps).mean()
