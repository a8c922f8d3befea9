"""ViT options that the shared fixture does not exercise, checked against first principles."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from geodino.models import build_dinov3
from geodino.models.block import SelfAttentionBlock
from geodino.models.ffn import SwiGLUFFN
from geodino.models.patch_embed import PatchEmbed
from geodino.models.rope import ROPE_DTYPES, RopePositionEmbedding, apply_rope

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4, "layerscale_init": 1e-5, "n_storage_tokens": 2}


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial LayerScale/norm values so every parameter affects the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "weight")) and p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(("bands", "height", "width"), [(3, 64, 48), (4, 37, 50)])
def test_patch_embedding_equals_the_strided_convolution(bands: int, height: int, width: int) -> None:
    """The matrix-product patch embedding gives the convolution's output and gradients, also for band counts
    other than 3 and image sides that are not multiples of the patch (the remainder is dropped)."""
    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=16, in_chans=bands, embed_dim=32).double()
    x = torch.randn(2, bands, height, width, dtype=torch.float64, requires_grad=True)
    out = embed(x)
    expected = nn.functional.conv2d(x, embed.proj.weight, embed.proj.bias, stride=16).permute(0, 2, 3, 1)
    assert out.shape == (2, height // 16, width // 16, 32)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), [x, embed.proj.weight, embed.proj.bias])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, embed.proj.weight, embed.proj.bias])
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_rope_periods_and_coordinates_follow_the_official_formulas():
    rope = RopePositionEmbedding(64, num_heads=4, base=100.0)  # head dim 16 -> 4 periods
    expected = torch.tensor([100 ** (2 * i / 8) for i in range(4)])
    torch.testing.assert_close(rope.periods, expected)
    sin, cos = rope(H=2, W=3)
    # patch (row 1, col 2): y = 2 * 1.5 / 2 - 1 = 0.5, x = 2 * 2.5 / 3 - 1 = 2/3; layout [y | x] tiled twice
    y, x = 0.5, 2 / 3
    angles = [2 * math.pi * y / p for p in expected] + [2 * math.pi * x / p for p in expected]
    torch.testing.assert_close(sin[5], torch.tensor(angles * 2).sin())
    torch.testing.assert_close(cos[0, :4], (2 * math.pi * -0.5 / expected).cos())


def test_rope_min_max_periods_and_normalisation_modes():
    rope = RopePositionEmbedding(
        64, num_heads=4, base=None, min_period=0.5, max_period=50.0, normalize_coords="max"
    )
    torch.testing.assert_close(rope.periods, torch.logspace(math.log10(0.5), math.log10(50.0), 4))
    sin_max, _ = rope(H=2, W=4)
    rope.normalize_coords = "min"
    sin_min, _ = rope(H=2, W=4)
    assert not torch.allclose(sin_max, sin_min)
    with pytest.raises(ValueError, match="either"):
        RopePositionEmbedding(64, num_heads=4, base=100.0, min_period=0.5, max_period=50.0)


def test_rope_augmentations_only_in_training():
    rope = RopePositionEmbedding(64, num_heads=4, rescale_coords=2.0, shift_coords=0.1, jitter_coords=1.5)
    eval_a, eval_b = rope.eval()(H=4, W=4), rope(H=4, W=4)
    torch.testing.assert_close(eval_a, eval_b)
    train_a, train_b = rope.train()(H=4, W=4), rope(H=4, W=4)
    assert not torch.allclose(train_a[0], train_b[0])


def official_apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """``dinov3/layers/attention.py``: cast to the RoPE dtype, rotate the patch tokens with the half-split
    ``rotate_half``, concatenate the prefix tokens back, cast back."""

    def rotate_half(t: Tensor) -> Tensor:
        a, b = t.chunk(2, dim=-1)
        return torch.cat((-b, a), dim=-1)

    n_prefix = x.shape[-2] - sin.shape[-2]
    y = x.to(sin.dtype)
    prefix, patches = y[..., :n_prefix, :], y[..., n_prefix:, :]
    return torch.cat((prefix, patches * cos + rotate_half(patches) * sin), dim=-2).to(x.dtype)


@pytest.mark.parametrize(
    ("x_dtype", "rope_dtype"),
    [(torch.float32, "fp32"), (torch.bfloat16, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")],
)
def test_apply_rope_is_the_official_rotation_bit_for_bit(x_dtype: torch.dtype, rope_dtype: str) -> None:
    rope = RopePositionEmbedding(64, num_heads=4, dtype=ROPE_DTYPES[rope_dtype], rescale_coords=2.0).train()
    sin, cos = rope(H=5, W=3)
    x = (10 * torch.randn(2, 4, 5 + 15, 16)).to(x_dtype)  # 5 prefix tokens, 15 patches
    got = apply_rope(x, sin, cos)
    assert got.dtype == x_dtype
    assert torch.equal(got, official_apply_rope(x, sin, cos))
    assert torch.equal(got[..., :5, :], x[..., :5, :])  # prefix tokens unchanged
    # the half-split convention: at a quarter turn, [0, 1, 2, 3] -> rotate_half = [-2, -3, 0, 1]
    quarter = torch.full((1, 4), math.pi / 2)
    turned = apply_rope(torch.arange(4.0).reshape(1, 1, 1, 4), quarter.sin(), quarter.cos())
    torch.testing.assert_close(turned.flatten(), torch.tensor([-2.0, -3.0, 0.0, 1.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("embed_dim", "ratio", "align", "hidden"),
    [(384, 6, 8, 1536), (1024, 6, 8, 4096), (1280, 6, 8, 5120), (4096, 3, 64, 8192), (100, 4, 32, 288)],
)
def test_swiglu_hidden_width_matches_the_released_models(embed_dim, ratio, align, hidden):
    ffn = SwiGLUFFN(embed_dim, int(embed_dim * ratio), align_to=align)
    assert ffn.w1.out_features == ffn.w2.out_features == ffn.w3.in_features == hidden


def test_swiglu_forward():
    ffn = SwiGLUFFN(8, 16, align_to=8)
    x = torch.randn(3, 8)
    expected = ffn.w3(torch.nn.functional.silu(ffn.w1(x)) * ffn.w2(x))
    torch.testing.assert_close(ffn(x), expected)


def test_no_qkv_bias_has_no_bias_mask_and_7b_style_options_build():
    model = build_dinov3(**TINY, qkv_bias=False, mask_k_bias=True, ffn_layer="swiglu64", ffn_ratio=3)
    keys = model.state_dict().keys()
    assert not any("qkv.bias" in k for k in keys)
    assert "blocks.0.mlp.w3.weight" in keys
    out = model.eval()(torch.randn(1, 3, 32, 48))
    assert out.shape == (1, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "eps"), [("layernorm", 1e-6), ("layernormbf16", 1e-5)])
def test_norm_layer_names_map_to_the_official_eps(name, eps):
    model = build_dinov3(**TINY, norm_layer=name)
    assert model.norm.eps == eps and model.blocks[0].norm1.eps == eps


def test_rmsnorm_option_has_weight_only():
    model = build_dinov3(**TINY, norm_layer="rmsnorm")
    assert isinstance(model.norm, nn.RMSNorm) and "norm.bias" not in model.state_dict()


def test_local_cls_norm_only_for_second_list_entry_in_training():
    model = _randomise(build_dinov3(**TINY, untie_global_and_local_cls_norm=True))
    global_crop, local_crop = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)
    model.train()
    model.rope_embed.eval()
    with torch.no_grad():
        g, loc = model.forward_features([global_crop, local_crop])
        prenorm = loc["x_prenorm"]
        torch.testing.assert_close(loc["x_norm_clstoken"], model.local_cls_norm(prenorm[:, 0]))
        torch.testing.assert_close(loc["x_norm_patchtokens"], model.norm(prenorm[:, 3:]))
        torch.testing.assert_close(g["x_norm_clstoken"], model.norm(g["x_prenorm"][:, 0]))
        model.eval()
        loc_eval = model.forward_features([global_crop, local_crop])[1]
        torch.testing.assert_close(loc_eval["x_norm_clstoken"], model.norm(loc_eval["x_prenorm"][:, 0]))


def test_untied_cls_and_patch_norms():
    model = _randomise(build_dinov3(**TINY, untie_cls_and_patch_norms=True)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_features(x)
        torch.testing.assert_close(out["x_storage_tokens"], model.cls_norm(out["x_prenorm"][:, 1:3]))
        ((_, cls),) = model.get_intermediate_layers(x, return_class_token=True)
        torch.testing.assert_close(cls, out["x_norm_clstoken"])


def test_sample_drop_drop_path_matches_its_definition():
    torch.manual_seed(0)
    block = _randomise(SelfAttentionBlock(32, 4, layerscale_init=0.5, drop_path=0.5)).train()
    x = torch.randn(6, 5, 32)
    torch.manual_seed(1)
    out = block(x)
    torch.manual_seed(1)
    idx1 = torch.randperm(6)[:3]
    expected = x.clone()
    expected[idx1] += 2.0 * block.ls1(block.attn(block.norm1(x[idx1])))
    idx2 = torch.randperm(6)[:3]
    expected[idx2] += 2.0 * block.ls2(block.mlp(block.norm2(expected[idx2])))
    torch.testing.assert_close(out, expected)
    untouched = sorted(set(range(6)) - set(idx1.tolist()) - set(idx2.tolist()))
    torch.testing.assert_close(out[untouched], x[untouched])


def test_crop_list_runs_per_token_ops_together_and_matches_each_crop_alone():
    """A list of crops of different sizes (as the student's global and local crops) goes through one block
    call: without drop-path it equals each crop run alone; with drop-path each residual branch runs on a
    per-crop subset (the attention subsets of every crop drawn first, then the FFN subsets), as the official
    list forward."""
    torch.manual_seed(0)
    block = _randomise(SelfAttentionBlock(32, 4, layerscale_init=0.5, drop_path=0.5))
    crops = [torch.randn(6, 5, 32), torch.randn(4, 3, 32)]
    ropes = [(torch.randn(4, 8), torch.randn(4, 8)), (torch.randn(2, 8), torch.randn(2, 8))]
    block.eval()
    together = block(crops, ropes)
    for out, x, rope in zip(together, crops, ropes, strict=True):
        torch.testing.assert_close(out, block(x, rope))
    block.train()
    torch.manual_seed(1)
    together = block(crops, ropes)
    torch.manual_seed(1)
    attn_subsets = [torch.randperm(6)[:3], torch.randperm(4)[:2]]
    expected = [x.clone() for x in crops]
    for x, e, idx, rope in zip(crops, expected, attn_subsets, ropes, strict=True):
        e[idx] += 2.0 * block.ls1(block.attn(block.norm1(x[idx]), rope))
    ffn_subsets = [torch.randperm(6)[:3], torch.randperm(4)[:2]]
    for e, idx in zip(expected, ffn_subsets, strict=True):
        e[idx] += 2.0 * block.ls2(block.mlp(block.norm2(e[idx].clone())))
    for out, e in zip(together, expected, strict=True):
        torch.testing.assert_close(out, e)


def test_intermediate_layers_validate_indices_and_keep_block_order():
    model = build_dinov3(**TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        by_index = model.get_intermediate_layers(x, n=[1, 0], norm=False)
        last_two = model.get_intermediate_layers(x, n=2, norm=False)
    for a, b in zip(by_index, last_two, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[2])


def test_bf16_rope_dtype_rounds_like_the_training_build():
    fp32 = _randomise(build_dinov3(**TINY, pos_embed_rope_dtype="fp32")).eval()
    bf16 = build_dinov3(**TINY, pos_embed_rope_dtype="bf16").eval()
    bf16.load_state_dict(fp32.state_dict())
    assert bf16.rope_embed.periods.dtype == torch.bfloat16
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        diff = (fp32(x) - bf16(x)).abs().max()
    assert 0 < diff < 0.1


def test_unknown_options_raise():
    with pytest.raises(TypeError):
        build_dinov3(**TINY, ffn_layr="mlp")
    with pytest.raises(ValueError, match="ffn_layer"):
        build_dinov3(**TINY, ffn_layer="geglu")
    with pytest.raises(ValueError, match="norm_layer"):
        build_dinov3(**TINY, norm_layer="batchnorm")
