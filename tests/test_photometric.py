"""Batched colour augmentation (``geodino.train.photometric``) against torchvision, image by image and draw by
draw, and the deferred mode (colour operations on the whole batch after the transfer) against the workers'.

Images are chips of a generated scene (``make_scene``: textured fields, roads, water), scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from geodino.data import make_scene
from geodino.models.presets import SAT_MEAN, SAT_STD
from geodino.train.augment import MultiCropAugmentation, collate_multicrop
from geodino.train.masking import MaskingGenerator
from geodino.train.photometric import (
    NEUTRAL_FACTORS,
    SOLARIZE_THRESHOLD,
    PhotometricAugmentation,
    PhotometricDraw,
)

RGBN_MEAN, RGBN_STD = (*SAT_MEAN, 0.3), (*SAT_STD, 0.15)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """A 4-band (R, G, B, NIR) 256 px scene, float32 [4, 256, 256] in [0, 1] (2-98 % stretch)."""
    path = make_scene(tmp_path_factory.mktemp("scene") / "scene.tif", size=256, bands=4, seed=5).path
    with rasterio.open(path) as src:
        pixels = src.read().astype(np.float32)
    low, high = np.percentile(pixels, [2, 98], axis=(1, 2), keepdims=True)
    return torch.from_numpy(np.clip((pixels - low) / (high - low), 0, 1).astype(np.float32))


def _chips(scene: torch.Tensor, n: int, size: int, bands: int = 3) -> torch.Tensor:
    """``n`` chips ``[n, bands, size, size]`` at different places of the scene."""
    step = (scene.shape[-1] - size) // max(n - 1, 1)
    return torch.stack(
        [scene[:bands, i * step : i * step + size, i * step : i * step + size] for i in range(n)]
    )


def _draw(n: int, **fields: np.ndarray) -> PhotometricDraw:
    """``n`` draws that do nothing except ``fields``."""
    neutral = {
        "order": np.tile(np.arange(4), (n, 1)),
        "factors": np.tile(np.array(NEUTRAL_FACTORS, dtype=np.float32), (n, 1)),
        "grayscale": np.zeros(n, dtype=bool),
        "blur_sigma": np.zeros(n, dtype=np.float32),
        "solarize": np.zeros(n, dtype=bool),
    }
    return PhotometricDraw(**{**neutral, **fields})


def _identity_normalisation(bands: int = 3) -> PhotometricAugmentation:
    return PhotometricAugmentation((0.0,) * bands, (1.0,) * bands, rgb_bands=(0, 1, 2))


@pytest.mark.parametrize(
    ("op", "values", "reference"),
    [
        (0, (0.6, 0.9, 1.1, 1.4), TF.adjust_brightness),
        (1, (0.6, 0.9, 1.1, 1.4), TF.adjust_contrast),
        (2, (0.8, 0.95, 1.05, 1.2), TF.adjust_saturation),
        (3, (-0.1, -0.02, 0.03, 0.1), TF.adjust_hue),
    ],
)
def test_each_jitter_operation_is_torchvision_bit_for_bit(scene, op, values, reference) -> None:
    chips = _chips(scene, 4, 64)
    factors = np.tile(np.array(NEUTRAL_FACTORS, dtype=np.float32), (4, 1))
    factors[:, op] = values
    out = _identity_normalisation()(chips, _draw(4, factors=factors))
    want = torch.stack([reference(chip, float(np.float32(v))) for chip, v in zip(chips, values, strict=True)])
    assert not torch.equal(want, chips)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_jitter_order_is_per_image(scene) -> None:
    """Each image runs the four operations in its own order; a subset of images per operation and step."""
    chips = _chips(scene, 3, 48)
    factors = np.array([[1.3, 0.7, 1.2, 0.08]] * 3, dtype=np.float32)
    orders = np.array([[3, 2, 1, 0], [0, 1, 2, 3], [1, 3, 0, 2]])
    out = _identity_normalisation()(chips, _draw(3, order=orders, factors=factors))
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for chip, order, got in zip(chips, orders, out, strict=True):
        want = chip
        for op in order:
            want = ops[op](want, float(factors[0, op]))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # the order matters


def test_grayscale_solarize_and_blur_are_torchvision(scene) -> None:
    chips = _chips(scene, 4, 64)
    aug = _identity_normalisation()
    gray = aug(chips, _draw(4, grayscale=np.array([True, False, True, False])))
    torch.testing.assert_close(gray[0], TF.rgb_to_grayscale(chips[0], num_output_channels=3), rtol=0, atol=0)
    torch.testing.assert_close(gray[1], chips[1], rtol=0, atol=0)

    solarized = aug(chips, _draw(4, solarize=np.array([True, True, False, False])))
    torch.testing.assert_close(solarized[:2], TF.solarize(chips[:2], SOLARIZE_THRESHOLD), rtol=0, atol=0)
    torch.testing.assert_close(solarized[2:], chips[2:], rtol=0, atol=0)

    sigma = np.array([0.1, 0.7, 2.0, 0.0], dtype=np.float32)
    blurred = aug(chips, _draw(4, blur_sigma=sigma))
    for chip, s, got in zip(chips[:3], sigma, blurred, strict=False):
        # separable passes against torchvision's 9 x 9 kernel: float32 rounding only
        torch.testing.assert_close(got, TF.gaussian_blur(chip, 9, [float(s)] * 2), rtol=0, atol=2e-6)
    torch.testing.assert_close(blurred[3], chips[3], rtol=0, atol=0)
    assert (blurred[2] - chips[2]).abs().mean() > 0.01


def test_other_bands_and_the_input_are_left_alone(scene) -> None:
    """Colour operations act on ``rgb_bands`` only; blur on every band; the input is not modified."""
    chips = _chips(scene, 2, 48, bands=4)[:, [3, 2, 1, 0]]  # NIR first, then B, G, R
    before = chips.clone()
    aug = PhotometricAugmentation((0.0,) * 4, (1.0,) * 4, rgb_bands=(3, 2, 1))
    factors = np.array([[1.2, 0.8, 1.1, 0.05]] * 2, dtype=np.float32)
    out = aug(chips, _draw(2, factors=factors, grayscale=np.array([False, True])))
    torch.testing.assert_close(chips, before, rtol=0, atol=0)
    torch.testing.assert_close(out[:, 0], chips[:, 0], rtol=0, atol=0)  # NIR untouched
    assert not torch.allclose(out[:, 1:], chips[:, 1:])
    torch.testing.assert_close(out[1, 1], out[1, 3], rtol=0, atol=0)  # grayscale: equal colour bands
    blurred = aug(chips, _draw(2, blur_sigma=np.array([1.5, 1.5], dtype=np.float32)))
    assert (blurred[:, 0] - chips[:, 0]).abs().mean() > 0.005


def test_normalisation_is_per_band() -> None:
    aug = PhotometricAugmentation(RGBN_MEAN, RGBN_STD, rgb_bands=(0, 1, 2))
    chips = torch.rand(2, 4, 16, 16)
    want = (chips - torch.tensor(RGBN_MEAN)[:, None, None]) / torch.tensor(RGBN_STD)[:, None, None]
    torch.testing.assert_close(aug(chips, _draw(2)), want)


def test_draw_frequencies_and_ranges() -> None:
    """Probabilities of the official pipeline over 4000 draws (binomial 4-sigma bounds ~0.025)."""
    aug = PhotometricAugmentation(SAT_MEAN, SAT_STD, rgb_bands=(0, 1, 2))
    torch.manual_seed(0)
    draws = PhotometricDraw.concat([aug.draw(blur_p=0.5, solarize=True) for _ in range(4000)])
    jittered = (draws.factors != np.array(NEUTRAL_FACTORS)).any(axis=1)
    assert abs(jittered.mean() - 0.8) < 0.03
    assert abs(draws.grayscale.mean() - 0.2) < 0.03
    assert abs((draws.blur_sigma > 0).mean() - 0.5) < 0.035
    assert abs(draws.solarize.mean() - 0.2) < 0.03
    sigma = draws.blur_sigma[draws.blur_sigma > 0]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    low, high = draws.factors[jittered].min(0), draws.factors[jittered].max(0)
    np.testing.assert_allclose(low, [0.6, 0.6, 0.8, -0.1], atol=0.01)
    np.testing.assert_allclose(high, [1.4, 1.4, 1.2, 0.1], atol=0.01)
    orders = {tuple(o) for o in draws.order[jittered]}
    assert len(orders) == 24  # every permutation occurs
    no_colour = PhotometricAugmentation(SAT_MEAN, SAT_STD, rgb_bands=None)
    plain = PhotometricDraw.concat([no_colour.draw(blur_p=1.0) for _ in range(50)])
    assert not plain.grayscale.any() and (plain.factors == np.array(NEUTRAL_FACTORS)).all()
    assert (plain.blur_sigma > 0).all() and not plain.solarize.any()


class _OnBands(nn.Module):
    """The official pipeline's colour block restricted to some bands (as geodino applied it before)."""

    def __init__(self, transform: nn.Module, bands: list[int]) -> None:
        super().__init__()
        self.transform, self.bands = transform, bands

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = image.clone()
        out[self.bands] = self.transform(image[self.bands])
        return out


def _torchvision_colour(mean, std, rgb_bands: list[int]) -> tuple[v2.Compose, v2.Compose, v2.Compose]:
    """Global crop 1, global crop 2 and local crop colour pipelines of the official code on torchvision v2."""
    colour = _OnBands(
        v2.Compose(
            [
                v2.RandomApply(
                    [v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
                ),
                v2.RandomGrayscale(p=0.2),
            ]
        ),
        rgb_bands,
    )

    def blur(p: float) -> v2.RandomApply:
        return v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)

    normalize = v2.Normalize(mean=list(mean), std=list(std))
    return (
        v2.Compose([colour, blur(0.0), normalize]),
        v2.Compose([colour, blur(0.9), v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=0.2), normalize]),
        v2.Compose([colour, blur(0.5), normalize]),
    )


def _assert_close_but_thresholds(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within float32 rounding of the blur (~1e-6 after normalisation), except at most 1 in 10^4 pixels:
    a rounding difference next to the solarize threshold flips such a pixel."""
    far = (got - want).abs() > 1e-5
    assert far.float().mean() < 1e-4
    torch.testing.assert_close(got[~far], want[~far], rtol=0, atol=1e-5)


def test_multicrop_is_the_official_torchvision_pipeline_draw_for_draw(scene) -> None:
    """Same seed, same crops: MultiCropAugmentation against torchvision's transforms in the official order,
    over seeds that between them exercise every colour operation."""
    mean, std, rgb = RGBN_MEAN, RGBN_STD, [0, 1, 2]
    sizes = {"global_crops_size": 64, "local_crops_size": 32, "local_crops_number": 4}
    aug = MultiCropAugmentation(mean, std, **sizes)
    deferred = MultiCropAugmentation(mean, std, **sizes, defer_photometric=True)
    global1, global2, local = _torchvision_colour(mean, std, rgb)
    image = scene[:, :160, :160]
    seen = []
    for seed in range(12):
        torch.manual_seed(seed)
        got = aug(image)
        torch.manual_seed(seed)
        # the official order of draws: both global geometries, their colours, then each local crop
        bases = [aug.geometric_augmentation_global(image).clamp(0, 1) for _ in range(2)]
        resized = [aug.resize_global(b).clamp(0, 1) for b in bases]
        want_global = [global1(resized[0]), global2(resized[1])]
        want_local = [local(aug.geometric_augmentation_local(image).clamp(0, 1)) for _ in range(4)]
        for g, w in zip(got["global_crops"] + got["local_crops"], want_global + want_local, strict=True):
            _assert_close_but_thresholds(g, w)
        torch.manual_seed(seed)
        seen.append(deferred(image)["photometric"])
    draws = PhotometricDraw.concat([d for s in seen for crops in s.values() for d in crops])
    assert draws.grayscale.any() and draws.solarize.any() and (draws.blur_sigma > 0).any()
    assert (draws.factors[:, 3] != 0).any() and (draws.order[:, 0] == 3).any()


def test_deferred_batch_is_the_per_crop_result(scene) -> None:
    """defer_photometric + collate + one call on the whole batch = the crops finished one by one."""
    kwargs = {"global_crops_size": 64, "local_crops_size": 32, "local_crops_number": 3, "gram_crops_size": 96}
    now = MultiCropAugmentation(RGBN_MEAN, RGBN_STD, **kwargs)
    later = MultiCropAugmentation(RGBN_MEAN, RGBN_STD, **kwargs, defer_photometric=True)
    images = [scene[:, i * 40 : i * 40 + 128, i * 30 : i * 30 + 128] for i in range(3)]
    masks = MaskingGenerator((4, 4))

    def batch(aug: MultiCropAugmentation) -> dict:
        samples = []
        for i, image in enumerate(images):
            torch.manual_seed(100 + i)
            samples.append(aug(image))
        return collate_multicrop(samples, masks, np.random.default_rng(0))

    want, deferred = batch(now), batch(later)
    assert "photometric" not in want
    draws = deferred.pop("photometric")
    assert len(draws["global_crops"]) == 6 and len(draws["local_crops"]) == 9
    assert deferred["collated_global_crops"].min() >= 0 and deferred["collated_global_crops"].max() <= 1
    for key in ("global_crops", "local_crops"):
        got = later.photometric(deferred[f"collated_{key}"], draws[key])
        torch.testing.assert_close(got, want[f"collated_{key}"], rtol=0, atol=2e-6, msg=key)
    for key in ("collated_gram_crops", "collated_masks", "mask_indices_list"):
        torch.testing.assert_close(deferred[key], want[key], rtol=0, atol=0, msg=key)


def test_batched_application_never_reads_device_values() -> None:
    """It runs on the meta device, which has no values: nothing in it waits for a GPU to report one."""
    aug = PhotometricAugmentation(SAT_MEAN, SAT_STD, rgb_bands=(0, 1, 2))
    torch.manual_seed(3)
    draws = PhotometricDraw.concat([aug.draw(blur_p=0.5, solarize=True) for _ in range(16)])
    out = aug(torch.empty(16, 3, 32, 32, device="meta"), draws)
    assert out.shape == (16, 3, 32, 32) and out.device.type == "meta"


def test_same_result_under_autocast() -> None:
    """A caller's bf16 autocast would run the blur convolution in bf16; the colour operations opt out."""
    aug = PhotometricAugmentation(SAT_MEAN, SAT_STD, rgb_bands=(0, 1, 2))
    torch.manual_seed(4)
    draws = PhotometricDraw.concat([aug.draw(blur_p=0.5, solarize=True) for _ in range(8)])
    crops = torch.rand(8, 3, 24, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(crops, draws)
    torch.testing.assert_close(out, aug(crops, draws), rtol=0, atol=0)


def test_mismatched_draws_are_refused() -> None:
    aug = PhotometricAugmentation(SAT_MEAN, SAT_STD, rgb_bands=(0, 1, 2))
    with pytest.raises(ValueError, match="2 photometric draws for 3 crops"):
        aug(torch.rand(3, 3, 8, 8), _draw(2))
