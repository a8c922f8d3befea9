"""Losses of DINOv3 self-supervised training: DINO, iBOT, KoLeo, Gram, and Sinkhorn-Knopp centering."""

from geodino.train.losses.dino import DINOLoss, DINOLossTerms
from geodino.train.losses.gram import GramLoss, resize_patch_features
from geodino.train.losses.ibot import iBOTPatchLoss
from geodino.train.losses.koleo import KoLeoLoss
from geodino.train.losses.sinkhorn import sinkhorn_knopp

__all__ = [
    "DINOLoss",
    "DINOLossTerms",
    "GramLoss",
    "KoLeoLoss",
    "iBOTPatchLoss",
    "resize_patch_features",
    "sinkhorn_knopp",
]
