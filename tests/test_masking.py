"""iBOT block masking: exact counts, blockiness, determinism, the official algorithm and batch rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geodino.train.masking import MaskingGenerator, sample_batch_masks


def _adjacent_pairs(mask: np.ndarray) -> int:
    """Number of 4-neighbour pairs of masked patches, by a plain loop."""
    h, w = mask.shape
    pairs = 0
    for i in range(h):
        for j in range(w):
            if mask[i, j] and i + 1 < h and mask[i + 1, j]:
                pairs += 1
            if mask[i, j] and j + 1 < w and mask[i, j + 1]:
                pairs += 1
    return pairs


def _official_loops(
    height: int,
    width: int,
    count: int,
    rng: np.random.Generator,
    max_num_patches: float,
    min_num_patches: int = 4,
) -> np.ndarray:
    """The official ``MaskingGenerator`` with its per-patch loops, drawing from ``rng`` in the same order.

    ``random.uniform(a, b)`` is ``a + (b - a) * U`` and ``random.randint(a, b)`` is ``integers(a, b + 1)``.
    """
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    mask = np.zeros((height, width), dtype=bool)
    mask_count = 0
    while mask_count < count:
        max_mask = min(count - mask_count, max_num_patches)
        delta = 0
        for _ in range(10):
            area = min_num_patches + (max_mask - min_num_patches) * rng.random()
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
            h = round(math.sqrt(area / aspect))
            w = round(math.sqrt(area * aspect))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                num_masked = sum(int(mask[i, j]) for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - num_masked <= max_mask:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        mask_count += delta
    flat = mask.flatten()
    flat[rng.choice(np.where(~flat)[0], size=count - flat.sum(), replace=False)] = True
    return flat.reshape(height, width)


@pytest.mark.parametrize("grid", [(16, 16), (12, 20)])
@pytest.mark.parametrize("count", [0, 1, 4, 25, 77, 96, 128, 200, 240])
def test_exact_count(grid: tuple[int, int], count: int) -> None:
    generator = MaskingGenerator(grid)
    for seed in range(5):
        mask = generator(count, np.random.default_rng(seed))
        assert mask.shape == grid and mask.dtype == bool
        assert int(mask.sum()) == count


def test_matches_official_loops() -> None:
    for grid, max_num_patches in [((16, 16), 128.0), ((10, 14), 30.0)]:
        generator = MaskingGenerator(grid, max_num_patches=max_num_patches)
        n = grid[0] * grid[1]
        for seed in range(20):
            count = int(n * (0.1 + 0.4 * seed / 19))
            ours = generator(count, np.random.default_rng(seed))
            reference = _official_loops(*grid, count, np.random.default_rng(seed), max_num_patches)
            np.testing.assert_array_equal(ours, reference)


def test_masks_are_blocky() -> None:
    generator = MaskingGenerator((16, 16))
    rng = np.random.default_rng(0)
    count = 64
    block = [_adjacent_pairs(generator(count, rng)) for _ in range(40)]
    random = []
    for _ in range(40):
        flat = np.zeros(256, dtype=bool)
        flat[rng.choice(256, size=count, replace=False)] = True
        random.append(_adjacent_pairs(flat.reshape(16, 16)))
    # 480 neighbour pairs on a 16 x 16 grid, each masked with p = 64 * 63 / (256 * 255) for random masks
    assert np.mean(random) == pytest.approx(480 * 64 * 63 / (256 * 255), rel=0.15)
    assert np.mean(block) > 2.5 * np.mean(random)


def test_deterministic_by_generator() -> None:
    generator = MaskingGenerator((16, 16))
    first = generator(100, np.random.default_rng(7))
    np.testing.assert_array_equal(first, generator(100, np.random.default_rng(7)))
    assert not np.array_equal(first, generator(100, np.random.default_rng(8)))


def test_invalid_count() -> None:
    generator = MaskingGenerator(4)
    with pytest.raises(ValueError, match="num_masking_patches"):
        generator(17, np.random.default_rng(0))


@pytest.mark.parametrize("n_images", [2, 6, 8, 9])
def test_batch_rule(n_images: int) -> None:
    generator = MaskingGenerator((16, 16))
    n_masked = int(n_images * 0.5)
    ratios = [0.1 + (0.5 - 0.1) * (k + 1) / n_masked for k in range(n_masked)]
    expected = sorted([int(256 * r) for r in ratios] + [0] * (n_images - n_masked))
    positions = set()
    for seed in range(20):
        masks = sample_batch_masks(n_images, generator, np.random.default_rng(seed))
        assert masks.shape == (n_images, 256)
        counts = masks.sum(1).tolist()
        assert sorted(counts) == expected
        positions |= {i for i, c in enumerate(counts) if c > 0}
    assert positions == set(range(n_images))  # shuffled: every crop gets a mask in some batch


def test_batch_deterministic_by_generator() -> None:
    generator = MaskingGenerator((8, 8))
    first = sample_batch_masks(8, generator, np.random.default_rng(3))
    assert (first == sample_batch_masks(8, generator, np.random.default_rng(3))).all()
    assert not (first == sample_batch_masks(8, generator, np.random.default_rng(4))).all()
