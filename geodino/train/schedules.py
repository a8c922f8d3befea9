"""Per-iteration hyper-parameter schedules of DINOv3 training ("schedules v2" of the official code).

Every schedule is a function of the optimisation step: linear warmup from ``start`` to ``peak`` over
``warmup`` steps (the end point excluded, as ``numpy.linspace(..., endpoint=False)`` in the official
``linear_warmup_cosine_decay``), then a half-cosine from ``peak`` to ``end`` over ``cosine`` steps (the
official ``cos(linspace(0, pi, cosine))``: the last of them takes ``end``), then constant ``end``. A
constant-after-warmup schedule (the 7B / SAT recipe) is ``cosine=0``. Schedules are evaluated on the fly
from the step rather than materialised as arrays, so a resumed run only needs the step counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """Linear warmup, half-cosine decay, then constant.

    Attributes:
        peak: Value reached at the end of the warmup.
        start: Value at step 0 (warmup from here); defaults to ``peak`` (no warmup).
        end: Value after the cosine; defaults to ``peak`` (constant after warmup).
        warmup: Warmup length, steps.
        cosine: Half-cosine length after warmup, steps (0: jump to ``end``, which equals ``peak`` by
            default).
        offset: Step at which the schedule starts; before it the value is ``start`` (used to start
            a weight ramp at a later stage, e.g. the Gram weight ramp at the start of Gram anchoring).
    """

    peak: float
    start: float | None = None
    end: float | None = None
    warmup: int = 0
    cosine: int = 0
    offset: int = 0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.cosine < 0 or self.offset < 0:
            raise ValueError(f"schedule lengths must be >= 0 steps, got {self}")

    def __call__(self, step: int) -> float:
        """Value at optimisation ``step`` (0-based)."""
        start = self.peak if self.start is None else self.start
        end = self.peak if self.end is None else self.end
        t = step - self.offset
        if t < 0:
            return start
        if t < self.warmup:
            return start + (self.peak - start) * t / self.warmup
        t -= self.warmup
        if t < self.cosine:  # the official cos(linspace(0, pi, cosine)): its last step is at `end`
            phase = t / (self.cosine - 1) if self.cosine > 1 else 0.0
            return end + 0.5 * (self.peak - end) * (1 + math.cos(math.pi * phase))
        return end
