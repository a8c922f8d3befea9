"""What the two self-distillation modules share: the step loop around their losses, and scale helpers.

:class:`SSLModule` is the base of :class:`~geodino.train.module.DINOv3Module` (EMA teacher, pretraining
stages) and :class:`~geodino.train.distill.DistillationModule` (frozen teacher, several students). It holds
the official iteration around each subclass's :meth:`~SSLModule.compute_losses`: per-step RNG seeding,
logging, the teacher's Sinkhorn-Knopp targets, per-submodule gradient clipping, skipping steps whose
gradients are not finite (:mod:`~geodino.train.nonfinite`), the scheduled LR and weight decay of every
parameter group, and FSDP sharding. Subclasses keep their own constructor (LightningCLI reads
its explicit signature) and say what differs through four small methods.

The module-level helpers build and load the networks (official key names, strict loads with readable
errors) and scale them: activation checkpointing, per-block ``torch.compile``, FSDP units, sharded
gradient clipping and the gathered state dict of an exported network.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import (
    FullStateDictConfig,
    FullyShardedDataParallel,
    MixedPrecision,
    ShardingStrategy,
    StateDictType,
)
from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy
from torch.optim import Optimizer
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from geodino.models import CheckpointError, DinoVisionTransformer, build_backbone
from geodino.models.block import SelfAttentionBlock
from geodino.models.checkpoint import describe_mismatch, read_checkpoint
from geodino.train.augment import masked_patch_index
from geodino.train.heads import DINOHead
from geodino.train.losses import sinkhorn_knopp
from geodino.train.nonfinite import NonFiniteSteps
from geodino.train.schedules import Schedule

__all__ = ["FSDP_BF16", "FSDP_UNITS", "N_GLOBAL_CROPS", "SSLModule"]

#: Global crops per image (fixed in the official ``SSLMetaArch``).
N_GLOBAL_CROPS = 2

#: Entries of official teacher checkpoints that are not networks (the unused momentum centres).
LOSS_BUFFER_PREFIXES = ("dino_loss.", "ibot_patch_loss.")

#: FSDP units set by :meth:`SSLModule.configure_model` under Lightning's ``FSDPStrategy``: every
#: transformer block, every backbone (its embeddings and final norms) and every head. Student and teacher
#: networks are then split into identical units, so their local shards line up element for element and the
#: EMA update runs on the shards without gathering anything.
FSDP_UNITS = (SelfAttentionBlock, DinoVisionTransformer, DINOHead)

#: FSDP's precision under ``bf16-mixed`` (official: bf16 parameters, fp32 gradient reduction). The networks
#: then compute in bf16 throughout, the residual stream included; buffers (RoPE periods, key-bias mask)
#: keep their dtype. (Without FSDP, autocast keeps float32 parameters and the residual stream in float32.)
#: Each unit casts its own inputs (a backbone its crops), not the root: Lightning passes the whole batch
#: through the root, whose cast would round iBOT's float32 per-patch weights to bf16 (FSDP2, which the
#: official code uses, casts per module too).
FSDP_BF16 = MixedPrecision(
    param_dtype=torch.bfloat16,
    reduce_dtype=torch.float32,
    cast_forward_inputs=True,
    cast_root_forward_inputs=False,
)

#: FSDP sharding strategies supported: each parameter lives on exactly one rank (or on all of them).
_FSDP_SHARDINGS = (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP, ShardingStrategy.NO_SHARD)


class SSLModule(L.LightningModule):
    """Base of the DINOv3 self-distillation modules: the official iteration around :meth:`compute_losses`.

    A subclass sets, in its constructor, ``self.schedules`` (name -> :class:`Schedule`, with at least
    ``lr``, ``weight_decay``, ``momentum`` and ``teacher_temp``), ``self.teacher`` (``ModuleDict(backbone,
    dino_head, ibot_head)`` that gives the targets) and ``self.nonfinite`` (a
    :class:`~geodino.train.nonfinite.NonFiniteSteps` whose flag its EMA update reads), has the
    hyper-parameters ``seed``, ``freeze_last_layer`` and ``clip_grad``, and implements
    :meth:`compute_losses`, :meth:`frozen_networks`, :meth:`clipped_networks` and
    :meth:`after_optimizer_step`.
    """

    schedules: dict[str, Schedule]
    teacher: nn.ModuleDict
    nonfinite: NonFiniteSteps
    #: State-dict key prefixes of the networks that checkpoints leave out (a frozen teacher, read again from
    #: its own file).
    unsaved_prefixes: tuple[str, ...] = ()

    # ------------------------------------------------------------------ what subclasses implement

    def compute_losses(self, batch: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        """``loss`` (the weighted total, with gradient) and the logged terms of one step's batch."""
        raise NotImplementedError

    def frozen_networks(self) -> list[nn.Module]:
        """The networks that never train and always stay in eval mode (teachers, EMA copies)."""
        raise NotImplementedError

    def clipped_networks(self) -> Iterator[tuple[str, nn.Module]]:
        """``(metric name, module)`` of every network clipped separately to ``clip_grad``."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int, values: dict[str, float]) -> None:
        """Runs after the optimizer step ``step`` with that step's schedule values (EMA updates)."""
        raise NotImplementedError

    def apply_scale_options(
        self,
        running: list[DinoVisionTransformer],
        trained: list[DinoVisionTransformer],
        fp8: bool,
        compile: bool,
        activation_checkpointing: bool | str,
    ) -> None:
        """The constructor's scale options, in the order they compose: fp8 blocks (:func:`float8_blocks`) in
        every ``running`` backbone (those with a forward pass), activation checkpointing
        (:func:`checkpoint_blocks`; True: full, ``"selective"``: matmul and attention outputs kept) of the
        ``trained`` backbones, then compiled blocks (:func:`compile_blocks`) in every ``running`` backbone
        and compiled ``dino_loss`` / ``ibot_patch_loss`` (:func:`compile_losses`).

        Raises:
            ValueError: ``activation_checkpointing`` is not False, True or ``"selective"``.
        """
        if activation_checkpointing not in (False, True, "selective"):
            raise ValueError(
                f"activation_checkpointing must be false, true (full) or 'selective', "
                f"got {activation_checkpointing!r}"
            )
        if fp8:
            float8_blocks(running)
        if activation_checkpointing:
            for backbone in trained:
                checkpoint_blocks(backbone, selective=activation_checkpointing == "selective")
        if compile:
            for backbone in running:
                compile_blocks(backbone)
            compile_losses(self.dino_loss, self.ibot_patch_loss)

    def exported_backbones(self) -> dict[str, nn.Module]:
        """``name -> backbone`` of the networks that ``export_teacher`` writes (the EMA networks, in eval
        mode), e.g. for :class:`~geodino.train.probe.DenseKNNProbe`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ modes and schedules

    def on_fit_start(self) -> None:
        """Refuses an optimizer that cannot skip a step on the device (:meth:`configure_gradient_clipping`),
        and quiets Lightning's "modules in eval mode at the start of training" warning when those modules
        are exactly the :meth:`frozen_networks` (in eval by design); a trained module left in eval is still
        reported (the filter matches only this count of modules).

        Raises:
            TypeError: An optimizer without ``found_inf`` support (not fused).
        """
        for optimizer in self.trainer.optimizers:
            # the attribute torch.amp.GradScaler checks before passing found_inf to an optimizer
            if not getattr(optimizer, "_step_supports_amp_scaling", False):
                raise TypeError(
                    f"{type(self).__name__} skips steps with non-finite gradients through the optimizer's "
                    f"found_inf, which {type(optimizer).__name__} without fused=True does not take: "
                    "configure_optimizers must return a fused optimizer (torch.optim.AdamW(..., fused=True))"
                )
        frozen = {id(m) for network in self.frozen_networks() for m in network.modules()}
        in_eval = [m for _, m in self.named_modules() if not m.training]
        if in_eval and all(id(m) in frozen for m in in_eval):
            warnings.filterwarnings(
                "ignore",
                message=rf"Found {len(in_eval)} module\(s\) in eval mode at the start of training",
                category=PossibleUserWarning,
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a checkpoint to resume from whose networks do not fit this run's, listing the keys that do
        not fit and the settings that differ from the checkpoint's. (``geodino fit --ckpt_path`` takes the
        settings from the recipe and the command line, not from the checkpoint; see :mod:`geodino.cli`.)

        Skipped under FSDP, where the expected shapes would have to be gathered; the load itself then
        fails on a mismatch.

        Raises:
            CheckpointError: Missing, unexpected or mis-shaped network keys.
        """
        if self._trainer is not None and isinstance(self._trainer.strategy, FSDPStrategy):
            return
        unsaved = self.unsaved_prefixes
        want = {k: tuple(v.shape) for k, v in self.state_dict().items() if not k.startswith(unsaved)}
        report = describe_mismatch(want, checkpoint["state_dict"])
        if not report:
            return
        before = checkpoint.get("hyper_parameters", {})
        changed = [
            f"{k}: {before.get(k)!r} then, {v!r} now" for k, v in self.hparams.items() if before.get(k) != v
        ]
        path = self._trainer.ckpt_path if self._trainer is not None else "the checkpoint"
        raise CheckpointError(
            f"{path}: its networks do not fit this run's settings:\n{report}\n"
            f"settings that differ from the checkpoint's: {'; '.join(changed) or 'none'}. Resume with the "
            "network settings the run started with (its config.yaml beside the logs); settings of the "
            "optimisation, such as lr, may change"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leaves the networks of :attr:`unsaved_prefixes` out of the checkpoint, and numbers the optimizer
        state's parameters in the model's order, as Lightning's FSDP checkpoints do.

        A plain optimizer state numbers them in the optimizer's order (the parameter groups one after the
        other), which Lightning's FSDP load reads in the model's order: a run resumed under FSDP from a
        single-device or DDP checkpoint gave its moments to other parameters and failed. Numbered alike, a
        checkpoint resumes under any strategy (a plain optimizer loads the numbers as they come).
        """
        if self.unsaved_prefixes:
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(self.unsaved_prefixes)
            }
        if self._trainer is not None and not isinstance(self._trainer.strategy, FSDPStrategy):
            states = checkpoint.get("optimizer_states", [])
            for optimizer, state in zip(self._trainer.optimizers, states, strict=True):
                state.update(_in_model_order(self, optimizer, state))

    def train(self, mode: bool = True) -> SSLModule:
        """Sets the training mode of the trained networks; :meth:`frozen_networks` always stay in eval."""
        super().train(mode)
        for module in self.frozen_networks():
            module.eval()
        return self

    def schedule_values(self, step: int) -> dict[str, float]:
        """Every scheduled hyper-parameter at optimisation ``step``, plus the heads' last-layer LR."""
        values = {name: schedule(step) for name, schedule in self.schedules.items()}
        values["last_layer_lr"] = 0.0 if step < self.hparams.freeze_last_layer else values["lr"]
        return values

    # ------------------------------------------------------------------ teacher targets

    @torch.no_grad()
    def teacher_targets(
        self, global_crops: Tensor, mask_indices: Tensor, teacher_temp: float
    ) -> tuple[Tensor, Tensor]:
        """Sinkhorn-Knopp targets of the teacher on the unmasked global crops.

        Args:
            global_crops: [2B, C, H, W], crop-major.
            mask_indices: The student's masked patches, long [M] indices into the flattened [2B, P] masks.
            teacher_temp: Teacher temperature of both centerings.

        Returns:
            DINO targets [2, B, K_dino] and iBOT targets at the masked patches [M, K_ibot] (rows in the order
            of ``mask_indices``).
        """
        out = self.teacher["backbone"](global_crops, is_training=True)
        cls_logits = self.teacher["dino_head"](out["x_norm_clstoken"])  # [2B, K]
        masked_logits = self.teacher["ibot_head"](masked_tokens(out["x_norm_patchtokens"], mask_indices))
        dino_targets = sinkhorn_knopp(cls_logits, teacher_temp).unflatten(0, (N_GLOBAL_CROPS, -1))
        return dino_targets, sinkhorn_knopp(masked_logits, teacher_temp)

    # ------------------------------------------------------------------ Lightning hooks

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """One step's forward pass and losses; logs every term and schedule value.

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
        self.log("train/total_loss", losses["loss"], sync_dist=True, batch_size=n_images)
        if (step + 1) % self._log_every_n_steps() == 0:
            # Lightning turns progress-bar values into numbers at every step once they are logged; for a
            # device tensor that is a host sync draining the GPU's queue. The bar gets a CPU copy of the
            # loss, made (one sync) only on the steps that write the logs.
            self.log("loss", losses["loss"].detach().cpu(), prog_bar=True, logger=False, batch_size=n_images)
            self._check_skipped_steps(step)  # the host waits for the GPU here already
        self.log("train/skipped_steps", self.nonfinite.total, batch_size=n_images)
        terms = {name: value.detach() for name, value in losses.items() if name != "loss"}
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=n_images)
        values = self.schedule_values(step)
        self.log_dict({f"train/{k}": v for k, v in values.items()}, batch_size=n_images)
        return {"loss": losses["loss"], **terms}

    def on_train_epoch_end(self) -> None:
        """Checks the steps after the last log for a run of skipped steps, as :meth:`training_step` does on
        the steps that log. Runs before the epoch's checkpoint and the teacher's export, so a diverged run
        stops without exporting."""
        self._check_skipped_steps(self.global_step)

    def _check_skipped_steps(self, step: int) -> None:
        """:meth:`NonFiniteSteps.check`. Under ``16-mixed`` the ``GradScaler`` skips the steps whose scaled
        gradients overflow and halves its scale until they fit, so runs of them are its normal working: they
        stop the run only once the scale has fallen below 1, where no overflow of scaling is left to blame.
        """
        scaler = self._grad_scaler()
        stop = scaler is None or scaler.get_scale() < 1.0
        self.nonfinite.check(type(self).__name__, step, stop=stop)

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """The ``GradScaler`` of the trainer's precision (``16-mixed``), or None."""
        if self._trainer is None:
            return None
        return getattr(self._trainer.precision_plugin, "scaler", None)

    def _log_every_n_steps(self) -> int:
        """The trainer's ``log_every_n_steps``; 1 when the module runs without a trainer."""
        try:
            return self.trainer.log_every_n_steps
        except RuntimeError:  # "... is not attached to a `Trainer`"
            return 1

    def configure_model(self) -> None:
        """Under Lightning's ``FSDPStrategy``, shards by :data:`FSDP_UNITS` (see :func:`configure_fsdp`)."""
        configure_fsdp(self)

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clips every network of :meth:`clipped_networks` separately to ``clip_grad`` (official), and marks
        the step to be skipped if a gradient is NaN or infinite.

        Lightning calls this hook before every optimizer step (after AMP unscaling), whatever the
        ``Trainer``'s ``gradient_clip_val``; the Trainer setting would clip all networks at once, so it is
        refused. Logs each network's norm before clipping as ``train/<name>_grad_norm``. The norms (computed
        also without ``clip_grad``) give ``self.nonfinite``'s flag, which goes to the optimizer as its
        ``found_inf``: the fused AdamW step then changes nothing (see :mod:`~geodino.train.nonfinite`).

        Raises:
            ValueError: If ``Trainer(gradient_clip_val=...)`` is set.
        """
        name = type(self).__name__
        if gradient_clip_val:
            raise ValueError(
                f"{name} clips per sub-module: set {name}(clip_grad=...) instead of "
                f"Trainer(gradient_clip_val={gradient_clip_val})"
            )
        scaler = self._grad_scaler()
        if scaler is not None:
            # Lightning leaves a fused optimizer's gradients scaled (its step unscales them); the norms and
            # the clipping need them unscaled. The scaler's own step then skips an overflowing step.
            scaler.unscale_(optimizer)
        sharded = grads_sharded(self)
        norms = []
        for metric, module in self.clipped_networks():
            norm = clip_grad_norm(module.parameters(), self.hparams.clip_grad or None, sharded=sharded)
            self.log(f"train/{metric}_grad_norm", norm)
            norms.append(norm)
        optimizer.found_inf = self.nonfinite.update(norms)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Optimizer,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Sets this step's LR and weight decay, steps, then :meth:`after_optimizer_step`.

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
        self.after_optimizer_step(step, values)

    @contextlib.contextmanager
    def _step_rng(self, step: int, batch_idx: int) -> Iterator[None]:
        """Global torch RNG (CPU, this CUDA device) seeded by (seed, step, batch, rank); restored on exit."""
        entropy = (self.hparams.seed, step, batch_idx, self.global_rank)
        step_seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step_seed)
            yield


def float8_blocks(backbones: Iterable[DinoVisionTransformer]) -> None:
    """Float8 matmuls in the transformer blocks of ``backbones``, in place (torchao
    ``convert_to_float8_training``: dynamic tensorwise scales, inputs and weights in e4m3, output gradients
    in e5m2), as the official 7B training's fp8 blocks.

    The blocks' plain ``nn.Linear`` layers are swapped: the attention output projection and the MLP (or
    SwiGLU) layers, three quarters of a block's matmul FLOPs. The fused qkv projection keeps its precision:
    its key bias is masked (:class:`~geodino.models.attention.LinearKMaskedBias`), which torchao's layer does
    not do. Parameters, their names and state-dict keys are unchanged, so checkpoints and exports load into
    plain backbones. Convert before :func:`checkpoint_blocks` and :func:`compile_blocks`; compiled, the
    scaling casts fuse into the neighbouring kernels.

    fp8 matmuls need tensor cores of CUDA compute capability 8.9 or more (H100, H200, L4, ...). Without a
    GPU they are emulated (operands rounded to fp8, products in higher precision: the same numerics, much
    slower), with a warning, for tests and CPU smoke runs.

    Raises:
        ImportError: torchao is not installed (``pip install torchao``).
        RuntimeError: The GPU has no fp8 tensor cores (e.g. an A100): emulating there would be slower than
            bf16 for nothing.
    """
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise ImportError("fp8 matmuls need torchao: pip install 'geodino[fp8]' (or torchao)") from err
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):
            raise RuntimeError(
                f"fp8=True needs fp8 tensor cores (CUDA compute capability >= 8.9: H100, H200, L4, ...); "
                f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}: set fp8=False"
            )
    else:
        warnings.warn(
            "fp8=True without a GPU: the fp8 matmuls are emulated, with fp8 numerics but much slower",
            UserWarning,
            stacklevel=3,
        )
    # pad_inner_dim: the weight gradient's inner dimension is the token count, and cuBLAS fp8 matmuls need it
    # to be a multiple of 16, which drop-path subsets and crop sizes rarely give (found on an H200: 307 local
    # crops x 54 tokens = 16578); the operands are zero-padded to the next multiple of 16.
    config = Float8LinearConfig(emulate=not torch.cuda.is_available(), pad_inner_dim=True)
    for backbone in backbones:
        for block in backbone.blocks:
            convert_to_float8_training(
                block, module_filter_fn=lambda module, _: type(module) is nn.Linear, config=config
            )


#: Operators whose outputs selective activation checkpointing keeps for the backward pass: the matrix
#: products (bf16, fp8) and attention, the expensive ops. Everything between them (LayerNorm, RoPE, GELU,
#: LayerScale, residual adds, drop-path gathers) is recomputed: cheap arithmetic, but most of the memory.
SELECTIVE_SAVED_OPS = frozenset(
    {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten._scaled_mm.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    }
)


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing policy: save :data:`SELECTIVE_SAVED_OPS` outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_blocks(backbone: DinoVisionTransformer, selective: bool = False) -> None:
    """Activation checkpointing of every transformer block of ``backbone``, in place.

    Each block is replaced by torch's ``checkpoint_wrapper`` (non-reentrant ``torch.utils.checkpoint``): its
    inner activations are dropped after the forward pass and recomputed in the backward pass. With
    ``selective``, the outputs of the matrix products and attention are kept (:data:`SELECTIVE_SAVED_OPS`,
    torch's ``create_selective_checkpoint_contexts``) and only the elementwise ops between them are
    recomputed, as the official pretraining's selective checkpointing: more memory than full checkpointing,
    no matmul run twice. The RNG state is saved with the inputs and restored for the recomputation, so
    drop-path draws the same samples and the gradients are those without checkpointing. State-dict keys are
    unchanged (the wrapper removes its ``_checkpoint_wrapped_module.`` prefix on save and adds it back on
    load); parameter names gain it. Checkpoint before :func:`compile_blocks`, so that each compiled block
    holds its checkpoint (what ``torch.compile`` supports for the selective policy).
    """
    context = (
        {"context_fn": partial(create_selective_checkpoint_contexts, _keep_matmuls)} if selective else {}
    )
    for i, block in enumerate(backbone.blocks):
        backbone.blocks[i] = checkpoint_wrapper(block, **context)


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


def compile_losses(*losses: nn.Module) -> None:
    """``torch.compile`` the prototype losses in place (``nn.Module.compile``).

    For :class:`~geodino.train.losses.DINOLoss` and :class:`~geodino.train.losses.iBOTPatchLoss`: eager
    float32 log-softmax and cross-entropy make about ten passes over the [rows, K] scores in forward and
    backward (cast, temperature, log-softmax, product, sum, and their gradients); compiled, they fuse into
    a few (``benchmarks/prototype_losses.py``: ~4.9x on the iBOT loss of a ViT-L step on a CPU). The number
    of masked patches is fixed by the batch and crop sizes; with mixed crop resolutions it changes with the
    resolution, and after its second value the iBOT graph is recompiled once with a dynamic row count, then
    reused.
    """
    for loss in losses:
        loss.compile()


def configure_fsdp(module: L.LightningModule) -> None:
    """Makes Lightning's ``FSDPStrategy`` shard ``module`` by :data:`FSDP_UNITS` (no-op for other strategies).

    Sets the strategy's ``auto_wrap_policy`` unless one was given; call it from ``configure_model``, which
    Lightning runs before wrapping the model. Under ``SHARD_GRAD_OP`` (the official choice) the units of the
    networks that run no backward pass (:meth:`SSLModule.frozen_networks`: the EMA teacher, the Gram teacher,
    a distillation teacher) are ``FULL_SHARD``: ``SHARD_GRAD_OP`` frees a unit's gathered weights only after
    its backward pass, so such a unit would keep computing with the weights of its first forward pass while
    the EMA update and the Gram refresh write its shards (pytorch/pytorch#144289). With its own policy, the
    user must keep every student network and its EMA copy in units of equal structure, or the EMA update will
    fail on mismatched shards, and must give forward-only units that change a resharding strategy. With
    ``bf16-mixed`` and no ``mixed_precision`` given, FSDP gathers bf16 parameters but reduces gradients in
    float32 and leaves buffers alone (official: bf16 parameters, fp32 reduce); Lightning's own setting
    would reduce in bf16 and cast the RoPE and key-bias mask buffers.

    Raises:
        ValueError: For hybrid sharding (replicas across nodes), which the sharded gradient clipping of
            :func:`clip_grad_norm` does not handle, and for ``state_dict_type="sharded"``: resuming, the next
            stage's ``init_from`` / ``continue_from`` and the export read full checkpoint files.
    """
    strategy = module._trainer.strategy if module._trainer is not None else None
    if not isinstance(strategy, FSDPStrategy):
        return
    if strategy.sharding_strategy not in _FSDP_SHARDINGS:
        raise ValueError(
            f"FSDP sharding_strategy {strategy.sharding_strategy.name} is not supported; use one of "
            f"{[s.name for s in _FSDP_SHARDINGS]}"
        )
    if strategy._state_dict_type != "full":
        raise ValueError(
            f"FSDP state_dict_type={strategy._state_dict_type!r} is not supported: a run resumes, and the "
            "next stage starts, from one full checkpoint file; leave state_dict_type at 'full' (the default)"
        )
    strategy.kwargs.setdefault("auto_wrap_policy", _fsdp_units(module, strategy.sharding_strategy))
    if strategy.mixed_precision is None and strategy.precision_plugin.precision == "bf16-mixed":
        strategy.mixed_precision = FSDP_BF16


def _fsdp_units(module: L.LightningModule, sharding: ShardingStrategy) -> ModuleWrapPolicy | CustomPolicy:
    """The :data:`FSDP_UNITS` policy; under ``SHARD_GRAD_OP`` the units of ``module.frozen_networks()`` are
    ``FULL_SHARD`` (see :func:`configure_fsdp`). Both strategies shard a unit's parameters alike, so the
    student's and the teacher's local shards still line up for the EMA update."""
    if sharding != ShardingStrategy.SHARD_GRAD_OP:
        return ModuleWrapPolicy(FSDP_UNITS)
    forward_only = {id(m) for network in module.frozen_networks() for m in network.modules()}

    def unit(m: nn.Module) -> bool | dict[str, Any]:
        if not isinstance(m, FSDP_UNITS):
            return False
        return {"sharding_strategy": ShardingStrategy.FULL_SHARD} if id(m) in forward_only else True

    return CustomPolicy(unit)


def unwrapped_name(name: str) -> str:
    """A parameter name or state-dict key without the FSDP and activation-checkpointing wrappers' prefixes."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def grads_sharded(module: L.LightningModule) -> bool:
    """Whether each rank holds only a shard of every gradient (FSDP sharding over more than one process)."""
    strategy = module._trainer.strategy if module._trainer is not None else None
    return (
        isinstance(strategy, FSDPStrategy)
        and strategy.world_size > 1
        and strategy.sharding_strategy != ShardingStrategy.NO_SHARD
    )


def clip_grad_norm(
    parameters: Iterable[nn.Parameter], max_norm: float | None, *, sharded: bool = False
) -> Tensor:
    """Scales the gradients so that their global L2 norm is at most ``max_norm``; returns the norm before.

    Without ``sharded`` this is ``nn.utils.clip_grad_norm_``. With ``sharded`` (FSDP: each rank holds a
    disjoint shard of every gradient), the squared norms of the local shards are summed over all ranks with
    one all-reduce, so every rank applies the same factor; every rank must call it. With ``max_norm`` None
    only the norm is computed.
    """
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not sharded:
        norm = nn.utils.get_total_norm(grads)
        if max_norm is not None:
            nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm
    squared = torch.zeros((), device=params[0].device)
    if grads:
        squared = torch.stack(torch._foreach_norm(grads)).float().square().sum()
    torch.distributed.all_reduce(squared)
    norm = squared.sqrt()
    if max_norm is not None:
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


def head_sizes(n_prototypes: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> dict[str, int]:
    """Keywords of one :class:`~geodino.train.heads.DINOHead` (besides its input width)."""
    return {
        "out_dim": n_prototypes,
        "hidden_dim": hidden_dim,
        "bottleneck_dim": bottleneck_dim,
        "nlayers": nlayers,
    }


class CropBatch(NamedTuple):
    """The parts of a :func:`~geodino.train.augment.collate_multicrop` batch that every step reads."""

    global_crops: Tensor  #: [2B, C, H, W], crop-major
    local_crops: Tensor  #: [N·B, C, h, w], crop-major
    masks: Tensor  #: bool [2B, P], the iBOT masks of the global crops
    mask_indices: Tensor  #: long [M], masked patches in ``masks.flatten()``
    masks_weight: Tensor  #: float [M], 1 / (masked patches of the patch's image)
    n_images: int  #: B


def unpack_batch(batch: Mapping[str, Tensor]) -> CropBatch:
    """The crops, masks and masked-patch indices and weights of a multi-crop batch.

    The indices and weights are the collate's ``mask_indices_list`` and ``masks_weight`` (computed on the
    CPU); a batch without them gets them from :func:`~geodino.train.augment.masked_patch_index`, which on a
    GPU waits for the device once.

    Raises:
        ValueError: If the crop counts are not 2·B and a multiple of B, or the batch still carries deferred
            colour operations (``photometric``).
    """
    if "photometric" in batch:
        raise ValueError(
            "the batch's colour operations were deferred (PretrainDataModule(photometric_on='device')) but "
            "never applied: give the Trainer the data module (trainer.fit(module, datamodule=...)), not its "
            "dataloader, or use photometric_on='workers'"
        )
    global_crops = batch["collated_global_crops"]
    local_crops = batch["collated_local_crops"]
    n_images = global_crops.shape[0] // N_GLOBAL_CROPS
    if global_crops.shape[0] != N_GLOBAL_CROPS * n_images or local_crops.shape[0] % n_images:
        raise ValueError(
            f"expected {N_GLOBAL_CROPS}·B global and N·B local crops, got {global_crops.shape[0]} and "
            f"{local_crops.shape[0]}"
        )
    masks = batch["collated_masks"].bool()
    if "mask_indices_list" in batch:
        indices, weights = batch["mask_indices_list"], batch["masks_weight"]
    else:
        indices, weights = masked_patch_index(masks)
    return CropBatch(global_crops, local_crops, masks, indices, weights, n_images)


def masked_tokens(patch_tokens: Tensor, mask_indices: Tensor) -> Tensor:
    """The tokens [M, D] of the masked patches of ``patch_tokens`` [2B, P, D] (no device synchronisation)."""
    return patch_tokens.flatten(0, 1).index_select(0, mask_indices)


def build_networks(name: str, overrides: dict[str, Any], heads: dict[str, dict[str, int]]) -> nn.ModuleDict:
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


def read_teacher_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Backbone and head tensors of a teacher checkpoint, read with ``torch.load(weights_only=True)``.

    Accepts ``{"teacher": state_dict}`` or a bare state dict with ``backbone.``/``dino_head.``/``ibot_head.``
    keys; the official loss-centre buffers (``dino_loss.*``, ``ibot_patch_loss.*``) are dropped.

    Raises:
        CheckpointError: Missing or unreadable file, or no tensor state dict inside.
    """
    obj = read_checkpoint(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("teacher"), Mapping):
        obj = obj["teacher"]
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected {{'teacher': state_dict}} or a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor) and not k.startswith(LOSS_BUFFER_PREFIXES)}


def _in_model_order(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """``state`` (``optimizer.state_dict()``: parameters numbered 0, 1, ... through the groups) with every
    parameter numbered by its place in ``module.parameters()``."""
    place = {id(p): i for i, p in enumerate(module.parameters())}
    number = {
        old: place[id(p)]
        for old, p in enumerate(p for group in optimizer.param_groups for p in group["params"])
    }
    return {
        "state": {number[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [number[k] for k in g["params"]]} for g in state["param_groups"]],
    }


class StageCheckpoint(NamedTuple):
    """What the next stage takes from a previous stage's Lightning checkpoint."""

    networks: dict[str, dict[str, Tensor]]  # "student" / "teacher" -> state dict without that prefix
    moments: dict[str, dict[str, Tensor]]  # student parameter name -> its AdamW state (step, moments)
    parameters: frozenset[str]  # the names of all student parameters the optimizer held


def read_stage_checkpoint(path: str | os.PathLike) -> StageCheckpoint:
    """Student, EMA teacher and optimizer state of a Lightning checkpoint (``.ckpt``) of a previous stage,
    read with ``torch.load(weights_only=True)``.

    The AdamW state is keyed by parameter name (without wrapper prefixes): each parameter group lists its
    parameters' ids and names in the same order, whether the ids count in the model's order (every geodino
    checkpoint now, see :meth:`SSLModule.on_save_checkpoint`) or in the optimizer's (earlier single-device
    and DDP checkpoints).

    Raises:
        CheckpointError: Missing or unreadable file, or not a training checkpoint of a DINOv3 module (no
            ``state_dict`` with ``student.`` and ``teacher.`` keys, or no single optimizer state with named
            parameter groups).
    """
    if not Path(path).is_file():
        raise CheckpointError(
            f"{path}: no such Lightning checkpoint; the previous stage writes it with its ModelCheckpoint "
            "(save_last: true, e.g. runs/pretrain_tiny/checkpoints/last.ckpt): run that stage first"
        )
    obj = read_checkpoint(path)
    state = obj.get("state_dict") if isinstance(obj, Mapping) else None
    optimizers = obj.get("optimizer_states") if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not isinstance(optimizers, list) or len(optimizers) != 1:
        raise CheckpointError(
            f"{path}: not a Lightning training checkpoint (state_dict and one optimizer state); "
            "for an exported teacher file use init_from"
        )
    networks = {
        name: {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
        for name in ("student", "teacher")
    }
    if not all(networks.values()):
        raise CheckpointError(f"{path}: no student and teacher networks in its state_dict")
    groups = optimizers[0].get("param_groups", [])
    if not groups or any(len(g.get("names", ())) != len(g["params"]) for g in groups):
        raise CheckpointError(
            f"{path}: its optimizer state has no named parameter groups (not a geodino run)"
        )
    names = {pid: unwrapped_name(n) for g in groups for pid, n in zip(g["params"], g["names"], strict=True)}
    moments = {names[pid]: adamw for pid, adamw in optimizers[0]["state"].items()}
    return StageCheckpoint(networks, moments, frozenset(names.values()))


#: ``ckpt_path`` values that Lightning resolves itself rather than reading them as a file path.
LIGHTNING_CKPT_KEYWORDS = frozenset({"last", "best", "hpc", "registry"})


def check_resume_checkpoint(path: str | os.PathLike) -> None:
    """Refuses a ``ckpt_path`` (a run to resume) that is missing or no whole checkpoint, before the run
    starts; Lightning would fail deep inside, and for a damaged file advise loading it unsafely.

    ``torch.save`` writes a zip archive whose directory is at the end of the file, so a file cut short (a
    copy interrupted, a disk that filled up) has none. Only that directory is read: nothing for a checkpoint
    of many GB. Lightning's values ``last``, ``best``, ``hpc`` and ``registry...`` are left to Lightning.

    Raises:
        CheckpointError: The file is missing, has no archive directory holding a pickled object, or is no
            Lightning checkpoint (say a teacher export).
    """
    if str(path) in LIGHTNING_CKPT_KEYWORDS or str(path).startswith("registry:"):
        return
    if not Path(path).is_file():
        raise CheckpointError(
            f"ckpt_path {path}: no such file; give a checkpoint that this run's ModelCheckpoint wrote (e.g. "
            "runs/pretrain_tiny/checkpoints/last.ckpt), or leave ckpt_path out to start from the first step"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            # the pickle holds the keys (the tensors are separate records): small, and not unpickled here
            lightning = bool(pickles) and b"pytorch-lightning_version" in archive.read(pickles[0])
    except (zipfile.BadZipFile, OSError):
        pickles, lightning = [], False
    if not pickles:
        raise CheckpointError(
            f"ckpt_path {path}: not a whole checkpoint (no torch.save archive directory at its end), as a "
            "copy cut short or a full disk leaves; resume from another checkpoint of the run, e.g. the one "
            "before it in the same folder"
        )
    if not lightning:
        raise CheckpointError(
            f"ckpt_path {path}: not a Lightning checkpoint of a run (a teacher export? it starts the next "
            "stage through --model.init_from); resume from the run's checkpoints/last.ckpt"
        )


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """``load_state_dict(strict=True)``, raising a :class:`CheckpointError` that lists what does not fit."""
    report = describe_mismatch(module, state_dict)
    if report:
        raise CheckpointError(f"{path} does not fit the configured networks:\n{report}")
    module.load_state_dict(state_dict, strict=True)
