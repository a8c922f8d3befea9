"""Pre-norm transformer block of the DINOv3 ViTs with LayerScale and sample-drop drop-path."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import LayerScale
from torch import Tensor, nn

from geodino.models.attention import SelfAttention
from geodino.models.ffn import make_ffn

Rope = tuple[Tensor, Tensor] | None


class SelfAttentionBlock(nn.Module):
    """x <- x + ls1(attn(norm1(x))); x <- x + ls2(ffn(norm2(x))).

    Drop-path is the official "sample drop": in training, each residual branch runs on a random
    subset of max(int(B (1 - p)), 1) samples and is added back scaled by B / subset (``index_add``),
    which saves the compute of the dropped samples instead of multiplying it by zero.

    Args:
        dim: token width E.
        num_heads: attention heads.
        ffn_ratio: FFN hidden width = int(E * ffn_ratio) (before SwiGLU rounding).
        norm_layer: constructor of a norm over the last dimension.
        ffn_layer: official FFN name, see :mod:`geodino.models.ffn`.
        layerscale_init: LayerScale init value; None or 0 disables LayerScale.
        drop_path: sample-drop rate p.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        ffn_layer: str = "mlp",
        layerscale_init: float | None = None,
        drop_path: float = 0.0,
        mask_k_bias: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SelfAttention(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, mask_k_bias=mask_k_bias, device=device
        )
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = make_ffn(ffn_layer, dim, int(dim * ffn_ratio), bias=ffn_bias, device=device)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.sample_drop_ratio = drop_path

    def _attn_branch(self, x: Tensor, rope: Rope) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), rope=rope))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward_one(self, x: Tensor, rope: Rope) -> Tensor:
        if not (self.training and self.sample_drop_ratio > 0.0):
            x = x + self._attn_branch(x, rope)
            return x + self._ffn_branch(x)
        b = x.shape[0]
        subset = max(int(b * (1 - self.sample_drop_ratio)), 1)
        scale = b / subset
        idx = torch.randperm(b, device=x.device)[:subset]
        x = torch.index_add(x, 0, idx, self._attn_branch(x[idx], rope), alpha=scale)
        idx = torch.randperm(b, device=x.device)[:subset]
        return torch.index_add(x, 0, idx, self._ffn_branch(x[idx]), alpha=scale)

    def forward(self, x: Tensor | list[Tensor], rope: Rope | list[Rope] = None) -> Tensor | list[Tensor]:
        """x: [B, N, E] or a list of such tensors (one per crop size), each with its own RoPE table."""
        if isinstance(x, Tensor):
            return self._forward_one(x, rope)
        ropes = rope if rope is not None else [None] * len(x)
        return [self._forward_one(t, r) for t, r in zip(x, ropes, strict=True)]
