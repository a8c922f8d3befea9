"""DINOv3 ConvNeXt parity with the official code (../shared/fixtures/dinov3_convnext_tiny)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_fixture

from geodino.models import build_convnext

ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_fixture("dinov3_convnext_tiny")


def _model(fx: dict, **overrides) -> torch.nn.Module:
    model = build_convnext(**{**fx["config"]["constructor_kwargs"], **overrides})
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    if expected.numel():
        diff = (actual - expected).abs().max().item()
        assert diff <= ATOL, f"max |diff| {diff:.2e} > {ATOL:.0e}"


@torch.no_grad()
def test_forward_and_forward_features(fixture):
    model, ref = _model(fixture), fixture["outputs"]
    _assert_close(model(fixture["input"]), ref["forward"])
    out = model.forward_features(fixture["input"])
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        _assert_close(out[key], ref[f"forward_features.{key}"])


@torch.no_grad()
def test_intermediate_layers_all_stages_normed(fixture):
    model, ref = _model(fixture), fixture["outputs"]
    stages = model.get_intermediate_layers(
        fixture["input"], n=4, reshape=True, return_class_token=True, norm=True
    )
    for i, (patch, cls) in enumerate(stages):
        _assert_close(patch, ref[f"gil_n4_reshape_cls_norm.{i}.patch"])
        _assert_close(cls, ref[f"gil_n4_reshape_cls_norm.{i}.cls"])


@torch.no_grad()
def test_intermediate_layers_by_index_flat_raw(fixture):
    model, ref = _model(fixture), fixture["outputs"]
    stages = model.get_intermediate_layers(
        fixture["input"], n=[1, 3], reshape=False, return_class_token=True, norm=False
    )
    for i, (patch, cls) in enumerate(stages):
        _assert_close(patch, ref[f"gil_idx13_flat_cls_nonorm.{i}.patch"])
        _assert_close(cls, ref[f"gil_idx13_flat_cls_nonorm.{i}.cls"])


@torch.no_grad()
def test_patch_size_resizes_every_stage_to_the_vit_grid(fixture):
    model, ref = _model(fixture, patch_size=16), fixture["outputs"]
    stages = model.get_intermediate_layers(
        fixture["input"], n=4, reshape=True, return_class_token=True, norm=True
    )
    for i, (patch, cls) in enumerate(stages):
        assert patch.shape[-2:] == (4, 6)
        _assert_close(patch, ref[f"extra.patch16.gil_n4_reshape_cls_norm.{i}.patch"])
        _assert_close(cls, ref[f"extra.patch16.gil_n4_reshape_cls_norm.{i}.cls"])


def test_final_norm_is_registered_twice_like_the_official_model(fixture):
    model = _model(fixture)
    assert model.norms[3] is model.norm
    keys = model.state_dict().keys()
    assert {"norm.weight", "norms.3.weight"} <= set(keys)


@torch.no_grad()
def test_layerscale_matters(fixture):
    """Dropping LayerScale (a plausible porting mistake) must break parity."""
    model = _model(fixture)
    for stage in model.stages:
        for block in stage:
            block.gamma = None
    assert (model(fixture["input"]) - fixture["outputs"]["forward"]).abs().max() > 1e-2
