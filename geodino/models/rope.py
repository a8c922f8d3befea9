"""Axial 2-D rotary position embedding (RoPE) of the DINOv3 ViTs.

Matches ``dinov3/layers/rope_position_encoding.py`` of the official code: the periods are a
persistent buffer (checkpoints carry their own, bf16-rounded, values), coordinates are patch-cell
centres mapped to [-1, 1], angles are laid out ``[y | x]`` and tiled twice to the head dimension,
and q/k are rotated with the half-split ("rotate half") convention.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

RopeDType = Literal["fp32", "fp16", "bf16"]
NormalizeCoords = Literal["separate", "min", "max"]

ROPE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class RopePositionEmbedding(nn.Module):
    """Sin/cos tables of the axial RoPE for an ``H x W`` patch grid.

    Args:
        embed_dim: token width E.
        num_heads: attention heads; the head dimension D = E / num_heads must be a multiple of 4.
        base: period base (period_i = base ** (4 i / D)); exclusive with ``min_period``/``max_period``.
        min_period: smallest period of the log-spaced alternative.
        max_period: largest period of the log-spaced alternative.
        normalize_coords: divide row/column cell centres by their own axis length ("separate"),
            or both by the shorter ("min") or longer ("max") side.
        shift_coords: training only: add U(-s, s) to each axis.
        jitter_coords: training only: scale each axis by a log-uniform factor in [1/j, j].
        rescale_coords: training only: scale both axes by one log-uniform factor in [1/r, r].
        dtype: dtype of the periods buffer and of the rotation arithmetic.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: NormalizeCoords = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(f"RoPE needs embed_dim ({embed_dim}) divisible by 4 * num_heads ({num_heads})")
        both_periods = min_period is not None and max_period is not None
        if (base is None) == (not both_periods):
            raise ValueError("RoPE takes either `base` or both `min_period` and `max_period`, not both")
        if normalize_coords not in ("separate", "min", "max"):
            raise ValueError(f"normalize_coords must be 'separate', 'min' or 'max', not {normalize_coords!r}")
        self.base = base
        self.min_period = min_period
        self.max_period = max_period
        self.head_dim = embed_dim // num_heads
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        self.dtype = dtype
        self.register_buffer("periods", torch.empty(self.head_dim // 4, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the periods from ``base`` (or the min/max log-spacing), as the official init does."""
        n = self.head_dim // 4
        device = self.periods.device
        if self.base is not None:
            exponents = 2 * torch.arange(n, device=device, dtype=self.dtype) / (self.head_dim // 2)
            periods = self.base**exponents
        else:
            ratio = self.max_period / self.min_period
            periods = (
                ratio ** torch.linspace(0, 1, n, device=device, dtype=self.dtype) / ratio * self.max_period
            )
        self.periods.data = periods

    def _coords(self, height: int, width: int) -> Tensor:
        """Cell-centre coordinates in [-1, 1], [H*W, 2] as (y, x), row-major."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "separate":
            h_den, w_den = height, width
        else:
            h_den = w_den = max(height, width) if self.normalize_coords == "max" else min(height, width)
        coords_h = torch.arange(0.5, height, **dd) / h_den
        coords_w = torch.arange(0.5, width, **dd) / w_den
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if self.training:
            coords = self._augment(coords)
        return coords

    def _augment(self, coords: Tensor) -> Tensor:
        """Training-time shift, per-axis jitter and global rescale of the coordinates."""
        dd = {"device": coords.device, "dtype": coords.dtype}
        if self.shift_coords is not None:
            coords = coords + torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)
        if self.jitter_coords is not None:
            log_j = math.log(self.jitter_coords)
            coords = coords * torch.empty(2, **dd).uniform_(-log_j, log_j).exp()
        if self.rescale_coords is not None:
            log_r = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, **dd).uniform_(-log_r, log_r).exp()
        return coords

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        """Return ``(sin, cos)``, each [H*W, D], for a grid of H x W patches."""
        coords = self._coords(H, W)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [HW, 2, D/4]
        angles = angles.flatten(1, 2).tile(2)  # [HW, D]
        return torch.sin(angles), torch.cos(angles)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate the last ``sin.shape[-2]`` tokens of ``x`` [B, heads, N, D]; leading (prefix) tokens are kept.

    The official rotation ``x·cos + rotate_half(x)·sin`` with ``rotate_half([a, b]) = [-b, a]`` (halves of
    the head vector), written as one elementwise expression over all N tokens: ``x·cos' + [b, a]·sin'``,
    the sign of ``rotate_half`` moved into ``sin'`` (``(-b)·s`` and ``b·(-s)`` are the same number) and the
    tables padded with cos 1, sin 0 for the prefix tokens, which leaves them unchanged. The result is the
    official one bit for bit, without its two concatenations (each a buffer in compiled CPU code). As in
    the official code the tokens are cast to the dtype of ``sin`` / ``cos`` and the result back.
    """
    n_prefix = x.shape[-2] - sin.shape[-2]
    if n_prefix < 0:
        raise ValueError(f"RoPE table covers {sin.shape[-2]} tokens but the sequence has {x.shape[-2]}")
    half = x.shape[-1] // 2
    cos = torch.nn.functional.pad(cos, (0, 0, n_prefix, 0), value=1.0)  # [N, D]
    sin = torch.nn.functional.pad(torch.cat((-sin[:, :half], sin[:, half:]), -1), (0, 0, n_prefix, 0))
    y = x.to(sin.dtype)
    swapped = y.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # [a, b] -> [b, a]
    return (y * cos + swapped * sin).to(x.dtype)
