"""SSL losses against naive re-implementations written here (float64 numpy, explicit loops).

Reference formulas: ``shared/notes/dinov3-official.md`` §3.5 (losses), §3.8 (Gram), §5 items 11, 12, 14.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from geodino.train.augment import masked_patch_index
from geodino.train.base import compile_losses
from geodino.train.losses import (
    DINOLoss,
    GramLoss,
    KoLeoLoss,
    iBOTPatchLoss,
    resize_patch_features,
    sinkhorn_knopp,
)

# ---------------------------------------------------------------- naive references (float64 numpy)


def naive_sinkhorn(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    """The official algorithm written out element by element, without the max shift."""
    n, k = logits.shape
    q = np.exp(logits.astype(np.float64) / temp).T  # [K, N]
    q = q / q.sum()
    for _ in range(n_iterations):
        for row in range(k):
            q[row] = q[row] / q[row].sum() / k
        for col in range(n):
            q[:, col] = q[:, col] / q[:, col].sum() / n
    return (q * n).T


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max()
    return z - m - math.log(np.exp(z - m).sum())


def naive_ce(student_logit: np.ndarray, teacher_prob: np.ndarray, temp: float = 0.1) -> float:
    return -float((teacher_prob * log_softmax(student_logit / temp)).sum())


def naive_pair_mean(student: np.ndarray, teacher: np.ndarray, ignore_diagonal: bool) -> float:
    losses = []
    for s in range(student.shape[0]):
        for t in range(teacher.shape[0]):
            if ignore_diagonal and s == t:
                continue
            for b in range(student.shape[1]):
                losses.append(naive_ce(student[s, b], teacher[t, b]))
    return float(np.mean(losses))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.sqrt((v * v).sum())


def naive_koleo(x: np.ndarray, eps: float = 1e-8) -> float:
    x = [unit(v.astype(np.float64)) for v in x]
    terms = []
    for i, xi in enumerate(x):
        best, best_dot = None, -np.inf
        for j, xj in enumerate(x):
            if j != i and float(xi @ xj) > best_dot:
                best, best_dot = j, float(xi @ xj)
        distance = math.sqrt(float(((xi - x[best] + eps) ** 2).sum()))
        terms.append(-math.log(distance + eps))
    return float(np.mean(terms))


def naive_gram(student: np.ndarray, teacher: np.ndarray, mode: str = "plain") -> float:
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        s = [unit(v.astype(np.float64)) for v in student[b]]
        t = [unit(v.astype(np.float64)) for v in teacher[b]]
        for i in range(len(s)):
            for j in range(len(s)):
                gs, gt = float(s[i] @ s[j]), float(t[i] @ t[j])
                if mode == "remove_neg":
                    gs, gt = max(gs, 0.0), max(gt, 0.0)
                elif mode == "remove_only_teacher_neg":
                    gs = 0.0 if (gs < 0 and gt < 0) else gs
                    gt = max(gt, 0.0)
                total += (gs - gt) ** 2
                count += 1
    return total / count


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys cubic-convolution weights for the 4 taps at offsets -1, 0, 1, 2 (PyTorch's A = -0.75)."""

    def near(d: float) -> float:  # |d| <= 1
        return (a + 2) * d**3 - (a + 3) * d**2 + 1

    def far(d: float) -> float:  # 1 < |d| < 2
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """1-D bicubic resampling matrix [n_out, n_in]: half-pixel centres, border taps clamped, no antialias."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for tap, w in zip(range(base - 1, base + 3), cubic_weights(src - base), strict=True):
            m[o, min(max(tap, 0), n_in - 1)] += w
    return m


# ---------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_needs_an_iteration() -> None:
    with pytest.raises(ValueError, match="n_iterations must be >= 1"):
        sinkhorn_knopp(torch.randn(4, 3), teacher_temp=0.1, n_iterations=0)


def test_sinkhorn_matches_naive_and_normalises_samples() -> None:
    logits = torch.randn(24, 10)
    out = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=3)
    assert out.dtype == torch.float32 and out.shape == (24, 10)
    np.testing.assert_allclose(out.numpy(), naive_sinkhorn(logits.numpy(), 0.5, 3), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.sum(dim=1).numpy(), np.ones(24), rtol=1e-5)


def test_sinkhorn_balances_prototypes_where_softmax_collapses() -> None:
    logits = torch.randn(64, 8) * 0.5
    logits[:, 0] += 2.0  # every sample prefers prototype 0
    temp = 0.5
    softmax_mass = torch.softmax(logits / temp, dim=-1).sum(dim=0)  # per prototype, ideal 64 / 8 = 8
    sk_mass = sinkhorn_knopp(logits, teacher_temp=temp).sum(dim=0)
    assert softmax_mass[0] > 40  # collapsed onto prototype 0
    assert torch.allclose(sk_mass, torch.full((8,), 8.0), rtol=0.05)
    # more iterations move the marginals closer to uniform
    err3 = (sk_mass - 8).abs().max()
    err10 = (sinkhorn_knopp(logits, teacher_temp=temp, n_iterations=10).sum(dim=0) - 8).abs().max()
    assert err10 < err3


def test_sinkhorn_is_fp32_no_grad_and_overflow_safe() -> None:
    logits = (torch.randn(16, 12) * 0.3 + 5).to(torch.bfloat16).requires_grad_()
    assert torch.isinf(torch.exp(logits.float() / 0.04)).any()  # the unshifted formula overflows in fp32
    out = sinkhorn_knopp(logits, teacher_temp=0.04)
    assert out.dtype == torch.float32 and not out.requires_grad and torch.isfinite(out).all()
    reference = naive_sinkhorn(logits.detach().float().numpy(), 0.04, 3)  # float64 has the range
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-4, atol=1e-6)


def test_sinkhorn_keeps_denormal_prototype_masses() -> None:
    """A prototype whose scores all lie ~95 below the maximum has a denormal mass (exp(-95) ~ 5e-42): it must
    still be normalised (the reciprocal of such a mass overflows float32), not turn into NaN."""
    temp = 0.05
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    logits[:, 5] = logits.max() - 95 * temp + 0.01 * torch.randn(8)
    assert 0 < torch.exp((logits[:, 5] - logits.max()) / temp).max() < torch.finfo(torch.float32).tiny
    out = sinkhorn_knopp(logits, teacher_temp=temp)
    assert torch.isfinite(out).all()
    reference = naive_sinkhorn(logits.numpy(), temp, 3)
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(out.sum(dim=1).numpy(), 1.0, rtol=1e-5)


def test_sinkhorn_keeps_samples_far_below_every_prototype() -> None:
    """A sample whose scores all lie ~95 τ below every prototype's maximum has sub-normal exp-scores and a
    sub-normal first mass: it must still get a finite distribution close to the float64 reference (the
    reciprocal of its mass overflows float32)."""
    temp = 0.05
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    logits[2] = logits[[0, 1, *range(3, 8)]].amax(dim=0) - 95 * temp + 0.01 * torch.randn(16)
    scores = torch.exp((logits[2] - logits.amax(dim=0)) / temp)
    assert 0 < scores.max() < torch.finfo(torch.float32).tiny
    out = sinkhorn_knopp(logits, teacher_temp=temp)
    assert torch.isfinite(out).all()
    reference = naive_sinkhorn(logits.numpy(), temp, 3)
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(out.sum(dim=1).numpy(), 1.0, rtol=1e-5)


def test_sinkhorn_empty_input() -> None:
    assert sinkhorn_knopp(torch.empty(0, 5), teacher_temp=0.07).shape == (0, 5)


# ---------------------------------------------------------------- DINO


def test_dino_terms_match_naive_and_official_scales() -> None:
    n_global, n_local, batch, k = 2, 8, 3, 7
    student_global = torch.randn(n_global, batch, k)
    student_local = torch.randn(n_local, batch, k)
    teacher = torch.softmax(torch.randn(n_global, batch, k), dim=-1)
    terms = DINOLoss()(student_global, student_local, teacher)
    local_ref = naive_pair_mean(student_local.numpy(), teacher.numpy(), ignore_diagonal=False)
    global_ref = naive_pair_mean(student_global.numpy(), teacher.numpy(), ignore_diagonal=True)
    assert terms.local_loss.item() == pytest.approx(local_ref, rel=1e-5)
    assert terms.global_loss.item() == pytest.approx(global_ref, rel=1e-5)
    assert (terms.local_scale, terms.global_scale) == (pytest.approx(16 / 18), pytest.approx(2 / 18))
    expected = 16 / 18 * 0.5 * local_ref + 2 / 18 * global_ref
    assert terms.total(local_weight=0.5).item() == pytest.approx(expected, rel=1e-5)

    keep_diagonal = DINOLoss(global_ignore_diagonal=False)(student_global, student_local, teacher)
    assert keep_diagonal.global_loss.item() == pytest.approx(
        naive_pair_mean(student_global.numpy(), teacher.numpy(), ignore_diagonal=False), rel=1e-5
    )
    assert (keep_diagonal.local_scale, keep_diagonal.global_scale) == (
        pytest.approx(16 / 20),
        pytest.approx(4 / 20),
    )


def test_dino_cross_entropy_is_entropy_when_student_matches_teacher() -> None:
    teacher = torch.softmax(torch.randn(1, 5, 9) * 2, dim=-1)
    matching_student = 0.1 * teacher.log()  # softmax(student / 0.1) == teacher
    entropy = -(teacher * teacher.log()).sum(-1).mean()
    loss = DINOLoss().cross_entropy(matching_student, teacher, ignore_diagonal=False)
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-5)
    other = DINOLoss().cross_entropy(matching_student + torch.randn(1, 5, 9), teacher, ignore_diagonal=False)
    assert other > loss  # Gibbs' inequality: CE >= entropy, with equality only at the teacher


def test_dino_gradient_reaches_student_only() -> None:
    student_global = torch.randn(2, 4, 6, requires_grad=True)
    student_local = torch.randn(3, 4, 6, requires_grad=True)
    teacher_logits = torch.randn(2 * 4, 6, requires_grad=True)
    teacher = sinkhorn_knopp(teacher_logits, teacher_temp=0.07).unflatten(0, (2, 4))
    probe = torch.softmax(torch.randn(2, 4, 6), dim=-1).requires_grad_()  # a teacher still in a graph
    DINOLoss()(student_global, student_local, teacher).total().backward()
    DINOLoss()(student_global, student_local, probe).total().backward()
    assert student_global.grad.abs().sum() > 0 and student_local.grad.abs().sum() > 0
    assert teacher_logits.grad is None and probe.grad is None


def test_dino_needs_local_crops() -> None:
    with pytest.raises(ValueError, match="local crop"):
        DINOLoss()(torch.randn(2, 3, 4), torch.randn(0, 3, 4), torch.rand(2, 3, 4))


# ---------------------------------------------------------------- iBOT


def test_ibot_matches_naive_per_image_weighting() -> None:
    n_images, n_patches, k = 4, 6, 5
    masks = torch.zeros(n_images, n_patches, dtype=torch.bool)
    masks[0, [1, 4]] = True
    masks[2, :5] = True  # image 1 and 3 unmasked: they count in the denominator only
    n_masked = int(masks.sum())
    student = torch.randn(n_masked, k, requires_grad=True)
    teacher = torch.softmax(torch.randn(n_masked, k), dim=-1)
    indices, weights = masked_patch_index(masks)
    assert indices.tolist() == masks.flatten().nonzero().flatten().tolist()
    loss = iBOTPatchLoss()(student, teacher, weights, n_images)

    total, row = 0.0, 0
    for image in range(n_images):
        count = int(masks[image].sum())
        for patch in range(n_patches):
            if masks[image, patch]:
                total += naive_ce(student[row].detach().numpy(), teacher[row].numpy()) / count
                row += 1
    assert loss.item() == pytest.approx(total / n_images, rel=1e-5)

    loss.backward()
    assert student.grad.abs().sum() > 0


def test_ibot_rejects_row_count_mismatch() -> None:
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, 0] = True
    _, weights = masked_patch_index(masks)
    with pytest.raises(ValueError, match="expected 1 masked-patch rows"):
        iBOTPatchLoss()(torch.randn(2, 3), torch.rand(2, 3), weights, 2)


# ---------------------------------------------------------------- KoLeo


def test_koleo_matches_naive_and_averages_crops() -> None:
    x = torch.randn(2, 10, 16)
    koleo = KoLeoLoss()
    per_crop = [naive_koleo(crop.numpy()) for crop in x]
    assert koleo(x[0]).item() == pytest.approx(per_crop[0], rel=1e-5)
    assert koleo(x).item() == pytest.approx(np.mean(per_crop), rel=1e-5)
    assert koleo(3.0 * x).item() == pytest.approx(koleo(x).item(), rel=1e-5)  # normalised first


def test_koleo_decreases_as_points_spread() -> None:
    n = 8
    losses = []
    for spread in (0.1, 0.3, 0.6, 2 * math.pi / n):  # n points on an arc of n * spread radians
        angles = torch.arange(n) * spread
        losses.append(KoLeoLoss()(torch.stack([angles.cos(), angles.sin()], dim=-1)).item())
    assert all(a > b for a, b in itertools.pairwise(losses))


def test_koleo_gradient_flows() -> None:
    x = torch.randn(6, 4, requires_grad=True)
    KoLeoLoss()(x).backward()
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------- Gram


@pytest.mark.parametrize("mode", ["plain", "remove_neg", "remove_only_teacher_neg"])
def test_gram_matches_naive(mode: str) -> None:
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    loss = GramLoss(
        remove_neg=mode == "remove_neg", remove_only_teacher_neg=mode == "remove_only_teacher_neg"
    )(student, teacher)
    assert loss.item() == pytest.approx(naive_gram(student.numpy(), teacher.numpy(), mode), rel=1e-5)


def test_gram_zero_for_identical_and_scale_invariant() -> None:
    student, teacher = torch.randn(3, 7, 6), torch.randn(3, 7, 6)
    gram = GramLoss()
    assert gram(student, student.clone()).item() == pytest.approx(0.0, abs=1e-12)
    scales = torch.rand(3, 7, 1) * 5 + 0.1  # a positive factor per patch vector
    assert gram(student * scales, teacher).item() == pytest.approx(gram(student, teacher).item(), rel=1e-5)
    assert gram(student, teacher * scales).item() == pytest.approx(gram(student, teacher).item(), rel=1e-5)


def test_gram_gradient_reaches_student_only() -> None:
    student = torch.randn(2, 4, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 3, requires_grad=True)
    GramLoss()(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_gram_rejects_conflicting_options_and_shapes() -> None:
    with pytest.raises(ValueError, match="exclusive"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(ValueError, match="differ"):
        GramLoss()(torch.randn(1, 4, 3), torch.randn(1, 9, 3))


def test_resize_patch_features_is_interpolate_of_the_token_map() -> None:
    batch, dim, (h_in, w_in), (h_out, w_out) = 2, 3, (8, 6), (4, 3)
    tokens = torch.randn(batch, h_in * w_in, dim)
    grid = torch.empty(batch, dim, h_in, w_in)
    for r in range(h_in):
        for c in range(w_in):
            grid[:, :, r, c] = tokens[:, r * w_in + c]
    resized = F.interpolate(grid, size=(h_out, w_out), mode="bicubic", align_corners=False, antialias=False)
    expected = torch.stack([resized[:, :, r, c] for r in range(h_out) for c in range(w_out)], dim=1)
    out = resize_patch_features(tokens, (h_in, w_in), (h_out, w_out))
    torch.testing.assert_close(out, expected)
    # and that map resize is plain separable Keys bicubic (no antialias, half-pixel centres)
    naive = np.einsum(
        "or,bdrc,pc->bdop", bicubic_matrix(h_in, h_out), grid.double().numpy(), bicubic_matrix(w_in, w_out)
    )
    np.testing.assert_allclose(resized.numpy(), naive, rtol=1e-5, atol=1e-5)


def test_resize_then_gram_equals_gram_of_student_grid_teacher() -> None:
    teacher_hr = torch.randn(2, 8 * 8, 5)
    student = torch.randn(2, 4 * 4, 5)
    teacher_lr = resize_patch_features(teacher_hr, (8, 8), (4, 4))
    assert teacher_lr.shape == (2, 16, 5)
    assert GramLoss()(student, teacher_lr).item() == pytest.approx(
        naive_gram(student.numpy(), teacher_lr.numpy()), rel=1e-5
    )
    with pytest.raises(ValueError, match="grid"):
        resize_patch_features(teacher_hr, (8, 7), (4, 4))


# ---------------------------------------------------------------- torch.distributed (2 gloo processes)


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        data = torch.load(Path(out_dir) / "inputs.pt", weights_only=True)
        dino_rows = data["dino_logits"].chunk(world_size)[rank]
        ibot_rows = data["ibot_logits"].split(data["ibot_split"])[rank]
        one_rank_rows = data["ibot_logits"].split([0, 20])[rank]
        koleo_rows = data["koleo"].chunk(world_size)[rank]
        results = {
            "dino": sinkhorn_knopp(dino_rows, teacher_temp=0.1),
            "ibot": sinkhorn_knopp(ibot_rows, teacher_temp=0.1),
            "ibot_one_rank": sinkhorn_knopp(one_rank_rows, teacher_temp=0.1),
            "koleo": KoLeoLoss()(koleo_rows),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_all_reduces_and_koleo_stays_per_process(tmp_path: Path) -> None:
    inputs = {
        "dino_logits": torch.randn(12, 6),
        "ibot_logits": torch.randn(20, 6),
        "ibot_split": [7, 13],  # ranks hold different numbers of masked patches
        "koleo": torch.randn(10, 4),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert not dist.is_initialized()  # single-process references below
    for key in ("dino", "ibot"):
        gathered = torch.cat([r[key] for r in ranks])
        torch.testing.assert_close(gathered, sinkhorn_knopp(inputs[f"{key}_logits"], teacher_temp=0.1))
    # a rank without masked patches still joins every collective and returns no rows
    assert ranks[0]["ibot_one_rank"].shape == (0, 6)
    torch.testing.assert_close(
        ranks[1]["ibot_one_rank"], sinkhorn_knopp(inputs["ibot_logits"], teacher_temp=0.1)
    )
    halves = inputs["koleo"].chunk(2)
    for r, half in enumerate(halves):
        assert ranks[r]["koleo"].item() == pytest.approx(naive_koleo(half.numpy()), rel=1e-5)
    assert ranks[0]["koleo"].item() != pytest.approx(naive_koleo(inputs["koleo"].numpy()), rel=1e-3)


def _koleo_group_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x = torch.load(Path(out_dir) / "koleo.pt", weights_only=True)  # [C, world * B, D]
        results = {}
        for group_size in (4, 8):
            rows = x.chunk(world_size, dim=1)[rank].clone().requires_grad_(True)
            loss = KoLeoLoss(group_size=group_size)(rows)
            loss.backward()
            results[group_size] = (loss.detach(), rows.grad)
        torch.save(results, Path(out_dir) / f"koleo{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_koleo_groups_search_neighbours_across_processes(tmp_path: Path) -> None:
    """2 processes x B=4: group 8 = the global batch, group 4 = each process alone (the per-GPU loss)."""
    x = torch.randn(2, 8, 5)
    x[:, 5] = x[:, 1] + 0.01 * torch.randn(2, 5)  # sample 1 (rank 0) has its neighbour on rank 1
    torch.save(x, tmp_path / "koleo.pt")
    mp.spawn(_koleo_group_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"koleo{r}.pt", weights_only=True) for r in range(2)]
    for r in range(2):
        mine = x[:, 4 * r : 4 * r + 4]
        loss, grad = ranks[r][4]
        alone = mine.clone().requires_grad_(True)
        assert loss.item() == pytest.approx(KoLeoLoss()(alone).item(), rel=1e-6)
        KoLeoLoss()(alone).backward()
        torch.testing.assert_close(grad, alone.grad)
        assert loss.item() == pytest.approx(np.mean([naive_koleo(c.numpy()) for c in mine]), rel=1e-5)
    # group 8: each rank's loss is the mean over its own samples of the whole-batch neighbour terms
    full = x.clone().requires_grad_(True)
    per_sample = []
    for c in range(2):
        whole = [unit(v.astype(np.float64)) for v in x[c].numpy()]
        for i in range(8):
            j = max((j for j in range(8) if j != i), key=lambda j: float(whole[i] @ whole[j]))
            per_sample.append(
                (c, i, -math.log(math.sqrt(float(((whole[i] - whole[j] + 1e-8) ** 2).sum())) + 1e-8))
            )
    for r in range(2):
        expected = np.mean([t for c, i, t in per_sample if 4 * r <= i < 4 * r + 4])
        assert ranks[r][8][0].item() == pytest.approx(expected, rel=1e-5)
    assert ranks[0][8][0].item() != pytest.approx(ranks[0][4][0].item(), rel=1e-3)  # the near pair counts
    # gradients: DDP averages the ranks' losses, i.e. the whole-batch mean; all_gather sums the gradient
    # flowing back to each rank's rows, so each rank's grad is world_size x that of the whole-batch loss
    KoLeoLoss(group_size=8)(full).backward()
    for r in range(2):
        torch.testing.assert_close(ranks[r][8][1], 2 * full.grad[:, 4 * r : 4 * r + 4])


def test_koleo_group_size_must_tile_the_batch() -> None:
    with pytest.raises(ValueError, match="multiple of the per-process batch"):
        KoLeoLoss(group_size=6)(torch.randn(4, 3))
    assert KoLeoLoss(group_size=4)(torch.ones(4, 3) + torch.eye(4, 3)).item() == pytest.approx(
        KoLeoLoss()(torch.ones(4, 3) + torch.eye(4, 3)).item()
    )


def test_losses_stay_float32_under_bf16_autocast() -> None:
    """Mixed-precision training runs the losses inside autocast, which would run their matmuls in bf16."""
    torch.manual_seed(0)
    student_global, student_local = torch.randn(2, 16, 4096), torch.randn(4, 16, 4096)
    teacher = torch.softmax(torch.randn(2, 16, 4096) / 0.05, dim=-1)
    patches, gram_teacher = torch.randn(4, 49, 32), torch.randn(4, 49, 32)
    cls = torch.randn(2, 16, 32)

    def losses() -> list[float]:
        terms = DINOLoss()(student_global, student_local, teacher)
        return [terms.local_loss.item(), terms.global_loss.item(), GramLoss()(patches, gram_teacher).item(),
                KoLeoLoss()(cls).item()]  # fmt: skip

    reference = losses()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = losses()
    assert mixed == pytest.approx(reference, rel=1e-6)


def test_compiled_losses_match_eager_without_recompiling_per_step() -> None:
    """``compile_losses`` with the default inductor backend: DINO and iBOT losses and their gradients equal
    the eager ones on bf16 student logits, and new numbers of masked patches (other crop resolutions)
    compile the iBOT graph at most twice (static, then dynamic), not once per new count."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of earlier tests in this process
    generator = torch.Generator().manual_seed(0)
    k, batch = 384, 3
    eager = {"dino": DINOLoss(), "ibot": iBOTPatchLoss()}
    compiled = {"dino": DINOLoss(), "ibot": iBOTPatchLoss()}
    compile_losses(*compiled.values())
    for n_masked in (40, 57, 23, 61):
        student_global = torch.randn(2, batch, k, generator=generator).bfloat16()
        student_local = torch.randn(8, batch, k, generator=generator).bfloat16()
        teacher = torch.softmax(torch.randn(2, batch, k, generator=generator), dim=-1)
        patches = torch.randn(n_masked, k, generator=generator).bfloat16()
        patch_teacher = torch.softmax(torch.randn(n_masked, k, generator=generator) / 0.1, dim=-1)
        weights = torch.rand(n_masked, generator=generator)
        results = {}
        for name, losses in (("eager", eager), ("compiled", compiled)):
            inputs = [t.clone().requires_grad_() for t in (student_global, student_local, patches)]
            dino = losses["dino"](inputs[0], inputs[1], teacher).total(local_weight=0.5)
            ibot = losses["ibot"](inputs[2], patch_teacher, weights, n_crops=2 * batch)
            (dino + ibot).backward()
            results[name] = (dino.detach(), ibot.detach(), *(t.grad.float() for t in inputs))
        for got, want in zip(results["compiled"], results["eager"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert results["compiled"][2].abs().sum() > 0  # gradient reached the local crops
    assert compiled["ibot"]._compiled_call_impl is not None
    # the DINO graph once, the iBOT graph at most twice: 4 row counts, no per-step recompilation
    assert 2 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
