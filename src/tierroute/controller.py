"""Self-calibration: a controller that keeps the policy on target as traffic drifts.

It watches the scores of recent requests and moves the top threshold (the boundary of
the largest tier) so that the share of requests sent to the largest tier stays at a
target: a share directly, or the share a dollar budget per hour affords at the current
request rate. Each step recomputes the threshold as the quantile of the last `window`
scores that would have sent the target share up, then moves at most `max_step` towards it
and stays within [min_threshold, max_threshold]. Every change comes with its reason, for
the ledger.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tierroute.calibrate import threshold_for_share
from tierroute.errors import ConfigError


@dataclass(frozen=True)
class ControllerConfig:
    target_large_share: float | None = None
    budget_usd_per_hour: float | None = None
    # Expected cost of one request on the small and on the large tier (for the budget).
    small_cost_usd: float = 0.0
    large_cost_usd: float = 0.0
    window: int = 500
    every: int = 50
    max_step: float = 0.05
    min_threshold: float = 0.02
    max_threshold: float = 0.98
    # When the smaller tiers' estimated quality (from shadow judgements) is below this
    # floor, the threshold only moves down (more requests to the largest tier).
    quality_floor: float | None = None

    def __post_init__(self) -> None:
        if (self.target_large_share is None) == (self.budget_usd_per_hour is None):
            raise ConfigError(
                "the controller needs one target: target_large_share or budget_usd_per_hour"
            )
        if self.target_large_share is not None and not 0 <= self.target_large_share <= 1:
            raise ConfigError("target_large_share must be within [0, 1]")
        if self.budget_usd_per_hour is not None and self.large_cost_usd <= self.small_cost_usd:
            raise ConfigError("a budget needs large_cost_usd above small_cost_usd")
        if not 0 <= self.min_threshold < self.max_threshold <= 1:
            raise ConfigError("need 0 <= min_threshold < max_threshold <= 1")
        if self.window < 10 or self.every < 1 or self.max_step <= 0:
            raise ConfigError("window >= 10, every >= 1 and max_step > 0, please")


@dataclass(frozen=True)
class ThresholdChange:
    ts: float
    old: float
    new: float
    reason: str


class ThresholdController:
    def __init__(
        self,
        config: ControllerConfig,
        threshold: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.threshold = threshold
        self.clock = clock
        self._scores: deque[float] = deque(maxlen=config.window)
        self._times: deque[float] = deque(maxlen=config.window)
        self._seen = 0

    def reset(self, threshold: float) -> None:
        """Start over at `threshold`: a new router's scores live on a scale of their own."""
        self.threshold = threshold
        self._scores.clear()
        self._times.clear()

    def affordable_usd(self) -> float | None:
        """The budget per request at the current request rate (USD); None without a
        budget or before the rate is known."""
        c = self.config
        span = self._times[-1] - self._times[0] if len(self._times) > 1 else 0.0
        if c.budget_usd_per_hour is None or span <= 0:
            return None
        per_hour = (len(self._times) - 1) / span * 3600
        return c.budget_usd_per_hour / per_hour

    def target_share(self) -> float:
        c = self.config
        if c.target_large_share is not None:
            return c.target_large_share
        affordable = self.affordable_usd()
        if affordable is None:
            return 0.0
        share = (affordable - c.small_cost_usd) / (c.large_cost_usd - c.small_cost_usd)
        return min(1.0, max(0.0, share))

    def observe(self, score: float, quality: float | None = None) -> ThresholdChange | None:
        """Record one request's score; every `every` requests, maybe move the threshold.
        `quality` is the smaller tiers' current estimated quality, when known."""
        self._scores.append(score)
        self._times.append(self.clock())
        self._seen += 1
        c = self.config
        if self._seen % c.every or len(self._scores) < min(c.window, 10 * c.every):
            return None
        target = self.target_share()
        ideal = threshold_for_share(list(self._scores), target)
        ideal = min(c.max_threshold, max(c.min_threshold, ideal))
        step = max(-c.max_step, min(c.max_step, ideal - self.threshold))
        share_now = sum(s >= self.threshold for s in self._scores) / len(self._scores)
        why = (
            f"large share {share_now:.1%} over the last {len(self._scores)} requests "
            f"vs target {target:.1%}"
        )
        if c.quality_floor is not None and quality is not None and quality < c.quality_floor:
            # Quality first: never send less to the largest tier while below the floor.
            step = -c.max_step
            why = f"estimated quality {quality:.2f} below the floor {c.quality_floor:.2f}"
        new = min(c.max_threshold, max(c.min_threshold, self.threshold + step))
        if abs(new - self.threshold) < 1e-4:
            return None
        old, self.threshold = self.threshold, new
        return ThresholdChange(
            ts=self.clock(), old=old, new=new, reason=f"{why}: threshold {old:.3f} -> {new:.3f}"
        )
