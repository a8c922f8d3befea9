"""Presets of every released DINOv3 backbone, kept as data (timm's ``default_cfgs`` pattern).

A preset is an architecture plus the weights it was released with: the official constructor
keywords, patch size, feature widths, and the input normalisation those weights expect. Names follow
the official hub entry points with a timm-style weights tag: ``dinov3_vitl16.sat493m``; a bare
``dinov3_vitl16`` means the web (LVD-1689M) weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WEB_MEAN = (0.485, 0.456, 0.406)
WEB_STD = (0.229, 0.224, 0.225)
SAT_MEAN = (0.430, 0.411, 0.296)
SAT_STD = (0.213, 0.156, 0.143)
#: The CHMv2 canopy-height head was trained and served with a red mean of 0.420 (notebook, HF processor).
CHMV2_MEAN = (0.420, 0.411, 0.296)

DINOV3_LICENSE = "DINOv3 License (https://ai.meta.com/resources/models-and-libraries/dinov3-license/)"

_VIT_HUB = {
    "img_size": 224,
    "patch_size": 16,
    "in_chans": 3,
    "pos_embed_rope_base": 100.0,
    "pos_embed_rope_min_period": None,
    "pos_embed_rope_max_period": None,
    "pos_embed_rope_normalize_coords": "separate",
    "pos_embed_rope_shift_coords": None,
    "pos_embed_rope_jitter_coords": None,
    "pos_embed_rope_rescale_coords": 2,
    "pos_embed_rope_dtype": "fp32",
    "drop_path_rate": 0.0,
    "layerscale_init": 1e-5,
    "norm_layer": "layernormbf16",
    "ffn_bias": True,
    "proj_bias": True,
    "n_storage_tokens": 4,
    "mask_k_bias": True,
    "untie_cls_and_patch_norms": False,
    "untie_global_and_local_cls_norm": False,
}


@dataclass(frozen=True)
class BackbonePreset:
    """One released backbone: architecture, weights metadata and input normalisation.

    Attributes:
        name: ``<hub entry point>.<weights tag>``, e.g. ``dinov3_vitl16.sat493m``.
        family: "vit" or "convnext".
        kwargs: official constructor keywords (``build_dinov3`` / ``build_convnext``).
        dataset: "LVD-1689M" (web photos) or "SAT-493M" (0.6 m Maxar RGB).
        mean: per-channel mean of [0, 1] RGB for these weights.
        std: per-channel std of [0, 1] RGB for these weights.
        params_m: parameter count, millions (official model card).
        checkpoint: official file name (hash included); weights are gated and never downloaded here.
        hf_id: Hugging Face transformers id of the same weights (None where none is published).
        timm_name: timm model name of the same weights (None where timm has none).
    """

    name: str
    family: str
    kwargs: dict[str, Any]
    dataset: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    params_m: float
    checkpoint: str
    hf_id: str | None
    timm_name: str | None = None
    license: str = DINOV3_LICENSE
    notes: str = field(default="", compare=False)

    @property
    def arch(self) -> str:
        """Hub entry point name, e.g. ``dinov3_vitl16``."""
        return self.name.split(".")[0]

    @property
    def patch_size(self) -> int:
        """Pixels per patch side of the output grid (ConvNeXt: stride of its last stage, 32)."""
        return self.kwargs.get("patch_size", 16) if self.family == "vit" else 32

    @property
    def embed_dim(self) -> int:
        """Width of the CLS and final patch features."""
        return self.kwargs["embed_dim"] if self.family == "vit" else self.kwargs["dims"][-1]

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """Width of each intermediate layer (every block of a ViT, every stage of a ConvNeXt)."""
        if self.family == "vit":
            return (self.kwargs["embed_dim"],) * self.kwargs["depth"]
        return tuple(self.kwargs["dims"])

    @property
    def depth(self) -> int:
        """Blocks (ViT) or stages (ConvNeXt) that ``get_intermediate_layers`` can return."""
        return self.kwargs["depth"] if self.family == "vit" else 4


def _vit(
    arch: str, tag: str, params_m: float, hf: str | None, timm: str | None, file_hash: str, **arch_kwargs
) -> BackbonePreset:
    sat = tag == "sat493m"
    return BackbonePreset(
        name=f"{arch}.{tag}",
        family="vit",
        kwargs={**_VIT_HUB, **arch_kwargs},
        dataset="SAT-493M" if sat else "LVD-1689M",
        mean=SAT_MEAN if sat else WEB_MEAN,
        std=SAT_STD if sat else WEB_STD,
        params_m=params_m,
        checkpoint=f"{arch}_pretrain_{tag}-{file_hash}.pth",
        hf_id=f"facebook/{hf}-pretrain-{tag}" if hf else None,
        timm_name=f"{timm}.{tag}" if timm else None,
    )


def _convnext(
    arch: str, depths: list[int], dims: list[int], params_m: float, file_hash: str
) -> BackbonePreset:
    size = arch.removeprefix("dinov3_convnext_")
    return BackbonePreset(
        name=f"{arch}.lvd1689m",
        family="convnext",
        kwargs={
            "in_chans": 3,
            "depths": depths,
            "dims": dims,
            "drop_path_rate": 0.0,
            "layer_scale_init_value": 1e-6,
        },
        dataset="LVD-1689M",
        mean=WEB_MEAN,
        std=WEB_STD,
        params_m=params_m,
        checkpoint=f"{arch}_pretrain_lvd1689m-{file_hash}.pth",
        hf_id=f"facebook/dinov3-convnext-{size}-pretrain-lvd1689m",
        timm_name=f"convnext_{size}.dinov3_lvd1689m",
    )


_S = {"embed_dim": 384, "depth": 12, "num_heads": 6}
_B = {"embed_dim": 768, "depth": 12, "num_heads": 12}
_L = {"embed_dim": 1024, "depth": 24, "num_heads": 16}
_H = {"embed_dim": 1280, "depth": 32, "num_heads": 20}
_7B = {
    "embed_dim": 4096,
    "depth": 40,
    "num_heads": 32,
    "ffn_ratio": 3,
    "ffn_layer": "swiglu64",
    "qkv_bias": False,
}
_MLP = {"ffn_ratio": 4, "ffn_layer": "mlp", "qkv_bias": True}
_SWIGLU = {"ffn_ratio": 6, "ffn_layer": "swiglu", "qkv_bias": True}
_UNTIED = {"untie_global_and_local_cls_norm": True}

_ALL = [
    _vit(
        "dinov3_vits16", "lvd1689m", 21, "dinov3-vits16", "vit_small_patch16_dinov3", "08c60483", **_S, **_MLP
    ),
    _vit(
        "dinov3_vits16plus",
        "lvd1689m",
        29,
        "dinov3-vits16plus",
        "vit_small_plus_patch16_dinov3",
        "4057cbaa",
        **_S,
        **_SWIGLU,
    ),
    _vit(
        "dinov3_vitb16", "lvd1689m", 86, "dinov3-vitb16", "vit_base_patch16_dinov3", "73cec8be", **_B, **_MLP
    ),
    _vit(
        "dinov3_vitl16",
        "lvd1689m",
        300,
        "dinov3-vitl16",
        "vit_large_patch16_dinov3",
        "8aa4cbdd",
        **_L,
        **_MLP,
    ),
    _vit(
        "dinov3_vitl16",
        "sat493m",
        300,
        "dinov3-vitl16",
        "vit_large_patch16_dinov3",
        "eadcf0ff",
        **_L,
        **_MLP,
        **_UNTIED,
    ),
    # hub entry point (backbone of the released detector); not on the model card, no timm/HF copy
    _vit("dinov3_vitl16plus", "lvd1689m", 404, None, None, "46503df0", **_L, **_SWIGLU),
    _vit(
        "dinov3_vith16plus",
        "lvd1689m",
        840,
        "dinov3-vith16plus",
        "vit_huge_plus_patch16_dinov3",
        "7c1da9a5",
        **_H,
        **_SWIGLU,
    ),
    _vit(
        "dinov3_vit7b16",
        "lvd1689m",
        6716,
        "dinov3-vit7b16",
        "vit_7b_patch16_dinov3",
        "a955f4ea",
        **_7B,
        **_UNTIED,
    ),
    _vit(
        "dinov3_vit7b16",
        "sat493m",
        6716,
        "dinov3-vit7b16",
        "vit_7b_patch16_dinov3",
        "a6675841",
        **_7B,
        **_UNTIED,
    ),
    _convnext("dinov3_convnext_tiny", [3, 3, 9, 3], [96, 192, 384, 768], 29, "21b726bb"),
    _convnext("dinov3_convnext_small", [3, 3, 27, 3], [96, 192, 384, 768], 50, "296db49d"),
    _convnext("dinov3_convnext_base", [3, 3, 27, 3], [128, 256, 512, 1024], 89, "801f2ba9"),
    _convnext("dinov3_convnext_large", [3, 3, 27, 3], [192, 384, 768, 1536], 198, "61fa432d"),
]

PRESETS: dict[str, BackbonePreset] = {p.name: p for p in _ALL}
DEFAULT_TAG = "lvd1689m"


def list_presets(family: str | None = None) -> list[str]:
    """Names of all presets, optionally only of one family ("vit" or "convnext")."""
    return [name for name, p in PRESETS.items() if family is None or p.family == family]


def get_preset(name: str) -> BackbonePreset:
    """Look up a preset by ``arch.tag``; a bare arch means its web (LVD-1689M) weights.

    Raises:
        KeyError: unknown name; the message lists the known ones.
    """
    key = name if "." in name else f"{name}.{DEFAULT_TAG}"
    if key not in PRESETS:
        raise KeyError(f"unknown backbone {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]
