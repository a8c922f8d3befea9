"""Skipped steps: the flag and counters of NonFiniteSteps, the stop rule, and the EMA update that skips."""

from __future__ import annotations

import pytest
import torch

from geodino.train import NonFiniteSteps, TrainingDiverged
from geodino.train.nonfinite import ema_update_

NAN, INF = float("nan"), float("inf")


def norms(*values: float) -> list[torch.Tensor]:
    return [torch.tensor(v) for v in values]


def test_flags_and_counts_follow_the_gradient_norms() -> None:
    steps = NonFiniteSteps(max_consecutive=3)
    history = [(1.0, 2.0), (NAN, 2.0), (1.0, INF), (1.0, 2.0), (-INF, 0.0), (0.0, 0.0)]
    flags, counts = [], []
    for values in history:
        flags.append(float(steps.update(norms(*values))))
        counts.append(steps.counts.tolist())
    assert flags == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    # [skipped in a row up to this step, longest run so far, all skipped]
    assert counts == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 2, 2], [1, 2, 3], [0, 2, 3]]
    assert float(steps.total) == 3.0


def test_check_stops_at_the_longest_run_since_the_last_check() -> None:
    steps = NonFiniteSteps(max_consecutive=2)
    for values in [(NAN,), (1.0,), (NAN,)]:
        steps.update(norms(*values))
    steps.check("Module", step=3)  # runs of one: goes on
    steps.update(norms(NAN))  # the run of step 2 goes on across the check: two in a row
    two_in_a_row = r"Module: 2 optimizer steps in a row before step 4 .*3 skipped"
    with pytest.raises(TrainingDiverged, match=two_in_a_row):
        steps.check("Module", step=4)
    # a run that ended between two checks is still seen at the next one
    steps = NonFiniteSteps(max_consecutive=2)
    for values in [(INF,), (INF,), (1.0,), (1.0,)]:
        steps.update(norms(*values))
    with pytest.raises(TrainingDiverged, match="lower lr"):
        steps.check("Module", step=4)
    steps.check("Module", step=4)  # each run is reported once


def test_max_consecutive_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteSteps(0)


def test_ema_update_follows_the_formula_and_skips() -> None:
    torch.manual_seed(0)
    ema = [torch.randn(3, 4), torch.randn(5)]
    online = [torch.randn(3, 4), torch.randn(5)]
    before = [t.clone() for t in ema]
    ema_update_(ema, online, 0.9, torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(ema, before, strict=True))
    ema_update_(ema, online, 0.9, torch.tensor(0.0))
    for new, old, theta in zip(ema, before, online, strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * theta, rtol=1e-6, atol=1e-7)


def test_nothing_is_read_on_the_host() -> None:
    """The flag, the counts and the EMA update run on the meta device, which holds no values: none of them
    reads a value back (on a GPU each such read would wait for the step to finish)."""
    steps = NonFiniteSteps(max_consecutive=3)
    meta = [torch.empty((), device="meta") for _ in range(3)]
    found = steps.update(meta)
    assert found.device.type == steps.counts.device.type == "meta"
    ema_update_([torch.empty(4, device="meta")], [torch.empty(4, device="meta")], 0.99, found)
