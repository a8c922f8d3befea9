"""Multi-head self-attention of the DINOv3 ViTs: fused qkv, optional K-masked bias, RoPE, SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geodino.models.rope import apply_rope

Rope = tuple[Tensor, Tensor] | None


def cat_tokens(xs: list[Tensor]) -> Tensor:
    """The tokens of several crops as one [sum of B·N, E] tensor (a view for a single crop), so that per-token
    ops (norms, linear layers, LayerScale) run once over all crops, as the official list forward does."""
    return xs[0].flatten(0, -2) if len(xs) == 1 else torch.cat([x.flatten(0, -2) for x in xs])


def split_tokens(tokens: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Inverse of :func:`cat_tokens`: views of ``tokens`` [sum of B·N, E'] as [B, N, E'], one per crop."""
    parts = tokens.split([x.shape[:-1].numel() for x in like])
    return [part.reshape(*x.shape[:-1], tokens.shape[-1]) for part, x in zip(parts, like, strict=True)]


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

    def forward(self, x: Tensor | list[Tensor], rope: Rope | list[Rope] = None) -> Tensor | list[Tensor]:
        """x: [B, N, E], or a list of such tensors (crops of different sizes); rope: (sin, cos), each
        [N_patches, head_dim], or one per crop. Returns the same structure. The qkv and output projections
        run once over the tokens of all crops, attention per crop with its own RoPE table."""
        xs, ropes = (
            (x, rope if rope is not None else [None] * len(x)) if isinstance(x, list) else ([x], [rope])
        )
        qkv = split_tokens(self.qkv(cat_tokens(xs)), xs)
        attended = [self._attend(t, r) for t, r in zip(qkv, ropes, strict=True)]
        out = split_tokens(self.proj(cat_tokens(attended)), xs)
        return out if isinstance(x, list) else out[0]

    def _attend(self, qkv: Tensor, rope: Rope) -> Tensor:
        """Scaled dot-product attention of one crop: qkv [B, N, 3E] -> [B, N, E]."""
        b, n, e3 = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, e3 // (3 * self.num_heads)).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, e3 // 3)
