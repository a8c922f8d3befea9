"""iBOT block masking: which patch tokens of the student's global crops are replaced by the mask token.

Follows the official ``dinov3/data/masking.py`` (``MaskingGenerator``) and the batch rule of
``dinov3/data/collate.py``: over the ``n`` global crops of a batch, ``int(n * mask_sample_probability)``
crops get a block mask whose size grows linearly across them (ratios ``linspace(0.1, 0.5, m + 1)[1:]``), the
other crops get none, and the masks are shuffled over the crops. The teacher never sees masks.

Randomness comes only from the ``numpy.random.Generator`` passed to each call (the official code uses the
global ``random`` / ``numpy.random`` state).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["MaskingGenerator", "sample_batch_masks"]


class MaskingGenerator:
    """Block masks of an exact number of patches on an ``h x w`` patch grid (BEiT / iBOT style).

    Rectangles are drawn one after the other: area ``U(min_num_patches, min(remaining, max_num_patches))``,
    aspect ratio log-uniform in ``[min_aspect, max_aspect]``, position uniform on the grid. A rectangle is
    kept when it adds at least one and at most ``remaining`` new patches; after 10 failed tries in a row the
    block phase stops. The mask is then topped up with random single patches to exactly the requested count.

    Args:
        input_size: Patch grid ``(h, w)`` of a global crop (e.g. ``(16, 16)`` for 256 px and patch 16); an
            int means a square grid.
        max_num_patches: Largest area of one block; None means half the grid (the official
            ``0.5 * h * w``).
        min_num_patches: Smallest area of one block.
        min_aspect: Smallest block aspect ratio (width / height).
        max_aspect: Largest block aspect ratio; None means ``1 / min_aspect``.
    """

    def __init__(
        self,
        input_size: tuple[int, int] | int,
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.num_patches = self.height * self.width
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = 1 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        min_aspect, max_aspect = (math.exp(a) for a in self.log_aspect_ratio)
        return (
            f"MaskingGenerator(({self.height}, {self.width}), max_num_patches={self.max_num_patches}, "
            f"min_num_patches={self.min_num_patches}, min_aspect={min_aspect:.3g}, "
            f"max_aspect={max_aspect:.3g})"
        )

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """Draws one mask.

        Args:
            num_masking_patches: Exact number of masked patches, ``0 <= n <= h * w``.
            rng: Source of all random draws.

        Returns:
            ``bool [h, w]`` with exactly ``num_masking_patches`` True entries.

        Raises:
            ValueError: If the count is negative or larger than the grid.
        """
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches must be in [0, {self.num_patches}], got {num_masking_patches}"
            )
        mask = np.zeros((self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask_block(mask, max_mask_patches, rng)
            if delta == 0:
                break
            mask_count += delta
        return self._complete_mask_randomly(mask, num_masking_patches, rng)

    def _mask_block(self, mask: np.ndarray, max_mask_patches: float, rng: np.random.Generator) -> int:
        """Adds one rectangle to ``mask`` in place (up to 10 tries); returns how many patches it added."""
        for _ in range(10):
            # lo + (hi - lo) * U, as Python's random.uniform (also when hi < lo, near the end of a mask)
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            low, high = self.log_aspect_ratio
            aspect_ratio = math.exp(low + (high - low) * rng.random())
            h = round(math.sqrt(target_area / aspect_ratio))
            w = round(math.sqrt(target_area * aspect_ratio))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top : top + h, left : left + w]
                delta = h * w - int(block.sum())
                if 0 < delta <= max_mask_patches:
                    block[...] = True
                    return delta
        return 0

    @staticmethod
    def _complete_mask_randomly(
        mask: np.ndarray, num_masking_patches: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Masks random single free patches until exactly ``num_masking_patches`` are masked."""
        flat = mask.reshape(-1)
        free = np.flatnonzero(~flat)
        flat[rng.choice(free, size=num_masking_patches - int(flat.sum()), replace=False)] = True
        return flat.reshape(mask.shape)


def sample_batch_masks(
    n_images: int,
    mask_generator: MaskingGenerator,
    rng: np.random.Generator,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
) -> torch.Tensor:
    """iBOT masks for the global crops of one batch (official ``collate_data_and_cast`` rule).

    ``m = int(n_images * mask_sample_probability)`` crops are masked; the k-th of them (k = 0..m-1) gets
    ``int(P * r_k)`` patches with ``r_k = linspace(min, max, m + 1)[k + 1]`` (float32, as the official
    ``torch.linspace``); the other crops get empty masks; the list is shuffled.

    Args:
        n_images: Number of global crops in the batch (``2 * B`` for 2 global crops).
        mask_generator: Block-mask generator on the global crops' patch grid (``P = h * w``).
        rng: Source of all random draws (masks and shuffle).
        mask_ratio_min_max: Smallest and largest masking ratio.
        mask_sample_probability: Fraction of the crops that are masked.

    Returns:
        ``bool [n_images, P]``, True where a patch is masked.
    """
    n_masked = int(n_images * mask_sample_probability)
    ratios = torch.linspace(*mask_ratio_min_max, n_masked + 1)
    counts = [int(mask_generator.num_patches * ratios[k + 1]) for k in range(n_masked)]
    counts += [0] * (n_images - n_masked)
    masks = [mask_generator(count, rng) for count in counts]
    order = rng.permutation(n_images)
    return torch.from_numpy(np.stack([masks[i] for i in order]).reshape(n_images, -1))
