"""DINOv3 backbones (ViT and ConvNeXt), their presets and checkpoint loading."""

from geodino.models.checkpoint import CheckpointError, build_backbone, load_backbone
from geodino.models.convnext import ConvNeXt, build_convnext
from geodino.models.presets import PRESETS, BackbonePreset, get_preset, list_presets
from geodino.models.vision_transformer import DinoVisionTransformer, build_dinov3

__all__ = [
    "PRESETS",
    "BackbonePreset",
    "CheckpointError",
    "ConvNeXt",
    "DinoVisionTransformer",
    "build_backbone",
    "build_convnext",
    "build_dinov3",
    "get_preset",
    "list_presets",
    "load_backbone",
]
