"""DINOv3 ViT parity with the official code (fixtures of ../shared/fixtures) and forward semantics."""

from __future__ import annotations

import pytest
import torch
from conftest import load_fixture

from geodino.models import build_dinov3

ATOL = 1e-5
FEATURE_KEYS = ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm")


def _official_kwargs(config: dict) -> dict:
    return {k: v for k, v in config["constructor_kwargs"].items() if k != "device"}


@pytest.fixture(scope="module")
def vits() -> tuple[torch.nn.Module, dict]:
    fx = load_fixture("dinov3_vits16_depth4")
    model = build_dinov3(**_official_kwargs(fx["config"]))
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval(), fx


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert diff <= atol, f"max |diff| {diff:.2e} > {atol:.0e}"


@torch.no_grad()
def test_forward_features_eval(vits):
    model, fx = vits
    out = model.forward_features(fx["input"])
    for key in FEATURE_KEYS:
        _assert_close(out[key], fx["outputs"][f"forward_features.{key}"])
    _assert_close(model(fx["input"]), fx["outputs"]["forward_features.x_norm_clstoken"])


@torch.no_grad()
def test_intermediate_layers_last_n_reshaped_normed(vits):
    model, fx = vits
    layers = model.get_intermediate_layers(fx["input"], n=2, reshape=True, return_class_token=True, norm=True)
    assert len(layers) == 2
    for i, (patch, cls) in enumerate(layers):
        _assert_close(patch, fx["outputs"][f"gil_n2_reshape_cls_norm.{i}.patch"])
        _assert_close(cls, fx["outputs"][f"gil_n2_reshape_cls_norm.{i}.cls"])


@torch.no_grad()
def test_intermediate_layers_by_index_with_storage_tokens_no_norm(vits):
    model, fx = vits
    layers = model.get_intermediate_layers(
        fx["input"], n=[0, 3], reshape=False, return_class_token=True, return_extra_tokens=True, norm=False
    )
    for i, (patch, cls, storage) in enumerate(layers):
        prefix = f"extra.gil_idx0_last_flat_cls_extra_nonorm.{i}"
        _assert_close(patch, fx["outputs"][f"{prefix}.patch"])
        _assert_close(cls, fx["outputs"][f"{prefix}.cls"])
        _assert_close(storage, fx["outputs"][f"{prefix}.storage"])


@torch.no_grad()
def test_masked_eval_forward(vits):
    model, fx = vits
    out = model.forward_features(fx["input"], masks=fx["extra_inputs"]["masks"])
    for key in FEATURE_KEYS:
        _assert_close(out[key], fx["outputs"][f"extra.masked_eval.{key}"])


@torch.no_grad()
def test_training_list_forward(vits):
    model, fx = vits
    model.train()
    model.rope_embed.eval()  # the fixture switches the random RoPE rescale off to be deterministic
    try:
        crops = [fx["input"], fx["extra_inputs"]["local_input"]]
        outs = model.forward_features(crops, masks=[fx["extra_inputs"]["masks"], None])
    finally:
        model.eval()
    for i, out in enumerate(outs):
        for key in FEATURE_KEYS:
            _assert_close(out[key], fx["outputs"][f"extra.train_list.{i}.{key}"])


@torch.no_grad()
def test_rope_periods_come_from_the_checkpoint(vits):
    """Recomputing the periods from the base (a common porting mistake) must break parity."""
    model, fx = vits
    saved = model.rope_embed.periods.clone()
    try:
        model.rope_embed.reset_parameters()
        diff = (
            model.forward_features(fx["input"])["x_norm_patchtokens"]
            - fx["outputs"]["forward_features.x_norm_patchtokens"]
        )
        assert diff.abs().max() > 1e-2
    finally:
        model.rope_embed.periods.copy_(saved)


@torch.no_grad()
def test_k_bias_is_masked(vits):
    model, fx = vits
    blocks = [b.attn.qkv for b in model.blocks]
    saved = [q.bias_mask.clone() for q in blocks]
    try:
        for q in blocks:
            q.bias_mask.fill_(1.0)
        out = model.forward_features(fx["input"])["x_norm_clstoken"]
        assert (out - fx["outputs"]["forward_features.x_norm_clstoken"]).abs().max() > 1e-3
    finally:
        for q, s in zip(blocks, saved, strict=True):
            q.bias_mask.copy_(s)


@torch.no_grad()
def test_sat_vitl_backbone_of_chmv2_fixture():
    """SAT ViT-L options (untied local CLS norm, 4 storage tokens) through the CHMv2 encoder path."""
    fx = load_fixture("dinov3_chmv2_head_tiny")
    kwargs = _official_kwargs(fx["config"]["backbone"])
    assert kwargs["untie_global_and_local_cls_norm"] is True
    model = build_dinov3(**kwargs)
    model.load_state_dict(fx["backbone_state_dict"], strict=True)
    model.eval()
    layers = model.get_intermediate_layers(fx["input"], n=[0, 1, 2, 3], reshape=True, return_class_token=True)
    for i, (patch, cls) in enumerate(layers):
        _assert_close(patch, fx["outputs"][f"encoder.{i}.patch"])
        _assert_close(cls, fx["outputs"][f"encoder.{i}.cls"])
