"""The official DINOv3 colour augmentations, batched: one random draw per crop, one call per batch of crops.

The official pipeline (``dinov3/data/augmentations.py``) colour-jitters (brightness 0.4, contrast 0.4,
saturation 0.2, hue 0.1, in a random order per image) with p 0.8, converts to grayscale with p 0.2, blurs
(kernel 9, sigma U(0.1, 2.0) pixels) and solarizes (global crop 2, p 0.2), one image at a time inside the
data workers. Here the random draws of a crop (:meth:`PhotometricAugmentation.draw`, torch's global RNG, in
torchvision's order) are kept apart from their application (:meth:`PhotometricAugmentation.__call__`), which
takes a batch ``[N, C, H, W]`` and a draw per image. So the same code runs in a worker on one crop, or on the
GPU on all crops of a step after the batch is transferred (``PretrainDataModule(photometric_on="device")``).
That takes two thirds of a worker's augmentation time per image to the GPU (35 -> 11 ms on one CPU core;
~2.7x more images per core through the data module, ``benchmarks/multicrop.py``).

The formulas are torchvision v2's (``functional/_color.py``, ``_misc.py``) with a factor per image; the tests
compare them to torchvision image by image. Hand-rolled because torchvision's functional colour ops take one
factor per call, and kornia's ``ColorJitter`` / ``ColorJiggle`` draw one operation order for the whole batch
where the official pipeline draws one per image. The Gaussian blur is separable (two 9-tap passes instead of
one 81-tap kernel; the same kernel up to float32 rounding).

Draws are numpy arrays, so Lightning leaves them on the host when it moves a batch: the rows each operation
applies to are known there, and the GPU never waits for the host to look at them (no synchronisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

__all__ = ["PhotometricAugmentation", "PhotometricDraw"]

#: The official pipeline solarizes 8-bit images at 128; the same cut on [0, 1] floats.
SOLARIZE_THRESHOLD = 128 / 255
#: ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) as factor ranges, in torchvision's
#: operation order (0 brightness, 1 contrast, 2 saturation, 3 hue).
JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
#: Factors that leave an image unchanged (torchvision skips a hue factor of 0).
NEUTRAL_FACTORS = (1.0, 1.0, 1.0, 0.0)
JITTER_P, GRAYSCALE_P, SOLARIZE_P = 0.8, 0.2, 0.2
BLUR_KERNEL = 9
BLUR_SIGMA = (0.1, 2.0)


@dataclass
class PhotometricDraw:
    """The random draws of N crops.

    Attributes:
        order: ``int [N, 4]``, the colour-jitter operation at each position (0 brightness, 1 contrast,
            2 saturation, 3 hue).
        factors: ``float32 [N, 4]``, the factor of each operation; :data:`NEUTRAL_FACTORS` where the crop is
            not jittered.
        grayscale: ``bool [N]``.
        blur_sigma: ``float32 [N]``, Gaussian blur sigma in pixels; 0 for no blur.
        solarize: ``bool [N]``.
    """

    order: np.ndarray
    factors: np.ndarray
    grayscale: np.ndarray
    blur_sigma: np.ndarray
    solarize: np.ndarray

    def __len__(self) -> int:
        return len(self.order)

    @staticmethod
    def concat(draws: Sequence[PhotometricDraw]) -> PhotometricDraw:
        """The draws of several batches of crops, in the given order."""
        return PhotometricDraw(
            *(np.concatenate([getattr(d, field.name) for d in draws]) for field in fields(PhotometricDraw))
        )


def _uniform(low: float, high: float) -> float:
    """One float32 draw from U(low, high), as torchvision's transforms make it."""
    return float(torch.empty(1).uniform_(low, high))


def _happens(p: float) -> bool:
    """torchvision's ``RandomApply`` test: one draw, also for p 0 or 1."""
    return bool(torch.rand(1) < p)


def _factor_column(values: np.ndarray, like: Tensor) -> Tensor:
    """``values [n]`` as ``[n, 1, 1, 1]`` in ``like``'s dtype, on its device (a copy from the host)."""
    column = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(-1, 1, 1, 1)
    return column.to(device=like.device, dtype=like.dtype, non_blocking=True)


def _update(
    images: Tensor, rows: np.ndarray, fn: Callable[..., Tensor], values: np.ndarray | None = None
) -> Tensor:
    """``images [N, ...]`` with ``fn`` applied to the images ``rows`` (in place unless all rows).

    ``fn(x)`` or, given per-image ``values [N]``, ``fn(x, values[rows] as [n, 1, 1, 1])``.
    """

    def apply(x: Tensor) -> Tensor:
        return fn(x) if values is None else fn(x, _factor_column(values[rows], x))

    if len(rows) == len(images):
        return apply(images)
    if len(rows):
        index = torch.from_numpy(rows).to(images.device, non_blocking=True)
        images.index_copy_(0, index, apply(images.index_select(0, index)))
    return images


def _gray(rgb: Tensor) -> Tensor:
    """ITU-R 601 luma of ``rgb [n, 3, H, W]`` as ``[n, 1, H, W]`` (torchvision's weights)."""
    r, g, b = rgb.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(image: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """``ratio * image + (1 - ratio) * other`` clamped to [0, 1]; ``ratio [n, 1, 1, 1]``."""
    return torch.addcmul(image.mul(ratio), other, 1.0 - ratio).clamp_(0.0, 1.0)


def _brightness(rgb: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_brightness`` of ``rgb [n, 3, H, W]``, one factor per image ``[n, 1, 1, 1]``."""
    return rgb.mul(factor).clamp_(0.0, 1.0)


def _contrast(rgb: Tensor, factor: Tensor) -> Tensor:
    """``adjust_contrast``: a blend with the image's mean luma."""
    return _blend(rgb, _gray(rgb).mean(dim=(-3, -2, -1), keepdim=True), factor)


def _saturation(rgb: Tensor, factor: Tensor) -> Tensor:
    """``adjust_saturation``: a blend with the per-pixel luma."""
    return _blend(rgb, _gray(rgb), factor)


def _hue(rgb: Tensor, factor: Tensor) -> Tensor:
    """``adjust_hue``: the hue shifted by ``factor`` turns in HSV (torchvision's conversions)."""
    h, s, v = _rgb_to_hsv(rgb).unbind(dim=-3)
    h = h.add(factor.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _grayscale(rgb: Tensor) -> Tensor:
    """``rgb [n, 3, H, W]`` as three equal luma bands."""
    return _gray(rgb).expand_as(rgb).clone()


def _solarize(images: Tensor) -> Tensor:
    """Inverts the values at or above :data:`SOLARIZE_THRESHOLD`."""
    return torch.where(images >= SOLARIZE_THRESHOLD, 1.0 - images, images)


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Blurs each image with its own sigma: torchvision's 9-tap Gaussian kernel, reflected borders.

    Args:
        images: ``[n, C, H, W]``, H and W > 4.
        sigma: ``[n, 1, 1, 1]`` in pixels, > 0.

    Returns:
        ``[n, C, H, W]``, two separable passes (one 9 x 9 kernel per image in torchvision).
    """
    n, c, height, width = images.shape
    lim = (BLUR_KERNEL - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, BLUR_KERNEL, dtype=images.dtype, device=images.device)
    kernel = torch.softmax(-(x / sigma.view(n, 1)).pow(2), dim=-1)  # [n, 9]
    kernel = kernel.repeat_interleave(c, dim=0)  # [n*C, 9], one per (image, band)
    half = BLUR_KERNEL // 2
    planes = F.pad(images.reshape(1, n * c, height, width), [half] * 4, mode="reflect")
    planes = F.conv2d(planes, kernel.view(n * c, 1, BLUR_KERNEL, 1), groups=n * c)
    planes = F.conv2d(planes, kernel.view(n * c, 1, 1, BLUR_KERNEL), groups=n * c)
    return planes.view(n, c, height, width)


class PhotometricAugmentation:
    """Colour jitter, grayscale, blur, solarize and normalisation of crops with per-crop random draws.

    Args:
        mean: Per-band normalisation mean; its length is the band count.
        std: Per-band normalisation std.
        rgb_bands: Positions of the red, green and blue bands for colour jitter and grayscale (the other
            bands are left unchanged), or None to skip them. Blur, solarize and normalisation act on every
            band.

    Example:
        >>> aug = PhotometricAugmentation((0.5, 0.5, 0.5), (0.2, 0.2, 0.2), rgb_bands=(0, 1, 2))
        >>> _ = torch.manual_seed(0)
        >>> draws = PhotometricDraw.concat([aug.draw(blur_p=0.5) for _ in range(4)])
        >>> aug(torch.rand(4, 3, 32, 32), draws).shape
        torch.Size([4, 3, 32, 32])
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], rgb_bands: tuple[int, int, int] | None
    ) -> None:
        self.mean, self.std = list(mean), list(std)
        self.rgb_bands = None if rgb_bands is None else list(rgb_bands)

    def draw(self, blur_p: float, solarize: bool = False) -> PhotometricDraw:
        """The draws of one crop from torch's global RNG, in the order of the official torchvision pipeline.

        Args:
            blur_p: Probability of the Gaussian blur.
            solarize: Whether the crop may be solarized (p 0.2; the official global crop 2).
        """
        order, factors = np.arange(4), np.array(NEUTRAL_FACTORS, dtype=np.float32)
        grayscale = False
        if self.rgb_bands is not None:
            if _happens(JITTER_P):
                order = torch.randperm(4).numpy()
                factors = np.array([_uniform(*bounds) for bounds in JITTER_RANGES], dtype=np.float32)
            grayscale = _happens(GRAYSCALE_P)
        sigma = _uniform(*BLUR_SIGMA) if _happens(blur_p) else 0.0
        return PhotometricDraw(
            order=order[None],
            factors=factors[None],
            grayscale=np.array([grayscale]),
            blur_sigma=np.array([sigma], dtype=np.float32),
            solarize=np.array([solarize and _happens(SOLARIZE_P)]),
        )

    def __call__(self, crops: Tensor, draws: PhotometricDraw) -> Tensor:
        """Applies the draws and normalises.

        Args:
            crops: ``float [N, C, H, W]`` in [0, 1], on any device.
            draws: One draw per crop (:meth:`draw`, :meth:`PhotometricDraw.concat`).

        Returns:
            ``[N, C, H, W]`` normalised with ``(x - mean) / std``, in ``crops``' dtype also under autocast
            (which would run the blur convolution in bf16); ``crops`` is not modified.
        """
        if len(draws) != len(crops):
            raise ValueError(f"{len(draws)} photometric draws for {len(crops)} crops")
        device = crops.device.type
        if not torch.amp.is_autocast_available(device):  # e.g. the meta device
            return self._apply(crops, draws)
        with torch.autocast(device, enabled=False):
            return self._apply(crops, draws)

    def _apply(self, crops: Tensor, draws: PhotometricDraw) -> Tensor:
        images = crops.clone()
        if self.rgb_bands is not None:
            rgb = images[:, self.rgb_bands]
            for position in range(4):
                for op, fn in enumerate(JITTER_OPS):
                    chosen = (draws.order[:, position] == op) & (draws.factors[:, op] != NEUTRAL_FACTORS[op])
                    rgb = _update(rgb, np.flatnonzero(chosen), fn, draws.factors[:, op])
            rgb = _update(rgb, np.flatnonzero(draws.grayscale), _grayscale)
            images[:, self.rgb_bands] = rgb
        images = _update(images, np.flatnonzero(draws.blur_sigma > 0), gaussian_blur, draws.blur_sigma)
        images = _update(images, np.flatnonzero(draws.solarize), _solarize)
        return self.normalize(images)

    def normalize(self, images: Tensor) -> Tensor:
        """``(images - mean) / std`` per band, ``images [..., C, H, W]`` (a new tensor)."""
        return TF.normalize(images, mean=self.mean, std=self.std)
