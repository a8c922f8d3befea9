"""Scale options of the training modules: activation checkpointing, ``torch.compile`` and FSDP.

1. Activation checkpointing (``checkpoint_blocks``) gives the gradients of the plain student, drop-path
   included (its draws are replayed in the recomputation), for pretraining and distillation, and leaves the
   optimizer's parameter groups as they were.
2. Neither option changes names where they are stored: Lightning checkpoints, ``export_teacher`` files and
   ``state_dict()`` keep the plain keys, and a checkpoint of a checkpointed + compiled run loads strictly into
   a plain module. The compiled step gives the eager step's loss and gradients. To keep the test short,
   ``nn.Module.compile`` runs with the ``aot_eager`` backend here (dynamo capture and AOT autograd, no C++
   code generation); ``benchmarks/train_gpu.py --tiny`` runs the default inductor backend.
3. FSDP (slow): 2 CPU processes (gloo) under Lightning's ``FSDPStrategy`` (sharding the networks by
   ``FSDP_UNITS``), with activation checkpointing and compiled blocks, and, as the reference, plain under
   DDP, on the same per-rank batches with Gram anchoring and a Gram refresh, drop-path and clipping that
   is active at every step, and a NaN pixel in rank 1's batch of step 1. Each FSDP rank holds half of the
   student; losses, gradient norms (reduced over the shards), the gathered teacher export and the Lightning
   checkpoint equal DDP's. Both ranks skip the NaN step (the norm is that of the reduced gradient), and
   the DDP replicas stay equal. Lightning refuses
   FSDP without a GPU, and FSDP needs ``device_id=cpu`` on CPU, so the run uses :class:`CPUFSDPStrategy`,
   a subclass that changes the device given to FSDP (and works around a CPU-only aliasing of gathered
   optimizer states in torch, see the class). The processes run this file as a script (Lightning starts
   rank 1 by re-running the command).
4. FSDP resume (slow): the same 2-process FSDP setup with activation checkpointing runs 4 steps with a
   Lightning checkpoint every 2, then a fresh process pair resumes from the step-2 checkpoint: steps 3-4
   give the uninterrupted losses exactly on both ranks, for pretraining with Gram anchoring (refreshed at
   step 3, after the resume point) and for distillation (whose checkpoints leave the frozen teacher out).
5. FSDP precision (slow): one CPU process under FSDP with ``bf16-mixed``, the official precision. The blocks
   compute with bf16 parameters on a bf16 residual stream, while the optimizer keeps float32 parameters
   and gradients, the buffers (RoPE periods) stay float32 and the teacher export is float32; the step-0
   loss terms match a float32 step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    OptimStateKeyType,
    ShardingStrategy,
    StateDictType,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from geodino.data import make_scene
from geodino.train.augment import masked_patch_index
from geodino.train.base import configure_fsdp, fsdp_inner
from geodino.train.distill import DistillationModule
from geodino.train.heads import DINOHead
from geodino.train.masking import MaskingGenerator, sample_batch_masks
from geodino.train.module import DINOv3Module
from geodino.train.probe import DenseKNNProbe

ROOT = Path(__file__).resolve().parents[1]
PRESET = "dinov3_vits16.lvd1689m"
#: Tiny ViT; LayerScale 0.1 so that the blocks matter at initialisation.
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "layerscale_init": 0.1}
HEADS = {
    f"{head}_head_{key}": value
    for head in ("dino", "ibot")
    for key, value in (("n_prototypes", 128), ("hidden_dim", 64), ("bottleneck_dim", 32))
}
GLOBAL, LOCAL, GRAM, N_LOCAL, BATCH = 32, 16, 64, 2, 4
WRAPPER = "_checkpoint_wrapped_module."
NN_MODULE_COMPILE = torch.nn.Module.compile


def aot_eager_compile(self: torch.nn.Module, **kwargs: Any) -> None:
    """``nn.Module.compile`` with the ``aot_eager`` backend (no C++ code generation: fast on CPU)."""
    NN_MODULE_COMPILE(self, backend="aot_eager", **kwargs)


def tiny_module(**kwargs: Any) -> DINOv3Module:
    """A 2-block DINOv3Module with small heads, drop-path 0.3 and Gram anchoring."""
    args = {
        "backbone": PRESET,
        "backbone_overrides": TINY,
        "drop_path_rate": 0.3,
        "lr": {"peak": 1e-3},
        "momentum": {"peak": 0.9},
        "teacher_temp": {"peak": 0.04},
        "freeze_last_layer": 0,
        "gram": True,
        **HEADS,
    }
    return DINOv3Module(**{**args, **kwargs})


def tiny_distiller(teacher_file: Path, **kwargs: Any) -> DistillationModule:
    """Two students (1 and 2 blocks, drop-path 0.2) of the tiny teacher."""
    students = [
        {
            "name": f"s{depth}",
            "backbone": PRESET,
            "drop_path_rate": 0.2,
            "backbone_overrides": {**TINY, "depth": depth},
        }
        for depth in (1, 2)
    ]
    return DistillationModule(
        PRESET, str(teacher_file), students, backbone_overrides=TINY, freeze_last_layer=0, **HEADS, **kwargs
    )


def random_batch(seed: int, sizes: tuple[int, int, int] = (GLOBAL, LOCAL, GRAM)) -> dict[str, Tensor]:
    """A multi-crop batch of random crops (with Gram crops; global, local, Gram ``sizes`` in pixels) and
    non-empty iBOT masks."""
    gen = torch.Generator().manual_seed(seed)
    global_size, local_size, gram_size = sizes
    masks = sample_batch_masks(
        2 * BATCH,
        MaskingGenerator(global_size // 16),
        np.random.default_rng(seed),
        mask_sample_probability=1.0,
    )
    return {
        "collated_global_crops": torch.randn(2 * BATCH, 3, global_size, global_size, generator=gen),
        "collated_local_crops": torch.randn(N_LOCAL * BATCH, 3, local_size, local_size, generator=gen),
        "collated_gram_crops": torch.randn(2 * BATCH, 3, gram_size, gram_size, generator=gen),
        "collated_masks": masks,
    }


def loss_and_grads(module: L.LightningModule, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one training forward (fixed RNG) and the gradients, by parameter name without the wrapper."""
    module.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss = module.compute_losses(batch, step=0)["loss"]
    loss.backward()
    grads = {n.replace(WRAPPER, ""): p.grad for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def group_layout(module: L.LightningModule) -> list[tuple]:
    """The optimizer's parameter groups: multipliers, last-layer flag and names without the wrapper."""
    return [
        (
            g["lr_multiplier"],
            g["wd_multiplier"],
            g["is_last_layer"],
            [n.replace(WRAPPER, "") for n in g["names"]],
        )
        for g in module.configure_optimizers().param_groups
    ]


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    """A tiny exported teacher for distillation."""
    return tiny_module(gram=False).export_teacher(tmp_path / "teacher.pth")


@pytest.mark.parametrize("mode", [True, "selective"])
@pytest.mark.parametrize("kind", ["pretrain", "distill"])
def test_activation_checkpointing_keeps_gradients(kind: str, mode: bool | str, teacher_file: Path) -> None:
    def build(checkpointing: bool | str) -> L.LightningModule:
        torch.manual_seed(0)
        if kind == "pretrain":
            return tiny_module(activation_checkpointing=checkpointing)
        return tiny_distiller(teacher_file, activation_checkpointing=checkpointing)

    plain, checkpointed = build(False), build(mode)
    assert any(WRAPPER in name for name, _ in checkpointed.named_parameters())
    assert group_layout(plain) == group_layout(checkpointed)
    batch = random_batch(0)
    loss, grads = loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, batch)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-8, msg=name)
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()


def test_fp8_blocks_train_like_full_precision_and_keep_stored_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fp8=True`` (torchao, emulated on this CPU): the blocks' plain linears of every network become
    Float8Linear, qkv (masked key bias) keeps its precision, the state dict keeps its keys (the plain
    module's state loads strictly), the loss and gradients stay close to full precision without being
    equal, and the exported teacher loads into a plain backbone."""
    from torchao.float8.float8_linear import Float8Linear

    from geodino.models import build_backbone
    from geodino.models.attention import LinearKMaskedBias
    from geodino.models.checkpoint import read_state_dict

    torch.manual_seed(0)
    plain = tiny_module()
    with pytest.warns(UserWarning, match="emulated"):
        fp8 = tiny_module(fp8=True)
    fp8.load_state_dict(plain.state_dict())
    for networks in (fp8.student, fp8.teacher, fp8.gram_teacher):
        for block in networks["backbone"].blocks:
            assert isinstance(block.attn.proj, Float8Linear) and isinstance(block.mlp.fc2, Float8Linear)
            assert type(block.attn.qkv) is LinearKMaskedBias
    assert not any(isinstance(m, Float8Linear) for m in plain.modules())

    batch = random_batch(3)
    loss, grads = loss_and_grads(plain, batch)
    loss_fp8, grads_fp8 = loss_and_grads(fp8, batch)
    assert loss_fp8 != loss and loss_fp8.item() == pytest.approx(loss.item(), rel=2e-2)
    backbone = [name for name in grads if name.startswith("student.backbone.blocks.")]
    flat, flat_fp8 = (torch.cat([g[name].flatten() for name in backbone]) for g in (grads, grads_fp8))
    assert torch.nn.functional.cosine_similarity(flat, flat_fp8, dim=0) > 0.98

    vit = build_backbone(PRESET, **TINY)
    vit.load_state_dict(read_state_dict(fp8.export_teacher(tmp_path / "fp8_teacher.pth")))

    with monkeypatch.context() as gpu:  # a GPU without fp8 tensor cores: refused, not emulated
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        gpu.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))
        gpu.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA A100-SXM4-80GB")
        with pytest.raises(RuntimeError, match=r"A100-SXM4-80GB has 8\.0: set fp8=False"):
            tiny_module(fp8=True)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # torchao missing: the fix in the message
    with pytest.raises(ImportError, match="pip install 'geodino\\[fp8\\]'"):
        tiny_module(fp8=True)


def test_fp8_matmuls_meet_the_tensor_core_shape_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU with fp8 tensor cores the blocks call ``torch._scaled_mm``, whose cuBLAS kernels need the
    inner and output dimensions to be multiples of 16. The weight gradient's inner dimension is the token
    count (here the drop-path subsets of both crop sizes together, 75 tokens), so unpadded the backward pass
    fails on the GPU.
    This CPU test runs the non-emulated path (CPU ``_scaled_mm``) with that rule enforced."""
    from torchao.float8.float8_linear import Float8Linear

    with monkeypatch.context() as gpu:  # built as on an H100: no emulation
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        gpu.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
        torch.manual_seed(0)
        fp8 = tiny_module(fp8=True)
    layers = [m for m in fp8.modules() if isinstance(m, Float8Linear)]
    assert layers and not any(layer.config.emulate for layer in layers)

    scaled_mm, shapes = torch._scaled_mm, []

    def cublas_rule(a: Tensor, b: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        shapes.append((*a.shape, b.shape[1]))
        assert a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0, f"{a.shape} x {b.shape}: not multiples of 16"
        return scaled_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", cublas_rule)
    loss, grads = loss_and_grads(fp8, random_batch(3))
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    # forward, input gradient and weight gradient of the 4 converted layers of each block
    assert len(shapes) >= 3 * 4 * len(fp8.student["backbone"].blocks)
    # weight gradients over the drop-path subsets' tokens, both crop sizes in one matmul: 5 global crops x 9
    # + 5 local crops x 6 = 75, zero-padded to 80
    assert 80 in {inner for _, inner, _ in shapes}


def test_compiled_module_reuses_its_graphs_across_crop_resolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed resolutions under ``compile=True``, with schedules that change every step: the first crop sizes
    compile blocks and losses, then every size reuses those graphs (no compilation per step, no schedule
    value baked into a graph)."""
    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager_compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of earlier tests in this process
    module = tiny_module(
        compile=True,
        teacher_temp={"start": 0.04, "peak": 0.07, "warmup": 10},
        gram_loss_weight={"start": 0.0, "peak": 1.0, "warmup": 10},
    )
    resolutions = [(32, 16, 64), (48, 32, 96), (64, 16, 96)]
    graphs = []
    for round_ in range(2):
        for i, sizes in enumerate(resolutions):
            step = 3 * round_ + i
            loss = module.compute_losses(random_batch(step, sizes), step=step)["loss"]
            loss.backward()
            assert torch.isfinite(loss)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0]


def saved_bytes_and_grads(module: DINOv3Module, batch: dict[str, Tensor]) -> tuple[int, dict[str, Tensor]]:
    """Bytes that autograd keeps for the backward pass of one training forward, and the gradients."""
    saved = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    module.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = module.compute_losses(batch, step=0)["loss"]
    loss.backward()
    grads = {n.replace(WRAPPER, ""): p.grad for n, p in module.named_parameters() if p.grad is not None}
    return sum(saved), grads


def test_selective_checkpointing_compiles_and_keeps_more_than_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``torch.compile`` (each compiled block holds its checkpoint), full and selective checkpointing
    give the plain compiled gradients; selective keeps the matmul and attention outputs, so it keeps more
    for the backward pass than full checkpointing and less than none. A value other than False, True and
    "selective" is refused."""
    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager_compile)
    torch._dynamo.reset()
    batch = random_batch(2)
    saved, grads = {}, {}
    for mode in (False, True, "selective"):
        torch.manual_seed(0)
        module = tiny_module(gram=False, activation_checkpointing=mode, compile=True)
        assert all(block._compiled_call_impl is not None for block in module.student["backbone"].blocks)
        saved[mode], grads[mode] = saved_bytes_and_grads(module, batch)
    assert saved[True] < saved["selective"] < saved[False]
    for mode in (True, "selective"):
        assert grads[mode].keys() == grads[False].keys()
        for name, grad in grads[False].items():
            torch.testing.assert_close(grads[mode][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="false, true \\(full\\) or 'selective'"):
        tiny_module(activation_checkpointing="some")


def fit_and_save(module: L.LightningModule, batches: list[dict[str, Tensor]], path: Path) -> Path:
    """One single-process CPU step per batch, then a Lightning checkpoint at ``path``."""
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|litlogger).*")
        trainer.fit(module, DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(path)
    return path


def test_checkpointing_and_compile_keep_stored_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager_compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of earlier tests in this process
    batch = random_batch(1)
    modules, checkpoints = {}, {}
    for name, options in (("plain", {}), ("scaled", {"activation_checkpointing": True, "compile": True})):
        torch.manual_seed(0)
        modules[name] = tiny_module(**options)
        checkpoints[name] = fit_and_save(modules[name], [batch], tmp_path / f"{name}.ckpt")
    plain, scaled = modules["plain"], modules["scaled"]
    assert all(block._compiled_call_impl is not None for block in scaled.teacher["backbone"].blocks)
    assert all(loss._compiled_call_impl is not None for loss in (scaled.dino_loss, scaled.ibot_patch_loss))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # student and teacher blocks

    stored = {name: torch.load(path, weights_only=True)["state_dict"] for name, path in checkpoints.items()}
    assert list(stored["scaled"]) == list(stored["plain"])
    assert list(scaled.state_dict()) == list(plain.state_dict())
    exported = {
        name: torch.load(module.export_teacher(tmp_path / f"{name}.pth"), weights_only=True)["teacher"]
        for name, module in modules.items()
    }
    assert list(exported["scaled"]) == list(exported["plain"])
    for key, value in exported["plain"].items():  # the same step: the same EMA teacher
        torch.testing.assert_close(exported["scaled"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    reloaded = DINOv3Module.load_from_checkpoint(
        checkpoints["scaled"], activation_checkpointing=False, compile=False
    )
    torch.testing.assert_close(reloaded.state_dict(), scaled.state_dict(), rtol=0, atol=0)

    loss, grads = loss_and_grads(plain, batch)
    loss_scaled, grads_scaled = loss_and_grads(scaled, batch)
    torch.testing.assert_close(loss_scaled, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_scaled[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of earlier tests in this process


#: Operators that make the host wait for the device (their output size or value is data-dependent).
SYNCING_OPS = ("aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.is_nonzero")


class RecordOps(TorchDispatchMode):
    """Records the name of every ATen operator that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["pretrain", "distill"])
def test_step_waits_for_no_device_value_given_the_collated_mask_indices(
    kind: str, teacher_file: Path
) -> None:
    """With the collate's ``mask_indices_list`` / ``masks_weight`` (computed on the CPU), forward and backward
    of a step run no operator whose result size or value the host must wait for (on a GPU each would stall
    the launch queue: boolean-mask indexing, ``.item()``); without them the indices are computed once."""
    module = tiny_module() if kind == "pretrain" else tiny_distiller(teacher_file)
    batch = random_batch(0)
    indices, weights = masked_patch_index(batch["collated_masks"])
    for given, syncs in (({"mask_indices_list": indices, "masks_weight": weights}, False), ({}, True)):
        with RecordOps() as record:
            module.compute_losses({**batch, **given}, step=0)["loss"].backward()
        assert bool(record.names & set(SYNCING_OPS)) == syncs, record.names & set(SYNCING_OPS)


# ---------------------------------------------------------------- FSDP on CPU processes

STEPS, WORLD = 3, 2
#: the FSDP runs compared with DDP, by their ``compare`` mode name
SHARDINGS = {"fsdp": "FULL_SHARD", "fsdp_grad_op": "SHARD_GRAD_OP"}


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` on CPU processes: FSDP is given ``device_id=cpu``, which it needs there,
    and the full optimizer state is gathered without ``offload_to_cpu``.

    Lightning refuses the registered ``fsdp`` strategy without a GPU (a subclass instance passes its check)
    and gives FSDP the device index, None on CPU. This copies ``FSDPStrategy._setup_model``'s wrapping with
    the CPU device; policy, sharding, precision and state-dict handling are Lightning's, except one setting
    of the optimizer state dict: torch's ``_allgather_orig_param_states`` gathers every state (``exp_avg``,
    ``exp_avg_sq``) into one reused buffer and relies on ``offload_to_cpu``'s ``.cpu()`` to copy each out;
    on a CPU device ``.cpu()`` copies nothing, so every saved state would alias the last one gathered
    (``exp_avg`` == ``exp_avg_sq`` in the checkpoint). Without offloading, torch clones each state instead.
    On a GPU the copy happens and Lightning's setting is right.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer
        context = FullyShardedDataParallel.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        )
        with context:
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
        if self.global_rank != 0:
            return state
        return FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)


class RecordAndExport(L.Callback):
    """Per rank, writes ``rank<r>.json``: the loss and backbone gradient norm of every step, and the number of
    student parameter elements held by the rank; at the end every rank calls ``export_teacher`` (collective
    under FSDP)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        metrics = trainer.callback_metrics
        self.steps.append(
            {"loss": float(outputs["loss"]), "grad_norm": float(metrics["train/backbone_grad_norm"])}
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        held = sum(p.numel() for p in pl_module.student.parameters())
        probe = next(c for c in trainer.callbacks if isinstance(c, DenseKNNProbe))
        sums = {
            name: sum(float(p.double().sum()) for p in getattr(pl_module, name).parameters())
            for name in ("student", "teacher")
        }
        record = {
            "steps": self.steps,
            "student_elements": held,
            "probe": probe.history,
            "skipped_steps": float(pl_module.nonfinite.total),
            **sums,
        }
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
        pl_module.export_teacher(self.folder / "teacher.pth")


def probe_scenes(folder: Path) -> tuple[list[str], list[str]]:
    """Two 128 px synthetic scenes and their land-cover maps in ``folder`` (written once, before the
    processes start), for a :class:`DenseKNNProbe`."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = (
        [str(folder / f"scene{i}.tif") for i in range(2)],
        [str(folder / f"lc{i}.tif") for i in range(2)],
    )
    if not Path(labels[-1]).exists():
        for i in range(2):
            make_scene(images[i], size=128, bands=3, seed=i, labels_path=labels[i])
    return images, labels


def distributed_fit(strategy: str, folder: Path) -> None:
    """One 2-process CPU run (``ddp``, or ``fsdp`` with checkpointing and compilation) of
    :func:`tiny_module`, checkpointed in ``folder``, with a dense k-NN probe of the teacher at steps 0 and 2
    (at step 0 under FSDP, before the root's first forward)."""
    torch.nn.Module.compile = aot_eager_compile
    folder.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    module = tiny_module(
        clip_grad=1e-3,  # below the gradient norms: clipping acts at every step
        gram_update_frequency=2,
        activation_checkpointing=strategy in SHARDINGS,
        compile=strategy in SHARDINGS,
    )
    batches = [random_batch(seed) for seed in range(WORLD * STEPS)]  # rank r gets r, r + 2, ...
    batches[WORLD + 1]["collated_global_crops"][0, 0, 0, 0] = float("nan")  # rank 1, step 1
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=CPUFSDPStrategy(sharding_strategy=SHARDINGS[strategy]) if strategy in SHARDINGS else "ddp",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            RecordAndExport(folder),
            DenseKNNProbe(*probe_scenes(folder.parent / "probe"), every_n_steps=2, window=64, k=5),
        ],
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert int(module.gram_updates) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= (2 if strategy in SHARDINGS else 0)
    trainer.save_checkpoint(folder / "last.ckpt")


def run_script(*args: str | Path) -> None:
    """Runs this file as a script (see the end of the file) in a subprocess; Lightning starts rank 1."""
    command = [sys.executable, __file__, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]


def test_fsdp_settings_that_break_the_teacher_or_resume_are_handled() -> None:
    """Under ``SHARD_GRAD_OP`` the teacher and Gram-teacher units reshard (FULL_SHARD; the 2-process run
    below shows the EMA teacher then matches DDP's), hybrid sharding and sharded checkpoints are refused."""
    module = tiny_module()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(sharding_strategy="SHARD_GRAD_OP"))
    configure_fsdp(module)
    unit = module._trainer.strategy.kwargs["auto_wrap_policy"]._lambda_fn
    full_shard = {"sharding_strategy": ShardingStrategy.FULL_SHARD}
    assert unit(module.teacher["backbone"].blocks[0]) == unit(module.gram_teacher["backbone"]) == full_shard
    assert unit(module.student["backbone"].blocks[0]) is True and unit(module.student["dino_head"]) is True
    assert unit(module.student["backbone"].blocks[0].mlp) is False
    for strategy, refused in (
        (
            FSDPStrategy(sharding_strategy="HYBRID_SHARD", auto_wrap_policy={DINOHead}),
            "sharding_strategy HYBRID_SHARD is not supported",
        ),
        (FSDPStrategy(state_dict_type="sharded"), "state_dict_type='sharded' is not supported.*'full'"),
    ):
        module._trainer = SimpleNamespace(strategy=strategy)
        with pytest.raises(ValueError, match=refused):
            configure_fsdp(module)


@pytest.mark.slow
def test_fsdp_matches_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    probe_scenes(tmp_path / "probe")
    for strategy in ("ddp", *SHARDINGS):
        run_script("compare", strategy, tmp_path / strategy)
    records = {
        s: [json.loads((tmp_path / s / f"rank{r}.json").read_text()) for r in range(WORLD)]
        for s in ("ddp", *SHARDINGS)
    }
    full = records["ddp"][0]["student_elements"]
    for sharded in SHARDINGS:
        held = [record["student_elements"] for record in records[sharded]]
        assert sum(held) == full and max(held) < full, sharded  # every element on exactly one rank
    # rank 1's batch of step 1 holds a NaN pixel; Sinkhorn-Knopp's sums over the global batch carry it into
    # rank 0's targets, and the gradient norm (after the all-reduce, or over the shards) is NaN on both
    # ranks: both skip the step, and the replicas stay equal
    for strategy, ranks in records.items():
        nan_losses = [[math.isnan(step["loss"]) for step in rank["steps"]] for rank in ranks]
        assert nan_losses == [[False, True, False]] * WORLD, strategy
        assert all(math.isnan(rank["steps"][1]["grad_norm"]) for rank in ranks), strategy
        assert [rank["skipped_steps"] for rank in ranks] == [1.0, 1.0], strategy
    for name in ("student", "teacher"):
        ddp_sums = [rank[name] for rank in records["ddp"]]
        assert math.isfinite(ddp_sums[0]) and ddp_sums[0] == ddp_sums[1], name  # replicas stayed equal
        for sharded in SHARDINGS:
            got = sum(rank[name] for rank in records[sharded])
            assert got == pytest.approx(ddp_sums[0], rel=1e-5), f"{sharded}: {name}"
    for sharded in SHARDINGS:
        for ddp, fsdp in zip(records["ddp"], records[sharded], strict=True):
            assert len(ddp["steps"]) == len(fsdp["steps"]) == STEPS
            for want, got in zip(ddp["steps"], fsdp["steps"], strict=True):
                assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, nan_ok=True), sharded
                assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5, nan_ok=True), sharded
            # the probe ran at steps 0 and 2 on every rank, and the sharded teacher gives the replicated one's
            assert [h["step"] for h in fsdp["probe"]] == [h["step"] for h in ddp["probe"]] == [0, 2]
            for want, got in zip(ddp["probe"], fsdp["probe"], strict=True):
                assert got["knn_accuracy"] == pytest.approx(want["knn_accuracy"], abs=0.02), sharded
        for file, key in (("teacher.pth", "teacher"), ("last.ckpt", "state_dict")):
            ddp, fsdp = (torch.load(tmp_path / s / file, weights_only=True)[key] for s in ("ddp", sharded))
            assert list(fsdp) == list(ddp), file
            for name, value in ddp.items():
                msg = f"{sharded} {file}: {name}"
                torch.testing.assert_close(fsdp[name], value, rtol=1e-4, atol=1e-6, msg=msg)


RESUME_STEPS = 4  # 2 batches per rank and epoch: checkpoint after step 2, at the epoch boundary


class RankBatches(L.LightningDataModule):
    """Rank ``r`` trains on ``batches[r::world]`` in order, every epoch (no sampler Lightning would swap)."""

    def __init__(self, batches: list[dict[str, Tensor]]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(self.batches[rank::world], batch_size=None)


class RecordLosses(L.Callback):
    """The total loss of every training step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args) -> None:
        self.losses.append(float(outputs["loss"]))


def resume_fit(kind: str, folder: Path, teacher: Path, ckpt_path: Path | None) -> None:
    """2 CPU processes under FSDP (activation checkpointing on): ``RESUME_STEPS`` steps of a fresh tiny
    ``pretrain`` (Gram anchoring) or ``distill`` module with a Lightning checkpoint every 2 steps, or the same
    run resumed from ``ckpt_path``. Every rank writes its losses to ``<folder>/rank<r>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    torch.manual_seed(1 if ckpt_path else 0)  # a resumed run starts from other weights before the load
    if kind == "pretrain":
        module = tiny_module(clip_grad=1e-3, gram_update_frequency=3, activation_checkpointing=True)
    else:
        module = tiny_distiller(teacher, clip_grad=1e-3, activation_checkpointing=True)
    record = RecordLosses()
    checkpoints = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=CPUFSDPStrategy(),
        max_steps=RESUME_STEPS,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, checkpoints],
    )
    batches = [random_batch(seed) for seed in range(WORLD * RESUME_STEPS // 2)]
    trainer.fit(module, RankBatches(batches), ckpt_path=ckpt_path, weights_only=True)
    if kind == "pretrain":
        assert int(module.gram_updates) == 1  # refreshed at step 3, after the resume point
    out = folder / f"rank{trainer.global_rank}{'_resumed' if ckpt_path else ''}.json"
    out.write_text(json.dumps(record.losses))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pretrain", "distill"])
def test_fsdp_run_resumes_exactly(kind: str, teacher_file: Path, tmp_path: Path) -> None:
    """Sharded checkpoint round trip: the run resumed under FSDP from its step-2 checkpoint gives steps 3-4
    with the uninterrupted run's losses on every rank (weights, AdamW state, EMA copies, Gram teacher and,
    for distillation, the frozen teacher that the checkpoint leaves out)."""
    run_script("resume", kind, tmp_path, "--teacher", teacher_file)
    checkpoint = tmp_path / "step=2.ckpt"
    stored = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert any(k.startswith("teacher.") for k in stored) == (kind == "pretrain")  # distillation leaves it out
    run_script("resume", kind, tmp_path, "--teacher", teacher_file, "--ckpt", checkpoint)
    for rank in range(WORLD):
        full = json.loads((tmp_path / f"rank{rank}.json").read_text())
        resumed = json.loads((tmp_path / f"rank{rank}_resumed.json").read_text())
        assert len(full) == RESUME_STEPS and all(map(math.isfinite, full))
        assert resumed == full[2:], rank


class SaveMomentsAtStart(L.Callback):
    """Rank 0 writes the gathered full AdamW state, keyed by parameter name, when training starts."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, optimizer = trainer.strategy.model, trainer.optimizers[0]
        full = (
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),  # see CPUFSDPStrategy
        )
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, *full):
            state = FullyShardedDataParallel.optim_state_dict(model, optimizer)
        if trainer.global_rank == 0:
            torch.save(state["state"], self.path)


def continue_fit(folder: Path, ckpt_path: Path, resume: bool) -> None:
    """2 CPU processes under FSDP starting from ``ckpt_path`` (a single-process 2-step pretraining
    checkpoint): one step of a Gram stage that continues it, or (``resume``) the run resumed from it for a
    third step. Rank 0 writes the AdamW state it starts with to ``<folder>/moments.pt``."""
    L.seed_everything(0)
    if resume:
        module, max_steps = tiny_module(gram=False), 3
    else:
        module, max_steps = tiny_module(continue_from=str(ckpt_path), layer_decay=0.9), 1
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=CPUFSDPStrategy(),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveMomentsAtStart(folder / "moments.pt")],
    )
    trainer.fit(
        module,
        DataLoader([random_batch(seed) for seed in range(WORLD)], batch_size=None),
        ckpt_path=ckpt_path if resume else None,
        weights_only=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("how", ["continue", "resume_single"])
def test_fsdp_stage_continues_or_resumes_a_single_process_run(tmp_path: Path, how: str) -> None:
    """``continue_from`` into a sharded run, or a single-process run resumed under FSDP (``ckpt_path``):
    every student parameter's AdamW moments and step count, gathered back from the FSDP shards at the start,
    are those of the single-process pretraining checkpoint (Lightning's FSDP load reads its ids in the
    model's order, which a plain optimizer state does not use)."""
    torch.manual_seed(0)
    batches = [random_batch(0), random_batch(1)]
    checkpoint = fit_and_save(tiny_module(gram=False), batches, tmp_path / "pretrain.ckpt")
    saved = torch.load(checkpoint, weights_only=True)["optimizer_states"][0]
    names = {pid: n for g in saved["param_groups"] for pid, n in zip(g["params"], g["names"], strict=True)}

    run_script(how, "pretrain", tmp_path, "--ckpt", checkpoint)
    started = torch.load(tmp_path / "moments.pt", weights_only=True)
    assert len(saved["state"]) == len(started) > 0
    for pid, moments in saved["state"].items():
        got = started[f"student.{names[pid]}"]
        for key, value in moments.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=f"{names[pid]}: {key}")


class RecordBlockDtypes(L.Callback):
    """Per training step: the dtype of the first student block's qkv weight and input inside its forward,
    of the crops and iBOT weights the losses are given, the dtypes of the student's stored parameters,
    gradients and floating-point buffers before the optimizer step, and the step's loss terms."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.seen: dict[str, str] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def record(block: torch.nn.Module, args: tuple) -> None:
            inputs = args[0] if isinstance(args[0], list) else [args[0]]
            self.seen["qkv_weight"] = str(block.attn.qkv.weight.dtype)
            self.seen["residual_stream"] = ",".join(sorted({str(x.dtype) for x in inputs}))

        # on the block inside its FSDP unit: the unit's own pre-hook has not gathered the bf16 copy yet
        fsdp_inner(pl_module.student["backbone"].blocks[0]).register_forward_pre_hook(record)
        compute_losses = pl_module.compute_losses

        def record_batch(batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
            self.seen["crops"] = str(batch["collated_global_crops"].dtype)
            self.seen["masks_weight"] = str(batch["masks_weight"].dtype)
            return compute_losses(batch, step)

        pl_module.compute_losses = record_batch  # the batch as the root FSDP unit hands it on

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = list(pl_module.student.parameters())
        self.seen["stored"] = ",".join(sorted({str(p.dtype) for p in params}))
        self.seen["grads"] = ",".join(sorted({str(p.grad.dtype) for p in params if p.grad is not None}))
        buffers = [b for b in pl_module.student.buffers() if b.is_floating_point()]
        self.seen["buffers"] = ",".join(sorted({str(b.dtype) for b in buffers}))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args) -> None:
        terms = {k: float(v) for k, v in outputs.items()}
        self.steps.append({**self.seen, "terms": terms})


def precision_fit(folder: Path) -> None:
    """One CPU process under FSDP with ``bf16-mixed``: 2 steps of :func:`tiny_module` (no Gram teacher),
    recorded by :class:`RecordBlockDtypes` into ``<folder>/bf16.json``, then the teacher export; and the
    first step of the same module and batch in float32 without a trainer (``float32.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = [random_batch(seed) for seed in range(2)]
    for batch in batches:  # with the collate's iBOT indices and float32 weights
        batch["mask_indices_list"], batch["masks_weight"] = masked_patch_index(batch["collated_masks"])
    torch.manual_seed(0)
    reference = tiny_module(gram=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        terms = reference.training_step(batches[0], 0)
    (folder / "float32.json").write_text(json.dumps({k: float(v) for k, v in terms.items()}))
    torch.manual_seed(0)
    module = tiny_module(gram=False)
    record = RecordBlockDtypes()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=CPUFSDPStrategy(),
        precision="bf16-mixed",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    (folder / "bf16.json").write_text(json.dumps(record.steps))
    module.export_teacher(folder / "teacher.pth")


@pytest.mark.slow
def test_fsdp_bf16_mixed_computes_in_bf16_with_float32_master_weights(tmp_path: Path) -> None:
    run_script("precision", "bf16", tmp_path)
    steps = json.loads((tmp_path / "bf16.json").read_text())
    assert len(steps) == 2
    for step in steps:
        assert step["qkv_weight"] == "torch.bfloat16"
        assert step["residual_stream"] == "torch.bfloat16"
        assert step["stored"] == step["grads"] == "torch.float32"
        assert step["buffers"] == "torch.float32"  # RoPE periods (Lightning's own FSDP setting casts them)
        # the backbone units cast their crops; the root leaves the batch alone: iBOT's per-patch weights 1 / n
        # stay float32 (bf16 would round them by up to 0.4 %), as officially
        assert step["crops"] == step["masks_weight"] == "torch.float32"
        assert all(math.isfinite(v) for v in step["terms"].values())
    # at initialisation the global CLS tokens of different images differ by less than bf16 resolves, so
    # KoLeo (-log of nearest-neighbour distances) is not comparable; the prototype losses are
    reference = json.loads((tmp_path / "float32.json").read_text())
    for name in ("dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss"):
        assert steps[0]["terms"][name] == pytest.approx(reference[name], rel=2e-3), name
    teacher = torch.load(tmp_path / "teacher.pth", weights_only=True)["teacher"]
    assert {v.dtype for v in teacher.values() if v.is_floating_point()} == {torch.float32}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the 2-process CPU runs of this file's slow tests")
    parser.add_argument("run", choices=["compare", "resume", "continue", "resume_single", "precision"])
    parser.add_argument("mode", help="compare: ddp or fsdp; resume: pretrain or distill; precision: bf16")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--teacher", type=Path, help="resume distill: the tiny teacher file")
    parser.add_argument("--ckpt", type=Path, help="the checkpoint to start from")
    args = parser.parse_args()
    if args.run == "compare":
        distributed_fit(args.mode, args.folder)
    elif args.run in ("continue", "resume_single"):
        continue_fit(args.folder, args.ckpt, resume=args.run == "resume_single")
    elif args.run == "precision":
        precision_fit(args.folder)
    else:
        resume_fit(args.mode, args.folder, args.teacher, args.ckpt)
