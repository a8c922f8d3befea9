"""DINOv3 self-supervised pretraining as a LightningModule (the official ``SSLMetaArch`` + ``train.py`` loop).

One module covers the three official stages: pretraining, Gram anchoring (``gram=True`` with a Gram teacher
snapshot or file) and high-resolution adaptation (``init_from`` the previous stage's teacher, Gram teacher
fixed). Per step, as the official loop (``shared/notes/dinov3-official.md`` §3.1, §3.5-3.8):

1. the EMA teacher (eval mode, no gradient) sees the two unmasked global crops: DINO head on the CLS tokens
   and iBOT head on the patch tokens at the student's masked positions, both centred by Sinkhorn-Knopp at
   the scheduled teacher temperature;
2. the student sees ``[masked global crops, local crops]`` in one list forward; its DINO head runs on all
   CLS tokens in one pass, its iBOT head on the masked patch tokens;
3. loss = ``dino_loss_weight`` · DINO (local term × local weight schedule) + ``koleo_loss_weight`` · 2 ·
   KoLeo (student global CLS, mean over the two crops) + ``ibot_loss_weight`` · iBOT + Gram weight schedule ·
   Gram (student masked global patch features against the frozen Gram teacher on the Gram crops, resized
   bicubically to the student grid when the Gram crops are larger);
4. per-submodule gradient clipping (backbone, DINO head, iBOT head), AdamW step with the scheduled LR and
   weight decay per parameter group, EMA update of the teacher, then the Gram-teacher refresh when due.

Schedules are :class:`~geodino.train.schedules.Schedule` keyword dicts evaluated at ``global_step``, so a
resumed run needs only the step counter. Every hyper-parameter is a plain value (str, int, float, bool,
tuple, dict of those), so ``save_hyperparameters`` keeps Lightning checkpoints loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import (
    FullStateDictConfig,
    FullyShardedDataParallel,
    MixedPrecision,
    ShardingStrategy,
    StateDictType,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.optim import Optimizer

from geodino.models import CheckpointError, DinoVisionTransformer, build_backbone
from geodino.models.block import SelfAttentionBlock
from geodino.models.checkpoint import describe_mismatch, read_state_dict
from geodino.train.heads import DINOHead
from geodino.train.losses import (
    DINOLoss,
    GramLoss,
    KoLeoLoss,
    iBOTPatchLoss,
    resize_patch_features,
    sinkhorn_knopp,
)
from geodino.train.param_groups import param_groups
from geodino.train.schedules import Schedule

__all__ = ["DEFAULT_SCHEDULES", "FSDP_UNITS", "DINOv3Module"]

#: Global crops per image (fixed in the official ``SSLMetaArch``).
N_GLOBAL_CROPS = 2

#: Schedules used when the matching argument is None: the official SAT / 7B pretraining stage
#: (``dinov3_vit7b16_pretrain.yaml``, notes §3.7) in optimisation steps. The LR is the effective value for a
#: global batch of 4096 (official ``sqrt_wrt_1024`` rule: 5e-5 × 4·sqrt(batch / 1024)); rescale it for
#: other batch sizes. The Gram weight default is the official ``gram.loss_weight`` 1.0 without a schedule.
DEFAULT_SCHEDULES: Mapping[str, Schedule] = MappingProxyType(
    {
        "lr": Schedule(start=0.0, peak=4e-4, warmup=100_000),
        "weight_decay": Schedule(peak=0.04),
        "momentum": Schedule(peak=0.994),
        "teacher_temp": Schedule(start=0.04, peak=0.07, warmup=100_000),
        "dino_local_loss_weight": Schedule(peak=1.0),
        "gram_loss_weight": Schedule(peak=1.0),
    }
)

#: Entries of official teacher checkpoints that are not networks (the unused momentum centres).
_LOSS_BUFFERS = ("dino_loss.", "ibot_patch_loss.")

#: FSDP units set by :meth:`DINOv3Module.configure_model` under Lightning's ``FSDPStrategy``: every
#: transformer block, every backbone (its embeddings and final norms) and every head. Student and teacher
#: networks are then split into identical units, so their local shards line up element for element and the
#: EMA update runs on the shards without gathering anything.
FSDP_UNITS = (SelfAttentionBlock, DinoVisionTransformer, DINOHead)

#: FSDP sharding strategies supported: each parameter lives on exactly one rank (or on all of them).
_FSDP_SHARDINGS = (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP, ShardingStrategy.NO_SHARD)


class DINOv3Module(L.LightningModule):
    """DINO + iBOT + KoLeo (+ Gram) self-distillation with an EMA teacher (official ``SSLMetaArch``).

    The batch is the output of :func:`~geodino.train.augment.collate_multicrop`: ``collated_global_crops``
    [2B, C, H, W] and ``collated_local_crops`` [N·B, C, h, w] crop-major, ``collated_masks`` bool [2B, P],
    and ``collated_gram_crops`` [2B, C, H_g, W_g] when ``gram`` is on (required then, as officially).

    Sub-modules: ``student`` and ``teacher`` are ``ModuleDict(backbone, dino_head, ibot_head)`` with the
    official key names, so ``teacher.state_dict()`` is an official teacher checkpoint; the teacher has
    ``requires_grad False`` and stays in eval mode whatever ``train()`` is called with, so RoPE coordinate
    augmentation and drop-path (configured in the backbone) act on the student only. With ``gram`` on,
    ``gram_teacher`` is ``ModuleDict(backbone)``, frozen and in eval mode, and the buffer ``gram_updates``
    counts its refreshes (restored on resume). (Lightning's "modules in eval mode at the start of training"
    notice lists these frozen networks.)

    Defaults follow the official SAT / 7B pretraining stage for optimisation (drop-path 0.4, freeze last layer
    5000 steps, layer decay 0.98, patch-embed LR × 0.2, betas (0.9, 0.99), clip 30, :data:`DEFAULT_SCHEDULES`)
    and the default-config head sizes (65536 / 256 / 2048), which fit backbones up to ViT-L.

    Args:
        backbone: ViT preset name (:func:`~geodino.models.list_presets`), e.g. ``dinov3_vitl16.sat493m``.
        backbone_overrides: Constructor keywords replacing the preset's (e.g. ``{"depth": 2}``, or
            ``{"pos_embed_rope_rescale_coords": None}`` to switch RoPE rescaling off). Applies to student,
            teacher and Gram teacher.
        drop_path_rate: Student sample-drop rate (the teacher and Gram teacher get none; 0.4 official 7B).
        dino_head_n_prototypes: DINO head prototypes K (official 65536; 262144 for 7B).
        dino_head_hidden_dim: DINO head MLP width (2048; 8192 for 7B).
        dino_head_bottleneck_dim: DINO head bottleneck (256; 512 for 7B).
        dino_head_nlayers: DINO head MLP layers (3).
        ibot_head_n_prototypes: iBOT head prototypes (65536; 98304 for 7B).
        ibot_head_hidden_dim: iBOT head MLP width (2048; 4096 for 7B).
        ibot_head_bottleneck_dim: iBOT head bottleneck (256; 384 for 7B).
        ibot_head_nlayers: iBOT head MLP layers (3).
        dino_loss_weight: Weight of the DINO loss.
        koleo_loss_weight: Weight of KoLeo; the official total adds it × 2 (global crops) × the crop mean.
        koleo_group_size: KoLeo neighbours searched in groups of this many samples gathered across
            processes (official ``koleo_distributed_loss_group_size``, 16 in the high-resolution stage);
            None: within each process's batch (stages 1-2). See :class:`~geodino.train.losses.KoLeoLoss`.
        ibot_loss_weight: Weight of the iBOT loss.
        student_temp: Student softmax temperature of DINO and iBOT.
        lr: Peak-LR schedule, keywords of :class:`~geodino.train.schedules.Schedule` (``start``, ``peak``,
            ``end``, ``warmup``, ``cosine``, ``offset``; lengths in steps); None: ``DEFAULT_SCHEDULES``. Each
            parameter group gets ``lr(step) × lr_multiplier`` (layer decay, patch-embed factor).
        weight_decay: Weight-decay schedule (× each group's ``wd_multiplier``, 0 for biases/norms/gamma).
        momentum: EMA momentum schedule m (θ_t ← m·θ_t + (1 − m)·θ_s).
        teacher_temp: Teacher temperature schedule of both Sinkhorn-Knopp centerings.
        dino_local_loss_weight: Extra weight of the local DINO term (official ``reweight_dino_local_loss``;
            1 → 0.5 in the Gram stage, 0.5 in the high-res stage).
        freeze_last_layer: Steps during which the heads' ``last_layer`` gets LR 0 (5000 official 7B).
        layer_decay: Layer-wise LR decay (0.98 official 7B, 0.9 ViT-L IN-1k; 1 = off).
        patch_embed_lr_mult: Extra LR factor of the patch embedding (0.2).
        betas: AdamW betas ((0.9, 0.99) official 7B / SAT, (0.9, 0.999) official default).
        clip_grad: Max gradient norm, applied separately to the student backbone, DINO head and iBOT head
            (30 official 7B, 3 default); None or 0 = no clipping. Use this, not
            ``Trainer(gradient_clip_val)``.
        gram: Enable Gram anchoring (a frozen Gram teacher and the Gram loss).
        gram_loss_weight: Gram weight schedule (official Gram stage: 0 → 2 cosine over 1000 steps from the
            stage start via ``offset``; high-res stage: constant 1.5).
        gram_from: Backbone file (official layout, e.g. an :meth:`export_teacher` file or a released
            checkpoint; heads are ignored) for the Gram teacher; None: a copy of the teacher as constructed
            (after ``init_from``), i.e. the EMA teacher at the first step.
        gram_update_frequency: Refresh the Gram teacher (hard copy of the EMA teacher backbone) after every
            step ``it`` with ``(it + 1) % frequency == 0`` (10000 official); None: never refresh.
        gram_first_update: No refresh before ``it + 1`` reaches this step count.
        gram_max_updates: Largest number of refreshes (3 official); None: unlimited.
        init_from: Teacher file of a previous stage (``{"teacher": {"backbone.*", "dino_head.*",
            "ibot_head.*"}}``, as written by :meth:`export_teacher` or the official
            ``teacher_checkpoint.pth``); loaded strictly into student and teacher (official
            ``student.resume_from_teacher_chkpt``).
        seed: Base of the per-step RNG seed (see :meth:`training_step`).
        activation_checkpointing: Recompute the student's block activations in the backward pass instead of
            keeping them (:func:`checkpoint_blocks`): less memory for about a third more compute, the same
            gradients (drop-path draws are replayed).
        compile: ``torch.compile`` every transformer block of the student, teacher and Gram teacher
            (:func:`compile_blocks`, per block as the official training); compiled on the first step.

    Scaling: one process per GPU with Lightning's ``ddp`` or ``fsdp`` strategy (``Trainer(strategy=...)``),
    any precision (``bf16-mixed`` is the recipe's); ``num_nodes`` and the process ranks come from Lightning's
    cluster environments (``torchrun``, SLURM). Under ``fsdp``, :meth:`configure_model` shards the networks
    in :data:`FSDP_UNITS`, gradient clipping reduces the norms over the shards and :meth:`export_teacher`
    gathers the teacher. Neither option changes parameter names in checkpoints or exports.

    Note:
        ``init_from`` and ``gram_from`` are read at construction and stored as hyper-parameters, so
        ``load_from_checkpoint`` reads them again before the checkpoint's weights overwrite them; pass
        ``init_from=None, gram_from=None`` there when the files are gone.
    """

    def __init__(
        self,
        backbone: str,
        backbone_overrides: dict[str, Any] | None = None,
        drop_path_rate: float = 0.4,
        dino_head_n_prototypes: int = 65536,
        dino_head_hidden_dim: int = 2048,
        dino_head_bottleneck_dim: int = 256,
        dino_head_nlayers: int = 3,
        ibot_head_n_prototypes: int = 65536,
        ibot_head_hidden_dim: int = 2048,
        ibot_head_bottleneck_dim: int = 256,
        ibot_head_nlayers: int = 3,
        dino_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        koleo_group_size: int | None = None,
        ibot_loss_weight: float = 1.0,
        student_temp: float = 0.1,
        lr: dict[str, float] | None = None,
        weight_decay: dict[str, float] | None = None,
        momentum: dict[str, float] | None = None,
        teacher_temp: dict[str, float] | None = None,
        dino_local_loss_weight: dict[str, float] | None = None,
        freeze_last_layer: int = 5000,
        layer_decay: float = 0.98,
        patch_embed_lr_mult: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.99),
        clip_grad: float | None = 30.0,
        gram: bool = False,
        gram_loss_weight: dict[str, float] | None = None,
        gram_from: str | None = None,
        gram_update_frequency: int | None = None,
        gram_first_update: int = 0,
        gram_max_updates: int | None = None,
        init_from: str | None = None,
        seed: int = 0,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if gram_update_frequency is not None and gram_update_frequency < 1:
            raise ValueError(f"gram_update_frequency must be >= 1 or None, got {gram_update_frequency}")
        self.schedules = {
            name: DEFAULT_SCHEDULES[name] if given is None else Schedule(**given)
            for name, given in (
                ("lr", lr),
                ("weight_decay", weight_decay),
                ("momentum", momentum),
                ("teacher_temp", teacher_temp),
                ("dino_local_loss_weight", dino_local_loss_weight),
                ("gram_loss_weight", gram_loss_weight),
            )
        }
        overrides = dict(backbone_overrides or {})
        heads = {
            "dino_head": {
                "out_dim": dino_head_n_prototypes,
                "hidden_dim": dino_head_hidden_dim,
                "bottleneck_dim": dino_head_bottleneck_dim,
                "nlayers": dino_head_nlayers,
            },
            "ibot_head": {
                "out_dim": ibot_head_n_prototypes,
                "hidden_dim": ibot_head_hidden_dim,
                "bottleneck_dim": ibot_head_bottleneck_dim,
                "nlayers": ibot_head_nlayers,
            },
        }
        self.student = _build_networks(backbone, {**overrides, "drop_path_rate": drop_path_rate}, heads)
        if init_from is not None:
            _load_strict(self.student, _read_teacher_file(init_from), init_from)
        self.teacher = _build_networks(backbone, {**overrides, "drop_path_rate": 0.0}, heads)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

        self.dino_loss = DINOLoss(student_temp=student_temp)
        self.ibot_patch_loss = iBOTPatchLoss(student_temp=student_temp)
        self.koleo_loss = KoLeoLoss(group_size=koleo_group_size)
        self.gram_teacher: nn.ModuleDict | None = None
        if gram:
            self.gram_loss = GramLoss()
            gram_backbone = build_backbone(backbone, **{**overrides, "drop_path_rate": 0.0})
            if gram_from is None:
                gram_backbone.load_state_dict(self.teacher["backbone"].state_dict())
            else:
                state = {
                    k: v for k, v in read_state_dict(gram_from).items() if not k.startswith(_LOSS_BUFFERS)
                }
                _load_strict(gram_backbone, state, gram_from)
            self.gram_teacher = nn.ModuleDict({"backbone": gram_backbone}).requires_grad_(False)
            self.register_buffer("gram_updates", torch.zeros((), dtype=torch.long))
        if compile:
            for networks in (self.student, self.teacher, self.gram_teacher):
                if networks is not None:
                    compile_blocks(networks["backbone"])
        if activation_checkpointing:
            checkpoint_blocks(self.student["backbone"])
        self.train()

    # ------------------------------------------------------------------ modes and schedules

    def train(self, mode: bool = True) -> DINOv3Module:
        """Sets the student's mode; the teacher and Gram teacher always stay in eval mode (official)."""
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    def schedule_values(self, step: int) -> dict[str, float]:
        """Every scheduled hyper-parameter at optimisation ``step``, plus the heads' last-layer LR."""
        values = {name: schedule(step) for name, schedule in self.schedules.items()}
        values["last_layer_lr"] = 0.0 if step < self.hparams.freeze_last_layer else values["lr"]
        return values

    # ------------------------------------------------------------------ forward passes and losses

    @torch.no_grad()
    def teacher_targets(
        self, global_crops: Tensor, masks: Tensor, teacher_temp: float
    ) -> tuple[Tensor, Tensor]:
        """Sinkhorn-Knopp targets of the EMA teacher on the unmasked global crops.

        Args:
            global_crops: [2B, C, H, W], crop-major.
            masks: Student iBOT masks, bool [2B, P].
            teacher_temp: Teacher temperature of both centerings.

        Returns:
            DINO targets [2, B, K_dino] and iBOT targets at the masked patches [M, K_ibot] (rows in the order
            of ``masks.flatten().nonzero()``).
        """
        out = self.teacher["backbone"](global_crops, is_training=True)
        cls_logits = self.teacher["dino_head"](out["x_norm_clstoken"])  # [2B, K]
        masked_logits = self.teacher["ibot_head"](out["x_norm_patchtokens"][masks])  # [M, K]
        dino_targets = sinkhorn_knopp(cls_logits, teacher_temp).unflatten(0, (N_GLOBAL_CROPS, -1))
        return dino_targets, sinkhorn_knopp(masked_logits, teacher_temp)

    @torch.no_grad()
    def gram_targets(self, gram_crops: Tensor, student_grid: tuple[int, int]) -> Tensor:
        """Gram-teacher patch features on the student's patch grid.

        Args:
            gram_crops: [2B, C, H_g, W_g], the same views as the global crops (possibly larger).
            student_grid: Patch grid (h, w) of the student's global crops.

        Returns:
            ``x_norm_patchtokens`` [2B, h·w, D], bicubically resized (official, no antialias) when the Gram
            crops have another grid.
        """
        patch_size = self.gram_teacher["backbone"].patch_size
        grid = (gram_crops.shape[-2] // patch_size, gram_crops.shape[-1] // patch_size)
        patches = self.gram_teacher["backbone"](gram_crops, is_training=True)["x_norm_patchtokens"]
        return patches if grid == student_grid else resize_patch_features(patches, grid, student_grid)

    def compute_losses(self, batch: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        """Teacher and student forward passes and every loss term (official ``forward_backward``).

        Args:
            batch: A :func:`~geodino.train.augment.collate_multicrop` batch (see the class docstring).
            step: Optimisation step at which the schedules are read.

        Returns:
            ``loss`` (the weighted total, with gradient) and the unweighted terms ``dino_local_crops_loss``,
            ``dino_global_crops_loss``, ``koleo_loss`` (mean over the global crops), ``ibot_loss`` and, with
            Gram, ``gram_loss`` (scalars with gradient).
        """
        global_crops = batch["collated_global_crops"]
        local_crops = batch["collated_local_crops"]
        masks = batch["collated_masks"].bool()
        n_images = global_crops.shape[0] // N_GLOBAL_CROPS
        if global_crops.shape[0] != N_GLOBAL_CROPS * n_images or local_crops.shape[0] % n_images:
            raise ValueError(
                f"expected {N_GLOBAL_CROPS}·B global and N·B local crops, got {global_crops.shape[0]} and "
                f"{local_crops.shape[0]}"
            )
        schedules = self.schedule_values(step)
        dino_targets, ibot_targets = self.teacher_targets(global_crops, masks, schedules["teacher_temp"])

        student_global, student_local = self.student["backbone"](
            [global_crops, local_crops], masks=[masks, None], is_training=True
        )
        global_cls = student_global["x_norm_clstoken"]  # [2B, D]
        cls_logits = self.student["dino_head"](torch.cat([global_cls, student_local["x_norm_clstoken"]]))
        global_logits, local_logits = cls_logits.split([global_cls.shape[0], local_crops.shape[0]])
        masked_logits = self.student["ibot_head"](student_global["x_norm_patchtokens"][masks])  # [M, K]

        dino_terms = self.dino_loss(
            global_logits.unflatten(0, (N_GLOBAL_CROPS, n_images)),
            local_logits.unflatten(0, (-1, n_images)),
            dino_targets,
        )
        losses = {
            "dino_local_crops_loss": dino_terms.local_loss,
            "dino_global_crops_loss": dino_terms.global_loss,
            "koleo_loss": self.koleo_loss(global_cls.unflatten(0, (N_GLOBAL_CROPS, n_images))),
            "ibot_loss": self.ibot_patch_loss(masked_logits, ibot_targets, masks),
        }
        total = (
            self.hparams.dino_loss_weight * dino_terms.total(schedules["dino_local_loss_weight"])
            + self.hparams.koleo_loss_weight * N_GLOBAL_CROPS * losses["koleo_loss"]
            + self.hparams.ibot_loss_weight * losses["ibot_loss"]
        )
        if self.gram_teacher is not None:
            if "collated_gram_crops" not in batch:
                raise KeyError(
                    "gram=True needs Gram-teacher crops in the batch ('collated_gram_crops'): set "
                    "MultiCropAugmentation(gram_crops_size=...)"
                )
            patch_size = self.student["backbone"].patch_size
            grid = (global_crops.shape[-2] // patch_size, global_crops.shape[-1] // patch_size)
            targets = self.gram_targets(batch["collated_gram_crops"], grid)
            losses["gram_loss"] = self.gram_loss(student_global["x_norm_patchtokens"], targets)
            total = total + schedules["gram_loss_weight"] * losses["gram_loss"]
        return {"loss": total, **losses}

    # ------------------------------------------------------------------ Lightning hooks

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """One official iteration's forward pass and losses; logs every term and schedule value.

        The global torch RNG is re-seeded from (``seed``, ``global_step``, ``batch_idx``, ``global_rank``)
        for the duration of the step and restored afterwards (``batch_idx`` keeps the micro-batches of one
        step apart under gradient accumulation). Drop-path and the RoPE coordinate augmentation draw from
        the global RNG, and Lightning does not checkpoint RNG states, so without this a run resumed from a
        checkpoint would draw different drop-path subsets and RoPE scales than the uninterrupted run; with
        it, the resumed run reproduces the next steps' losses exactly given the same batches. Restoring the
        state keeps the re-seeding from leaking into code outside the step (e.g. in-process augmentation).

        Returns:
            ``{"loss": total, <term>: detached term}`` (Lightning back-propagates ``loss``).
        """
        step = self.global_step
        with self._step_rng(step, batch_idx):
            losses = self.compute_losses(batch, step)
        n_images = batch["collated_global_crops"].shape[0] // N_GLOBAL_CROPS
        self.log("train/total_loss", losses["loss"], prog_bar=True, sync_dist=True, batch_size=n_images)
        terms = {name: value.detach() for name, value in losses.items() if name != "loss"}
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=n_images)
        values = self.schedule_values(step)
        if self.gram_teacher is None:
            del values["gram_loss_weight"]
        self.log_dict({f"train/{k}": v for k, v in values.items()}, batch_size=n_images)
        return {"loss": losses["loss"], **terms}

    def configure_model(self) -> None:
        """Under Lightning's ``FSDPStrategy``, shards by :data:`FSDP_UNITS` (see :func:`configure_fsdp`)."""
        configure_fsdp(self)

    def configure_optimizers(self) -> Optimizer:
        """AdamW over the official parameter groups of the student (LR and WD are set at every step)."""
        groups = param_groups(
            ((name, fsdp_inner(module)) for name, module in self.student.items()),
            n_blocks=self.student["backbone"].n_blocks,
            layer_decay=self.hparams.layer_decay,
            patch_embed_lr_mult=self.hparams.patch_embed_lr_mult,
        )
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=tuple(self.hparams.betas))

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clips the student backbone, DINO head and iBOT head separately to ``clip_grad`` (official).

        Lightning calls this hook before every optimizer step (after AMP unscaling), whatever the
        ``Trainer``'s ``gradient_clip_val``; the Trainer setting would clip the whole student at once, so it
        is refused. Logs each sub-module's norm before clipping as ``train/<name>_grad_norm``.

        Raises:
            ValueError: If ``Trainer(gradient_clip_val=...)`` is set.
        """
        if gradient_clip_val:
            raise ValueError(
                "DINOv3Module clips per sub-module: set DINOv3Module(clip_grad=...) instead of "
                f"Trainer(gradient_clip_val={gradient_clip_val})"
            )
        if not self.hparams.clip_grad:
            return
        sharded = grads_sharded(self)
        for name, module in self.student.items():
            norm = clip_grad_norm(module.parameters(), self.hparams.clip_grad, sharded=sharded)
            self.log(f"train/{name}_grad_norm", norm)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Optimizer,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Sets this step's LR and weight decay, steps, then updates the EMA teacher and the Gram teacher.

        Called by Lightning once per real optimizer step (not during gradient accumulation), with
        ``global_step`` still equal to the index of the current step.
        """
        step = self.global_step
        values = self.schedule_values(step)
        for group in optimizer.param_groups:
            lr = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
            group["lr"] = lr * group["lr_multiplier"]
            group["weight_decay"] = values["weight_decay"] * group["wd_multiplier"]
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_ema(values["momentum"])
        if self._gram_update_due(step):
            self.update_gram()

    # ------------------------------------------------------------------ teacher updates and export

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        """θ_teacher ← m·θ_teacher + (1 − m)·θ_student over all parameters (buffers are not averaged)."""
        teacher = list(self.teacher.parameters())
        student = list(self.student.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    @torch.no_grad()
    def update_gram(self) -> None:
        """Gram teacher ← EMA teacher backbone (hard copy of the parameters); counts the refresh."""
        if self.gram_teacher is None:
            raise RuntimeError("update_gram needs gram=True")
        torch._foreach_copy_(
            list(self.gram_teacher["backbone"].parameters()), list(self.teacher["backbone"].parameters())
        )
        self.gram_updates.add_(1)

    def _gram_update_due(self, step: int) -> bool:
        """Official rule after step ``it``: (it + 1) ≥ first, (it + 1) % frequency == 0, count < max."""
        frequency = self.hparams.gram_update_frequency
        if self.gram_teacher is None or frequency is None:
            return False
        done = step + 1
        max_updates = self.hparams.gram_max_updates
        return (
            done >= self.hparams.gram_first_update
            and done % frequency == 0
            and (max_updates is None or int(self.gram_updates) < max_updates)
        )

    def export_teacher(self, path: str | os.PathLike) -> Path:
        """Writes the EMA teacher as an official teacher checkpoint, atomically.

        The file holds ``{"teacher": {"backbone.<official key>": ..., "dino_head.*": ..., "ibot_head.*":
        ...}}`` (CPU tensors, the parameters' dtype), the layout of the official ``teacher_checkpoint.pth``:
        :func:`~geodino.models.load_backbone` reads its backbone, and ``init_from`` / ``gram_from`` of the
        next stage read it. It is written to a temporary file in the same folder, synced, then renamed over
        ``path``, so a crash never leaves a truncated file. Only global rank 0 writes. Without FSDP, calling
        it on rank 0 alone is enough; under FSDP the teacher is gathered with collectives (see
        :func:`rank0_state_dict`), so every rank must call it.

        Args:
            path: Destination file (``.pth``); parent folders are created.

        Returns:
            The path written (on rank 0).
        """
        path = Path(path)
        state = rank0_state_dict(self.teacher)
        if state is None:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"teacher": state}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _step_rng(self, step: int, batch_idx: int) -> Iterator[None]:
        """Global torch RNG (CPU, this CUDA device) seeded by (seed, step, batch, rank); restored on exit."""
        entropy = (self.hparams.seed, step, batch_idx, self.global_rank)
        step_seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step_seed)
            yield


def checkpoint_blocks(backbone: DinoVisionTransformer) -> None:
    """Activation checkpointing of every transformer block of ``backbone``, in place.

    Each block is replaced by torch's ``checkpoint_wrapper`` (non-reentrant ``torch.utils.checkpoint``): its
    inner activations are dropped after the forward pass and recomputed in the backward pass. The RNG state
    is saved with the inputs and restored for the recomputation, so drop-path draws the same samples and
    the gradients are those without checkpointing. State-dict keys are unchanged (the wrapper removes its
    ``_checkpoint_wrapped_module.`` prefix on save and adds it back on load); parameter names gain it.
    """
    for i, block in enumerate(backbone.blocks):
        backbone.blocks[i] = checkpoint_wrapper(block)


def compile_blocks(backbone: DinoVisionTransformer) -> None:
    """``torch.compile`` every transformer block of ``backbone`` in place (``nn.Module.compile``).

    Per block, as the official training (notes §3.7): the list forward over crop sizes, drop-path and the
    per-block RoPE tables stay in Python, the block's arithmetic is fused. ``nn.Module.compile`` keeps the
    module object, so names and state-dict keys gain no ``_orig_mod.`` prefix. Every block shares the same
    compiled code; compilation happens on the first call of each input signature (student training,
    teacher inference, Gram crops).
    """
    for block in backbone.blocks:
        block.compile()


def configure_fsdp(module: L.LightningModule) -> None:
    """Makes Lightning's ``FSDPStrategy`` shard ``module`` by :data:`FSDP_UNITS` (no-op for other strategies).

    Sets the strategy's ``auto_wrap_policy`` unless one was given; call it from ``configure_model``, which
    Lightning runs before wrapping the model. With its own policy, the user must keep every student network
    and its EMA copy in units of equal structure, or the EMA update will fail on mismatched shards. With
    ``bf16-mixed`` and no ``mixed_precision`` given, FSDP gathers bf16 parameters but reduces gradients in
    float32 and leaves buffers alone (official: bf16 parameters, fp32 reduce); Lightning's own setting
    would reduce in bf16 and cast the RoPE and key-bias mask buffers.

    Raises:
        ValueError: For hybrid sharding (replicas across nodes), which the sharded gradient clipping of
            :func:`clip_grad_norm` does not handle.
    """
    strategy = module._trainer.strategy if module._trainer is not None else None
    if not isinstance(strategy, FSDPStrategy):
        return
    if strategy.sharding_strategy not in _FSDP_SHARDINGS:
        raise ValueError(
            f"FSDP sharding_strategy {strategy.sharding_strategy.name} is not supported; use one of "
            f"{[s.name for s in _FSDP_SHARDINGS]}"
        )
    strategy.kwargs.setdefault("auto_wrap_policy", ModuleWrapPolicy(FSDP_UNITS))
    if strategy.mixed_precision is None and strategy.precision_plugin.precision == "bf16-mixed":
        strategy.mixed_precision = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def grads_sharded(module: L.LightningModule) -> bool:
    """Whether each rank holds only a shard of every gradient (FSDP sharding over more than one process)."""
    strategy = module._trainer.strategy if module._trainer is not None else None
    return (
        isinstance(strategy, FSDPStrategy)
        and strategy.world_size > 1
        and strategy.sharding_strategy != ShardingStrategy.NO_SHARD
    )


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float, *, sharded: bool = False) -> Tensor:
    """Scales the gradients so that their global L2 norm is at most ``max_norm``; returns the norm before.

    Without ``sharded`` this is ``nn.utils.clip_grad_norm_``. With ``sharded`` (FSDP: each rank holds a
    disjoint shard of every gradient), the squared norms of the local shards are summed over all ranks with
    one all-reduce, so every rank applies the same factor; every rank must call it.
    """
    if not sharded:
        return nn.utils.clip_grad_norm_(parameters, max_norm=max_norm)
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    squared = torch.zeros((), device=params[0].device)
    if grads:
        squared = torch.stack(torch._foreach_norm(grads)).float().square().sum()
    torch.distributed.all_reduce(squared)
    norm = squared.sqrt()
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def rank0_state_dict(module: nn.Module) -> dict[str, Tensor] | None:
    """CPU copies of ``module``'s full state dict on global rank 0; None on the other ranks.

    Under FSDP (``module`` holds FSDP units) the tensors are gathered from the shards, a collective: every
    rank must call it. Otherwise only rank 0 copies anything. Keys carry no wrapper prefixes.
    """
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(module, StateDictType.FULL_STATE_DICT, config):
            state = module.state_dict()  # empty on ranks other than 0
    elif rank == 0:
        state = module.state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()} if rank == 0 else None


def fsdp_inner(module: nn.Module) -> nn.Module:
    """The module an FSDP unit wraps (``module`` itself if it is not one), for unprefixed parameter names."""
    return module.module if isinstance(module, FullyShardedDataParallel) else module


def _build_networks(name: str, overrides: dict[str, Any], heads: dict[str, dict[str, int]]) -> nn.ModuleDict:
    """``ModuleDict(backbone, dino_head, ibot_head)`` with the official key names."""
    backbone = build_backbone(name, **overrides)
    if not isinstance(backbone, DinoVisionTransformer):
        raise ValueError(f"DINOv3 SSL training needs a ViT preset, {name!r} is a {type(backbone).__name__}")
    return nn.ModuleDict(
        {
            "backbone": backbone,
            **{head: DINOHead(backbone.embed_dim, **sizes) for head, sizes in heads.items()},
        }
    )


def _read_teacher_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Backbone and head tensors of a teacher checkpoint, read with ``torch.load(weights_only=True)``.

    Accepts ``{"teacher": state_dict}`` or a bare state dict with ``backbone.``/``dino_head.``/``ibot_head.``
    keys; the official loss-centre buffers (``dino_loss.*``, ``ibot_patch_loss.*``) are dropped.

    Raises:
        CheckpointError: Missing or unreadable file, or no tensor state dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such teacher checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any decoder failure means the same to the user: not a readable checkpoint
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("teacher"), Mapping):
        obj = obj["teacher"]
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected {{'teacher': state_dict}} or a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor) and not k.startswith(_LOSS_BUFFERS)}


def _load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """``load_state_dict(strict=True)``, raising a :class:`CheckpointError` that lists what does not fit."""
    report = describe_mismatch(module, state_dict)
    if report:
        raise CheckpointError(f"{path} does not fit the configured networks:\n{report}")
    module.load_state_dict(state_dict, strict=True)
