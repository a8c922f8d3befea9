"""Build preset backbones and load DINOv3 checkpoints from local files, strictly and safely.

A checkpoint is untrusted input: ``.pth``/``.pt``/``.bin`` files are read with
``torch.load(weights_only=True)`` and ``.safetensors`` with safetensors; nothing is ever downloaded.
Official, timm and Hugging Face transformers layouts are accepted (see :mod:`geodino.models.convert`).
A file that does not fit the requested preset raises :class:`CheckpointError` listing the missing and
unexpected keys, the shape mismatches and the preset the file looks like; there is no silent random
initialisation.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from geodino.models.convert import detect_format, to_official
from geodino.models.convnext import ConvNeXt, build_convnext
from geodino.models.presets import PRESETS, BackbonePreset, get_preset
from geodino.models.vision_transformer import DinoVisionTransformer, build_dinov3

Backbone = DinoVisionTransformer | ConvNeXt

#: Containers that training or export scripts wrap a backbone state dict in, tried in this order.
_CONTAINER_KEYS = ("teacher", "model_ema", "state_dict", "model", "module")
#: Key prefixes stripped before matching (DDP, the official SSL wrappers, Lightning modules).
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "teacher.", "model.")
#: Official SSL heads stored next to the backbone in training checkpoints; not part of a backbone.
_HEADS = ("dino_head.", "ibot_head.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not match the requested architecture."""


def build_backbone(name: str, **overrides: Any) -> Backbone:
    """Randomly initialised backbone of a preset's architecture (official init scheme).

    Args:
        name: preset name, e.g. ``dinov3_vits16`` or ``dinov3_vitl16.sat493m``.
        **overrides: constructor keywords replacing the preset's (e.g. ``drop_path_rate=0.1``).
    """
    preset = get_preset(name)
    kwargs = {**preset.kwargs, **overrides}
    return build_dinov3(**kwargs) if preset.family == "vit" else build_convnext(**kwargs)


def read_checkpoint(path: str | os.PathLike) -> object:
    """The object stored in a checkpoint file (``torch.load(weights_only=True)``: tensors and plain
    containers; ``.safetensors`` with safetensors), never unpickling arbitrary objects.

    Raises:
        CheckpointError: missing, unreadable or truncated file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such checkpoint file (geodino never downloads weights; give a local path)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any decoder failure means the same thing to the user: a bad file
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch/safetensors checkpoint ({_load_error_reason(err)}). "
            "The file may be truncated or not a checkpoint; download it again or check the path."
        ) from err
    return obj


def _load_error_reason(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` or safetensors failed, in one line.

    The weights-only unpickler's own message advises loading again with ``weights_only=False``: for a file
    from elsewhere that is the unsafe step a checkpoint must never get, and for a corrupt file it does not
    help either, so it is replaced.
    """
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
        return (
            "it holds Python objects other than tensors and plain containers, or is corrupt; "
            "geodino does not unpickle such objects, since a checkpoint can run code when it is unpickled"
        )
    first_line = next(iter(str(err).strip().splitlines()), "")
    return f"{type(err).__name__}: {first_line}"


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict (:func:`read_checkpoint`).

    Unwraps the usual containers (``teacher``, ``model_ema``, ``state_dict``, ``model``) and strips
    ``module.``/``backbone.``-style prefixes.

    Raises:
        CheckpointError: missing, unreadable, truncated or non-tensor file.
    """
    return _flatten(read_checkpoint(path), Path(path))


def _flatten(obj: object, path: Path) -> dict[str, Tensor]:
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            raise CheckpointError(
                f"{path}: a dict without tensors (top-level keys: {sorted(obj)[:10]}); "
                f"expected a state dict, optionally inside one of {list(_CONTAINER_KEYS)}"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {_strip_prefixes(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    return {k: v for k, v in tensors.items() if not k.startswith(_HEADS)}


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and sum(isinstance(v, Tensor) for v in obj.values()) >= len(obj) / 2


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _preset_shapes(preset: BackbonePreset) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a preset, computed on the meta device (no memory, even for 7B)."""
    with torch.device("meta"):
        return _shapes(build_backbone(preset.name))


def closest_presets(state_dict: Mapping[str, Tensor], top: int = 3) -> list[tuple[str, float]]:
    """Presets ranked by how many (key, shape) pairs they share with ``state_dict`` (Jaccard, 1 = exact)."""
    have = {(k, tuple(v.shape)) for k, v in state_dict.items()}
    scores = []
    for name, preset in PRESETS.items():
        want = set(_preset_shapes(preset).items())
        scores.append((name, len(have & want) / len(have | want)))
    return sorted(scores, key=lambda s: -s[1])[:top]


def describe_mismatch(
    model: nn.Module | Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Tensor], limit: int = 8
) -> str:
    """Human-readable missing / unexpected / shape-mismatched keys of ``state_dict`` against ``model`` (a
    module, or the ``key -> shape`` of the state dict it expects)."""
    want = _shapes(model) if isinstance(model, nn.Module) else model
    have = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shape = [
        f"{k}: file {have[k]} vs model {want[k]}" for k in sorted(set(want) & set(have)) if want[k] != have[k]
    ]
    lines = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shape),
    ):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            lines.append(f"  {title} ({len(items)}): {', '.join(items[:limit])}{more}")
    return "\n".join(lines)


def load_backbone(
    name: str, weights: str | os.PathLike, *, device: str | torch.device = "cpu", **overrides: Any
) -> Backbone:
    """Build a preset backbone and load its weights from a local file (official, timm or HF layout).

    Args:
        name: preset name, e.g. ``dinov3_vitl16.sat493m`` (see :func:`~geodino.models.list_presets`).
        weights: path to a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` checkpoint.
        device: where to put the model.
        **overrides: constructor keywords replacing the preset's, as for :func:`build_backbone`: a
            teacher exported by a run with ``backbone_overrides`` (say ``depth=2, embed_dim=64``) loads
            with the same keywords.

    Returns:
        The backbone in eval mode, float32.

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not match the preset; the message
            lists what is missing, unexpected or mis-shaped and which presets the file resembles.
    """
    preset = get_preset(name)
    raw = read_state_dict(weights)
    try:
        fmt = detect_format(raw)
        state_dict = to_official(raw, {**preset.kwargs, **overrides}, preset.family)
    except ValueError as err:
        raise CheckpointError(f"{weights}: {err}") from err
    model = build_backbone(preset.name, **overrides)
    report = describe_mismatch(model, state_dict)
    if report:
        guesses = ", ".join(f"{n} ({s:.0%})" for n, s in closest_presets(state_dict))
        changed = f" with {overrides}" if overrides else ""
        raise CheckpointError(
            f"{weights} ({fmt} layout) does not fit preset {preset.name}{changed}:\n{report}\n"
            f"  the file looks most like: {guesses}"
        )
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.to(device).eval()
