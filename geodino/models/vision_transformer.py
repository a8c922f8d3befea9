"""The DINOv3 vision transformer, state-dict compatible with the official ``DinoVisionTransformer``.

Token sequence: [CLS, n storage (register) tokens, patches in row-major order]; no absolute position
embedding, axial RoPE on the patch tokens in every block; final LayerNorm, optionally untied for
CLS/storage tokens (``cls_norm``) or for local crops in training (``local_cls_norm``, SAT models).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from geodino.models.attention import LinearKMaskedBias
from geodino.models.block import SelfAttentionBlock
from geodino.models.patch_embed import PatchEmbed
from geodino.models.rope import ROPE_DTYPES, RopePositionEmbedding

NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "layernorm": partial(nn.LayerNorm, eps=1e-6),
    "layernormbf16": partial(nn.LayerNorm, eps=1e-5),  # the name is historical: eps 1e-5, float math
    "rmsnorm": partial(nn.RMSNorm, eps=1e-5),
}

FeatureDict = dict[str, Tensor | None]


class DinoVisionTransformer(nn.Module):
    """DINOv3 ViT backbone taking the official constructor keywords (see :func:`build_dinov3`).

    Inputs are [B, C, H, W] images in the normalised space of the weights; H and W should be
    multiples of ``patch_size`` (the patch embedding truncates the remainder, as the official
    model does). Outputs follow the official dictionaries and tuples exactly.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        pos_embed_rope_base: float | None = 100.0,
        pos_embed_rope_min_period: float | None = None,
        pos_embed_rope_max_period: float | None = None,
        pos_embed_rope_normalize_coords: str = "separate",
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = None,
        pos_embed_rope_dtype: str = "bf16",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = None,
        norm_layer: str = "layernorm",
        ffn_layer: str = "mlp",
        ffn_bias: bool = True,
        proj_bias: bool = True,
        n_storage_tokens: int = 0,
        mask_k_bias: bool = False,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if norm_layer not in NORM_LAYERS:
            raise ValueError(f"unknown norm_layer {norm_layer!r}; choose one of {sorted(NORM_LAYERS)}")
        if pos_embed_rope_dtype not in ROPE_DTYPES:
            raise ValueError(
                f"unknown pos_embed_rope_dtype {pos_embed_rope_dtype!r}; choose {sorted(ROPE_DTYPES)}"
            )
        norm = NORM_LAYERS[norm_layer]
        self.embed_dim = self.num_features = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.n_storage_tokens = n_storage_tokens
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim).to(device)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, device=device))
        if n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.empty(1, n_storage_tokens, embed_dim, device=device))
        self.rope_embed = RopePositionEmbedding(
            embed_dim,
            num_heads=num_heads,
            base=pos_embed_rope_base,
            min_period=pos_embed_rope_min_period,
            max_period=pos_embed_rope_max_period,
            normalize_coords=pos_embed_rope_normalize_coords,
            shift_coords=pos_embed_rope_shift_coords,
            jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords,
            dtype=ROPE_DTYPES[pos_embed_rope_dtype],
            device=device,
        )
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                embed_dim,
                num_heads,
                ffn_ratio=ffn_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                norm_layer=norm,
                ffn_layer=ffn_layer,
                layerscale_init=layerscale_init,
                drop_path=drop_path_rate,
                mask_k_bias=mask_k_bias,
                device=device,
            )
            for _ in range(depth)
        )
        self.norm = norm(embed_dim)
        self.cls_norm = norm(embed_dim) if untie_cls_and_patch_norms else None
        self.local_cls_norm = norm(embed_dim) if untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim, device=device))
        self.to(device)
        self.init_weights()

    @property
    def n_prefix_tokens(self) -> int:
        """CLS plus storage tokens in front of the patch tokens."""
        return 1 + self.n_storage_tokens

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation (truncated-normal Linear weights, LayerScale, RoPE periods, K mask)."""
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens > 0:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.rope_embed.reset_parameters()
        bound = 1 / math.sqrt(self.patch_embed.proj.in_channels * self.patch_size**2)
        nn.init.uniform_(self.patch_embed.proj.weight, -bound, bound)
        nn.init.uniform_(self.patch_embed.proj.bias, -bound, bound)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            if isinstance(module, LinearKMaskedBias):
                module.reset_bias_mask()
            if isinstance(module, nn.LayerNorm | nn.RMSNorm):
                module.reset_parameters()
            if hasattr(module, "gamma") and isinstance(module.gamma, nn.Parameter):
                module.gamma.fill_(module.init_values)

    def prepare_tokens_with_masks(
        self, x: Tensor, masks: Tensor | None = None
    ) -> tuple[Tensor, tuple[int, int]]:
        """Embed [B, C, H, W] into [B, 1 + n_storage + h*w, E]; masked patches take ``mask_token``.

        Args:
            x: images [B, C, H, W].
            masks: bool [B, h*w], True where a patch embedding is replaced (iBOT masking).

        Returns:
            The token sequence and the patch grid (h, w).
        """
        x = self.patch_embed(x)
        b, h, w, _ = x.shape
        x = x.flatten(1, 2)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            cls_token = self.cls_token + 0 * self.mask_token  # keeps mask_token in the graph (DDP)
        prefix = [cls_token.expand(b, -1, -1)]
        if self.n_storage_tokens > 0:
            prefix.append(self.storage_tokens.expand(b, -1, -1))
        return torch.cat([*prefix, x], dim=1), (h, w)

    def _final_norm(self, x: Tensor, crop_index: int) -> tuple[Tensor, Tensor]:
        """Normalise [B, N, E] into (CLS+storage [B, 1+n, E], patches [B, h*w, E])."""
        p = self.n_prefix_tokens
        if self.local_cls_norm is not None and self.training and crop_index == 1:
            prefix_norm = self.local_cls_norm  # the second list entry holds the local crops
        elif self.cls_norm is not None:
            prefix_norm = self.cls_norm
        else:
            x_norm = self.norm(x)
            return x_norm[:, :p], x_norm[:, p:]
        return prefix_norm(x[:, :p]), self.norm(x[:, p:])

    def forward_features_list(
        self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None]
    ) -> list[FeatureDict]:
        """Run several crop sizes through the blocks together; one output dict per crop tensor."""
        prepared = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list, strict=True)]
        x = [tokens for tokens, _ in prepared]
        grids = [grid for _, grid in prepared]
        for blk in self.blocks:
            # official behaviour: the RoPE table (and its training-time augmentation) is drawn per block
            x = blk(x, [self.rope_embed(H=h, W=w) for h, w in grids])
        out = []
        for i, (t, masks) in enumerate(zip(x, masks_list, strict=True)):
            prefix, patches = self._final_norm(t, i)
            out.append(
                {
                    "x_norm_clstoken": prefix[:, 0],
                    "x_storage_tokens": prefix[:, 1:],
                    "x_norm_patchtokens": patches,
                    "x_prenorm": t,
                    "masks": masks,
                }
            )
        return out

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> FeatureDict | list[FeatureDict]:
        """Features of one image batch [B, C, H, W], or of a list of crop batches.

        Returns a dict (a list of dicts for a list input) with ``x_norm_clstoken`` [B, E],
        ``x_storage_tokens`` [B, n, E], ``x_norm_patchtokens`` [B, h*w, E], ``x_prenorm``
        [B, 1 + n + h*w, E] (before the final norm) and ``masks``.
        """
        if isinstance(x, Tensor):
            return self.forward_features_list([x], [masks])[0]
        return self.forward_features_list(x, masks if masks is not None else [None] * len(x))

    def _block_outputs(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        """Raw outputs [B, N, E] of the last ``n`` blocks, or of the listed block indices, in block order."""
        take = set(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else set(n)
        bad = sorted(i for i in take if not 0 <= i < self.n_blocks)
        if bad or not take:
            raise ValueError(
                f"block indices {bad or list(take)} out of range for a ViT with {self.n_blocks} blocks"
            )
        x, (h, w) = self.prepare_tokens_with_masks(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.rope_embed(H=h, W=w))
            if i in take:
                out.append(x)
            if len(out) == len(take):
                break
        return out

    def get_intermediate_layers(
        self,
        x: Tensor,
        *,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch features of several blocks, as in the official method.

        Args:
            x: images [B, C, H, W].
            n: the last ``n`` blocks (int) or these 0-based block indices (list); always in block order.
            reshape: patches as [B, E, H/p, W/p] instead of [B, h*w, E].
            return_class_token: add the CLS token [B, E] to each entry.
            return_extra_tokens: add the storage tokens [B, n_storage, E] to each entry.
            norm: apply the final norm (``cls_norm`` on prefix tokens when untied; never ``local_cls_norm``).

        Returns:
            A tuple over blocks of patches, or of tuples (patches[, cls][, storage]).
        """
        outputs = self._block_outputs(x, n)
        p = self.n_prefix_tokens
        if norm:
            if self.cls_norm is not None:
                outputs = [torch.cat((self.cls_norm(o[:, :p]), self.norm(o[:, p:])), dim=1) for o in outputs]
            else:
                outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        extra_tokens = [o[:, 1:p] for o in outputs]
        patches = [o[:, p:] for o in outputs]
        if reshape:
            b, _, height, width = x.shape
            hp, wp = height // self.patch_size, width // self.patch_size
            patches = [t.reshape(b, hp, wp, -1).permute(0, 3, 1, 2).contiguous() for t in patches]
        parts: list[list[Tensor]] = [patches]
        if return_class_token:
            parts.append(class_tokens)
        if return_extra_tokens:
            parts.append(extra_tokens)
        return tuple(patches) if len(parts) == 1 else tuple(zip(*parts, strict=True))

    def forward(
        self, *args: Any, is_training: bool = False, **kwargs: Any
    ) -> Tensor | FeatureDict | list[FeatureDict]:
        """The CLS embedding [B, E] (``head`` is identity), or the feature dict(s) with ``is_training``."""
        features = self.forward_features(*args, **kwargs)
        return features if is_training else self.head(features["x_norm_clstoken"])


def build_dinov3(**kwargs: Any) -> DinoVisionTransformer:
    """Build a DINOv3 ViT from the official constructor keywords (a fixture's ``constructor_kwargs``).

    Every official option is honoured; the model is randomly initialised with the official scheme.
    Unknown keywords raise (the official class only logs them), so a typo cannot silently change the
    architecture.
    """
    return DinoVisionTransformer(**kwargs)
