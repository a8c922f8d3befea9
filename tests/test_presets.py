"""Presets of the released backbones: architecture, sizes, normalisation."""

from __future__ import annotations

import pytest
import torch

from geodino.models import PRESETS, get_preset, list_presets
from geodino.models.checkpoint import build_backbone


def _params_m(name: str) -> float:
    with torch.device("meta"):
        model = build_backbone(name)
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_the_model_card(name):
    assert _params_m(name) == pytest.approx(PRESETS[name].params_m, rel=0.05)


def test_every_released_model_is_there():
    archs = {p.arch for p in PRESETS.values()}
    assert archs == {
        "dinov3_vits16",
        "dinov3_vits16plus",
        "dinov3_vitb16",
        "dinov3_vitl16",
        "dinov3_vitl16plus",
        "dinov3_vith16plus",
        "dinov3_vit7b16",
        "dinov3_convnext_tiny",
        "dinov3_convnext_small",
        "dinov3_convnext_base",
        "dinov3_convnext_large",
    }
    assert set(list_presets("convnext")) == {n for n in PRESETS if "convnext" in n}
    assert {n for n in PRESETS if n.endswith("sat493m")} == {
        "dinov3_vitl16.sat493m",
        "dinov3_vit7b16.sat493m",
    }


def test_sat_and_web_normalisation_and_architecture():
    sat, web = get_preset("dinov3_vitl16.sat493m"), get_preset("dinov3_vitl16")
    assert web.name == "dinov3_vitl16.lvd1689m"
    assert sat.mean == (0.430, 0.411, 0.296) and sat.std == (0.213, 0.156, 0.143)
    assert web.mean == (0.485, 0.456, 0.406) and web.std == (0.229, 0.224, 0.225)
    assert sat.kwargs["untie_global_and_local_cls_norm"] and not web.kwargs["untie_global_and_local_cls_norm"]
    assert sat.checkpoint == "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"


def test_feature_dims_and_patch_size():
    vit, cnx = get_preset("dinov3_vitb16"), get_preset("dinov3_convnext_base")
    assert vit.patch_size == 16 and vit.embed_dim == 768 and len(vit.feature_dims) == 12
    assert cnx.feature_dims == (128, 256, 512, 1024) and cnx.embed_dim == 1024


def test_7b_has_no_qkv_bias_and_swiglu64():
    kw = get_preset("dinov3_vit7b16.sat493m").kwargs
    assert kw["qkv_bias"] is False and kw["ffn_layer"] == "swiglu64" and kw["ffn_ratio"] == 3


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"dinov3_vits16\.lvd1689m"):
        get_preset("dinov3_vitz16")
