"""Patch embedding of the DINOv3 ViT: timm's ``PatchEmbed`` (its ``proj`` convolution holds the weights, so
state dicts are those of the official model), computed as one matrix product over the patches.

A convolution whose stride equals its kernel is a matrix product over non-overlapping patches. Computed as
such, it runs on the GPU's matrix units: on an H200, cuDNN's bf16 convolution for ViT-L/16 patches took
3.2 ms per call for 0.1 TFLOP (~30 TFLOP/s, 2.5 % of a training step; ``benchmarks/RESULTS.md``), where a
matrix product of that size runs at several hundred TFLOP/s. It is also ~20 % faster on a CPU.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import PatchEmbed as _TimmPatchEmbed
from torch import Tensor

__all__ = ["PatchEmbed"]


class PatchEmbed(_TimmPatchEmbed):
    """Non-overlapping ``patch_size`` patches of [B, C, H, W] images to [B, H // p, W // p, E] embeddings
    (channels last). Rows and columns past the last whole patch are dropped, as the convolution does."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt="NHWC",
            strict_img_size=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch_size
        gh, gw = h // ph, w // pw
        patches = x[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        # [B, h, w, C * ph * pw] in the (C, ph, pw) order of the convolution weight [E, C, ph, pw]
        patches = patches.reshape(b, gh, gw, c * ph * pw)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)
