"""Multi-head self-attention of the DINOv3 ViTs: fused qkv, optional K-masked bias, RoPE, SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geodino.models.rope import apply_rope


class LinearKMaskedBias(nn.Linear):
    """Fused qkv projection whose bias is multiplied by a persistent ``bias_mask`` buffer.

    The official mask is 1 over the q and v thirds and 0 over the k third, so the effective K bias
    is zero whatever the stored bias holds. Because RoPE rotates k, a K bias is not softmax-invariant:
    the mask changes outputs and must be loaded with the checkpoint.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        if out_features % 3 != 0:
            raise ValueError(f"a fused qkv projection needs out_features divisible by 3, got {out_features}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.full_like(self.bias, float("nan")))

    def reset_bias_mask(self) -> None:
        """Set the official pattern: ones for q and v, zeros for k."""
        if self.bias is not None:
            third = self.out_features // 3
            mask = torch.ones_like(self.bias_mask)
            mask[third : 2 * third] = 0
            self.bias_mask.copy_(mask)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias * self.bias_mask.to(self.bias.dtype)
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    """Softmax attention with scale 1/sqrt(head_dim); RoPE on the patch tokens only.

    Args:
        dim: token width E.
        num_heads: number of heads; head_dim = E / num_heads.
        qkv_bias: bias on the fused qkv projection.
        proj_bias: bias on the output projection.
        mask_k_bias: use :class:`LinearKMaskedBias` for qkv (official ``mask_k_bias``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        mask_k_bias: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        linear = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear(dim, 3 * dim, bias=qkv_bias, device=device)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: [B, N, E]; rope: (sin, cos), each [N_patches, head_dim]. Returns [B, N, E]."""
        b, n, e = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, e // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, e))
