"""DINOv3 backbones (ViT and ConvNeXt), their presets and checkpoint loading."""

from geodino.models.convnext import ConvNeXt, build_convnext
from geodino.models.presets import PRESETS, BackbonePreset, get_preset, list_presets
from geodino.models.vision_transformer import DinoVisionTransformer, build_dinov3

__all__ = [
    "PRESETS",
    "BackbonePreset",
    "ConvNeXt",
    "DinoVisionTransformer",
    "build_convnext",
    "build_dinov3",
    "get_preset",
    "list_presets",
]
