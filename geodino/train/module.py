"""DINOv3 self-supervised pretraining as a LightningModule (the official ``SSLMetaArch`` + ``train.py`` loop).

One module covers the three official stages: pretraining, Gram anchoring (``gram=True``, continuing the
pretraining run with ``continue_from``; Gram teacher snapshot or file) and high-resolution adaptation
(``init_from`` the previous stage's teacher, Gram teacher fixed). Per step, as the official loop
(``shared/notes/dinov3-official.md`` §3.1, §3.5-3.8):

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

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    StateDictType,
)
from torch.optim import Optimizer

from geodino.io import atomic_output
from geodino.models import CheckpointError, build_backbone
from geodino.models.checkpoint import read_state_dict
from geodino.train.base import (
    LOSS_BUFFER_PREFIXES,
    N_GLOBAL_CROPS,
    SSLModule,
    StageCheckpoint,
    build_networks,
    fsdp_inner,
    head_sizes,
    load_strict,
    masked_tokens,
    rank0_state_dict,
    read_stage_checkpoint,
    read_teacher_file,
    unpack_batch,
    unwrapped_name,
)
from geodino.train.losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss, resize_patch_features
from geodino.train.nonfinite import NonFiniteSteps, ema_update_
from geodino.train.param_groups import param_groups
from geodino.train.schedules import Schedule

__all__ = ["DEFAULT_SCHEDULES", "DINOv3Module"]

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


class DINOv3Module(SSLModule):
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
            teacher and Gram teacher. The preset's RoPE runs in float32 (periods and rotation), as the
            released backbones do at inference; the official training runs it in bf16 (its ``build_model``
            does not pass ``pos_embed_rope_dtype`` on), which ``{"pos_embed_rope_dtype": "bf16"}``
            reproduces. The speed is the same (``benchmarks/block_traffic.py``). An export loads with
            :func:`~geodino.models.load_backbone` given the same keywords.
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
            ``student.resume_from_teacher_chkpt``), with a fresh AdamW: the high-resolution stage.
        continue_from: Lightning checkpoint (``.ckpt``, e.g. ``checkpoints/last.ckpt``) of a previous stage of
            this module with the same networks: the student, the EMA teacher and the AdamW state continue from
            it, as the official Gram stage continues the pretraining run; this stage's step counter and
            schedules start at 0. The Gram teacher starts as that EMA teacher unless ``gram_from`` is given.
            The AdamW state moves by parameter name, so either stage may run on one device, DDP or FSDP,
            with any ``layer_decay``. Not with ``init_from``.
        max_skipped_steps: A step whose gradients are NaN or infinite is skipped: the weights, the AdamW
            state and the EMA networks stay as they were (:mod:`~geodino.train.nonfinite`). This many
            skipped steps in a row stop the run with :class:`~geodino.train.nonfinite.TrainingDiverged` (3:
            the official training aborts at the third NaN loss in a row), checked when the logs are written
            (``Trainer(log_every_n_steps)``) and at the end of every epoch. Under ``16-mixed``, whose
            ``GradScaler`` skips overflowing steps while it lowers its scale, only once the scale is below 1.
        seed: Base of the per-step RNG seed (see :meth:`training_step`).
        activation_checkpointing: Recompute the student's block activations in the backward pass instead of
            keeping them (:func:`~geodino.train.base.checkpoint_blocks`), with the same gradients (drop-path
            draws are replayed). True: all of them, the least memory for about a third more compute;
            ``"selective"``: only the elementwise ops, keeping the matmul and attention outputs (the
            official pretraining's choice).
        compile: ``torch.compile`` every transformer block of the student, teacher and Gram teacher
            (:func:`~geodino.train.base.compile_blocks`, per block as the official training) and the DINO
            and iBOT losses (:func:`~geodino.train.base.compile_losses`); compiled on the first step.
        fp8: Float8 matmuls in the transformer blocks of all networks
            (:func:`~geodino.train.base.float8_blocks`, torchao), as the official 7B training; needs fp8
            tensor cores (H100 class; emulated, with a warning, without a GPU). Use with ``compile``. At
            ViT-L width it saves memory (-23 % peak) but runs slower than bf16: on an H200 its scaling casts
            cost more than the faster matmuls save (``benchmarks/RESULTS.md``); it pays off for wide models.

    Scaling: one process per GPU with Lightning's ``ddp`` or ``fsdp`` strategy (``Trainer(strategy=...)``),
    any precision (``bf16-mixed`` is the recipe's); ``num_nodes`` and the process ranks come from Lightning's
    cluster environments (``torchrun``, SLURM). Under ``fsdp``, :meth:`configure_model` shards the networks
    in :data:`~geodino.train.base.FSDP_UNITS`, gradient clipping reduces the norms over the shards and
    :meth:`export_teacher` gathers the teacher. Neither option changes parameter names in checkpoints or
    exports.

    Note:
        ``init_from``, ``continue_from`` and ``gram_from`` are read at construction and stored as
        hyper-parameters, so ``load_from_checkpoint`` (and resuming a stage with ``ckpt_path``) reads them
        again before the checkpoint's weights overwrite them; pass ``None`` for them there when the files are
        gone. A stage resumed with ``ckpt_path`` keeps its own optimizer state, not ``continue_from``'s.
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
        max_skipped_steps: int = 3,
        gram: bool = False,
        gram_loss_weight: dict[str, float] | None = None,
        gram_from: str | None = None,
        gram_update_frequency: int | None = None,
        gram_first_update: int = 0,
        gram_max_updates: int | None = None,
        init_from: str | None = None,
        continue_from: str | None = None,
        seed: int = 0,
        activation_checkpointing: bool | Literal["selective"] = False,
        compile: bool = False,
        fp8: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.nonfinite = NonFiniteSteps(max_skipped_steps)
        if init_from is not None and continue_from is not None:
            raise ValueError(
                "init_from starts a stage from a teacher file, continue_from continues a run: not both"
            )
        if gram_update_frequency is not None and gram_update_frequency < 1:
            raise ValueError(f"gram_update_frequency must be >= 1 or None, got {gram_update_frequency}")
        given_schedules = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "teacher_temp": teacher_temp,
            "dino_local_loss_weight": dino_local_loss_weight,
            **({"gram_loss_weight": gram_loss_weight} if gram else {}),
        }
        self.schedules = {
            name: DEFAULT_SCHEDULES[name] if given is None else Schedule(**given)
            for name, given in given_schedules.items()
        }
        overrides = dict(backbone_overrides or {})
        heads = {
            "dino_head": head_sizes(
                dino_head_n_prototypes, dino_head_hidden_dim, dino_head_bottleneck_dim, dino_head_nlayers
            ),
            "ibot_head": head_sizes(
                ibot_head_n_prototypes, ibot_head_hidden_dim, ibot_head_bottleneck_dim, ibot_head_nlayers
            ),
        }
        self.student = build_networks(backbone, {**overrides, "drop_path_rate": drop_path_rate}, heads)
        if init_from is not None:
            load_strict(self.student, read_teacher_file(init_from), init_from)
        self.teacher = build_networks(backbone, {**overrides, "drop_path_rate": 0.0}, heads)
        self._continued_from: StageCheckpoint | None = None
        if continue_from is not None:
            previous = read_stage_checkpoint(continue_from)
            load_strict(self.student, previous.networks["student"], continue_from)
            load_strict(self.teacher, previous.networks["teacher"], continue_from)
            self._continued_from = previous._replace(networks={})  # AdamW state: loaded in on_fit_start
        else:
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
                    k: v
                    for k, v in read_state_dict(gram_from).items()
                    if not k.startswith(LOSS_BUFFER_PREFIXES)
                }
                load_strict(gram_backbone, state, gram_from)
            self.gram_teacher = nn.ModuleDict({"backbone": gram_backbone}).requires_grad_(False)
            self.register_buffer("gram_updates", torch.zeros((), dtype=torch.long))
        running = [n["backbone"] for n in (self.student, self.teacher, self.gram_teacher) if n is not None]
        self.apply_scale_options(running, [self.student["backbone"]], fp8, compile, activation_checkpointing)
        self.train()

    # ------------------------------------------------------------------ modes and schedules

    def frozen_networks(self) -> list[nn.Module]:
        """The teacher and the Gram teacher: always in eval mode, whatever ``train()`` is called with."""
        return [self.teacher] + ([] if self.gram_teacher is None else [self.gram_teacher])

    # ------------------------------------------------------------------ forward passes and losses

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
        global_crops, local_crops, masks, mask_indices, masks_weight, n_images = unpack_batch(batch)
        schedules = self.schedule_values(step)
        dino_targets, ibot_targets = self.teacher_targets(
            global_crops, mask_indices, schedules["teacher_temp"]
        )

        student_global, student_local = self.student["backbone"](
            [global_crops, local_crops], masks=[masks, None], is_training=True
        )
        global_cls = student_global["x_norm_clstoken"]  # [2B, D]
        cls_logits = self.student["dino_head"](torch.cat([global_cls, student_local["x_norm_clstoken"]]))
        global_logits, local_logits = cls_logits.split([global_cls.shape[0], local_crops.shape[0]])
        masked_patches = masked_tokens(student_global["x_norm_patchtokens"], mask_indices)  # [M, D]
        masked_logits = self.student["ibot_head"](masked_patches)  # [M, K]

        dino_terms = self.dino_loss(
            global_logits.unflatten(0, (N_GLOBAL_CROPS, n_images)),
            local_logits.unflatten(0, (-1, n_images)),
            dino_targets,
        )
        losses = {
            "dino_local_crops_loss": dino_terms.local_loss,
            "dino_global_crops_loss": dino_terms.global_loss,
            "koleo_loss": self.koleo_loss(global_cls.unflatten(0, (N_GLOBAL_CROPS, n_images))),
            "ibot_loss": self.ibot_patch_loss(masked_logits, ibot_targets, masks_weight, masks.shape[0]),
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

    def on_fit_start(self) -> None:
        """With ``continue_from``: the previous stage's AdamW state (moments and step count of every student
        parameter, matched by name) goes into this run's optimizer, which keeps this stage's group
        hyper-parameters. Either run may be single-device, DDP or FSDP. A stage resumed with ``ckpt_path``
        keeps its own optimizer state: Lightning restores it after this hook.

        Raises:
            CheckpointError: The checkpoint's student parameters differ from this stage's.
        """
        super().on_fit_start()
        previous, path = self._continued_from, self.hparams.continue_from
        self._continued_from = None
        if previous is None:
            return
        optimizer = self.trainer.optimizers[0]
        current = optimizer.state_dict()["param_groups"]
        order = [unwrapped_name(n) for g in current for n in g["names"]]
        if set(order) != previous.parameters:
            diff = sorted(previous.parameters.symmetric_difference(order))
            raise CheckpointError(
                f"{path}: its optimizer holds other student parameters than this stage's ({len(diff)} "
                f"differ, e.g. {diff[0]}): keep the previous stage's networks"
            )
        if not isinstance(self.trainer.strategy, FSDPStrategy):
            state = {i: previous.moments[name] for i, name in enumerate(order) if name in previous.moments}
            self.trainer.strategy.load_optimizer_state_dict(
                {"optimizer_states": [{"state": state, "param_groups": current}]}
            )
            return
        by_fqn = {  # FSDP's full optimizer state: keyed by the model's parameter names
            "state": {f"student.{name}": state for name, state in previous.moments.items()},
            "param_groups": [
                {**g, "params": [f"student.{unwrapped_name(n)}" for n in g["names"]]} for g in current
            ],
        }
        model = self.trainer.strategy.model
        full = FullStateDictConfig(rank0_only=False), FullOptimStateDictConfig(rank0_only=False)
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, *full):
            flat = FullyShardedDataParallel.optim_state_dict_to_load(model, optimizer, by_fqn)
        optimizer.load_state_dict(flat)

    def configure_optimizers(self) -> Optimizer:
        """Fused AdamW (one kernel per group and device; on the GPU as on the CPU) over the official parameter
        groups of the student (LR and WD are set at every step)."""
        groups = param_groups(
            ((name, fsdp_inner(module)) for name, module in self.student.items()),
            n_blocks=self.student["backbone"].n_blocks,
            layer_decay=self.hparams.layer_decay,
            patch_embed_lr_mult=self.hparams.patch_embed_lr_mult,
        )
        return torch.optim.AdamW(
            groups, lr=0.0, weight_decay=0.0, betas=tuple(self.hparams.betas), fused=True
        )

    def clipped_networks(self) -> Iterator[tuple[str, nn.Module]]:
        """The student's backbone, DINO head and iBOT head, clipped separately (official)."""
        yield from self.student.items()

    def exported_backbones(self) -> dict[str, nn.Module]:
        """The EMA teacher's backbone, as ``"teacher"``."""
        return {"teacher": self.teacher["backbone"]}

    def after_optimizer_step(self, step: int, values: dict[str, float]) -> None:
        """EMA update of the teacher, then the Gram-teacher refresh when due."""
        self.update_ema(values["momentum"])
        if self._gram_update_due(step):
            self.update_gram()

    # ------------------------------------------------------------------ teacher updates and export

    def update_ema(self, momentum: float) -> None:
        """θ_teacher ← m·θ_teacher + (1 − m)·θ_student over all parameters (buffers are not averaged); no
        change after a skipped step (:func:`~geodino.train.nonfinite.ema_update_`)."""
        ema_update_(
            list(self.teacher.parameters()), list(self.student.parameters()), momentum, self.nonfinite.found
        )

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
        next stage read it. It is written atomically (:func:`~geodino.io.atomic_output`), so a crash never
        leaves a truncated file. Only global rank 0 writes. Without FSDP, calling
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
        with atomic_output(path) as tmp:
            torch.save({"teacher": state}, tmp)
        return path
