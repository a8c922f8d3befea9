"""Sinkhorn-Knopp centering of teacher logits (``sinkhorn_knopp_teacher`` in ``dinov3/loss``).

DINOv3 replaces DINOv2's momentum centering with a few Sinkhorn-Knopp iterations that turn the teacher's
prototype scores into soft assignments whose marginal over prototypes is (nearly) uniform across the whole
global batch. Both the DINO head (CLS rows) and the iBOT head (masked-patch rows) use it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["sinkhorn_knopp"]


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Balanced soft assignments of samples to prototypes, computed in float32 without gradient.

    Q = exp(logits / τ)ᵀ [K, N] is scaled to total mass 1, then ``n_iterations`` times: every prototype row
    is scaled to mass 1/K, then every sample column to mass 1/N; finally Q × N, so that each sample's
    assignment sums to exactly 1 over the prototypes while each prototype receives ≈ N/K samples in total.
    N is the number of rows summed over all processes. When ``torch.distributed`` is initialised, the
    total mass, the row count and the per-prototype sums are all-reduced over the default group, so the
    result on each process equals the matching rows of Sinkhorn-Knopp run on the concatenated global batch.
    This covers both official uses: the DINO call (N = rows × world size) and the iBOT call, where ranks hold
    different numbers of masked patches (N = all-reduced ``n_masked_patches``). Column (per-sample)
    normalisation is local and needs no communication.

    The scores logits / τ are shifted by their global maximum before the exponential; the shift cancels in
    the first normalisation, so results equal the official formula (to float32 rounding) while large
    logits / small τ cannot overflow (the official exp overflows once a score passes ~88). As in the official
    float32 code, a prototype whose scores all lie more than ~100 below the maximum underflows to zero mass
    (NaN rows).

    Every process must call this function (it holds collectives).

    Args:
        teacher_logits: Teacher head outputs [N_local, K] (any float dtype). For DINO, the CLS logits of all
            teacher global crops stacked ([2B, K]); for iBOT, the logits of the masked patches ([M, K]).
        teacher_temp: Teacher temperature τ (the caller applies the warmup schedule, 0.04 → 0.07 officially).
        n_iterations: Sinkhorn-Knopp iterations (3 officially).

    Returns:
        Float32 targets [N_local, K]; each row is a distribution over the K prototypes.

    Raises:
        ValueError: If ``n_iterations < 1``.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    # Memory-bound on [N, K] float32 (K = 65536 prototypes): the official algebra with its scalar factors
    # folded, so each iteration makes 2 passes that read and write Q and 2 that read it (the official order
    # of in-place divisions makes 4 and 2) and the initial total-mass division, which the first row
    # normalisation cancels, is left out; see benchmarks/sinkhorn.py.
    # A process may hold no rows (e.g. no masked patches for iBOT); it still joins every collective.
    max_logit = (
        teacher_logits.max().float() if teacher_logits.numel() else teacher_logits.new_tensor(-torch.inf)
    )
    _all_reduce(max_logit, dist.ReduceOp.MAX)
    q = teacher_logits.to(torch.float32, copy=True)  # a copy: the steps below work in place
    q = q.sub_(max_logit).div_(teacher_temp).exp_().t()  # [K, N_local], exp(score - max score) <= 1
    n_prototypes = q.shape[0]
    n_samples = q.new_tensor(float(q.shape[1]))
    _all_reduce(n_samples, dist.ReduceOp.SUM)
    for i in range(n_iterations):
        prototype_mass = q.sum(dim=1, keepdim=True)  # [K, 1]
        _all_reduce(prototype_mass, dist.ReduceOp.SUM)
        q /= prototype_mass * n_prototypes  # every prototype row: mass 1/K (a division: masses may be
        # denormal, and their reciprocals would overflow)
        sample_mass = q.sum(dim=0, keepdim=True)  # [1, N_local]
        # every sample column: mass 1/N, except after the last iteration, where the official × N follows
        q /= sample_mass if i == n_iterations - 1 else sample_mass * n_samples
    return q.t()


def _all_reduce(tensor: Tensor, op: dist.ReduceOp) -> None:
    """In-place all-reduce over the default group; a no-op when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
