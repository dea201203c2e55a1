"""Circuit breakers and rolling latency per tier. Pure state machines with a clock passed in."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass
class CircuitBreaker:
    """closed -> (failures in a row >= threshold) -> open -> (cool-down over) -> half-open:
    one probe goes through; its success closes the breaker, its failure opens it again."""

    failure_threshold: int = 3
    cooldown_s: float = 30.0
    clock: Clock = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.cooldown_s:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        """May a request go to this tier now? In half-open state only one probe may."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.failure_threshold:
            self.opened_at = self.clock()
        self.probing = False


@dataclass
class RollingLatency:
    """The median of the last `window` latencies (ms) of a tier; None before any."""

    window: int = 50
    samples: deque[float] = field(default_factory=deque)

    def add(self, ms: float) -> None:
        self.samples.append(ms)
        while len(self.samples) > self.window:
            self.samples.popleft()

    def p50(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def backoff_s(attempt: int, base: float = 0.1, cap: float = 2.0) -> float:
    """Exponential backoff before retry number `attempt` (1-based)."""
    return float(min(cap, base * 2 ** (attempt - 1)))
