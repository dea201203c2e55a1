"""The self-calibrating controller under simulated traffic whose scores drift."""

from __future__ import annotations

import numpy as np
import pytest

from tierroute.controller import ControllerConfig, ThresholdController
from tierroute.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(
    controller: ThresholdController, scores: np.ndarray, clock: Clock, gap_s: float
) -> list[bool]:
    sent_large = []
    for s in scores:
        clock.now += gap_s
        sent_large.append(bool(s >= controller.threshold))  # the policy's decision
        controller.observe(float(s))
    return sent_large


def test_large_share_returns_to_target_after_a_shift() -> None:
    rng = np.random.default_rng(7)
    clock = Clock()
    ctl = ThresholdController(ControllerConfig(target_large_share=0.3), threshold=0.5, clock=clock)
    before = rng.beta(2, 5, 4000)  # mostly easy traffic
    after = rng.beta(5, 2, 6000)  # then mostly hard: without control ~90% would go large
    settled_before = run(ctl, before, clock, 1.0)[-2000:]
    assert abs(np.mean(settled_before) - 0.3) <= 0.05
    threshold_before = ctl.threshold
    decisions = run(ctl, after, clock, 1.0)
    assert np.mean(after >= threshold_before) > 0.8  # the shift was real
    assert abs(np.mean(decisions[-2000:]) - 0.3) <= 0.05  # and the controller absorbed it


def test_steps_are_bounded_and_explained() -> None:
    clock = Clock()
    config = ControllerConfig(
        target_large_share=0.1,
        window=100,
        every=10,
        max_step=0.02,
        min_threshold=0.2,
        max_threshold=0.6,
    )
    ctl = ThresholdController(config, threshold=0.3, clock=clock)
    changes = []
    for s in np.linspace(0, 1, 2000) % 1.0:
        clock.now += 1
        change = ctl.observe(float((s * 7919) % 1.0))
        if change:
            changes.append(change)
    assert changes and all(abs(c.new - c.old) <= 0.02 + 1e-9 for c in changes)
    assert all(0.2 <= c.new <= 0.6 for c in changes)
    assert "vs target 10.0%" in changes[0].reason
    assert ctl.threshold == pytest.approx(0.6)  # the 90th percentile (0.9) is out of bounds


def test_budget_sets_the_share() -> None:
    clock = Clock()
    # 3600 requests an hour, $0.001 small vs $0.011 large: $10.80/hour pays for 20% large
    # (3600 x (0.001 + 0.2 x 0.010) = 10.8)
    config = ControllerConfig(budget_usd_per_hour=10.8, small_cost_usd=0.001, large_cost_usd=0.011)
    ctl = ThresholdController(config, threshold=0.5, clock=clock)
    rng = np.random.default_rng(3)
    decisions = run(ctl, rng.random(5000), clock, 1.0)
    assert ctl.target_share() == pytest.approx(0.2, abs=0.01)
    assert abs(np.mean(decisions[-2000:]) - 0.2) <= 0.05


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"target_large_share": 0.3, "budget_usd_per_hour": 1.0},
        {"target_large_share": 1.5},
        {"budget_usd_per_hour": 1.0},
        {"target_large_share": 0.3, "min_threshold": 0.9, "max_threshold": 0.5},
    ],
)
def test_bad_configs(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ControllerConfig(**kwargs)  # type: ignore[arg-type]


def test_quality_floor_overrides_the_share_target() -> None:
    clock = Clock()
    config = ControllerConfig(
        target_large_share=0.1,
        window=100,
        every=10,
        max_step=0.05,
        min_threshold=0.1,
        quality_floor=0.8,
    )
    ctl = ThresholdController(config, threshold=0.5, clock=clock)
    rng = np.random.default_rng(5)
    changes = []
    for s in rng.random(1000):
        clock.now += 1
        change = ctl.observe(float(s), quality=0.6)  # the small tier is judged too weak
        if change:
            changes.append(change)
    # the 10% target alone would raise the threshold towards 0.9; the floor lowers it
    assert changes and all(c.new < c.old for c in changes)
    assert ctl.threshold == pytest.approx(0.1)
    assert "estimated quality 0.60 below the floor 0.80" in changes[0].reason
    for s in rng.random(500):  # quality recovers: the share target takes over again
        clock.now += 1
        ctl.observe(float(s), quality=0.9)
    assert ctl.threshold > 0.8
