"""Memory traffic of a compiled ViT-L/16 block in a DINOv3 training step by precision, as inductor counts it.

    python benchmarks/block_traffic.py             # CPU: one compiled block per precision; prints a table
    python benchmarks/block_traffic.py --markdown  # also writes its section of benchmarks/RESULTS.md
    python benchmarks/block_traffic.py --device cuda  # the same count from the Triton backend's kernels

Why: on a GPU, a batch-128 ViT-L step spends ~0.22 s outside its matrix products and attention
(``train_gpu.py`` profile, NVIDIA H200, session 6), in kernels bound by memory traffic: LayerNorm, RoPE,
GELU, LayerScale, residual adds, drop-path gathers and scatters, and their gradients. Their time follows the
bytes they move, and inductor's scheduler counts those bytes for every kernel it generates
(``GraphLowering.count_bytes``, which it runs when the ``inductor_metrics`` log is on; the reads and writes
of each fused kernel, each fallback ATen kernel and each matmul / attention call). So the traffic of a
precision can be compared without a GPU.

What runs: one ViT-L/16 SAT block (width 1024, 16 heads, MLP 4096, LayerScale, masked K bias) compiled with
``torch.compile``, with the crops of a 1/32 slice of a batch-128 step through the list forward (8 global
crops of 261 tokens and 32 local crops of 54 tokens, drop-path 0.4 as in the recipe): the student's forward
and backward (random upstream gradients), then the teacher's forward on the global crops (eval mode, no
gradients). Each precision row compiles afresh (caches off).

Precisions (the baseline comes first):
- ``fp32 params, fp32 RoPE``: float32 parameters under bf16 autocast, as in geodino's DDP runs and every row
  measured on a GPU so far. Autocast keeps LayerNorm, LayerScale products and the residual stream in float32.
- ``fp32 params, bf16 RoPE``: the same with ``pos_embed_rope_dtype="bf16"``.
- ``bf16 params, fp32 RoPE``: the parameters FSDP's mixed precision computes with (``FSDP_BF16``), bf16
  autocast on top, as geodino's FSDP strategy.
- ``bf16 params, bf16 RoPE``: the official training precision (FSDP2 mixed precision, the class default
  RoPE dtype).

Projection (an estimate, not a measurement): the measured H200 step of ``compile_fused_4x`` (0.517 s, MFU
35.3 %) is taken as 0.295 s of matmuls and attention, ~0.030 s of heads, losses, optimizer, EMA and clipping
(Sinkhorn 14 ms, AdamW 9 ms and the smaller kernels in the profile of RESULTS.md), and 0.192 s of block
kernels outside matmuls and attention. The projected step scales that last part by the row's traffic
outside matmuls and attention relative to the baseline, as if those kernels ran at the same share of peak
bandwidth; MFU scales inversely with the step. The CPU backend fuses differently from Triton, so the rows
compare precisions; ``--device cuda`` counts Triton's own kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import torch
import torch._dynamo
import torch._inductor.compile_fx
import torch._inductor.config
import torch._inductor.metrics
from results_md import markdown_table, write_section
from torch import Tensor
from torch._inductor.scheduler import ExternKernelSchedulerNode

from geodino.models import build_dinov3, get_preset

PRESET = "dinov3_vitl16.sat493m"
GLOBAL_CROPS = (8, 16)  # crops, patches per side: 256 px global crops of 128 images / 32
LOCAL_CROPS = (32, 7)  # 112 px local crops
DROP_PATH = 0.4
# the session-6 H200 measurement the projection starts from (RESULTS.md, "fp8, batch 128, ...")
MEASURED_STEP_S, MEASURED_MFU = 0.517, 0.353
MATMUL_ATTENTION_S, OUTSIDE_BLOCKS_S = 0.295, 0.030


@dataclass(frozen=True)
class Precision:
    name: str
    param_dtype: torch.dtype
    rope_dtype: str


#: by command-line key; the first is the baseline
PRECISIONS = {
    "fp32": Precision("fp32 params, fp32 RoPE (DDP today)", torch.float32, "fp32"),
    "fp32-rope16": Precision("fp32 params, bf16 RoPE", torch.float32, "bf16"),
    "bf16": Precision("bf16 params, fp32 RoPE (FSDP)", torch.bfloat16, "fp32"),
    "bf16-rope16": Precision("bf16 params, bf16 RoPE (official)", torch.bfloat16, "bf16"),
}


def kernel_kind(node: object) -> str:
    """'generated' for a kernel inductor wrote, 'matmul/attention' for cuBLAS / SDPA / convolution calls,
    'fallback' for any other ATen kernel it calls as is (an op it does not lower)."""
    if not isinstance(node, ExternKernelSchedulerNode):
        return "generated"
    name = str(getattr(node.node, "python_kernel_name", "") or "")
    library = any(k in name for k in ("mm", "scaled_dot_product", "convolution"))
    return "matmul/attention" if library else "fallback"


@contextlib.contextmanager
def inductor_byte_counts() -> Iterator[None]:
    """Inductor counts the bytes of each graph it compiles meanwhile (it counts while its ``inductor_metrics``
    log is on; the counts are read, not printed) and compiles every graph afresh (a cached one is not
    counted)."""
    log = logging.getLogger(torch._inductor.compile_fx.inductor_metrics_log.name)
    level, propagate = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with torch._inductor.config.patch(force_disable_caches=True):
            yield
    finally:
        log.setLevel(level)
        log.propagate = propagate


def count_traffic(fn: Callable[[], object]) -> dict[str, float]:
    """Bytes read and written per kernel kind by the graphs inductor compiles while ``fn()`` runs, and the
    number of kernels of each kind (``<kind> kernels``)."""
    torch._inductor.metrics.reset()
    with inductor_byte_counts():
        fn()
    totals: dict[str, float] = {}
    for node, n_words in torch._inductor.metrics.nodes_num_elem:  # (node, bytes // 4) per scheduled node
        kind = kernel_kind(node)
        totals[kind] = totals.get(kind, 0.0) + 4 * n_words
        if n_words:
            totals[f"{kind} kernels"] = totals.get(f"{kind} kernels", 0) + 1
    return totals


def block_step(precision: Precision, device: torch.device) -> dict[str, float]:
    """Traffic of the student's forward + backward and the teacher's forward through one compiled block."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    kwargs = dict(get_preset(PRESET).kwargs, depth=1, drop_path_rate=DROP_PATH)
    kwargs["pos_embed_rope_dtype"] = precision.rope_dtype
    vit = build_dinov3(**kwargs).to(device)
    block = vit.blocks[0]
    for p in block.parameters():  # what FSDP's mixed precision computes with; buffers keep their dtype
        p.data = p.data.to(precision.param_dtype)
    crops = [GLOBAL_CROPS, LOCAL_CROPS]
    shapes = [(n, side * side + vit.n_prefix_tokens, vit.embed_dim) for n, side in crops]
    tokens = [torch.randn(shape, device=device, dtype=precision.param_dtype) for shape in shapes]
    ropes = [vit.rope_embed(H=side, W=side) for _, side in crops]
    student, teacher = torch.compile(block), torch.compile(block)

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            block.train()
            xs = [t.clone().requires_grad_() for t in tokens]
            out: list[Tensor] = student(xs, ropes)
            torch.autograd.backward(out, [torch.randn_like(o) for o in out])
            block.eval()
            with torch.no_grad():
                teacher([tokens[0]], ropes[:1])

    return count_traffic(run)


def projected_step_s(other_bytes: float, baseline_other_bytes: float) -> float:
    """The measured step with its block kernels outside matmuls and attention scaled by the traffic ratio."""
    blocks_s = MEASURED_STEP_S - MATMUL_ATTENTION_S - OUTSIDE_BLOCKS_S
    return MATMUL_ATTENTION_S + OUTSIDE_BLOCKS_S + blocks_s * other_bytes / baseline_other_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (C++ backend) or cuda (Triton backend)")
    ap.add_argument(
        "--precisions",
        nargs="+",
        choices=list(PRECISIONS),
        default=list(PRECISIONS),
        help="rows to count (default: all); the baseline fp32 is always counted first",
    )
    ap.add_argument("--markdown", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = ap.parse_args()
    device = torch.device(args.device)

    header = [
        "precision",
        "generated kernels MB",
        "fallback kernels MB",
        "matmul + attention MB",
        "outside matmul + attention MB",
        "vs baseline",
        "kernels (generated / fallback)",
        "projected step s",
        "projected MFU",
    ]
    rows, baseline = [], None
    for key in ["fp32", *(k for k in PRECISIONS if k in args.precisions and k != "fp32")]:
        precision = PRECISIONS[key]
        t = block_step(precision, device)
        other = t.get("generated", 0.0) + t.get("fallback", 0.0)
        baseline = baseline or other
        step_s = projected_step_s(other, baseline)
        rows.append(
            [
                precision.name,
                f"{t.get('generated', 0.0) / 1e6:.1f}",
                f"{t.get('fallback', 0.0) / 1e6:.1f}",
                f"{t.get('matmul/attention', 0.0) / 1e6:.1f}",
                f"{other / 1e6:.1f}",
                f"{other / baseline:.2f}",
                f"{int(t.get('generated kernels', 0))} / {int(t.get('fallback kernels', 0))}",
                f"{step_s:.3f}",
                f"{MEASURED_MFU * MEASURED_STEP_S / step_s:.1%}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)

    table = markdown_table(header, rows)
    print("\n".join(table))
    if args.markdown:
        when = datetime.now().strftime("%Y-%m-%d %H:%M")
        write_section(
            f"block_traffic {args.device}",
            [
                f"## Memory traffic of a compiled ViT-L block by precision, {args.device} ({when})",
                "",
                f"`python benchmarks/block_traffic.py --device {args.device} --markdown` (torch "
                f"{torch.__version__}, {platform.processor() or platform.machine()}): inductor's byte counts "
                "for one ViT-L/16 block, student forward + backward and teacher forward on 1/32 of a "
                "batch-128 step (8 global crops of 261 tokens, 32 local crops of 54 tokens, drop-path 0.4). "
                "The projection scales the block kernels outside matmuls and attention of the measured H200 "
                f"step ({MEASURED_STEP_S} s, MFU {MEASURED_MFU:.1%}) by each row's traffic; an estimate, not "
                "a measurement (see the script's docstring).",
                "",
                *table,
            ],
        )


if __name__ == "__main__":
    main()
