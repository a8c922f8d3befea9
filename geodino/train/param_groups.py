"""AdamW parameter groups of DINOv3: layer-wise LR decay, patch-embed LR multiplier, weight-decay exclusions.

Follows ``dinov3/train/param_groups.py`` (see the official brief, section 3.6):

* layer id 0 for ``patch_embed``, ``cls_token``, ``storage_tokens`` and ``mask_token``; block ``i`` has
  layer id ``i + 1``; everything else (final norms, heads) ``L + 1`` for a backbone of ``L`` blocks;
* LR multiplier ``layer_decay ** (L + 1 - layer_id)``, times ``patch_embed_lr_mult`` for the patch
  embedding;
* no weight decay for names ending in ``bias`` or containing ``norm`` or ``gamma`` (LayerScale). Tokens
  *do* get weight decay, as in the official code;
* the last layer of the DINO and iBOT heads is marked, so its LR can be held at 0 for the first
  ``freeze_last_layer`` steps.

Parameters with the same multipliers are fused into one group. Each group carries ``lr_multiplier``,
``wd_multiplier`` and ``is_last_layer``; the training module sets ``lr`` and ``weight_decay`` of every
group from its schedules at each step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["layer_id", "param_groups"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = ("patch_embed", "cls_token", "storage_tokens", "mask_token")


def layer_id(name: str, n_blocks: int) -> int:
    """Layer id of a backbone parameter ``name`` (0 = embeddings, 1..L = blocks, L + 1 = the rest)."""
    block = _BLOCK.search(name)
    if block is not None:
        return int(block.group(1)) + 1
    if any(part in _EMBED for part in name.split(".")):
        return 0
    return n_blocks + 1


def _no_weight_decay(name: str) -> bool:
    return name.endswith("bias") or "norm" in name or "gamma" in name


def param_groups(
    modules: Iterable[tuple[str, nn.Module]],
    *,
    n_blocks: int,
    layer_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim.AdamW`` over named sub-modules.

    Args:
        modules: ``(prefix, module)`` pairs, e.g. ``[("backbone", vit), ("dino_head", head)]``; layer ids
            are taken from names inside each module, so heads land at ``L + 1``.
        n_blocks: Number of transformer blocks ``L`` of the backbone.
        layer_decay: Layer-wise LR decay factor (1.0 = off; official 0.98 for 7B, 0.9 for ViT-L IN-1k).
        patch_embed_lr_mult: Extra LR multiplier of the patch embedding (official 0.2).

    Returns:
        Groups with ``params``, ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer`` and ``names``
        (the parameter names, for inspection). Frozen parameters are skipped.
    """
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for prefix, module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            lr_mult = layer_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
            if "patch_embed" in name:
                lr_mult *= patch_embed_lr_mult
            wd_mult = 0.0 if _no_weight_decay(name) else 1.0
            last = name.startswith("last_layer")
            key = (lr_mult, wd_mult, last)
            group = groups.setdefault(
                key,
                {
                    "params": [],
                    "names": [],
                    "lr_multiplier": lr_mult,
                    "wd_multiplier": wd_mult,
                    "is_last_layer": last,
                },
            )
            group["params"].append(param)
            group["names"].append(f"{prefix}.{name}")
    return list(groups.values())
