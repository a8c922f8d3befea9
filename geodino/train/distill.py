"""Distillation of a frozen DINOv3 teacher into several students in one run (``MultiDistillationMetaArch``).

The official multi-student distillation (``dinov3/train/multidist_meta_arch.py``, config
``dinov3_vitl16_lvd1689m_distilled.yaml``; ``shared/notes/dinov3-official.md`` §3.9) trains each student with
the SSL losses of pretraining against a **frozen** pretrained teacher instead of an EMA of itself. Per step:

1. the teacher (eval mode, no gradient) sees the two unmasked global crops once: DINO head on the CLS tokens
   and iBOT head on the patch tokens at the iBOT mask positions, both centred by Sinkhorn-Knopp at the
   scheduled teacher temperature;
2. every student sees ``[global crops, local crops]`` in one list forward. With distillation the global crops
   are **not masked** (official ``masks=[None, None]``), yet iBOT still compares the student's patch tokens
   at the masked positions with the teacher's there;
3. each student's loss is ``dino_loss_weight`` · DINO (local term 16/18, global term 2/18 with the same-view
   pairs removed, for 2 global and 8 local crops) + ``koleo_loss_weight`` · 2 · KoLeo (student global CLS)
   + ``ibot_loss_weight`` · iBOT; the total is the sum over students (their parameters are disjoint, so
   each student's gradient is that of its own loss);
4. per student and sub-module gradient clipping, one AdamW step over all students, then every student's
   EMA copy is updated; the EMA copies are what gets exported (official ``model_ema``).

Difference from the official multi-student run: there the GPUs are split into sub-groups, one per student
(``multidistillation.students[].ranks_range``); the teacher runs once on all ranks and its outputs are
broadcast to every sub-group, so each student sees the whole global batch spread over its own ranks. Here
every rank trains every student on its own batch shard (plain DDP): each student still sees the whole global
batch per step and the Sinkhorn-Knopp targets are normalised over the whole global batch (all-reduced over the
default group), but each GPU holds all students and runs them one after the other, and all students share
the per-GPU batch size. KoLeo (per GPU, as officially) therefore sees this rank's images, where an official
student rank sees the global batch divided by its sub-group size.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from geodino.io import atomic_output
from geodino.train.base import (
    N_GLOBAL_CROPS,
    CropBatch,
    SSLModule,
    build_networks,
    fsdp_inner,
    head_sizes,
    load_strict,
    masked_tokens,
    rank0_state_dict,
    read_teacher_file,
    unpack_batch,
    unwrapped_name,
)
from geodino.train.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from geodino.train.nonfinite import NonFiniteSteps, ema_update_
from geodino.train.param_groups import param_groups
from geodino.train.schedules import Schedule

__all__ = ["DEFAULT_DISTILLATION_SCHEDULES", "DistillationModule"]

#: Schedules used when the matching argument is None: the official distillation recipe
#: (``dinov3_vitl16_lvd1689m_distilled.yaml``: 20 epochs × 1250 steps) in optimisation steps. LR: half-cosine
#: from 0 up to 5e-5 × 4·sqrt(1920 / 1024) (official ``sqrt_wrt_1024`` rule at the official global batch of
#: 1920) over 10 epochs, then constant; EMA momentum: half-cosine 0.994 → 1.0 over the whole run (set
#: ``cosine`` to your run length).
DEFAULT_DISTILLATION_SCHEDULES: Mapping[str, Schedule] = MappingProxyType(
    {
        "lr": Schedule(peak=0.0, end=5e-5 * 4 * math.sqrt(1920 / 1024), cosine=12_500),
        "weight_decay": Schedule(peak=0.04),
        "momentum": Schedule(peak=0.994, end=1.0, cosine=25_000),
        "teacher_temp": Schedule(peak=0.07),
    }
)

#: Head keys of a student specification (after ``<head>_head_``) and the matching ``DINOHead`` argument.
_HEAD_SIZES = (
    ("n_prototypes", "out_dim"),
    ("hidden_dim", "hidden_dim"),
    ("bottleneck_dim", "bottleneck_dim"),
    ("nlayers", "nlayers"),
)
_STUDENT_KEYS = frozenset(
    {"name", "backbone", "backbone_overrides", "drop_path_rate"}
    | {f"{head}_head_{key}" for head in ("dino", "ibot") for key, _ in _HEAD_SIZES}
)
_STUDENT_NAME = re.compile(r"[A-Za-z0-9_-]+")


class DistillationModule(SSLModule):
    """DINO + iBOT + KoLeo distillation of a frozen teacher into one or more students, each with an EMA copy.

    The batch is the output of :func:`~geodino.train.augment.collate_multicrop` (as for
    :class:`~geodino.train.module.DINOv3Module`): ``collated_global_crops`` [2B, C, H, W] and
    ``collated_local_crops`` [N·B, C, h, w] crop-major, and ``collated_masks`` bool [2B, P]; the masks
    only select the patches that iBOT compares.

    Sub-modules: ``teacher`` = ``ModuleDict(backbone, dino_head, ibot_head)`` loaded strictly from
    ``teacher_from``, ``requires_grad False`` and always in eval mode; ``students`` and ``students_ema`` =
    ``ModuleDict({name: ModuleDict(backbone, dino_head, ibot_head)})``, the EMA copies frozen and in eval
    mode. Every network uses the official key names, so ``students_ema[name].state_dict()`` is an official
    teacher checkpoint (:meth:`export_students`). The frozen teacher is left out of Lightning checkpoints
    (it is read from ``teacher_from`` at construction; a state dict that lacks its keys loads, every other
    key strictly): a 7B teacher would add ~27 GB to every checkpoint.

    Each entry of ``students`` is a plain dict (one YAML mapping) with the keys

    * ``name`` (required): letters, digits, ``_`` or ``-``; names the exported file
      ``<name>_teacher_checkpoint.pth`` and the logged metrics ``train/<name>/...``;
    * ``backbone`` (required): ViT preset name, e.g. ``dinov3_vits16.lvd1689m``; its patch size must be the
      teacher's (official assert);
    * ``backbone_overrides``: constructor keywords replacing the preset's (e.g. ``{"depth": 6}``);
    * ``drop_path_rate``: sample-drop rate of the student (0.0, the official distillation value);
    * ``dino_head_n_prototypes``, ``dino_head_hidden_dim``, ``dino_head_bottleneck_dim``,
      ``dino_head_nlayers`` and the same four ``ibot_head_*`` keys: the student's own heads; each size
      defaults to the teacher's, and the prototype counts must equal the teacher's (the losses compare
      distributions over the same prototypes; official assert).

    Defaults follow the official distillation recipe: :data:`DEFAULT_DISTILLATION_SCHEDULES`, no last-layer
    freeze, layer decay 0.99, patch-embed LR × 0.2, betas (0.9, 0.999), clip 3, loss weights 1 / 0.1 / 1. The
    teacher head defaults are those of :class:`~geodino.train.module.DINOv3Module` (65536 / 256 / 2048), so a
    teacher it trained with default heads loads as is (official 7B teacher: 262144 / 512 / 8192 DINO,
    98304 / 384 / 4096 iBOT).

    Args:
        backbone: ViT preset of the teacher, e.g. ``dinov3_vitl16.sat493m``.
        teacher_from: Teacher file (``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``, as written
            by :meth:`DINOv3Module.export_teacher <geodino.train.module.DINOv3Module.export_teacher>` or the
            official ``teacher_checkpoint.pth``), read with ``torch.load(weights_only=True)`` and loaded
            strictly.
        students: Student specifications (see above); at least one, names unique.
        backbone_overrides: Constructor keywords replacing the teacher preset's (e.g. ``{"depth": 2}``).
        dino_head_n_prototypes: Teacher DINO head prototypes K.
        dino_head_hidden_dim: Teacher DINO head MLP width.
        dino_head_bottleneck_dim: Teacher DINO head bottleneck.
        dino_head_nlayers: Teacher DINO head MLP layers.
        ibot_head_n_prototypes: Teacher iBOT head prototypes.
        ibot_head_hidden_dim: Teacher iBOT head MLP width.
        ibot_head_bottleneck_dim: Teacher iBOT head bottleneck.
        ibot_head_nlayers: Teacher iBOT head MLP layers.
        dino_loss_weight: Weight of the DINO loss.
        koleo_loss_weight: Weight of KoLeo; the total adds it × 2 (global crops) × the crop mean (official).
        koleo_group_size: KoLeo neighbours searched in groups of this many samples gathered across
            processes (official ``koleo_distributed_loss_group_size``, 16 in the high-resolution stage);
            None: within each process's batch (stages 1-2). See :class:`~geodino.train.losses.KoLeoLoss`.
        ibot_loss_weight: Weight of the iBOT loss.
        student_temp: Student softmax temperature of DINO and iBOT.
        lr: Peak-LR schedule, keywords of :class:`~geodino.train.schedules.Schedule` (lengths in steps);
            None: ``DEFAULT_DISTILLATION_SCHEDULES``. Each parameter group gets ``lr(step) × lr_multiplier``.
        weight_decay: Weight-decay schedule (× each group's ``wd_multiplier``, 0 for biases/norms/gamma).
        momentum: EMA momentum schedule m of the students' EMA copies (θ_ema ← m·θ_ema + (1 − m)·θ).
        teacher_temp: Teacher temperature schedule of both Sinkhorn-Knopp centerings.
        freeze_last_layer: Steps during which the students' heads' ``last_layer`` gets LR 0.
        layer_decay: Layer-wise LR decay, applied per student over its own number of blocks.
        patch_embed_lr_mult: Extra LR factor of the patch embeddings.
        betas: AdamW betas.
        clip_grad: Max gradient norm, applied separately to each student's backbone, DINO head and iBOT head;
            None or 0 = no clipping. Use this, not ``Trainer(gradient_clip_val)``.
        max_skipped_steps: Skipped steps (NaN or infinite gradients) in a row that stop the run, as for
            :class:`~geodino.train.module.DINOv3Module`.
        seed: Base of the per-step RNG seed (see :meth:`training_step`).
        activation_checkpointing: Recompute the students' block activations in the backward pass
            (:func:`~geodino.train.base.checkpoint_blocks`): less memory, the same gradients. True: all of
            them; ``"selective"``: only the elementwise ops, keeping the matmul and attention outputs.
        compile: ``torch.compile`` every transformer block of the teacher and the students
            (:func:`~geodino.train.base.compile_blocks`) and the DINO and iBOT losses
            (:func:`~geodino.train.base.compile_losses`).
        fp8: Float8 matmuls in the transformer blocks of the teacher and the students
            (:func:`~geodino.train.base.float8_blocks`, torchao); the students' EMA copies keep full
            precision (they run no forward pass in training).

    Strategies, precisions and FSDP sharding work as for :class:`~geodino.train.module.DINOv3Module`
    (``configure_model``, sharded gradient clipping, gathered export, exact resume).

    Raises:
        ValueError: Invalid student specifications (unknown key, missing or repeated name, patch size or
            prototype count differing from the teacher's, not a ViT preset) or a negative seed.
        CheckpointError: ``teacher_from`` is missing, unreadable or does not fit the teacher networks.
    """

    #: Checkpoints leave the frozen teacher out (it is read from ``teacher_from``).
    unsaved_prefixes = ("teacher.",)

    def __init__(
        self,
        backbone: str,
        teacher_from: str,
        students: list[dict[str, Any]],
        backbone_overrides: dict[str, Any] | None = None,
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
        freeze_last_layer: int = 0,
        layer_decay: float = 0.99,
        patch_embed_lr_mult: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.999),
        clip_grad: float | None = 3.0,
        max_skipped_steps: int = 3,
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
        self.schedules = {
            name: DEFAULT_DISTILLATION_SCHEDULES[name] if given is None else Schedule(**given)
            for name, given in (
                ("lr", lr),
                ("weight_decay", weight_decay),
                ("momentum", momentum),
                ("teacher_temp", teacher_temp),
            )
        }
        teacher_heads = {
            "dino_head": head_sizes(
                dino_head_n_prototypes, dino_head_hidden_dim, dino_head_bottleneck_dim, dino_head_nlayers
            ),
            "ibot_head": head_sizes(
                ibot_head_n_prototypes, ibot_head_hidden_dim, ibot_head_bottleneck_dim, ibot_head_nlayers
            ),
        }
        self.teacher = build_networks(
            backbone, {**(backbone_overrides or {}), "drop_path_rate": 0.0}, teacher_heads
        )
        load_strict(self.teacher, read_teacher_file(teacher_from), teacher_from)
        self.teacher.requires_grad_(False)
        self.register_load_state_dict_post_hook(_allow_missing_teacher)

        self.students = nn.ModuleDict()
        self.students_ema = nn.ModuleDict()
        for spec in _check_student_specs(students):
            heads = _student_heads(spec, teacher_heads)
            overrides = dict(spec.get("backbone_overrides") or {})
            student = build_networks(
                spec["backbone"], {**overrides, "drop_path_rate": spec.get("drop_path_rate", 0.0)}, heads
            )
            if student["backbone"].patch_size != self.teacher["backbone"].patch_size:
                raise ValueError(
                    f"student {spec['name']!r} has patch size {student['backbone'].patch_size} but the "
                    f"teacher {self.teacher['backbone'].patch_size}; the iBOT masks and targets need equal "
                    "patch grids"
                )
            ema = build_networks(spec["backbone"], {**overrides, "drop_path_rate": 0.0}, heads)
            ema.load_state_dict(student.state_dict())
            self.students[spec["name"]] = student
            self.students_ema[spec["name"]] = ema.requires_grad_(False)

        self.dino_loss = DINOLoss(student_temp=student_temp)
        self.ibot_patch_loss = iBOTPatchLoss(student_temp=student_temp)
        self.koleo_loss = KoLeoLoss(group_size=koleo_group_size)
        students = [student["backbone"] for student in self.students.values()]
        self.apply_scale_options(
            [self.teacher["backbone"], *students], students, fp8, compile, activation_checkpointing
        )
        self.train()

    # ------------------------------------------------------------------ modes and schedules

    def frozen_networks(self) -> list[nn.Module]:
        """The teacher and the students' EMA copies: always in eval mode."""
        return [self.teacher, self.students_ema]

    # ------------------------------------------------------------------ forward passes and losses

    def student_losses(
        self,
        student: nn.ModuleDict,
        crops: CropBatch,
        dino_targets: Tensor,
        ibot_targets: Tensor,
    ) -> dict[str, Tensor]:
        """One student's forward pass and loss terms (official ``get_student_output`` + ``compute_losses``).

        Args:
            student: ``ModuleDict(backbone, dino_head, ibot_head)``.
            crops: The batch's crops (:func:`~geodino.train.base.unpack_batch`): the student sees the global
                crops unmasked (official distillation); the masks only select the patches whose student
                tokens iBOT compares.
            dino_targets: Teacher DINO targets [2, B, K_dino].
            ibot_targets: Teacher iBOT targets at the masked patches [M, K_ibot].

        Returns:
            ``loss`` (the weighted sum) and the unweighted terms ``dino_local_crops_loss``,
            ``dino_global_crops_loss``, ``koleo_loss`` (mean over the global crops) and ``ibot_loss``
            (scalars with gradient).
        """
        n_images = crops.n_images
        student_global, student_local = student["backbone"](
            [crops.global_crops, crops.local_crops], is_training=True
        )
        global_cls = student_global["x_norm_clstoken"]  # [2B, D]
        cls_logits = student["dino_head"](torch.cat([global_cls, student_local["x_norm_clstoken"]]))
        global_logits, local_logits = cls_logits.split([global_cls.shape[0], crops.local_crops.shape[0]])
        masked_patches = masked_tokens(student_global["x_norm_patchtokens"], crops.mask_indices)  # [M, D]
        masked_logits = student["ibot_head"](masked_patches)  # [M, K]

        dino_terms = self.dino_loss(
            global_logits.unflatten(0, (N_GLOBAL_CROPS, n_images)),
            local_logits.unflatten(0, (-1, n_images)),
            dino_targets,
        )
        terms = {
            "dino_local_crops_loss": dino_terms.local_loss,
            "dino_global_crops_loss": dino_terms.global_loss,
            "koleo_loss": self.koleo_loss(global_cls.unflatten(0, (N_GLOBAL_CROPS, n_images))),
            "ibot_loss": self.ibot_patch_loss(
                masked_logits, ibot_targets, crops.masks_weight, crops.masks.shape[0]
            ),
        }
        loss = (
            self.hparams.dino_loss_weight * dino_terms.total()
            + self.hparams.koleo_loss_weight * N_GLOBAL_CROPS * terms["koleo_loss"]
            + self.hparams.ibot_loss_weight * terms["ibot_loss"]
        )
        return {"loss": loss, **terms}

    def compute_losses(self, batch: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        """Teacher forward once, then every student's losses (official ``forward_backward``).

        Args:
            batch: A :func:`~geodino.train.augment.collate_multicrop` batch (see the class docstring).
            step: Optimisation step at which the schedules are read.

        Returns:
            ``loss`` (the sum of the students' weighted totals, with gradient) and, per student, its total
            ``<name>/loss`` and unweighted terms ``<name>/<term>`` (see :meth:`student_losses`).
        """
        crops = unpack_batch(batch)
        teacher_temp = self.schedule_values(step)["teacher_temp"]
        dino_targets, ibot_targets = self.teacher_targets(
            crops.global_crops, crops.mask_indices, teacher_temp
        )
        losses: dict[str, Tensor] = {}
        for name, student in self.students.items():
            terms = self.student_losses(student, crops, dino_targets, ibot_targets)
            losses.update({f"{name}/{term}": value for term, value in terms.items()})
        total = torch.stack([losses[f"{name}/loss"] for name in self.students]).sum()
        return {"loss": total, **losses}

    # ------------------------------------------------------------------ Lightning hooks

    def configure_optimizers(self) -> Optimizer:
        """One fused AdamW over the official parameter groups of every student (layer decay over its own
        blocks)."""
        groups = []
        for name, student in self.students.items():
            groups += param_groups(
                ((f"students.{name}.{part}", fsdp_inner(module)) for part, module in student.items()),
                n_blocks=student["backbone"].n_blocks,
                layer_decay=self.hparams.layer_decay,
                patch_embed_lr_mult=self.hparams.patch_embed_lr_mult,
            )
        return torch.optim.AdamW(
            groups, lr=0.0, weight_decay=0.0, betas=tuple(self.hparams.betas), fused=True
        )

    def clipped_networks(self) -> Iterator[tuple[str, nn.Module]]:
        """Each student's backbone, DINO head and iBOT head, clipped separately (official); metrics
        ``train/<name>/<part>_grad_norm``."""
        for name, student in self.students.items():
            for part, module in student.items():
                yield f"{name}/{part}", module

    def after_optimizer_step(self, step: int, values: dict[str, float]) -> None:
        """EMA update of the students' copies."""
        self.update_ema(values["momentum"])

    # ------------------------------------------------------------------ EMA and export

    def update_ema(self, momentum: float) -> None:
        """θ_ema ← m·θ_ema + (1 − m)·θ_student for every student's parameters (buffers are not averaged); no
        change after a skipped step (:func:`~geodino.train.nonfinite.ema_update_`)."""
        ema_update_(
            list(self.students_ema.parameters()),
            list(self.students.parameters()),
            momentum,
            self.nonfinite.found,
        )

    def export_students(
        self, folder: str | os.PathLike, filename: str = "teacher_checkpoint.pth"
    ) -> dict[str, Path]:
        """Writes every student's EMA copy as an official teacher checkpoint ``<folder>/<name>_<filename>``.

        Each file holds ``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}`` (CPU tensors), the
        layout of the official ``teacher_checkpoint.pth`` and of :meth:`DINOv3Module.export_teacher
        <geodino.train.module.DINOv3Module.export_teacher>`: :func:`~geodino.models.load_backbone` reads its
        backbone with the student's preset and overrides, and ``init_from`` of a later stage reads all of
        it. Files are written atomically (:func:`~geodino.io.atomic_output`), by global rank 0 only. Without
        FSDP, calling it on rank 0 alone is enough; under FSDP the EMA copies are gathered with collectives,
        so every rank must call it.

        Args:
            folder: Output folder; created if missing.
            filename: Name after ``<name>_``.

        Returns:
            The path written for each student name (on rank 0).
        """
        folder = Path(folder)
        paths = {}
        for name, ema in self.students_ema.items():
            paths[name] = folder / f"{name}_{filename}"
            state = rank0_state_dict(ema)
            if state is not None:
                folder.mkdir(parents=True, exist_ok=True)
                with atomic_output(paths[name]) as tmp:
                    torch.save({"teacher": state}, tmp)
        return paths

    def exported_backbones(self) -> dict[str, nn.Module]:
        """Each student's EMA backbone, by student name."""
        return {name: ema["backbone"] for name, ema in self.students_ema.items()}

    def export_teacher(self, path: str | os.PathLike) -> list[Path]:
        """The :class:`~geodino.train.callbacks.ExportTeacher` hook: :meth:`export_students` beside ``path``.

        ``path`` = ``<folder>/<file>`` writes ``<folder>/<name>_<file>`` for every student, e.g.
        ``runs/distill/vits_teacher_checkpoint.pth`` for ``runs/distill/teacher_checkpoint.pth``.

        Returns:
            The paths written, in student order.
        """
        path = Path(path)
        return list(self.export_students(path.parent, path.name).values())


def _allow_missing_teacher(module: nn.Module, incompatible: nn.modules.module._IncompatibleKeys) -> None:
    """``load_state_dict`` post-hook: the frozen teacher's keys may be missing (checkpoints leave it out; it
    keeps the weights read from ``teacher_from``); every other key still loads strictly. Runs inside the
    load, so it also works where Lightning's FSDP strategy loads the state before any checkpoint hook."""
    missing = incompatible.missing_keys
    missing[:] = [key for key in missing if not unwrapped_name(key).startswith("teacher.")]


def _check_student_specs(students: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validates the student specifications' keys and names; returns them unchanged."""
    if not students:
        raise ValueError("students: give at least one student specification")
    names = []
    for i, spec in enumerate(students):
        unknown = sorted(set(spec) - _STUDENT_KEYS)
        if unknown:
            raise ValueError(f"students[{i}]: unknown keys {unknown}; allowed: {sorted(_STUDENT_KEYS)}")
        for key in ("name", "backbone"):
            if key not in spec:
                raise ValueError(f"students[{i}]: {key!r} is required")
        if not _STUDENT_NAME.fullmatch(str(spec["name"])):
            raise ValueError(f"students[{i}]: name {spec['name']!r} must be letters, digits, '_' or '-'")
        names.append(spec["name"])
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"students: repeated names {repeated}")
    return students


def _student_heads(
    spec: Mapping[str, Any], teacher_heads: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """Head sizes of one student (the teacher's by default); its prototype counts must be the teacher's."""
    heads = {}
    for head, teacher_sizes in teacher_heads.items():
        sizes = {arg: spec.get(f"{head}_{key}", teacher_sizes[arg]) for key, arg in _HEAD_SIZES}
        if sizes["out_dim"] != teacher_sizes["out_dim"]:
            raise ValueError(
                f"student {spec['name']!r}: {head}_n_prototypes {sizes['out_dim']} differs from the "
                f"teacher's {teacher_sizes['out_dim']}; distillation matches distributions over the "
                "teacher's prototypes, so the counts must be equal"
            )
        heads[head] = sizes
    return heads
