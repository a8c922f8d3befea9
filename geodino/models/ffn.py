"""Feed-forward layers of the DINOv3 ViTs, chosen by the official ``ffn_layer`` name.

"mlp" is timm's :class:`~timm.layers.Mlp` (same ``fc1``/``fc2`` keys, exact GELU). The SwiGLU of
DINOv3 is hand-written because timm's ``SwiGLU`` names its weights differently (``fc1_g``/``fc1_x``)
and does not round the hidden width up to the official alignment.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn


def swiglu_hidden_features(hidden_features: int, align_to: int) -> int:
    """Official SwiGLU width: int(2/3 * hidden), rounded up to a multiple of ``align_to``."""
    d = int(hidden_features * 2 / 3)
    return d + (-d % align_to)


class SwiGLUFFN(nn.Module):
    """out = w3(silu(w1 x) * w2 x), hidden width from :func:`swiglu_hidden_features`."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        bias: bool = True,
        align_to: int = 8,
        device=None,
    ) -> None:
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features, align_to)
        self.w1 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w2 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w3 = nn.Linear(hidden, in_features, bias=bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., E] -> [..., E]."""
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def _mlp(in_features: int, hidden_features: int, *, bias: bool = True, device=None) -> nn.Module:
    return Mlp(in_features, hidden_features, act_layer=nn.GELU, bias=bias).to(device)


FFN_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "swiglu": partial(SwiGLUFFN, align_to=8),
    "swiglu32": partial(SwiGLUFFN, align_to=32),
    "swiglu64": partial(SwiGLUFFN, align_to=64),
    "swiglu128": partial(SwiGLUFFN, align_to=128),
}


def make_ffn(name: str, dim: int, hidden_features: int, *, bias: bool = True, device=None) -> nn.Module:
    """Build the FFN called ``name`` ("mlp", "swiglu", "swiglu32", "swiglu64", "swiglu128")."""
    if name not in FFN_LAYERS:
        raise ValueError(f"unknown ffn_layer {name!r}; choose one of {sorted(FFN_LAYERS)}")
    return FFN_LAYERS[name](dim, hidden_features, bias=bias, device=device)
