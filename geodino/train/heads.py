"""Projection heads of DINOv3 self-supervised training (``dinov3/layers/dino_head.py``).

The same class serves as DINO head (on the CLS token) and iBOT head (on masked patch tokens); only the
sizes differ. Parameter names follow the official module (``mlp.0``, ``mlp.2``, ``mlp.4``, ``last_layer``),
so heads stored in official training checkpoints load with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """MLP, L2 normalisation, then a bias-free linear layer onto ``out_dim`` prototypes.

    With ``nlayers`` = n ≥ 2 the MLP is Linear(in, hidden) → GELU → (Linear(hidden, hidden) → GELU) × (n − 2)
    → Linear(hidden, bottleneck); with ``nlayers`` = 1 it is a single Linear(in, bottleneck) stored as
    ``mlp`` itself, as in the official ``_build_mlp``. Unlike DINOv2, ``last_layer`` has no weight
    normalisation. All Linear weights (``last_layer`` included) are truncated-normal with std 0.02, biases 0.

    Official sizes (``out_dim`` / ``bottleneck_dim`` / ``hidden_dim``): 65536 / 256 / 2048 for both heads
    in the default and ViT-L ImageNet configs (the defaults here); 7B and distillation configs use
    262144 / 512 / 8192 for the DINO head and 98304 / 384 / 4096 for the iBOT head.

    Args:
        in_dim: Input width E (the backbone ``embed_dim``).
        out_dim: Number of prototypes K.
        nlayers: Number of Linear layers in the MLP (≥ 1).
        hidden_dim: Width of the hidden MLP layers.
        bottleneck_dim: Width of the normalised bottleneck fed to ``last_layer``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        self.mlp = _build_mlp(nlayers, in_dim, hidden_dim, bottleneck_dim)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation: truncated-normal (std 0.02) weights, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Prototype logits.

        Args:
            x: Features [..., E] (CLS tokens [N, E] or gathered patch tokens [M, E]).

        Returns:
            Logits [..., K]; each row is ``last_layer`` applied to a unit-norm bottleneck vector.
        """
        x = self.mlp(x)
        # the official eps: 1e-12 in float32/bfloat16, 1e-6 in float16 where 1e-12 underflows
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def _build_mlp(nlayers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int) -> nn.Module:
    """The head MLP with the official module layout (Linear/GELU alternating in one Sequential)."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)
