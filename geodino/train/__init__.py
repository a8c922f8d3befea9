"""DINOv3 self-supervised pretraining in Lightning: augmentation, heads, losses, the training module, data."""

from geodino.train.augment import MultiCropAugmentation, collate_multicrop
from geodino.train.base import SSLModule
from geodino.train.callbacks import DataWaitMonitor, ExportTeacher
from geodino.train.checkpoint_io import AtomicCheckpointIO
from geodino.train.data import PretrainDataModule
from geodino.train.distill import DEFAULT_DISTILLATION_SCHEDULES, DistillationModule
from geodino.train.heads import DINOHead
from geodino.train.losses import (
    DINOLoss,
    DINOLossTerms,
    GramLoss,
    KoLeoLoss,
    iBOTPatchLoss,
    resize_patch_features,
    sinkhorn_knopp,
)
from geodino.train.masking import MaskingGenerator
from geodino.train.module import DINOv3Module
from geodino.train.nonfinite import NonFiniteSteps, TrainingDiverged
from geodino.train.param_groups import layer_id, param_groups
from geodino.train.photometric import PhotometricAugmentation, PhotometricDraw
from geodino.train.probe import DenseKNNProbe
from geodino.train.schedules import Schedule

__all__ = [
    "DEFAULT_DISTILLATION_SCHEDULES",
    "AtomicCheckpointIO",
    "DINOHead",
    "DINOLoss",
    "DINOLossTerms",
    "DINOv3Module",
    "DataWaitMonitor",
    "DenseKNNProbe",
    "DistillationModule",
    "ExportTeacher",
    "GramLoss",
    "KoLeoLoss",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "NonFiniteSteps",
    "PhotometricAugmentation",
    "PhotometricDraw",
    "PretrainDataModule",
    "SSLModule",
    "Schedule",
    "TrainingDiverged",
    "collate_multicrop",
    "iBOTPatchLoss",
    "layer_id",
    "param_groups",
    "resize_patch_features",
    "sinkhorn_knopp",
]
