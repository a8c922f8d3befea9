"""GPU check of DINOv3 pretraining: ViT-L/16 training throughput, peak memory and MFU in bf16 for several
execution variants (eager, torch.compile, max-autotune, activation checkpointing, fused AdamW, fp8 blocks),
then a short pretrain -> Gram anchoring run through Lightning (FSDP, bf16-mixed) on a synthetic corpus.

    python benchmarks/train_gpu.py --out results/                    # one H100 / H200: about 7-8 min
    python benchmarks/train_gpu.py --out results/ --skip-lightning   # variants only: about 4 min
    python benchmarks/train_gpu.py --tiny --out /tmp/x               # CPU smoke test of every code path

Part 1 times the full official iteration (teacher forward, student multi-crop forward/backward, per-submodule
clipping, AdamW, EMA update) of :class:`geodino.train.DINOv3Module` on random crops with real iBOT masks, once
per variant, each on a fresh module and a reset ``torch._dynamo``. ``first_step_s`` includes compilation.
Model FLOPs per image come from ``torch.utils.flop_counter.FlopCounterMode`` on one eager step at ``--batch``
(it counts the SDPA kernels; recomputation by checkpointing is not model FLOPs), and MFU = FLOPs per image x
images/s / peak dense bf16 FLOP/s of the GPU (H100/H200 SXM: 989 TFLOP/s, :data:`PEAK_BF16`), also for the
fp8 variant, so that MFU compares the variants on the same model FLOPs and peak. The FLOPs are those the
step runs: the student's residual branches only on the crops that drop-path (0.4) keeps, about 60 % of them.
Counting every crop would give 1.51x the FLOPs per step, and so 1.51x the MFU at the same speed. A variant
that runs out of memory is reported as such and the next one runs, as is an fp8 variant where fp8 is
unavailable (no torchao, or a GPU without fp8 tensor cores).
Then it times the colour operations of a step's crops on the device (``photometric_on="device"``:
:class:`~geodino.train.PhotometricAugmentation` on the crops of the ``4 x --batch`` images of the best
variants, with the draws of :class:`~geodino.train.MultiCropAugmentation`).
Part 2 runs ``Trainer.fit`` (bf16-mixed, ``--stage-strategy``, activation checkpointing in the pretrain
stage) for the pretrain and Gram stages with the real data pipeline (corpus -> random chips -> multi-crop ->
masks, DataLoader workers, colour operations on the device) and reports losses, step times and how long
each step waited for its batch (Lightning's ``SimpleProfiler``), without a GPU synchronisation per step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch._inductor.config
from lightning.pytorch.profilers import SimpleProfiler
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from geodino.data import RasterCorpus, make_scene
from geodino.models.presets import SAT_MEAN, SAT_STD
from geodino.train import (
    DataWaitMonitor,
    DINOv3Module,
    ExportTeacher,
    MaskingGenerator,
    MultiCropAugmentation,
    PretrainDataModule,
    collate_multicrop,
)
from geodino.train.augment import masked_patch_index
from geodino.train.base import FSDP_BF16, FSDP_UNITS, clip_grad_norm
from geodino.train.masking import sample_batch_masks

#: Dense bf16 tensor-core peaks by device name, the first match wins: the PCIe and NVL cards run fewer SMs
#: or lower clocks than SXM (H100 PCIe 114 SMs, 756 TFLOP/s; H100 / H200 NVL 835 TFLOP/s, NVIDIA datasheets).
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)
N_LOCAL = 8
#: Prototypes, hidden and bottleneck width of both heads (official default config) and with ``--tiny``.
HEAD_KEYS = ("n_prototypes", "hidden_dim", "bottleneck_dim")
HEADS, TINY_HEADS = (65536, 2048, 256), (256, 128, 64)
#: Defaults of the sizes and step counts on a GPU and with ``--tiny`` (CPU).
GPU_DEFAULTS = dict(
    batch=32, global_size=256, local_size=112, warmup=3, steps=10, stage_batch=32, stage_steps=200
)
TINY_DEFAULTS = dict(batch=4, global_size=64, local_size=32, warmup=1, steps=2, stage_batch=4, stage_steps=12)


@dataclass(frozen=True)
class Variant:
    """One way of running the same training step."""

    name: str
    compile: bool = False
    activation_checkpointing: bool | str = False  # True: full, "selective": matmul and attention outputs kept
    fused_adamw: bool = False
    fp8: bool = False  # float8 matmuls in the blocks (torchao)
    # FSDP units with bf16 parameters, as Lightning's FSDPStrategy under bf16-mixed (official precision);
    # on one GPU nothing is sharded, but the networks compute in bf16, the residual stream included
    fsdp: bool = False
    # the only scaled-dot-product attention backend allowed (a torch.nn.attention.SDPBackend name); None:
    # PyTorch's choice (cuDNN on the H200 in session 6)
    sdpa: str | None = None
    # RoPE periods and rotation in bf16, as the official training builds (the hub presets: float32); with
    # float32 tables the compiled rotation writes float32 copies of q and k besides the bf16 ones
    rope_bf16: bool = False
    # torch._inductor.config settings patched while the variant compiles and runs
    inductor: tuple[tuple[str, object], ...] = ()
    batch_scale: int = 1  # batch = --batch x batch_scale


def fused_4x(name: str, inductor: dict[str, object] | None = None, **fields: object) -> Variant:
    """``compile_fused_4x`` with other ``fields`` and ``torch._inductor.config`` settings ``inductor``."""
    base = {"compile": True, "fused_adamw": True, "batch_scale": 4}
    return Variant(name, inductor=tuple((inductor or {}).items()), **{**base, **fields})


VARIANTS = {
    v.name: v
    for v in (
        Variant("eager"),
        Variant("compile", compile=True),
        Variant("compile_fused", compile=True, fused_adamw=True),
        Variant("compile_fused_2x", compile=True, fused_adamw=True, batch_scale=2),
        # ~95 GiB at ViT-L: fits an H200, reported as out of memory on an H100
        Variant("compile_fused_4x", compile=True, fused_adamw=True, batch_scale=4),
        # ~135 GiB at ViT-L: the largest batch an H200 may hold; the per-step costs that do not grow with
        # the batch (AdamW, EMA, clipping, launches) weigh less
        Variant("compile_fused_6x", compile=True, fused_adamw=True, batch_scale=6),
        Variant(
            "compile_ckpt_4x", compile=True, activation_checkpointing=True, fused_adamw=True, batch_scale=4
        ),
        Variant(
            "compile_sac_4x",
            compile=True,
            activation_checkpointing="selective",
            fused_adamw=True,
            batch_scale=4,
        ),
        Variant("compile_fused_2x_fp8", compile=True, fused_adamw=True, fp8=True, batch_scale=2),
        Variant("compile_fused_4x_fp8", compile=True, fused_adamw=True, fp8=True, batch_scale=4),
        # the Triton kernels' launch configurations (block sizes, warps) benchmarked per kernel instead of
        # inductor's heuristics: the elementwise kernels of the B=128 profile ran at about half the HBM
        # bandwidth their bytes allow
        fused_4x(
            "compile_fused_4x_tuned",
            inductor={"coordinate_descent_tuning": True, "max_autotune_pointwise": True},
        ),
        # independent kernels of one graph (e.g. the same op on the global and the local crops) launched as
        # one ("combo kernels", horizontal fusion)
        fused_4x("compile_fused_4x_combo", inductor={"combo_kernels": True}),
        # max-autotune of the matmuls: Triton templates, with bias / GELU / casts fused into their epilogues
        # where they beat cuBLAS (longest compilation)
        fused_4x("compile_fused_4x_autotune", inductor={"max_autotune": True}),
        # bf16 parameters (FSDP mixed precision) instead of float32 parameters under autocast: LayerNorm,
        # LayerScale, residual adds and drop-path gathers move half the bytes
        fused_4x("compile_fused_4x_fsdp", fsdp=True),
        # ... and RoPE in bf16 as well: the official training precision
        fused_4x("compile_fused_4x_fsdp_rope16", fsdp=True, rope_bf16=True),
        fused_4x("compile_fused_6x_fsdp_rope16", fsdp=True, rope_bf16=True, batch_scale=6),
        fused_4x(
            "compile_fused_4x_fsdp_rope16_tuned",
            inductor={"coordinate_descent_tuning": True},
            fsdp=True,
            rope_bf16=True,
        ),
        # attention measured ~95 TFLOP/s (cuDNN, 56 ms of a B=128 step): 261- and 54-token sequences fill
        # few 128-row tiles; the other fused backends on the same shapes
        fused_4x("compile_fused_4x_fsdp_rope16_flash", fsdp=True, rope_bf16=True, sdpa="FLASH_ATTENTION"),
        fused_4x(
            "compile_fused_4x_fsdp_rope16_efficient", fsdp=True, rope_bf16=True, sdpa="EFFICIENT_ATTENTION"
        ),
    )
}


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16 if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_batch(b: int, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Random crops of ``b`` images with the official iBOT mask rule (half the global crops masked) and the
    masked-patch indices and weights that the collate computes."""
    grid = args.global_size // 16
    masks = sample_batch_masks(2 * b, MaskingGenerator((grid, grid)), np.random.default_rng(0))
    indices, weights = masked_patch_index(masks)  # on the CPU, as the collate does
    return {
        "collated_global_crops": torch.randn(2 * b, 3, args.global_size, args.global_size, device=device),
        "collated_local_crops": torch.randn(N_LOCAL * b, 3, args.local_size, args.local_size, device=device),
        "collated_masks": masks.to(device),
        "mask_indices_list": indices.to(device),
        "masks_weight": weights.to(device),
    }


def build(args: argparse.Namespace, device: torch.device, variant: Variant) -> DINOv3Module:
    """The benchmarked module, created on ``device`` (fast initialisation of the large networks on GPU)."""
    overrides = {"depth": 2, "embed_dim": 64, "num_heads": 2} if args.tiny else {}
    if variant.rope_bf16:
        overrides["pos_embed_rope_dtype"] = "bf16"
    heads = {
        f"{head}_head_{key}": value
        for head in ("dino", "ibot")
        for key, value in zip(HEAD_KEYS, TINY_HEADS if args.tiny else HEADS, strict=True)
    }
    with device:
        return DINOv3Module(
            args.backbone,
            backbone_overrides=overrides,
            **heads,
            lr={"peak": 1e-4},
            freeze_last_layer=0,
            compile=variant.compile,
            activation_checkpointing=variant.activation_checkpointing,
            fp8=variant.fp8,
        )


def fsdp_wrap(module: DINOv3Module, device: torch.device) -> nn.Module:
    """``module`` in FSDP units with bf16 parameters, as Lightning's ``FSDPStrategy`` wraps it under
    ``bf16-mixed`` (:func:`geodino.train.base.configure_fsdp`), in a process group of one: nothing is
    sharded (``NO_SHARD``, what FSDP runs at world size 1), so the difference to the other variants is the
    precision. Keeps the original parameters (``use_orig_params``, as Lightning) for the optimizer, the
    clipping and the EMA update."""
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1)
    return FullyShardedDataParallel(
        module,
        auto_wrap_policy=ModuleWrapPolicy(FSDP_UNITS),
        mixed_precision=FSDP_BF16,
        sharding_strategy=ShardingStrategy.NO_SHARD,
        use_orig_params=True,
        device_id=torch.device(device.type, torch.cuda.current_device()) if device.type == "cuda" else device,
    )


def make_step(
    module: DINOv3Module,
    batch: dict,
    device: torch.device,
    variant: Variant,
    wrapped: nn.Module | None = None,
) -> Callable[[], Tensor]:
    """One official iteration as a function returning the loss (no host sync): forward, backward,
    per-submodule clipping and the skip flag of non-finite gradients, AdamW (fused with
    ``variant.fused_adamw``, skipping on the flag), EMA (skipping too), with ``variant.sdpa``'s
    attention backend. With ``wrapped`` (the FSDP root around ``module``) the losses are computed through
    the root's forward, as Lightning calls ``training_step``."""
    if wrapped is None:
        forward = partial(module.compute_losses, batch, step=0)
    else:
        forward = partial(_ForwardRedirection(), wrapped, module, "compute_losses", batch, step=0)
    groups = module.configure_optimizers().param_groups
    for group in groups:
        group["lr"] = 1e-4 * group["lr_multiplier"]
        group["weight_decay"] = 0.04 * group["wd_multiplier"]
    optimizer = torch.optim.AdamW(
        groups, betas=tuple(module.hparams.betas), fused=variant.fused_adamw or None
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def attention() -> contextlib.AbstractContextManager:
        return sdpa_kernel(getattr(SDPBackend, variant.sdpa)) if variant.sdpa else contextlib.nullcontext()

    def step() -> Tensor:
        with attention():
            with autocast:
                loss = forward()["loss"]
            loss.backward()
        norms = [clip_grad_norm(sub.parameters(), 30.0) for sub in module.student.values()]
        found_inf = module.nonfinite.update(norms)  # the module's skip flag, read on the device
        if variant.fused_adamw:
            optimizer.found_inf = found_inf
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.update_ema(0.994)
        return loss.detach()

    return step


def flops_per_image(args: argparse.Namespace, device: torch.device) -> float:
    """Model FLOPs of one training iteration per image: one counted eager step at ``--batch``."""
    module = build(args, device, VARIANTS["eager"])
    step = make_step(module, random_batch(args.batch, args, device), device, VARIANTS["eager"])
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / args.batch


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(variant: Variant, batch_size: int, args: argparse.Namespace, device: torch.device) -> dict:
    """First step (with compilation), warm-up, then the timed steps of a fresh module."""
    torch.manual_seed(0)
    module = build(args, device, variant)
    wrapped = fsdp_wrap(module, device) if variant.fsdp else None
    step = make_step(module, random_batch(batch_size, args, device), device, variant, wrapped)
    start = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    measured = {
        "first_step_s": first,
        "step_s": (time.perf_counter() - start) / args.steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "loss": float(loss),
    }
    if variant.name in args.profile:
        measured["profile_ms_per_step"] = profile(step, args.out / f"profile_{variant.name}.txt")
    return measured


#: Kernel (GPU) or operator (CPU) name patterns of the profile breakdown, first match wins: cuBLAS / cuDNN
#: kernel names on the H200 and the operators or Triton kernels that inductor names after the ops it fused.
PROFILE_CATEGORIES = (
    ("patch-embedding convolution", r"conv"),
    ("matmuls", r"nvjet|gemm|cutlass|xmma|aten::(mm|addmm|bmm|_scaled_mm)$"),
    # not the Triton kernels named after an SDPA they feed (RoPE and layout for the attention inputs)
    ("attention", r"^(?!triton).*(attention|sdpa|flash|fmha|cudnn::fusion)"),
    ("RoPE", r"flip|neg.*cat|cat.*neg|rope"),  # flip: the swapped halves of apply_rope
    ("GELU", r"gelu"),
    ("LayerNorm", r"layer_norm"),
    ("softmax / cross-entropy", r"softmax|logsumexp"),
    ("drop-path gathers and scatters", r"index"),
    ("optimizer, EMA, clipping", r"multi_tensor|foreach|adam|lerp|norm"),
    ("eager elementwise (Sinkhorn, ...)", r"elementwise_kernel|aten::(div|mul|sub|exp|add)_?$"),
    ("reductions", r"reduce_kernel|aten::(sum|amax|max|mv)$|gemv"),
    ("copies", r"copy|memcpy|memset|clone|cat"),
    ("other fused (adds, LayerScale, casts)", r"triton"),
)


def profile(step: Callable[[], Tensor], path: Path) -> dict[str, dict[str, float]]:
    """Profiles two steps: writes operators and kernels by self time on the device (or CPU) to ``path`` and
    returns the time per step by :data:`PROFILE_CATEGORIES` (``{category: {"ms": .., "share": ..}}``, largest
    first; on a GPU the kernels' device time, on a CPU the operators' self time)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    events = prof.key_averages()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    path.write_text(events.table(sort_by=key, row_limit=150, max_name_column_width=60))
    on_gpu = torch.cuda.is_available()
    device_type = DeviceType.CUDA if on_gpu else DeviceType.CPU
    ms = dict.fromkeys([name for name, _ in PROFILE_CATEGORIES] + ["other"], 0.0)
    for event in events:
        # "Command Buffer Full": the host waiting for room in the launch queue, not work on the device
        if event.device_type != device_type or event.key == "Command Buffer Full":
            continue
        name = event.key
        category = next(
            (c for c, rule in PROFILE_CATEGORIES if re.search(rule, name, re.IGNORECASE)), "other"
        )
        ms[category] += (event.self_device_time_total if on_gpu else event.self_cpu_time_total) / 1e3 / 2
    total = sum(ms.values())
    return {
        category: {"ms": round(value, 2), "share": round(value / total, 4)}
        for category, value in sorted(ms.items(), key=lambda item: -item[1])
        if value > 0
    }


def time_variant(name: str, args: argparse.Namespace, device: torch.device, per_image: float) -> dict:
    """Part 1 for one variant: throughput, memory and MFU, or the out-of-memory error."""
    variant = VARIANTS[name]
    batch_size = args.batch * variant.batch_scale
    result = {**asdict(variant), "inductor": dict(variant.inductor), "batch_per_gpu": batch_size}
    del result["name"]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    try:
        with torch._inductor.config.patch(dict(variant.inductor)):
            result |= measure(variant, batch_size, args, device)
        # a recompiling block (new guards every step) would show here as more graphs than signatures
        result["compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs
        result["graph_breaks"] = sum(counters["graph_break"].values()) - breaks
    except torch.OutOfMemoryError as err:
        result["error"] = f"out of memory: {str(err).splitlines()[0]}"
    except (ImportError, RuntimeError) as err:
        if not (variant.fp8 or variant.sdpa):
            raise
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # no torchao, no fp8 tensor cores, a failure in the compiled fp8 code (its last line says which), or
        # an attention backend without a kernel for these shapes or this device
        what = "fp8" if variant.fp8 else f"attention backend {variant.sdpa}"
        result["error"] = f"{what} unavailable: {lines[0]} ... {lines[-1]}"
    release(device)
    if "error" in result:
        return result
    peak = peak_flops()
    flops = per_image * batch_size
    result |= {
        "images_per_s": batch_size / result["step_s"],
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / result["step_s"] / 1e12,
        "mfu": None if peak is None else flops / result["step_s"] / peak,
    }
    return result


class StepTimer(L.Callback):
    """Records the loss and the wall time at the end of every training step without waiting for the GPU (as
    ``geodino fit`` runs): the losses stay on the device until :meth:`report`."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())
        self.times.append(time.perf_counter())

    def report(self, batch_size: int, data_waits: list[float]) -> dict[str, float | None]:
        """Mean step time and images/s after 10 warm-up steps (the host runs ahead of the GPU, so single
        steps are not its steps), mean wait for the next batch (``data_waits``, seconds per step) over the
        same steps, and the mean loss of the first and last 10 steps."""
        losses = torch.stack(self.losses).float().cpu().tolist()
        steps = len(self.times) - 11
        step_s = (self.times[-1] - self.times[10]) / steps if steps > 0 else None
        waits = data_waits[11:]
        return {
            "mean_step_s": step_s,
            "images_per_s": None if step_s is None else batch_size / step_s,
            "mean_data_wait_s": sum(waits) / len(waits) if waits else None,
            "loss_first10": sum(losses[:10]) / 10,
            "loss_last10": sum(losses[-10:]) / 10,
        }


def time_photometric(images: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Milliseconds of the colour operations and normalisation of ``images`` images' crops on ``device``
    (median of 5 after one warm-up): the crops and draws of :class:`MultiCropAugmentation` with deferred
    colour operations, on random chips, collated as ``PretrainDataModule(photometric_on="device")`` does."""
    aug = MultiCropAugmentation(
        SAT_MEAN, SAT_STD, global_crops_size=args.global_size, local_crops_size=args.local_size,
        local_crops_number=N_LOCAL, defer_photometric=True,
    )  # fmt: skip
    torch.manual_seed(0)
    chip = 2 * args.global_size
    samples = [aug(torch.rand(3, chip, chip)) for _ in range(images)]
    grid = args.global_size // 16
    batch = collate_multicrop(samples, MaskingGenerator((grid, grid)), np.random.default_rng(0))
    draws = batch.pop("photometric")
    crops = {key: batch[f"collated_{key}"].to(device) for key in draws}
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        for key, tensor in crops.items():
            aug.photometric(tensor, draws[key])
        sync(device)
        times.append(time.perf_counter() - start)
    return {"images": images, "ms": 1e3 * sorted(times[1:])[2]}


def stages(args: argparse.Namespace, out: Path, accelerator: str, record: Callable[[dict], None]) -> None:
    """Part 2: pretrain then Gram anchoring with Lightning on a synthetic corpus, the Gram stage continuing
    the pretraining run's Lightning checkpoint (``continue_from``: networks and AdamW state, as the recipes);
    ``record`` receives the report after each stage (so that a run stopped in the Gram stage keeps the
    pretrain figures)."""
    scene = make_scene(out / "scene.tif", size=512 if args.tiny else 2048, seed=3, bands=3)
    corpus_path = out / "corpus.parquet"
    RasterCorpus.from_paths([scene.path], progress=False).save(corpus_path)
    tiny = {"depth": 2, "embed_dim": 64, "num_heads": 2} if args.tiny else {}
    heads = 256 if args.tiny else 16384
    common = {
        "backbone": args.stage_backbone,
        "backbone_overrides": tiny,
        "dino_head_n_prototypes": heads,
        "ibot_head_n_prototypes": heads,
        "lr": {"start": 0.0, "peak": 5e-4, "warmup": 20},
        "teacher_temp": {"start": 0.04, "peak": 0.07, "warmup": 50},
        "freeze_last_layer": 10,
        "drop_path_rate": 0.1,
    }
    strategy = args.stage_strategy if accelerator == "gpu" else "auto"  # Lightning's FSDP needs a GPU
    report = {}
    checkpoint = out / "pretrain.ckpt"
    for stage in ("pretrain", "gram"):
        gram = stage == "gram"
        module = DINOv3Module(
            **common,
            gram=gram,
            continue_from=str(checkpoint) if gram else None,
            gram_loss_weight={"start": 0.0, "peak": 2.0, "warmup": 20} if gram else None,
            gram_update_frequency=50 if gram else None,
            gram_max_updates=3 if gram else None,
            activation_checkpointing=not gram,
        )
        data = PretrainDataModule(
            str(corpus_path),
            preset=args.stage_backbone,
            batch_size=args.stage_batch,
            chips_per_epoch=100_000,
            chip_size=512 if not args.tiny else 128,
            num_workers=args.workers,
            global_crops_size=args.global_size if not args.tiny else 32,
            local_crops_size=args.local_size if not args.tiny else 16,
            gram_crops_size=(2 * args.global_size if not args.tiny else 64) if gram else None,
            photometric_on="device",
        )
        timer = StepTimer()
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            strategy=strategy,
            precision="bf16-mixed" if accelerator == "gpu" else "32-true",
            max_steps=args.stage_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            use_distributed_sampler=False,
            callbacks=[timer, ExportTeacher(out / f"{stage}_teacher.pth"), DataWaitMonitor()],
            profiler=SimpleProfiler(dirpath=out, filename=f"profiler_{stage}"),  # the waits for batches
        )
        start = time.perf_counter()
        trainer.fit(module, data)
        waits = trainer.profiler.recorded_durations["[_TrainingEpochLoop].train_dataloader_next"]
        report[stage] = {
            "steps": args.stage_steps,
            "strategy": type(trainer.strategy).__name__,
            "activation_checkpointing": not gram,
            "photometric_on": "device",
            "wall_s": time.perf_counter() - start,
            **timer.report(args.stage_batch, waits),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "gram_updates": int(module.gram_updates) if gram else None,
        }
        record(report)
        if not gram:
            trainer.save_checkpoint(checkpoint)  # what the Gram stage continues
        release(torch.device("cuda" if accelerator == "gpu" else "cpu"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU: a smoke test of the script")
    parser.add_argument("--backbone", default="dinov3_vitl16.sat493m")
    parser.add_argument("--batch", type=int, help="images per step, variants scale it (32; tiny: 4)")
    parser.add_argument("--global-size", type=int, help="global crop side (256; tiny: 64)")
    parser.add_argument("--local-size", type=int, help="local crop side (112; tiny: 32)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}"
    )
    parser.add_argument("--no-compile", action="store_true", help="drop the compiled variants")
    parser.add_argument(
        "--profile", default="", help="comma-separated variants whose kernels to profile (profile_<name>.txt)"
    )
    parser.add_argument("--no-tf32", action="store_true", help="keep float32 matmuls in full precision")
    parser.add_argument("--warmup", type=int, help="untimed steps after the first, per variant (3; tiny: 1)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (10; tiny: 2)")
    parser.add_argument("--skip-lightning", action="store_true", help="skip part 2 (Lightning stages)")
    parser.add_argument("--stage-backbone", default="dinov3_vitb16.lvd1689m")
    parser.add_argument("--stage-strategy", default="fsdp", help="Lightning strategy of part 2 (GPU only)")
    parser.add_argument("--stage-batch", type=int, help="images per step in part 2 (32; tiny: 4)")
    parser.add_argument("--stage-steps", type=int, help="steps per Lightning stage (200; tiny: 12)")
    parser.add_argument("--workers", type=int, default=12)
    args = parser.parse_args()
    for key, value in (TINY_DEFAULTS if args.tiny else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v for v in args.variants.split(",") if not (args.no_compile and VARIANTS[v].compile)]
    args.profile = args.profile.split(",")
    return args


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        torch.set_num_threads(1)  # tiny operations: several threads only wait for each other
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    torch.backends.cudnn.allow_tf32 = not args.no_tf32
    peak = peak_flops()
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "peak_bf16_tflops": None if peak is None else peak / 1e12,
        "tf32": not args.no_tf32,
        "backbone": args.backbone,
        "crops": f"2x{args.global_size} + {N_LOCAL}x{args.local_size}",
    }
    out_file = args.out / "train_gpu.json"
    start = time.perf_counter()
    if args.variants:
        per_image = flops_per_image(args, device)
        release(device)
        results["tflop_per_image"] = per_image / 1e12
        results["variants"] = {}
        for name in args.variants:
            results["variants"][name] = time_variant(name, args, device, per_image)
            print(name, json.dumps(results["variants"][name]), flush=True)
            out_file.write_text(json.dumps(results, indent=1))
    if torch.distributed.is_initialized():  # the FSDP variants' process group of one; Lightning makes its own
        torch.distributed.destroy_process_group()
    results["variants_wall_s"] = time.perf_counter() - start
    results["photometric_on_device"] = time_photometric(4 * args.batch, args, device)
    print("photometric_on_device", json.dumps(results["photometric_on_device"]), flush=True)
    release(device)
    out_file.write_text(json.dumps(results, indent=1))
    if not args.skip_lightning:

        def record(report: dict) -> None:
            results["stages"] = report
            out_file.write_text(json.dumps(results, indent=1))
            print(json.dumps(report, indent=1), flush=True)

        stages(args, args.out, "gpu" if device.type == "cuda" else "cpu", record)
    results["wall_s"] = time.perf_counter() - start
    out_file.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
