"""GPU check of DINOv3 pretraining: ViT-L/16 training throughput, peak memory and MFU in bf16, then a short
pretrain -> Gram anchoring run through Lightning on a synthetic corpus.

    python benchmarks/train_gpu.py --out results/         # on a CUDA machine, ~3-4 min
    python benchmarks/train_gpu.py --tiny --out /tmp/x    # CPU smoke test of every code path

Part 1 times the full official iteration (teacher forward, student multi-crop forward/backward, per-submodule
clipping, AdamW, EMA update) of :class:`geodino.train.DINOv3Module` on random crops with real iBOT masks.
Model FLOPs per step come from ``torch.utils.flop_counter.FlopCounterMode`` on one step (it counts the SDPA
kernels), and MFU = FLOPs / step time / peak dense bf16 FLOP/s of the GPU (H100/H200 SXM: 989 TFLOP/s).
Part 2 runs ``Trainer.fit`` (bf16-mixed) for the pretrain and Gram stages with the real data pipeline
(corpus -> random chips -> multi-crop -> masks, DataLoader workers) and reports losses and step times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from geodino.data import RasterCorpus, make_scene
from geodino.train import DINOv3Module, ExportTeacher, MaskingGenerator, PretrainDataModule
from geodino.train.masking import sample_batch_masks

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def random_batch(b: int, global_size: int, local_size: int, n_local: int, device: torch.device) -> dict:
    grid = global_size // 16
    masks = sample_batch_masks(
        2 * b, MaskingGenerator((grid, grid)), __import__("numpy").random.default_rng(0)
    )
    return {
        "collated_global_crops": torch.randn(2 * b, 3, global_size, global_size, device=device),
        "collated_local_crops": torch.randn(n_local * b, 3, local_size, local_size, device=device),
        "collated_masks": masks.to(device),
    }


def throughput(args: argparse.Namespace, device: torch.device) -> dict:
    """Part 1: one official iteration, timed."""
    overrides = {"depth": 2, "embed_dim": 64, "num_heads": 2} if args.tiny else {}
    heads = 256 if args.tiny else 65536
    module = DINOv3Module(
        args.backbone,
        backbone_overrides=overrides,
        dino_head_n_prototypes=heads,
        ibot_head_n_prototypes=heads,
        lr={"peak": 1e-4},
        freeze_last_layer=0,
    ).to(device)
    optimizer = module.configure_optimizers()
    for group in optimizer.param_groups:
        group["lr"] = 1e-4 * group["lr_multiplier"]
        group["weight_decay"] = 0.04 * group["wd_multiplier"]
    batch = random_batch(args.batch, args.global_size, args.local_size, 8, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        with autocast:
            loss = module.compute_losses(batch, step=0)["loss"]
        loss.backward()
        for sub in module.student.values():
            torch.nn.utils.clip_grad_norm_(sub.parameters(), 30.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.update_ema(0.994)
        return float(loss)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = peak_flops()
    result = {
        "backbone": args.backbone,
        "batch_per_gpu": args.batch,
        "crops": f"2x{args.global_size} + 8x{args.local_size}",
        "step_s": seconds,
        "images_per_s": args.batch / seconds,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": None if peak is None else flops / seconds / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "loss": loss,
        "params_student_m": sum(p.numel() for p in module.student.parameters()) / 1e6,
    }
    return result


class StepTimer(L.Callback):
    """Records the loss and wall time of every training step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.times.append(time.perf_counter())


def stages(args: argparse.Namespace, out: Path, accelerator: str) -> dict:
    """Part 2: pretrain then Gram anchoring with Lightning on a synthetic corpus."""
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
    report = {}
    teacher = out / "pretrain_teacher.pth"
    for stage, steps in (("pretrain", args.stage_steps), ("gram", args.stage_steps)):
        gram = stage == "gram"
        module = DINOv3Module(
            **common,
            gram=gram,
            init_from=str(teacher) if gram else None,
            gram_loss_weight={"start": 0.0, "peak": 2.0, "warmup": 20} if gram else None,
            gram_update_frequency=50 if gram else None,
            gram_max_updates=3 if gram else None,
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
        )
        timer = StepTimer()
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision="bf16-mixed" if accelerator == "gpu" else "32-true",
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            use_distributed_sampler=False,
            callbacks=[timer, ExportTeacher(teacher if not gram else out / "gram_teacher.pth")],
        )
        start = time.perf_counter()
        trainer.fit(module, data)
        dt = [b - a for a, b in zip(timer.times[10:], timer.times[11:], strict=False)]
        report[stage] = {
            "steps": steps,
            "wall_s": time.perf_counter() - start,
            "median_step_s": sorted(dt)[len(dt) // 2] if dt else None,
            "images_per_s": args.stage_batch / sorted(dt)[len(dt) // 2] if dt else None,
            "loss_first10": sum(timer.losses[:10]) / 10,
            "loss_last10": sum(timer.losses[-10:]) / 10,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "gram_updates": int(module.gram_updates) if gram else None,
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU: a smoke test of the script")
    parser.add_argument("--backbone", default="dinov3_vitl16.sat493m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--global-size", type=int, default=256)
    parser.add_argument("--local-size", type=int, default=112)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stage-backbone", default="dinov3_vitb16.lvd1689m")
    parser.add_argument("--stage-batch", type=int, default=32)
    parser.add_argument("--stage-steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--skip", choices=["throughput", "stages"], default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if args.skip != "throughput":
        results["throughput"] = throughput(args, device)
        print(json.dumps(results["throughput"], indent=1), flush=True)
        (args.out / "train_gpu.json").write_text(json.dumps(results, indent=1))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.skip != "stages":
        results["stages"] = stages(args, args.out, "gpu" if device.type == "cuda" else "cpu")
        print(json.dumps(results["stages"], indent=1), flush=True)
    (args.out / "train_gpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
