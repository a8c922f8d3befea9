"""Convert DINOv3 state dicts from the timm and Hugging Face transformers layouts to the official one.

Keys are given after wrapper prefixes (``module.``, ``backbone.``, ``model.``) were stripped, so the
transformers >= 5 nesting ``model.layer.N`` / ``model.stages.N`` and the hub files' ``layer.N`` /
``stages.N`` both arrive here (the optional ``model.`` is accepted either way). Layouts, ViT:

============================  ==============================  ===================================
official                      timm ``Eva`` (dinov3)           transformers ``DINOv3ViTModel``
============================  ==============================  ===================================
cls_token [1,1,E]             cls_token                       embeddings.cls_token
storage_tokens [1,n,E]        reg_token                       embeddings.register_tokens ([1,0,E] if n=0)
mask_token [1,E]              (dropped)                       embeddings.mask_token [1,1,E]
patch_embed.proj.*            patch_embed.proj.*              embeddings.patch_embeddings.*
rope_embed.periods [D/4]      (recomputed, non-persistent)    (``inv_freq`` = 1/periods, non-persistent)
blocks.i.norm{1,2}.*          blocks.i.norm{1,2}.*            layer.i.norm{1,2}.*
blocks.i.attn.qkv.weight      blocks.i.attn.qkv.weight        layer.i.attention.{q,k,v}_proj.weight
blocks.i.attn.qkv.bias        attn.{q,v}_bias (qkvb models)   layer.i.attention.{q,v}_proj.bias
blocks.i.attn.qkv.bias_mask   (none, K bias fixed at 0)       (none, no K bias)
blocks.i.attn.proj.*          blocks.i.attn.proj.*            layer.i.attention.o_proj.*
blocks.i.ls{1,2}.gamma        blocks.i.gamma_{1,2}            layer.i.layer_scale{1,2}.lambda1
blocks.i.mlp.fc{1,2}.*        blocks.i.mlp.fc{1,2}.*          layer.i.mlp.{up,down}_proj.*
blocks.i.mlp.w{1,2,3}.*       blocks.i.mlp.{fc1_g,fc1_x,fc2}  layer.i.mlp.{gate,up,down}_proj.*
norm.*                        norm.*                          norm.*
cls_norm.*, local_cls_norm.*  (none)                          (none)
============================  ==============================  ===================================

ConvNeXt: official ``downsample_layers.0.{0,1}`` is timm ``stem.{0,1}``; ``downsample_layers.i.k``
(i >= 1) is timm ``stages.i.downsample.k`` and HF ``stages.i.downsample_layers.k``; official
``stages.i.j.{dwconv,norm,pwconv1,pwconv2,gamma}`` is timm ``stages.i.blocks.j.{conv_dw,norm,mlp.fc1,
mlp.fc2,gamma}`` and HF ``stages.i.layers.j.{depthwise_conv,layer_norm,pointwise_conv1,pointwise_conv2,
gamma}``; the final ``norm`` (official also ``norms.3``, the same module) is timm ``head.norm`` and
HF ``layer_norm``.

Entries the source layout does not store are filled with what makes the official model compute the
same function: zero qkv biases (timm drops the all-zero biases of the distilled models; HF and timm
have no K bias), the official 1/0/1 ``bias_mask``, a zero ``mask_token`` (training-time masking
only), ``cls_norm``/``local_cls_norm``/``norms.3`` as copies of ``norm`` (an untied copy of a tied
norm is the same function), and the RoPE ``periods`` computed as the source library computes them,
in float32, then stored in the official buffer dtype (``pos_embed_rope_dtype``). The official
checkpoints' own periods are bf16-rounded values, so converted timm/HF weights reproduce timm/HF
outputs, which differ from the original official outputs by that rounding (as timm documents).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from geodino.models.convnext import build_convnext
from geodino.models.rope import RopePositionEmbedding
from geodino.models.vision_transformer import build_dinov3

Format = Literal["official", "timm", "hf"]
#: (regex searched in the key, replacement); a None replacement drops the key. Applied in order.
Rule = tuple[str, str | None]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {"vit": build_dinov3, "convnext": build_convnext}

#: A state dict is in a layout when some key starts with that layout's signature (and no other's).
_SIGNATURES: dict[str, re.Pattern[str]] = {
    "official": re.compile(
        r"rope_embed\.periods$|mask_token$|storage_tokens$|blocks\.\d+\.ls[12]\.gamma$|downsample_layers\.\d\.\d\."
    ),
    "timm": re.compile(
        r"reg_token$|blocks\.\d+\.gamma_[12]$|blocks\.\d+\.attn\.[qv]_bias$|stem\.\d\.|stages\.\d\.(blocks|downsample)\."
        r"|head\.norm\."
    ),
    "hf": re.compile(
        r"embeddings\.|(model\.)?(layer\.\d+\.|stages\.\d\.(layers|downsample_layers)\.)|layer_norm\."
    ),
}

_RULES: dict[tuple[str, str], list[Rule]] = {
    ("timm", "vit"): [
        (r"^reg_token$", "storage_tokens"),
        (r"\.gamma_([12])$", r".ls\1.gamma"),
        (r"\.attn\.([qv])_bias$", r".attn.\1.bias"),  # fused into qkv.bias below
        (r"^(head|fc_norm)\.", None),  # timm classifier, not part of the backbone
    ],
    ("hf", "vit"): [
        (r"^embeddings\.register_tokens$", "storage_tokens"),
        (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
        (r"^embeddings\.", ""),
        (r"^(model\.)?layer\.", "blocks."),
        (r"\.attention\.o_proj\.", ".attn.proj."),
        (r"\.attention\.([qkv])_proj\.", r".attn.\1."),  # fused into qkv below
        (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"),
    ],
    ("timm", "convnext"): [
        (r"^stem\.", "downsample_layers.0."),
        (r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1."),
        (r"\.blocks\.", "."),
        (r"\.conv_dw\.", ".dwconv."),
        (r"\.mlp\.fc([12])\.", r".pwconv\1."),
        (r"^head\.norm\.", "norm."),
        (r"^head\.fc\.", None),  # timm classifier
    ],
    ("hf", "convnext"): [
        (r"^(model\.)?stages\.(\d)\.downsample_layers\.", r"downsample_layers.\2."),
        (r"^(model\.)?stages\.(\d)\.layers\.", r"stages.\2."),
        (r"\.depthwise_conv\.", ".dwconv."),
        (r"\.layer_norm\.", ".norm."),
        (r"\.pointwise_conv([12])\.", r".pwconv\1."),
        (r"^layer_norm\.", "norm."),
    ],
}

#: ViT FFN Linear names by (format, target is SwiGLU): source name -> official name.
_FFN_NAMES: dict[tuple[str, bool], dict[str, str]] = {
    ("timm", True): {"fc1_g": "w1", "fc1_x": "w2", "fc2": "w3"},
    ("hf", True): {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"},
    ("hf", False): {"up_proj": "fc1", "down_proj": "fc2"},
}

_SPLIT_QKV = re.compile(r"(.+\.attn)\.([qkv])\.(weight|bias)$")
_NORM_COPY = re.compile(r"(?:cls_norm|local_cls_norm|norms\.3)\.(weight|bias)$")


def detect_format(state_dict: Mapping[str, Tensor]) -> Format:
    """Which layout a DINOv3 backbone state dict (ViT or ConvNeXt) is in.

    Args:
        state_dict: the backbone tensors, wrapper prefixes (``module.``, ``backbone.``, ``model.``)
            already stripped; HF's own ``model.layer.N`` / ``model.stages.N`` nesting is accepted too.

    Returns:
        "official" (facebookresearch/dinov3), "timm" or "hf" (Hugging Face transformers).

    Raises:
        ValueError: no layout, or more than one, recognises the keys.
    """
    found = [fmt for fmt, sig in _SIGNATURES.items() if any(sig.match(key) for key in state_dict)]
    if len(found) != 1:
        sample = ", ".join(list(state_dict)[:6])
        what = "no known layout" if not found else f"several layouts ({', '.join(found)})"
        raise ValueError(
            f"unknown DINOv3 state-dict layout: {what} matches keys like {sample}; expected the official, "
            "timm or Hugging Face transformers layout of a ViT or ConvNeXt backbone"
        )
    return cast(Format, found[0])


def to_official(state_dict: Mapping[str, Tensor], kwargs: dict[str, Any], family: str) -> dict[str, Tensor]:
    """Convert a timm or Hugging Face DINOv3 state dict to the official layout.

    Args:
        state_dict: backbone tensors in any layout :func:`detect_format` recognises.
        kwargs: official constructor keywords of the target architecture (a preset's ``kwargs``).
        family: "vit" or "convnext".

    Returns:
        Official-layout tensors in the official key order (an official input is returned as is).
        Keys the target does not expect are kept, so a strict load reports a wrong architecture.

    Raises:
        ValueError: unknown family or layout, or a source that cannot be mapped exactly (incomplete
            q/k/v projections, a non-zero K bias for a target that masks it).
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown backbone family {family!r}; choose 'vit' or 'convnext'")
    fmt = detect_format(state_dict)
    if fmt == "official":
        return dict(state_dict)
    with torch.device("meta"):  # the target's keys, shapes and buffer dtypes, without memory
        target = _BUILDERS[family](**kwargs)
    expected = target.state_dict()
    swiglu = "blocks.0.mlp.w1.weight" in expected
    rules = _RULES[fmt, family] + [
        (rf"\.mlp\.{src}\.", f".mlp.{dst}.") for src, dst in _FFN_NAMES.get((fmt, swiglu), {}).items()
    ]
    out = {}
    for key, value in state_dict.items():
        new_key = _rename(key, rules)
        if new_key is not None:
            out[new_key] = value
    _fuse_qkv(out, expected)
    for key, meta in expected.items():
        if key not in out and (value := _synthesize(key, meta, out, fmt, target)) is not None:
            out[key] = value
    out = {k: v for k, v in out.items() if k in expected or v.numel() > 0}  # HF keeps [1, 0, E] registers
    for key, meta in expected.items():  # HF mask_token [1, 1, E] -> [1, E]
        if key in out and out[key].shape != meta.shape and out[key].squeeze().shape == meta.squeeze().shape:
            out[key] = out[key].reshape(meta.shape)
    return {k: out[k] for k in [*expected, *out] if k in out}


def _rename(key: str, rules: list[Rule]) -> str | None:
    for pattern, replacement in rules:
        if replacement is None:
            if re.search(pattern, key):
                return None
        else:
            key = re.sub(pattern, replacement, key)
    return key


def _fuse_qkv(state_dict: dict[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Concatenate split ``attn.{q,k,v}.{weight,bias}`` into ``attn.qkv.*``; absent biases are zero."""
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key in list(state_dict):
        if (match := _SPLIT_QKV.match(key)) is not None:
            prefix, part, param = match.groups()
            groups.setdefault((prefix, param), {})[part] = state_dict.pop(key)
    for (prefix, param), parts in groups.items():
        if param == "weight" and len(parts) != 3:
            raise ValueError(f"{prefix}: q/k/v projection weights incomplete (have {sorted(parts)})")
        if param == "bias" and "k" in parts and parts["k"].any() and f"{prefix}.qkv.bias_mask" in expected:
            # RoPE rotates k, so a K bias changes the output and the official mask would drop it
            raise ValueError(f"{prefix}: the source has a non-zero key bias but the target sets mask_k_bias")
        zeros = torch.zeros_like(next(iter(parts.values())))
        state_dict[f"{prefix}.qkv.{param}"] = torch.cat([parts.get(c, zeros) for c in "qkv"])


def _synthesize(
    key: str, meta: Tensor, state_dict: dict[str, Tensor], fmt: str, target: nn.Module
) -> Tensor | None:
    """The value of an official entry the source does not store, or None if it cannot be inferred."""
    like = next((v for v in state_dict.values() if v.is_floating_point()), torch.empty(0))
    if key == "mask_token" or key.endswith(".qkv.bias"):
        return torch.zeros(meta.shape, dtype=like.dtype, device=like.device)
    if key.endswith(".qkv.bias_mask"):
        mask = torch.ones(meta.shape, dtype=like.dtype, device=like.device)
        third = meta.shape[0] // 3
        mask[third : 2 * third] = 0
        return mask
    if key == "rope_embed.periods":
        return _rope_periods(target.rope_embed, fmt).to(meta.dtype)
    if (match := _NORM_COPY.match(key)) is not None:
        return state_dict.get(f"norm.{match[1]}")
    return None


def _rope_periods(rope: RopePositionEmbedding, fmt: str) -> Tensor:
    """RoPE periods [D/4] computed in float32 exactly as the source library does."""
    n = rope.head_dim // 4
    if rope.base is None:  # timm's min/max schedule (HF has none)
        return rope.min_period * (rope.max_period / rope.min_period) ** torch.linspace(0, 1, n)
    if fmt == "hf":  # HF multiplies by inv_freq = 1 / base ** arange(0, 1, 4 / D)
        return 1 / (1 / rope.base ** torch.arange(0, 1, 4 / rope.head_dim))
    return rope.base ** (2 * torch.arange(n, dtype=torch.float32) / (rope.head_dim // 2))
