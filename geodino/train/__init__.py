"""DINOv3 self-supervised pretraining: heads, losses, schedules and parameter groups."""

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
from geodino.train.param_groups import layer_id, param_groups
from geodino.train.schedules import Schedule

__all__ = [
    "DINOHead",
    "DINOLoss",
    "DINOLossTerms",
    "GramLoss",
    "KoLeoLoss",
    "Schedule",
    "iBOTPatchLoss",
    "layer_id",
    "param_groups",
    "resize_patch_features",
    "sinkhorn_knopp",
]
