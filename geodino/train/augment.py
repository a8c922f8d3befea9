"""DINOv3 multi-crop augmentation for overhead imagery, and the collate that builds iBOT masks.

Port of the official ``dinov3/data/augmentations.py`` (``DataAugmentationDINO``) and ``collate.py``
(``collate_data_and_cast``) on ``torchvision.transforms.v2``, for float chips ``[C, H, W]`` in [0, 1]
(the data layer's scaling). Official defaults, by recipe:

======================  ====================  =========================  ==========================
option                  geodino default       7B / SAT 7B configs        default / IN-1k configs
======================  ====================  =========================  ==========================
global / local size     256 / 112             256 / 112                  224 / 96
global / local scale    (0.32, 1) / (0.05,    same                       same
                        0.32)
local crops             8                     8                          8
flips                   ``"dihedral"``        ``"none"``                 ``"horizontal"``
blur p (g1, g2, local)  (0.0, 0.9, 0.5)       effective (0.0, 0.9, 0.5)  same
Gram crop               None                  512 (Gram stage), 768 /    None
                                              1152 (high-res stage)
======================  ====================  =========================  ==========================

Colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p 0.8, grayscale p 0.2, Gaussian
blur (kernel 9, sigma U(0.1, 2.0)), solarize (p 0.2, global crop 2 only) and the bicubic RandomResizedCrop are
the official ones everywhere. Decisions where geodino departs or had to choose:

- **Blur probabilities.** The official ``GaussianBlur(p)`` wraps ``RandomApply`` with ``1 - p`` (dinov3#286):
  nominally global crop 1 is always blurred, crop 2 rarely (0.1), but in effect crop 1 is never blurred and
  crop 2 blurred 90 %. The released checkpoints (web and SAT) were trained with the effective values, and
  geodino continues training from / distils against them, so the defaults are the **effective** probabilities
  ``(0.0, 0.9, 0.5)``; ``blur_probabilities`` states them plainly (``(1.0, 0.1, 0.5)`` gives the nominal
  DINOv2 intent).
- **Flips and rotations.** Nadir images have no "up", so by default every crop gets a uniformly random
  element of the dihedral group D4 (horizontal flip with p 0.5, then a rotation by k * 90 degrees, k uniform
  in 0..3; vertical flips are the flip followed by 180 degrees). ``flips="none"`` reproduces the 7B/SAT
  configs, ``"horizontal"`` the default config.
- **Bands.** Colour jitter and grayscale are defined on RGB: they act on the three bands named by
  ``rgb_bands`` (red, green, blue positions) and leave the other bands (e.g. NIR) unchanged;
  ``rgb_bands=None`` skips them (non-optical sensors). Blur, solarize, geometry and normalisation act on
  every band. The band count of a chip must equal ``len(mean)``.
- **Solarize threshold** is 128/255: the official pipeline solarizes 8-bit PIL images at 128.
- **Resampling on floats.** Bicubic resampling of float tensors overshoots [0, 1] (PIL's 8-bit pipeline
  clamps), so every crop / resize result is clamped to [0, 1] before the colour operations.
- **Gram crops** follow the official ``gram_teacher_no_distortions: true``: the global crop is cut at
  ``max(global, gram)`` size, the student's global crop is that crop resized (bicubic) to the global size
  before the colour operations, and the Gram crop is the same crop resized to the Gram size and only
  normalised.
- Official options that are off in every released config (``share_color_jitter``, ``teacher_no_color_jitter``,
  ``local_crops_subset_of_global_crops``) are not ported. Mixed resolutions (high-res stage) are one
  augmentation per (global, local) size pair, as the official per-resolution data loaders.

Colour operations: their formulas and random draws are torchvision v2's, applied by
:class:`~geodino.train.photometric.PhotometricAugmentation` (batched, one draw per crop). With
``defer_photometric=True`` a call returns the crops in [0, 1] with their draws instead, and the colour
operations and normalisation run later on a whole batch, on the GPU (``PretrainDataModule(photometric_on=
"device")``); the crops are the same up to float rounding.

Randomness: ``torchvision.transforms.v2`` draws from the global torch RNG, so this module does too (including
the 90 degree rotation, for one consistent source). Reproducibility comes from the ``DataLoader``, which seeds
each worker's torch RNG from its base seed (``torch.utils.data`` sets ``torch.initial_seed()`` per worker); in
the main process, ``torch.manual_seed`` before a call makes it deterministic. The iBOT masks take an explicit
``numpy.random.Generator`` (:mod:`geodino.train.masking`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from geodino.train.masking import MaskingGenerator, sample_batch_masks
from geodino.train.photometric import PhotometricAugmentation, PhotometricDraw

__all__ = ["MultiCropAugmentation", "RandomRot90", "collate_multicrop"]

Flips = Literal["dihedral", "horizontal", "none"]


class RandomRot90(nn.Module):
    """Rotates an image ``[..., H, W]`` by ``k * 90`` degrees, ``k`` uniform in 0..3 (global torch RNG).

    Hand-rolled: torchvision has no discrete rotation, and ``v2.RandomRotation`` resamples on a grid
    instead of permuting pixels.
    """

    def forward(self, image: Tensor) -> Tensor:
        """Rotated image, same shape for square inputs (H and W swap for odd ``k`` otherwise)."""
        k = int(torch.randint(4, ()))
        return torch.rot90(image, k, dims=(-2, -1))


def _symmetries(flips: Flips) -> list[nn.Module]:
    """Random flips / rotations after a crop: official horizontal flip, or all of D4 for nadir images."""
    if flips == "dihedral":
        return [v2.RandomHorizontalFlip(p=0.5), RandomRot90()]
    if flips == "horizontal":
        return [v2.RandomHorizontalFlip(p=0.5)]
    if flips == "none":
        return []
    raise ValueError(f"flips must be 'dihedral', 'horizontal' or 'none', got {flips!r}")


def _clamp_unit(image: Tensor) -> Tensor:
    """Clamps to [0, 1] out of place (a crop may be a view of the caller's chip)."""
    return image.clamp(0.0, 1.0)


class MultiCropAugmentation:
    """Two global and N local crops of one chip, plus optional Gram-teacher crops (see the module notes).

    Args:
        mean: Per-band normalisation mean (the backbone preset's, e.g. ``presets.SAT_MEAN``); its length is
            the band count.
        std: Per-band normalisation std.
        global_crops_size: Side of the global crops, pixels.
        local_crops_size: Side of the local crops, pixels.
        global_crops_scale: Area fraction range of the global RandomResizedCrop.
        local_crops_scale: Area fraction range of the local RandomResizedCrop.
        local_crops_number: Number of local crops.
        gram_crops_size: Side of the Gram-teacher crops (None: no Gram crops).
        flips: ``"dihedral"`` (random flip and 90 degree rotation), ``"horizontal"`` or ``"none"``.
        blur_probabilities: Probability that global crop 1, global crop 2 and each local crop is blurred.
        rgb_bands: Positions of the red, green and blue bands for the colour operations, or None to skip
            colour jitter and grayscale. Check the band order of your chips: Sentinel-2 B02, B03, B04 is
            blue, green, red, i.e. ``rgb_bands=(2, 1, 0)``.
        defer_photometric: Return the global and local crops in [0, 1] with their photometric draws, to be
            applied to the whole batch later (:attr:`photometric`), instead of finished crops.

    Raises:
        ValueError: If ``mean`` and ``std`` differ in length, ``rgb_bands`` is not three distinct valid
            band positions, a probability is outside [0, 1] or ``flips`` is unknown.

    Example:
        >>> from geodino.models.presets import SAT_MEAN, SAT_STD
        >>> aug = MultiCropAugmentation(SAT_MEAN, SAT_STD, global_crops_size=64, local_crops_size=32)
        >>> crops = aug(torch.rand(3, 128, 128))
        >>> [c.shape[-1] for c in crops["global_crops"] + crops["local_crops"][:1]]
        [64, 64, 32]
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        global_crops_size: int = 256,
        local_crops_size: int = 112,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        gram_crops_size: int | None = None,
        flips: Flips = "dihedral",
        blur_probabilities: tuple[float, float, float] = (0.0, 0.9, 0.5),
        rgb_bands: tuple[int, int, int] | None = (0, 1, 2),
        defer_photometric: bool = False,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per band, got {len(mean)} and {len(std)}")
        self.num_bands = len(mean)
        if rgb_bands is not None and (
            len(set(rgb_bands)) != 3 or not all(0 <= b < self.num_bands for b in rgb_bands)
        ):
            raise ValueError(
                f"rgb_bands must be three distinct band positions in 0..{self.num_bands - 1} (red, green, "
                f"blue), or None for no colour operations; got {rgb_bands}"
            )
        if not all(0.0 <= p <= 1.0 for p in blur_probabilities):
            raise ValueError(f"blur_probabilities must be in [0, 1], got {blur_probabilities}")
        if local_crops_number < 1:
            raise ValueError(
                f"local_crops_number must be >= 1 (the DINO loss compares local crops with the global ones; "
                f"official: 8), got {local_crops_number}"
            )
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.local_crops_number = local_crops_number
        self.gram_crops_size = gram_crops_size

        symmetries = _symmetries(flips)
        bicubic = v2.InterpolationMode.BICUBIC
        # Global and Gram crops are one geometric crop at the larger size, resized to each (official).
        global_crop_max_size = max(global_crops_size, gram_crops_size or 0)
        self.geometric_augmentation_global = v2.Compose(
            [
                v2.RandomResizedCrop(global_crop_max_size, scale=global_crops_scale, interpolation=bicubic),
                *symmetries,
            ]
        )
        self.geometric_augmentation_local = v2.Compose(
            [
                v2.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=bicubic),
                *symmetries,
            ]
        )
        self.resize_global = v2.Resize(global_crops_size, interpolation=bicubic)
        self.resize_gram = (
            None if gram_crops_size is None else v2.Resize(gram_crops_size, interpolation=bicubic)
        )

        #: Colour operations and normalisation of the global and local crops (normalisation only: Gram crops).
        self.photometric = PhotometricAugmentation(mean, std, rgb_bands)
        self.blur_probabilities = blur_probabilities
        self.defer_photometric = defer_photometric

    def __call__(self, image: Tensor) -> dict[str, list[Tensor]]:
        """Crops one chip.

        Args:
            image: ``float [C, H, W]`` in [0, 1], ``C == len(mean)``.

        Returns:
            ``{"global_crops": [2 x [C, G, G]], "local_crops": [N x [C, L, L]]}`` normalised, plus
            ``"gram_crops": [2 x [C, R, R]]`` (same geometry as the global crops, only normalised) when
            ``gram_crops_size`` is set. With ``defer_photometric`` the global and local crops are in [0, 1]
            and ``"photometric": {"global_crops": [2 draws], "local_crops": [N draws]}`` holds their
            :class:`~geodino.train.photometric.PhotometricDraw`.

        Raises:
            ValueError: If the image is not a floating ``[C, H, W]`` tensor with ``len(mean)`` bands.
        """
        if image.ndim != 3 or image.shape[0] != self.num_bands or not image.is_floating_point():
            raise ValueError(
                f"expected a float [C, H, W] chip with C = {self.num_bands} bands (the length of mean/std), "
                f"got {image.dtype} {tuple(image.shape)}"
            )
        # the same draws as the official pipeline, in another order (same distribution): both global
        # geometries, then both global colours (officially geometry and colour of each global crop in turn),
        # then geometry and colour of each local crop
        bases = [_clamp_unit(self.geometric_augmentation_global(image)) for _ in range(2)]
        resized = [_clamp_unit(self.resize_global(base)) for base in bases]
        blur_global1, blur_global2, blur_local = self.blur_probabilities
        global_draws = [
            self.photometric.draw(blur_global1),
            self.photometric.draw(blur_global2, solarize=True),
        ]
        local_crops, local_draws = [], []
        for _ in range(self.local_crops_number):
            local_crops.append(_clamp_unit(self.geometric_augmentation_local(image)))
            local_draws.append(self.photometric.draw(blur_local))
        crops = {"global_crops": resized, "local_crops": local_crops}
        draws = {"global_crops": global_draws, "local_crops": local_draws}
        if self.defer_photometric:
            output = {**crops, "photometric": draws}
        else:
            output = {
                key: [
                    self.photometric(crop[None], draw)[0]
                    for crop, draw in zip(crops[key], draws[key], strict=True)
                ]
                for key in crops
            }
        if self.resize_gram is not None:
            output["gram_crops"] = [
                self.photometric.normalize(_clamp_unit(self.resize_gram(base))) for base in bases
            ]
        return output


def masked_patch_index(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices and loss weights of the masked patches of ``masks`` (bool [2B, P]).

    Returns:
        ``long [M]``: indices of the masked patches in ``masks.flatten()`` (image-major, then patch), which
        select their tokens as ``tokens.flatten(0, 1).index_select(0, indices)``; and ``float [M]``: per
        masked patch ``1 / (masked patches of its image)``. Computed where ``masks`` lives: on a GPU this
        waits for the device (M is data-dependent), so the collate computes them on the CPU.
    """
    indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1, keepdim=True).clamp(min=1)
    weights = (1 / per_image).expand_as(masks).flatten().index_select(0, indices)
    return indices, weights


def collate_multicrop(
    samples: Sequence[Mapping[str, Sequence[Tensor]]],
    mask_generator: MaskingGenerator,
    rng: np.random.Generator,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
) -> dict[str, Any]:
    """Stacks the crops of B samples crop-major and draws the iBOT masks (official ``collate_data_and_cast``).

    Crop-major: all samples' first global crop, then all samples' second global crop (likewise for local and
    Gram crops), so that ``collated_global_crops.unflatten(0, (2, B))[i]`` is global crop ``i`` of the batch.

    Args:
        samples: B outputs of :class:`MultiCropAugmentation`.
        mask_generator: Block masks on the global crops' patch grid.
        rng: Source of the mask draws. Each ``DataLoader`` worker needs its own (e.g. seeded from
            ``torch.initial_seed()`` in ``worker_init_fn``), or workers repeat each other's masks.
        mask_ratio_min_max: Smallest and largest masking ratio.
        mask_sample_probability: Fraction of the global crops that are masked.

    Returns:
        A dict with

        - ``collated_global_crops``: ``[2B, C, G, G]``;
        - ``collated_local_crops``: ``[N*B, C, L, L]``;
        - ``collated_gram_crops``: ``[2B, C, R, R]`` (only when the samples have Gram crops);
        - ``photometric``: ``{"global_crops": draws [2B], "local_crops": draws [N*B]}``, crop-major, only
          when the samples' colour operations are deferred (``defer_photometric``);
        - ``collated_masks``: ``bool [2B, P]``;
        - ``mask_indices_list``: ``long [M]`` flat indices of the masked patches in ``collated_masks``;
        - ``masks_weight``: ``float [M]``, ``1 / (masked patches of its image)`` per masked patch, so it sums
          to the number of masked images;
        - ``n_masked_patches``: ``long [1]``, ``M``;
        - ``upperbound``: int, the number of patches the mask rule asked for; equal to ``M`` because the
          masks are exact.
    """

    def crop_major(key: str) -> Tensor:
        return torch.stack([sample[key][i] for i in range(len(samples[0][key])) for sample in samples])

    collated_global_crops = crop_major("global_crops")
    collated_masks = sample_batch_masks(
        len(collated_global_crops), mask_generator, rng, mask_ratio_min_max, mask_sample_probability
    )
    mask_indices_list, masks_weight = masked_patch_index(collated_masks)
    output = {
        "collated_global_crops": collated_global_crops,
        "collated_local_crops": crop_major("local_crops"),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.tensor([len(mask_indices_list)], dtype=torch.long),
        "upperbound": len(mask_indices_list),
    }
    if "gram_crops" in samples[0]:
        output["collated_gram_crops"] = crop_major("gram_crops")
    if "photometric" in samples[0]:
        output["photometric"] = {
            key: PhotometricDraw.concat(
                [s["photometric"][key][i] for i in range(len(draws)) for s in samples]
            )
            for key, draws in samples[0]["photometric"].items()
        }
    return output
