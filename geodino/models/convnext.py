"""The distilled DINOv3 ConvNeXt backbones, state-dict compatible with the official ``ConvNeXt``.

timm has a ConvNeXt, but its keys (``stem``, ``stages.i.downsample``, ``conv_dw``, ``mlp.fc1``) and
outputs (no pooled "CLS" token, no ``get_intermediate_layers``) differ from the official class, so the
layout is written out here to load official checkpoints strictly; :mod:`geodino.models.checkpoint`
maps timm's keys onto it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

FeatureDict = dict[str, Tensor | None]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (official ``data_format="channels_first"``)."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """x + gamma * pwconv2(GELU(pwconv1(LN(dwconv7x7(x))))), norm and Linears channels-last."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(torch.full((dim,), layer_scale_init_value)) if layer_scale_init_value > 0 else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """DINOv3 ConvNeXt: 4 stages at strides 4, 8, 16, 32; the pooled stage-3 map plays the CLS token.

    Args:
        in_chans: input bands.
        depths: blocks per stage.
        dims: channels per stage.
        drop_path_rate: stochastic depth, ramped linearly over all blocks.
        layer_scale_init_value: LayerScale init (0 disables it).
        patch_size: if set, ``get_intermediate_layers`` resizes every stage map to (H/p, W/p)
            (bilinear, antialiased), giving ViT-like patch grids.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 stages, got depths={list(depths)} dims={list(dims)}")
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6)
                )
            ]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)
                )
            )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(
                nn.Sequential(
                    *(ConvNeXtBlock(dims[i], rates[start + j], layer_scale_init_value) for j in range(depth))
                )
            )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        # official quirk kept for strict loading: stage norms for get_intermediate_layers, the last one
        # *is* ``norm`` (so the state dict carries both ``norm.*`` and ``norms.3.*``)
        self.norms = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Identity(), self.norm])
        self.head = nn.Identity()
        self.embed_dim = self.num_features = dims[-1]
        self.embed_dims = list(dims)
        self.n_blocks = 4
        self.n_storage_tokens = 0
        self.patch_size = patch_size
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: truncated-normal 0.02 conv/Linear weights, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def _stage(self, x: Tensor, i: int) -> Tensor:
        return self.stages[i](self.downsample_layers[i](x))

    def forward_features_list(
        self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None]
    ) -> list[FeatureDict]:
        out = []
        for x, masks in zip(x_list, masks_list, strict=True):
            for i in range(4):
                x = self._stage(x, i)
            pooled = x.mean((-2, -1))
            tokens = x.flatten(2).transpose(1, 2)
            x_norm = self.norm(torch.cat([pooled.unsqueeze(1), tokens], dim=1))
            out.append(
                {
                    "x_norm_clstoken": x_norm[:, 0],
                    "x_storage_tokens": x_norm[:, 1:1],
                    "x_norm_patchtokens": x_norm[:, 1:],
                    "x_prenorm": tokens,  # patch tokens only, unlike the ViT (official behaviour)
                    "masks": masks,
                }
            )
        return out

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> FeatureDict | list[FeatureDict]:
        """ViT-like dicts: pooled 'CLS' [B, C], no storage tokens, stage-3 tokens [B, h*w, C]."""
        if isinstance(x, Tensor):
            return self.forward_features_list([x], [masks])[0]
        return self.forward_features_list(x, masks if masks is not None else [None] * len(x))

    def get_intermediate_layers(
        self,
        x: Tensor,
        *,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Per-stage features: the last ``n`` stages (int) or these stage indices (list).

        Patches are [B, C_i, h_i, w_i] with ``reshape`` (or with ``norm=False``, the official quirk)
        and [B, h_i*w_i, C_i] otherwise; the pooled vector [B, C_i] is the spatial mean of the raw
        stage output, taken before any ``patch_size`` resize.
        """
        take = list(range(4 - n, 4)) if isinstance(n, int) else list(n)
        if not take or any(not 0 <= i < 4 for i in take):
            raise ValueError(f"ConvNeXt has stages 0..3, got n={n!r}")
        height, width = x.shape[-2:]
        outputs = []
        for i in range(max(take) + 1):
            x = self._stage(x, i)
            if i in take:
                patches = x
                if self.patch_size is not None:
                    size = (height // self.patch_size, width // self.patch_size)
                    patches = F.interpolate(x, size=size, mode="bilinear", antialias=True)
                outputs.append((i, x.mean((-2, -1)), patches))
        results = []
        for i, pooled, patches in outputs:
            b, c, h, w = patches.shape
            if norm:
                stage_norm = self.norms[i]
                pooled = stage_norm(pooled)
                patches = stage_norm(patches.flatten(2).transpose(1, 2))
                if reshape:
                    patches = patches.transpose(1, 2).reshape(b, c, h, w).contiguous()
            elif not reshape:
                patches = patches.flatten(2).transpose(1, 2)
            results.append((patches, pooled) if return_class_token else patches)
        return tuple(results)

    def forward(
        self, *args: Any, is_training: bool = False, **kwargs: Any
    ) -> Tensor | FeatureDict | list[FeatureDict]:
        """The normalised pooled embedding [B, C], or the feature dict(s) with ``is_training``."""
        features = self.forward_features(*args, **kwargs)
        return features if is_training else self.head(features["x_norm_clstoken"])


def build_convnext(**kwargs: Any) -> ConvNeXt:
    """Build a DINOv3 ConvNeXt from the official constructor keywords."""
    return ConvNeXt(**kwargs)
