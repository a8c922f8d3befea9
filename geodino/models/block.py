"""Pre-norm transformer block of the DINOv3 ViTs with LayerScale and sample-drop drop-path."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import LayerScale
from torch import Tensor, nn

from geodino.models.attention import Rope, SelfAttention, cat_tokens, split_tokens
from geodino.models.ffn import make_ffn


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

    def _attn_branch(self, xs: list[Tensor], ropes: list[Rope]) -> list[Tensor]:
        """LayerScale(attention(norm1(x))) per crop; the norm runs once over the tokens of all crops."""
        return [self.ls1(t) for t in self.attn(split_tokens(self.norm1(cat_tokens(xs)), xs), ropes)]

    def _ffn_branch(self, xs: list[Tensor]) -> list[Tensor]:
        """LayerScale(FFN(norm2(x))) per crop, computed once over the tokens of all crops."""
        return split_tokens(self.ls2(self.mlp(self.norm2(cat_tokens(xs)))), xs)

    def _add_branch(self, xs: list[Tensor], branch: Callable[[list[Tensor]], list[Tensor]]) -> list[Tensor]:
        """x + branch(x) for every crop. In training with drop-path the branch runs on a random subset of
        max(int(B (1 - p)), 1) samples of each crop (subsets drawn crop by crop), added back scaled by
        B / subset."""
        if not (self.training and self.sample_drop_ratio > 0.0):
            return [x + r for x, r in zip(xs, branch(xs), strict=True)]
        kept = [
            torch.randperm(x.shape[0], device=x.device)[
                : max(int(x.shape[0] * (1 - self.sample_drop_ratio)), 1)
            ]
            for x in xs
        ]
        out = branch([x[i] for x, i in zip(xs, kept, strict=True)])
        return [
            torch.index_add(x, 0, i, r, alpha=x.shape[0] / i.shape[0])
            for x, i, r in zip(xs, kept, out, strict=True)
        ]

    def forward(self, x: Tensor | list[Tensor], rope: Rope | list[Rope] = None) -> Tensor | list[Tensor]:
        """x: [B, N, E] or a list of such tensors (one per crop size), each with its own RoPE table.

        As the official list forward, the tokens of all crops are concatenated for the per-token ops
        (norms, qkv and output projections, FFN, LayerScale) and attention runs per crop: one kernel per
        op over every crop instead of one per crop.
        """
        xs, ropes = (
            (x, rope if rope is not None else [None] * len(x)) if isinstance(x, list) else ([x], [rope])
        )
        xs = self._add_branch(xs, lambda t: self._attn_branch(t, ropes))
        xs = self._add_branch(xs, self._ffn_branch)
        return xs if isinstance(x, list) else xs[0]
