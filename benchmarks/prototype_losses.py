"""DINO and iBOT losses over 65536 prototypes, forward + backward: ``compile_losses`` against eager.

    python benchmarks/prototype_losses.py              # CPU (and the GPU, if there is one); prints a table
    python benchmarks/prototype_losses.py --markdown   # also writes the section of benchmarks/RESULTS.md

Baseline: the eager :class:`~geodino.train.losses.DINOLoss` and :class:`~geodino.train.losses.iBOTPatchLoss`,
whose float32 operators are those of the official ``dinov3/loss`` code (cast, temperature, log-softmax,
product with the teacher targets, sums). Candidate: the same modules after
:func:`~geodino.train.base.compile_losses` (what ``DINOv3Module(compile=True)`` runs). Sizes of a ViT-L step
at 64 images per GPU: the iBOT call on M = 4915 masked patches (128 global crops x 256 patches x 0.5 masked x
0.3 mean ratio), the DINO call on 2 x 64 global and 8 x 64 local CLS rows, bf16 student logits (the head's
output under autocast) and float32 teacher targets. The compiled iBOT loss is first called with two other
row counts, so the timed graph is the dynamic one that training with mixed crop resolutions reuses (the
masked-patch count is fixed by the batch and crop sizes). Reports the median of ``--repeats`` timed
forward + backward calls after the warm-up, and the largest difference of loss and of student-logit
gradient (relative to the largest gradient entry; the gradient is bf16, as the logits, so one bf16 rounding
is ~4e-3) between the two.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from results_md import markdown_table, write_section
from torch import Tensor, nn

from geodino.train.base import compile_losses
from geodino.train.losses import DINOLoss, iBOTPatchLoss

K = 65536
IMAGES = 64  # per GPU
MASKED = 4915
CALLS = ("iBOT", "DINO")


def inputs(call: str, rows: int, device: str) -> tuple[list[Tensor], list[Tensor]]:
    """(student logits needing gradients, fixed teacher targets and weights) of one call."""
    gen = torch.Generator().manual_seed(rows)

    def logits(*shape: int) -> Tensor:
        return (0.5 * torch.randn(*shape, generator=gen)).to(device, torch.bfloat16)

    def targets(*shape: int) -> Tensor:
        return torch.softmax(torch.randn(*shape, generator=gen) / 0.1, dim=-1).to(device)

    if call == "iBOT":
        weights = torch.rand(rows, generator=gen).to(device)
        return [logits(rows, K)], [targets(rows, K), weights]
    return [logits(2, IMAGES, K), logits(8, IMAGES, K)], [targets(2, IMAGES, K)]


def loss_step(call: str, loss: nn.Module) -> Callable[[list[Tensor], list[Tensor]], tuple[Tensor, Tensor]]:
    """Forward + backward of ``loss``; returns the loss and the gradient of the first student tensor."""

    def step(student: list[Tensor], fixed: list[Tensor]) -> tuple[Tensor, Tensor]:
        student = [t.detach().requires_grad_() for t in student]
        if call == "iBOT":
            value = loss(student[0], fixed[0], fixed[1], n_crops=2 * IMAGES)
        else:
            value = loss(*student, fixed[0]).total(local_weight=1.0)
        value.backward()
        return value.detach(), student[0].grad

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(
    step: Callable, student: list[Tensor], fixed: list[Tensor], repeats: int, device: str
) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step(student, fixed)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(call: str, device: str, repeats: int) -> tuple[float, float, float, float, float]:
    """(eager ms, compiled ms, compile s, max |loss diff|, max relative |gradient diff|) on ``device``."""
    make = {"iBOT": iBOTPatchLoss, "DINO": DINOLoss}[call]
    eager, compiled = loss_step(call, make()), make()
    compile_losses(compiled)
    compiled = loss_step(call, compiled)
    rows = MASKED if call == "iBOT" else 2 * IMAGES
    student, fixed = inputs(call, rows, device)
    start = time.perf_counter()
    warm_rows = (MASKED - 301, MASKED + 173) if call == "iBOT" else ()
    for n in warm_rows:  # the row counts of other steps: the timed graph is the dynamic one
        compiled(*inputs(call, n, device))
    compiled(student, fixed)
    sync(device)
    compile_s = time.perf_counter() - start
    eager(student, fixed)  # warm-up
    eager_s = median_seconds(eager, student, fixed, repeats, device)
    compiled_s = median_seconds(compiled, student, fixed, repeats, device)
    (loss_a, grad_a), (loss_b, grad_b) = eager(student, fixed), compiled(student, fixed)
    return (
        eager_s * 1e3,
        compiled_s * 1e3,
        compile_s,
        (loss_a - loss_b).abs().item(),
        ((grad_a.float() - grad_b.float()).abs().max() / grad_a.float().abs().max()).item(),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--markdown", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch._inductor.config.force_disable_caches = True  # compile s: a first run's cost, no on-disk cache
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        for call in CALLS:
            torch._dynamo.reset()
            size = f"{MASKED} x {K}" if call == "iBOT" else f"(2 + 8) x {IMAGES} x {K}"
            rows.append((name, call, size, *measure(call, device, args.repeats)))
    header = ["device", "call", "student logits", "eager ms", "compiled ms", "speed-up", "compile s"]
    header += ["max loss diff", "max grad diff (rel.)"]
    lines = markdown_table(
        header,
        [
            (d, c, s, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x", f"{t:.0f}", f"{e:.1e}", f"{g:.1e}")
            for d, c, s, a, b, t, e, g in rows
        ],
    )
    print("\n".join(lines))
    if args.markdown:
        intro = [
            f"## DINO and iBOT losses, compiled against eager ({time.strftime('%Y-%m-%d %H:%M')})",
            "",
            "`python benchmarks/prototype_losses.py --markdown`: median of "
            f"{args.repeats} forward + backward calls at ViT-L B=64 sizes, eager modules (the official "
            f"loss operators) against `compile_losses` (torch {torch.__version__}); compile s (inductor "
            "caches off) includes the dynamic recompilation for a second and third masked-patch count.",
            "",
        ]
        write_section("prototype_losses", intro + lines)


if __name__ == "__main__":
    main()
