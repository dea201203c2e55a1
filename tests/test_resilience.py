"""The gateway's state machines, with a fake clock."""

from __future__ import annotations

from tierroute.gateway.cache import DecisionCache, cache_key
from tierroute.gateway.resilience import CircuitBreaker, RollingLatency, backoff_s


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_cools_down_and_lets_one_probe_through() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, cooldown_s=10, clock=clock)
    assert b.allow()
    b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.now = 9.9
    assert not b.allow()
    clock.now = 10.0
    assert b.state == "half-open"
    assert b.allow()  # the probe
    assert not b.allow()  # nobody else while it runs
    b.failure()  # the probe failed: open again for a full cool-down
    assert b.state == "open"
    clock.now = 20.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()


def test_rolling_latency_median() -> None:
    r = RollingLatency(window=3)
    assert r.p50() is None
    for ms in (10, 30, 20, 1000):
        r.add(ms)
    assert r.p50() == 30  # window holds 30, 20, 1000


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff_s(i) for i in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert backoff_s(20) == 2.0


def test_decision_cache_lru_ttl_and_normalisation() -> None:
    clock = Clock()
    cache: DecisionCache[str] = DecisionCache(size=2, ttl_s=5, clock=clock)
    k = cache_key("Hello   World")
    assert k == cache_key("  hello world ")
    cache.put(k, "small")
    assert cache.get(k) == "small"
    cache.put("b", "x")
    cache.put("c", "y")  # evicts k, the least recently used
    assert cache.get(k) is None
    clock.now = 6
    assert cache.get("c") is None  # expired
    assert cache.hits == 1 and cache.misses == 2
    assert abs(cache.hit_rate - 1 / 3) < 1e-9
