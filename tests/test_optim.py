"""Schedules and AdamW parameter groups against the official definitions written out independently."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from geodino.models import build_backbone
from geodino.train.param_groups import layer_id, param_groups
from geodino.train.schedules import Schedule


def official_linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine=None):
    """dinov3/train/cosine_lr_scheduler.py (schedules v2), as the official code builds the array."""
    linear = np.linspace(start, peak, warmup, endpoint=False)
    cosine = total - warmup if cosine is None else cosine
    cos = end + 0.5 * (peak - end) * (1 + np.cos(np.linspace(0, np.pi, cosine)))
    constant = np.full(total - warmup - cosine, end)
    return np.concatenate([linear, cos, constant])


@pytest.mark.parametrize(
    ("start", "peak", "end", "warmup", "total", "cosine"),
    [
        (0.0, 4e-4, 4e-4, 100, 400, 0),
        (0.0, 1e-3, 1e-6, 10, 100, None),
        (0.04, 0.07, 0.07, 30, 50, 0),
        (0.5, 1.0, 0.2, 0, 20, 15),
    ],
)
def test_schedule_matches_official_array(start, peak, end, warmup, total, cosine):
    expected = official_linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine)
    s = Schedule(
        peak=peak, start=start, end=end, warmup=warmup, cosine=total - warmup if cosine is None else cosine
    )
    np.testing.assert_allclose([s(i) for i in range(total)], expected, rtol=1e-12, atol=1e-15)


def test_schedule_offset_holds_start_then_ramps():
    s = Schedule(peak=2.0, start=0.0, warmup=0, cosine=0, offset=5)
    assert [s(i) for i in (0, 4, 5, 100)] == [0.0, 0.0, 2.0, 2.0]
    ramp = Schedule(peak=2.0, start=0.0, end=2.0, warmup=4, offset=10)
    assert [ramp(i) for i in (9, 10, 12, 14)] == [0.0, 0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match=">= 0"):
        Schedule(peak=1.0, warmup=-1)


def test_layer_ids_follow_official_rule():
    assert layer_id("patch_embed.proj.weight", 12) == 0
    assert layer_id("cls_token", 12) == 0
    assert layer_id("storage_tokens", 12) == 0
    assert layer_id("mask_token", 12) == 0
    assert layer_id("blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("norm.weight", 12) == 13
    assert layer_id("mlp.0.weight", 12) == 13


def test_param_groups_multipliers_and_weight_decay():
    vit = build_backbone("dinov3_vits16.lvd1689m", depth=3)
    head = nn.ModuleDict({"mlp": nn.Linear(4, 4), "last_layer": nn.Linear(4, 8, bias=False)})
    groups = param_groups(
        [("backbone", vit), ("dino_head", head)], n_blocks=3, layer_decay=0.9, patch_embed_lr_mult=0.2
    )
    by_name = {n: g for g in groups for n in g["names"]}
    params = dict(vit.named_parameters())
    # every trainable parameter appears exactly once
    assert sum(len(g["params"]) for g in groups) == len(params) + 3
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.9**4 * 0.2)
    assert by_name["backbone.cls_token"]["lr_multiplier"] == pytest.approx(0.9**4)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9**3)
    assert by_name["backbone.blocks.2.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9**1)
    assert by_name["backbone.norm.weight"]["lr_multiplier"] == 1.0
    assert by_name["dino_head.mlp.weight"]["lr_multiplier"] == 1.0
    # weight decay: off for biases, norms and LayerScale gamma; on for tokens and weights
    assert by_name["backbone.blocks.1.attn.qkv.bias"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.1.norm1.weight"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.1.ls1.gamma"]["wd_multiplier"] == 0.0
    assert by_name["backbone.cls_token"]["wd_multiplier"] == 1.0
    assert by_name["backbone.storage_tokens"]["wd_multiplier"] == 1.0
    assert by_name["backbone.blocks.1.mlp.fc1.weight"]["wd_multiplier"] == 1.0
    assert by_name["dino_head.last_layer.weight"]["is_last_layer"]
    assert not by_name["dino_head.mlp.weight"]["is_last_layer"]
    # groups are fused by their multipliers
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
