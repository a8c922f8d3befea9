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
    per-prototype maxima and sums and the row count are all-reduced over the default group, so the result on
    each process equals the matching rows of Sinkhorn-Knopp run on the concatenated global batch. This
    covers both official uses: the DINO call (N = rows × world size) and the iBOT call, where ranks hold
    different numbers of masked patches (N = all-reduced ``n_masked_patches``). Per-sample sums are local
    and need no communication.

    Computed as Q = diag(a) · E · diag(b) with E = exp((logits − m) / τ) [N, K], where m [K] is each
    prototype's maximum score: each iteration updates only the scale vectors, b = 1 / (K · Eᵀa) and
    a = 1 / (N · E b), two matrix-vector products that read E once each, instead of rescaling Q in full
    (memory-bound on [N, 65536] float32: ~20 full passes instead of the official order's ~43; see
    benchmarks/sinkhorn.py). The shift m cancels in the first prototype normalisation, so the result equals
    the official formula up to float32 rounding: within ~2e-5 relative of a float64 run, as matrix-vector
    products accumulate less exactly than pairwise sums (the bf16 logits themselves are only good to
    ~4e-3). Large logits or a small τ cannot overflow (the official exp overflows once a score passes
    ~88), and every prototype keeps a sample of mass 1, so none underflows to zero mass. The first
    iteration's a is folded into E by a division, which keeps samples whose scores all lie far below the
    maxima (sub-normal masses, whose reciprocals would overflow) normalised; later sample sums are ratios
    of prototype scales, well within range. As in the official float32 code, a sample whose scores all lie
    more than ~100 τ below every prototype's maximum underflows to zero mass (a NaN row).

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
    n_local, n_prototypes = teacher_logits.shape
    # the matrix-vector products stay float32 under autocast; cuBLAS / CPU gemv does not use TF32
    with torch.autocast(teacher_logits.device.type, enabled=False):
        # A process may hold no rows (e.g. no masked patches for iBOT); it still joins every collective.
        prototype_max = (
            teacher_logits.amax(dim=0).float()
            if n_local
            else teacher_logits.new_full((n_prototypes,), -torch.inf, dtype=torch.float32)
        )
        _all_reduce(prototype_max, dist.ReduceOp.MAX)
        n_samples = teacher_logits.new_tensor(float(n_local), dtype=torch.float32)
        _all_reduce(n_samples, dist.ReduceOp.SUM)
        # E = exp((logits − m) / τ) [N_local, K] <= 1; a float32 copy, as the steps below work in place
        e = teacher_logits.to(torch.float32, copy=True).sub_(prototype_max).div_(teacher_temp).exp_()
        a = None  # row scales after the first iteration; None: all ones
        for i in range(n_iterations):
            prototype_mass = e.sum(dim=0) if a is None else torch.mv(e.t(), a)  # [K]
            _all_reduce(prototype_mass, dist.ReduceOp.SUM)
            b = (prototype_mass * n_prototypes).reciprocal_()  # every prototype: mass 1/K
            sample_mass = torch.mv(e, b)  # [N_local]
            # every sample: mass 1/N, except after the last iteration, where the official × N follows
            if i < n_iterations - 1:
                sample_mass *= n_samples
            if i == 0:
                e /= sample_mass.unsqueeze(1)  # folded into E by a division: the masses may be sub-normal
            else:
                a = sample_mass.reciprocal_()
        q = e.mul_(b)
        return q if a is None else q.mul_(a.unsqueeze(1))


def _all_reduce(tensor: Tensor, op: dist.ReduceOp) -> None:
    """In-place all-reduce over the default group; a no-op when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
