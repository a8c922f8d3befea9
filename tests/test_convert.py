"""timm and Hugging Face transformers DINOv3 state dicts convert to the official layout exactly.

Each case builds a tiny random model in the foreign library, converts its state dict with
:func:`to_official`, loads it strictly into our official-layout model and compares the outputs
(float32, eval, a 64 x 96 input so that H != W).
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import Tensor, nn
from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel, DINOv3ViTConfig, DINOv3ViTModel

from geodino.models import build_convnext, build_dinov3, get_preset
from geodino.models.convert import detect_format, to_official

ATOL = 1e-5

#: case -> (preset whose official kwargs are shrunk, timm model name, size overrides)
VIT_CASES = {
    # GELU MLP, q/v biases stored by timm's "_qkvb" variant, mask_k_bias, 4 storage tokens
    "mlp_qkvb": ("dinov3_vits16", "vit_small_patch16_dinov3_qkvb", {"embed_dim": 64, "num_heads": 2}),
    # SwiGLU (align 8); timm's plain variant drops the (all-zero) qkv biases the official model has
    "swiglu": ("dinov3_vits16plus", "vit_small_plus_patch16_dinov3", {"embed_dim": 64, "num_heads": 2}),
    # 7B-like: swiglu64, no qkv bias, untied global/local CLS norm (local_cls_norm synthesized)
    "7b": ("dinov3_vit7b16", "vit_7b_patch16_dinov3", {"embed_dim": 128, "num_heads": 4}),
}
CONVNEXT_KWARGS = {"depths": [1, 1, 2, 1], "dims": [16, 24, 32, 40], "layer_scale_init_value": 1e-6}


@torch.no_grad()
def randomize(model: nn.Module) -> nn.Module:
    """Random values in every parameter (LayerScale, norms, biases, tokens included), eval mode."""
    for p in model.parameters():
        p.copy_(torch.randn(p.shape) * (0.5 if p.ndim <= 1 else 0.1))
    return model.eval()


def vit_kwargs(case: str) -> dict:
    preset, _, size = VIT_CASES[case]
    return {**get_preset(preset).kwargs, **size, "depth": 2}


def official_tokens(model: nn.Module, x: Tensor) -> Tensor:
    """Normalised [CLS, storage, patches] sequence of our official-layout ViT."""
    with torch.no_grad():
        f = model.forward_features(x)
    return torch.cat([f["x_norm_clstoken"][:, None], f["x_storage_tokens"], f["x_norm_patchtokens"]], dim=1)


def hf_vit(kwargs: dict) -> DINOv3ViTModel:
    ffn = build_dinov3(**kwargs).blocks[0].mlp
    swiglu = hasattr(ffn, "w1")
    config = DINOv3ViTConfig(
        hidden_size=kwargs["embed_dim"],
        num_hidden_layers=kwargs["depth"],
        num_attention_heads=kwargs["num_heads"],
        intermediate_size=(ffn.w1 if swiglu else ffn.fc1).out_features,
        use_gated_mlp=swiglu,
        hidden_act="silu" if swiglu else "gelu",
        num_register_tokens=kwargs["n_storage_tokens"],
        query_bias=kwargs["qkv_bias"],
        value_bias=kwargs["qkv_bias"],
        rope_theta=kwargs["pos_embed_rope_base"],
        layer_norm_eps=1e-5,
    )
    return randomize(DINOv3ViTModel(config))


def convert_and_load(state_dict: dict, kwargs: dict, family: str) -> nn.Module:
    build = build_dinov3 if family == "vit" else build_convnext
    model = build(**kwargs).eval()
    model.load_state_dict(to_official(state_dict, kwargs, family), strict=True)
    return model


def assert_close(actual: Tensor, expected: Tensor) -> None:
    diff = (actual - expected).abs().max().item()
    print(f"max abs diff {diff:.3g} (scale {expected.abs().max().item():.3g})")
    assert actual.shape == expected.shape and diff <= ATOL


@pytest.mark.parametrize("case", VIT_CASES)
def test_timm_vit(case: str) -> None:
    kwargs = vit_kwargs(case)
    _, name, size = VIT_CASES[case]
    source = randomize(timm.create_model(name, depth=2, num_classes=5, **size))  # with a head to drop
    state_dict = source.state_dict()
    assert detect_format(state_dict) == "timm"
    model = convert_and_load(state_dict, kwargs, "vit")
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = source.forward_features(x)  # [CLS, 4 registers, patches], normalised
    assert_close(official_tokens(model, x), expected)


@pytest.mark.parametrize("case", VIT_CASES)
def test_hf_vit(case: str) -> None:
    kwargs = vit_kwargs(case)
    source = hf_vit(kwargs)
    state_dict = source.state_dict()  # transformers >= 5 nests the blocks as model.layer.N
    hub_layout = {k.removeprefix("model."): v for k, v in state_dict.items()}  # hub files: layer.N
    assert detect_format(state_dict) == detect_format(hub_layout) == "hf"
    model = convert_and_load(state_dict, kwargs, "vit")
    loaded = model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in to_official(hub_layout, kwargs, "vit").items())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = source(pixel_values=x).last_hidden_state  # [CLS, registers, patches], normalised
    # HF rotates with inv_freq (x * f) where the official code divides by periods (x / p): a few ulp
    assert_close(official_tokens(model, x), expected)


def test_hf_vit_without_registers() -> None:
    kwargs = {**vit_kwargs("mlp_qkvb"), "n_storage_tokens": 0}
    source = hf_vit(kwargs)
    assert source.embeddings.register_tokens.shape == (1, 0, 64)  # HF keeps an empty parameter
    model = convert_and_load(source.state_dict(), kwargs, "vit")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert_close(official_tokens(model, x), source(pixel_values=x).last_hidden_state)


def test_timm_convnext() -> None:
    source = randomize(
        timm.create_model("convnext_tiny", depths=[1, 1, 2, 1], dims=[16, 24, 32, 40], num_classes=5)
    )
    state_dict = source.state_dict()
    assert detect_format(state_dict) == "timm"
    model = convert_and_load(state_dict, CONVNEXT_KWARGS, "convnext")
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        stage3 = source.forward_features(x)
        pooled = source.forward_head(stage3, pre_logits=True)  # mean-pool then head.norm
        f = model.forward_features(x)
    assert_close(f["x_norm_clstoken"], pooled)
    assert_close(f["x_prenorm"], stage3.flatten(2).transpose(1, 2))
    assert_close(f["x_norm_patchtokens"], model.norm(stage3.flatten(2).transpose(1, 2)))


def test_hf_convnext() -> None:
    config = DINOv3ConvNextConfig(
        hidden_sizes=CONVNEXT_KWARGS["dims"], depths=CONVNEXT_KWARGS["depths"], layer_norm_eps=1e-6
    )
    source = randomize(DINOv3ConvNextModel(config))
    state_dict = source.state_dict()  # model.stages.N (transformers >= 5); hub files: stages.N
    hub_layout = {k.removeprefix("model."): v for k, v in state_dict.items()}
    assert detect_format(state_dict) == detect_format(hub_layout) == "hf"
    model = convert_and_load(hub_layout, CONVNEXT_KWARGS, "convnext")
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = source(pixel_values=x)
        f = model.forward_features(x)
    assert_close(f["x_norm_clstoken"], out.pooler_output)
    assert_close(f["x_norm_patchtokens"], out.last_hidden_state[:, 1:])


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_official_passes_through(family: str) -> None:
    model = build_dinov3(**vit_kwargs("7b")) if family == "vit" else build_convnext(**CONVNEXT_KWARGS)
    state_dict = model.state_dict()
    assert detect_format(state_dict) == "official"
    converted = to_official(state_dict, {}, family)
    assert converted.keys() == state_dict.keys()
    assert all(converted[k] is v for k, v in state_dict.items())


def test_synthesized_entries() -> None:
    """timm stores neither K/zero biases, bias_mask, mask_token, periods nor local_cls_norm."""
    kwargs = {**vit_kwargs("swiglu"), "untie_global_and_local_cls_norm": True, "pos_embed_rope_dtype": "bf16"}
    source = randomize(timm.create_model("vit_small_plus_patch16_dinov3", depth=2, embed_dim=64, num_heads=2))
    out = to_official(source.state_dict(), kwargs, "vit")
    assert torch.equal(out["blocks.0.attn.qkv.bias"], torch.zeros(192))
    assert out["blocks.0.attn.qkv.bias_mask"].tolist() == [1.0] * 64 + [0.0] * 64 + [1.0] * 64
    assert torch.equal(out["mask_token"], torch.zeros(1, 64))
    assert out["rope_embed.periods"].dtype == torch.bfloat16
    assert torch.equal(out["rope_embed.periods"], source.rope.periods.to(torch.bfloat16))
    assert out["local_cls_norm.weight"] is out["norm.weight"]


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown DINOv3 state-dict layout"):
        detect_format({"encoder.weight": torch.zeros(1)})
    timm_vit = timm.create_model("vit_small_patch16_dinov3", depth=1, embed_dim=64, num_heads=2).state_dict()
    with pytest.raises(ValueError, match="several layouts"):
        detect_format({**timm_vit, "mask_token": torch.zeros(1, 64)})
    with pytest.raises(ValueError, match="unknown backbone family"):
        to_official(timm_vit, {}, "swin")
    hf = hf_vit(vit_kwargs("mlp_qkvb")).state_dict()
    hf["model.layer.0.attention.k_proj.bias"] = torch.ones(64)
    with pytest.raises(ValueError, match="non-zero key bias"):
        to_official(hf, vit_kwargs("mlp_qkvb"), "vit")
    del hf["model.layer.0.attention.k_proj.weight"]
    with pytest.raises(ValueError, match="incomplete"):
        to_official(hf, vit_kwargs("mlp_qkvb"), "vit")


def test_wrong_mapping_is_detected() -> None:
    """The comparison is sensitive: swapping SwiGLU's w1/w2 breaks it."""
    kwargs = vit_kwargs("swiglu")
    source = randomize(timm.create_model("vit_small_plus_patch16_dinov3", depth=2, embed_dim=64, num_heads=2))
    state_dict = to_official(source.state_dict(), kwargs, "vit")
    state_dict["blocks.1.mlp.w1.weight"], state_dict["blocks.1.mlp.w2.weight"] = (
        state_dict["blocks.1.mlp.w2.weight"],
        state_dict["blocks.1.mlp.w1.weight"],
    )
    model = build_dinov3(**kwargs).eval()
    model.load_state_dict(state_dict, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert (official_tokens(model, x) - source.forward_features(x)).abs().max() > 1e-2
