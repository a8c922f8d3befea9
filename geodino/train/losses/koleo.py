"""KoLeo regulariser (``dinov3/loss/koleo_loss.py``, ``KoLeoLoss``).

Kozachenko-Leonenko differential-entropy estimator (Sablayrolles et al., 2018, "Spreading vectors for
similarity search"): it pushes every sample away from its nearest neighbour in the batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """−mean log(distance to the nearest neighbour) of L2-normalised vectors, in float32.

    By default neighbours are searched within the given batch only: in training this is the per-GPU batch
    of one global crop (official ``dino.koleo_loss_distributed: false``), with no communication between
    processes. With ``group_size`` (official ``KoLeoLossDistributed``, ``koleo_distributed_loss_group_size``,
    16 in the high-resolution stage) the batches of all processes are gathered, with gradient, into the
    global batch in rank order, which is cut into consecutive groups of ``group_size`` samples; each sample's
    neighbour is searched in the group that holds its process's batch. Input [C, B, D] treats each of the
    C crops as a separate batch and averages the C losses, which is the official
    ``sum(koleo(x) for x in student_global_cls) / n_global_crops``; the caller then multiplies by
    ``koleo_loss_weight`` (0.1) × number of global crops (2).

    The nearest neighbour maximises the inner product, the sample itself excluded (its score is set to −∞;
    the official −1 differs only when every other sample is exactly antipodal) and no gradient flows
    through the choice; the distance is ``pairwise_distance(x, y, eps=1e-8)`` = ‖x − y + 1e-8‖₂ as in the
    official ``nn.PairwiseDistance(2, eps=1e-8)``, and −log(distance + 1e-8) is averaged.

    Args:
        eps: Stabiliser of the normalisation, the pairwise distance and the logarithm.
        group_size: Samples per neighbour group across processes (a multiple of the per-process batch B
            that divides the global batch); None: the per-process batch. Every process must then hold the
            same B. Without an initialised process group the global batch is this process's.
    """

    def __init__(self, eps: float = 1e-8, group_size: int | None = None) -> None:
        super().__init__()
        if group_size is not None and group_size < 2:
            raise ValueError(f"KoLeo group_size must be >= 2 or None, got {group_size}")
        self.eps = eps
        self.group_size = group_size

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
        candidates, offset = self._neighbour_group(x)  # [..., G, D]; x[..., i] is candidates[..., offset + i]
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # float32 as the official
            dots = x @ candidates.transpose(-1, -2)  # [..., B, G]
            n = x.shape[-2]
            dots[..., torch.arange(n), offset + torch.arange(n)] = -torch.inf
            neighbour = dots.argmax(dim=-1)  # [..., B]
        nearest = torch.take_along_dim(candidates, neighbour.unsqueeze(-1), dim=-2)  # [..., B, D]
        distance = F.pairwise_distance(x, nearest, p=2, eps=self.eps)  # [..., B]
        return -torch.log(distance + self.eps).mean()

    def _neighbour_group(self, x: Tensor) -> tuple[Tensor, int]:
        """The candidate neighbours of ``x`` [..., B, D]: [..., G, D] and where ``x`` sits among them."""
        if self.group_size is None:
            return x, 0
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        n, size = x.shape[-2], self.group_size
        if size % n or (world * n) % size:
            raise ValueError(
                f"KoLeo group_size {size} must be a multiple of the per-process batch ({n}) and divide the "
                f"global batch ({world} processes x {n}); change the batch size or koleo_group_size"
            )
        everything = torch.cat(dist_fn.all_gather(x), dim=-2) if distributed else x  # [..., world * B, D]
        ranks_per_group = size // n
        group = rank // ranks_per_group
        return everything[..., group * size : (group + 1) * size, :], (rank % ranks_per_group) * n
