"""Multi-crop augmentation and multi-crop collate: shapes, geometry, measured probabilities, masks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from geodino.models.presets import SAT_MEAN, SAT_STD, WEB_MEAN, WEB_STD
from geodino.train.augment import MultiCropAugmentation, collate_multicrop
from geodino.train.masking import MaskingGenerator

BICUBIC = F.InterpolationMode.BICUBIC
MEAN = torch.tensor(SAT_MEAN)[:, None, None]
STD = torch.tensor(SAT_STD)[:, None, None]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _full_view(size: int, **kwargs) -> MultiCropAugmentation:
    """Crops that cover a ``size`` x ``size`` chip whole, so outputs are permutations of its pixels."""
    kwargs = {"local_crops_number": 1, **kwargs}
    return MultiCropAugmentation(
        SAT_MEAN,
        SAT_STD,
        global_crops_size=size,
        local_crops_size=size,
        global_crops_scale=(1.0, 1.0),
        local_crops_scale=(1.0, 1.0),
        **kwargs,
    )


def _d4(image: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / rotations of ``[C, H, W]``, with numpy."""
    out = []
    for flipped in (image, image[:, :, ::-1]):
        out += [np.rot90(flipped, k, axes=(1, 2)) for k in range(4)]
    return out


def test_shapes_and_dtypes() -> None:
    aug = MultiCropAugmentation(
        WEB_MEAN, WEB_STD, global_crops_size=48, local_crops_size=16, local_crops_number=3, gram_crops_size=80
    )
    crops = aug(torch.rand(3, 100, 90))
    assert set(crops) == {"global_crops", "local_crops", "gram_crops"}
    assert [c.shape for c in crops["global_crops"]] == [(3, 48, 48)] * 2
    assert [c.shape for c in crops["local_crops"]] == [(3, 16, 16)] * 3
    assert [c.shape for c in crops["gram_crops"]] == [(3, 80, 80)] * 2
    assert all(c.dtype == torch.float32 for group in crops.values() for c in group)
    no_gram = MultiCropAugmentation(WEB_MEAN, WEB_STD, global_crops_size=48, local_crops_size=16)
    assert set(no_gram(torch.rand(3, 64, 64))) == {"global_crops", "local_crops"}


def test_defaults_are_the_7b_recipe() -> None:
    crops = MultiCropAugmentation(SAT_MEAN, SAT_STD)(torch.rand(3, 300, 300))
    assert [c.shape[-1] for c in crops["global_crops"]] == [256, 256]
    assert [c.shape[-1] for c in crops["local_crops"]] == [112] * 8


def test_normalisation_without_colour_ops() -> None:
    chip = torch.tensor([0.2, 0.5, 0.9])[:, None, None].expand(3, 40, 40)
    crops = MultiCropAugmentation(
        SAT_MEAN, SAT_STD, global_crops_size=32, local_crops_size=16, local_crops_number=2, rgb_bands=None
    )(chip)
    expected = (torch.tensor([0.2, 0.5, 0.9]) - torch.tensor(SAT_MEAN)) / torch.tensor(SAT_STD)
    for crop in crops["global_crops"][:1] + crops["local_crops"]:  # global crop 2 may be solarized
        torch.testing.assert_close(crop, expected[:, None, None].expand_as(crop), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("flips", "expected"), [("dihedral", range(8)), ("horizontal", [0, 4]), ("none", [0])]
)
def test_flips_and_rotations(flips: str, expected: range | list[int]) -> None:
    chip = torch.arange(3 * 24 * 24, dtype=torch.float32).reshape(3, 24, 24) / (3 * 24 * 24)
    candidates = _d4(chip.numpy())
    aug = _full_view(24, flips=flips)
    draws = 480
    counts = np.zeros(8)
    for _ in range(draws):
        crop = aug.geometric_augmentation_global(chip).numpy()
        matches = [i for i, c in enumerate(candidates) if np.array_equal(crop, c)]
        assert len(matches) == 1  # a pure permutation of the chip's pixels
        counts[matches[0]] += 1
    frequencies = counts / draws
    for i in range(8):
        target = 1 / len(expected) if i in expected else 0.0
        assert frequencies[i] == pytest.approx(target, abs=0.06)


def test_blur_probabilities() -> None:
    # Four grey levels at random: crops without blur keep at most 4 distinct values (flips, solarize and
    # normalisation map pixels one by one); a blur mixes neighbours into many values, once sigma is large
    # enough to move a float32 value at all. That sigma is found with torchvision's blur on the same chip.
    levels = torch.tensor([0.1, 0.35, 0.6, 0.85])
    chip = levels[torch.randint(4, (16, 16), generator=torch.Generator().manual_seed(0))]
    chip = chip.expand(3, 16, 16).contiguous()

    def blurred(crop: torch.Tensor) -> bool:
        return crop[0].unique().numel() > 4

    sigmas = np.arange(0.1, 0.4, 0.001)
    sigma_min = next(s for s in sigmas if blurred(F.gaussian_blur(chip, [9, 9], [float(s), float(s)])))
    visible = (2.0 - sigma_min) / (2.0 - 0.1)  # sigma ~ U(0.1, 2.0)
    aug = _full_view(16, local_crops_number=2, rgb_bands=None)
    draws = 400
    hits = np.zeros(3)
    for _ in range(draws):
        crops = aug(chip)
        local = sum(blurred(c) for c in crops["local_crops"]) / 2
        hits += [blurred(crops["global_crops"][0]), blurred(crops["global_crops"][1]), local]
    assert hits[0] == 0
    assert hits[1] / draws == pytest.approx(0.9 * visible, abs=0.06)
    assert hits[2] / draws == pytest.approx(0.5 * visible, abs=0.06)


@pytest.mark.parametrize(("value", "rate"), [(0.501, 0.0), (0.503, 0.2)])
def test_solarize_only_global_crop_2(value: float, rate: float) -> None:
    # threshold 128/255 = 0.50196: a constant chip just below it never flips, just above it flips to 1 - value
    aug = _full_view(8, rgb_bands=None, blur_probabilities=(0.0, 0.0, 0.0))
    chip = torch.full((3, 8, 8), value)
    draws = 300
    flipped = np.zeros(3)
    for _ in range(draws):
        crops = aug(chip)
        views = [crops["global_crops"][0], crops["global_crops"][1], crops["local_crops"][0]]
        values = [v * STD + MEAN for v in views]
        flipped += [bool(((v - (1 - value)).abs() < (v - value).abs()).all()) for v in values]
    assert flipped[0] == 0 and flipped[2] == 0
    assert flipped[1] / draws == pytest.approx(rate, abs=0.08)


def test_gram_crop_has_the_global_geometry() -> None:
    # A smooth grey field; global crop 1 is never blurred nor solarized, so it is a monotone pixel-wise colour
    # map of the geometric crop. The Gram crop is that crop at 2x: resized to the global size it must be
    # ranked like global crop 1; the other Gram crop (other geometry) must not.
    field = F.resize(torch.rand(1, 12, 12), [96, 96], antialias=True).expand(3, 96, 96).contiguous()
    aug = MultiCropAugmentation(
        SAT_MEAN, SAT_STD, global_crops_size=32, local_crops_size=16, local_crops_number=1, gram_crops_size=64
    )

    def monotone(reference: torch.Tensor, crop: torch.Tensor) -> bool:
        order = reference.flatten().argsort()
        return bool((crop.flatten()[order].diff() >= -1e-4).all())

    for _ in range(10):
        crops = aug(field)
        gram = [F.resize(g * STD + MEAN, [32, 32], BICUBIC).clamp(0, 1)[0] for g in crops["gram_crops"]]
        global1 = (crops["global_crops"][0] * STD + MEAN)[0]
        assert monotone(gram[0], global1)
        assert not monotone(gram[1], global1)


def test_gram_crops_are_only_normalised() -> None:
    aug = MultiCropAugmentation(
        SAT_MEAN, SAT_STD, global_crops_size=16, local_crops_size=16, local_crops_number=1, gram_crops_size=32
    )
    chip = torch.full((3, 40, 40), 0.7)
    globals_seen = []
    for _ in range(20):
        crops = aug(chip)
        for gram in crops["gram_crops"]:
            torch.testing.assert_close(gram * STD + MEAN, torch.full_like(gram, 0.7), atol=1e-5, rtol=0)
        globals_seen.append(float((crops["global_crops"][0] * STD + MEAN).mean()))
    assert np.std(globals_seen) > 0.01  # while the global crops get colour jitter


@pytest.mark.parametrize(("rgb_bands", "other"), [((0, 1, 2), 3), ((3, 1, 2), 0)])
def test_colour_ops_only_on_rgb_bands(rgb_bands: tuple[int, int, int], other: int) -> None:
    mean, std = (0.4, 0.4, 0.3, 0.5), (0.2, 0.2, 0.1, 0.3)
    aug = MultiCropAugmentation(
        mean, std, global_crops_size=16, local_crops_size=16, local_crops_number=2, rgb_bands=rgb_bands
    )
    chip = torch.full((4, 24, 24), 0.9)
    chip[other] = 0.3  # below the solarize threshold: only colour ops could change it
    rgb_values = []
    for _ in range(20):
        crops = aug(chip)
        for crop in crops["global_crops"] + crops["local_crops"]:
            torch.testing.assert_close(crop[other] * std[other] + mean[other], torch.full((16, 16), 0.3))
        crop = crops["global_crops"][0]
        rgb_values.append(float(crop[rgb_bands[0]].mean() * std[rgb_bands[0]] + mean[rgb_bands[0]]))
    assert np.std(rgb_values) > 0.01


def test_invalid_configurations() -> None:
    with pytest.raises(ValueError, match="rgb_bands"):
        MultiCropAugmentation((0.5,) * 4, (0.2,) * 4, rgb_bands=(0, 1, 4))
    with pytest.raises(ValueError, match="rgb_bands"):
        MultiCropAugmentation(SAT_MEAN, SAT_STD, rgb_bands=(0, 1, 1))
    with pytest.raises(ValueError, match="mean and std"):
        MultiCropAugmentation(SAT_MEAN, (0.2,) * 4)
    with pytest.raises(ValueError, match="flips"):
        MultiCropAugmentation(SAT_MEAN, SAT_STD, flips="vertical")
    with pytest.raises(ValueError, match="blur_probabilities"):
        MultiCropAugmentation(SAT_MEAN, SAT_STD, blur_probabilities=(0.0, 1.5, 0.5))
    with pytest.raises(ValueError, match=r"local_crops_number must be >= 1.*got 0"):
        MultiCropAugmentation(SAT_MEAN, SAT_STD, local_crops_number=0)
    aug = MultiCropAugmentation(SAT_MEAN, SAT_STD, global_crops_size=16, local_crops_size=8)
    with pytest.raises(ValueError, match="3 bands"):
        aug(torch.rand(4, 32, 32))
    with pytest.raises(ValueError, match="float"):
        aug(torch.zeros(3, 32, 32, dtype=torch.uint8))


def test_reproducible_under_manual_seed() -> None:
    aug = MultiCropAugmentation(
        SAT_MEAN, SAT_STD, global_crops_size=32, local_crops_size=16, local_crops_number=2
    )
    chip = torch.rand(3, 48, 48)

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        crops = aug(chip)
        return crops["global_crops"] + crops["local_crops"]

    first = run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, run(1), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, run(2), strict=True))


def test_picklable_for_worker_processes() -> None:
    aug = MultiCropAugmentation(SAT_MEAN, SAT_STD, global_crops_size=16, local_crops_size=8)
    copy = pickle.loads(pickle.dumps(aug))
    chip = torch.rand(3, 24, 24)
    torch.manual_seed(3)
    expected = aug(chip)["global_crops"][0]
    torch.manual_seed(3)
    assert torch.equal(copy(chip)["global_crops"][0], expected)


def _tagged_samples(batch: int, n_local: int, gram: bool) -> list[dict[str, list[torch.Tensor]]]:
    """Crops filled with ``100 * sample + crop`` so the collated order can be read back."""
    samples = []
    for i in range(batch):
        sample = {
            "global_crops": [torch.full((3, 32, 32), 100.0 * i + j) for j in range(2)],
            "local_crops": [torch.full((3, 16, 16), 100.0 * i + j) for j in range(n_local)],
        }
        if gram:
            sample["gram_crops"] = [torch.full((3, 64, 64), 100.0 * i + j) for j in range(2)]
        samples.append(sample)
    return samples


@pytest.mark.parametrize("gram", [False, True])
def test_collate_shapes_and_crop_major_order(gram: bool) -> None:
    batch, n_local = 3, 4
    out = collate_multicrop(
        _tagged_samples(batch, n_local, gram), MaskingGenerator((2, 2)), np.random.default_rng(0)
    )
    assert out["collated_global_crops"].shape == (2 * batch, 3, 32, 32)
    assert out["collated_local_crops"].shape == (n_local * batch, 3, 16, 16)
    assert ("collated_gram_crops" in out) == gram
    keys = ["collated_global_crops", "collated_local_crops"] + (["collated_gram_crops"] if gram else [])
    for key in keys:
        tags = out[key][:, 0, 0, 0].tolist()
        n_crops = len(tags) // batch
        assert tags == [100.0 * i + j for j in range(n_crops) for i in range(batch)]


def test_collate_masks() -> None:
    batch = 5
    generator = MaskingGenerator((8, 8))
    out = collate_multicrop(_tagged_samples(batch, 2, False), generator, np.random.default_rng(1))
    masks = out["collated_masks"]
    assert masks.shape == (2 * batch, 64) and masks.dtype == torch.bool
    n_masked = int(2 * batch * 0.5)
    expected_counts = [int(64 * (0.1 + 0.4 * (k + 1) / n_masked)) for k in range(n_masked)]
    assert sorted(c for c in masks.sum(1).tolist() if c > 0) == sorted(expected_counts)
    indices, weights = [], []
    for row in range(2 * batch):
        count = int(masks[row].sum())
        for col in range(64):
            if masks[row, col]:
                indices.append(row * 64 + col)
                weights.append(1 / count)
    assert out["mask_indices_list"].tolist() == indices
    torch.testing.assert_close(out["masks_weight"], torch.tensor(weights, dtype=torch.float32))
    assert float(out["masks_weight"].sum()) == pytest.approx(n_masked)
    assert out["n_masked_patches"].tolist() == [len(indices)]
    assert out["upperbound"] == sum(expected_counts)
