"""Shared state in the process: the default, and what a Redis state falls back on."""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from tierroute.keys import KeyPolicy
from tierroute.state.base import Ask, BreakerView, Snapshot, Verdict
from tierroute.state.windows import Clock, sliding

# A key's reservations are forgotten when it has reserved nothing for this long (what a
# request killed before it was settled would otherwise hold for ever); Redis expires them alike.
RESERVATION_TTL_S = 3600.0


class MemoryState:
    """Every part of the shared state in dictionaries of this process. Limits hold per
    process; nothing is seen by another replica."""

    shared = False

    def __init__(self, cache_size: int = 10_000) -> None:
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._breakers: dict[str, BreakerView] = {}
        self._probes: dict[str, float] = {}
        self._latency: dict[str, deque[float]] = {}
        self._scores: deque[float] = deque()
        self._lease: tuple[str, float] | None = None
        self._threshold: float | None = None
        self._offsets: dict[str, list[float]] = {}
        self._offsets_version = 0
        self._counters: dict[tuple[str, str, str], float] = {}
        self._window = 0
        self._reserved_at: dict[str, float] = {}

    def problem(self) -> str | None:
        return None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def cache_get(self, key: str) -> str | None:
        item = self._cache.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._cache[key]
            return None
        return item[1]

    async def cache_put(self, key: str, value: str, ttl_s: float) -> None:
        self._cache[key] = (time.monotonic() + ttl_s, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def breaker_failure(self, tier: str, threshold: int, now: float) -> BreakerView:
        view = self._breakers.get(tier, BreakerView())
        failures = view.failures + 1
        opened = view.opened_at
        if opened is not None or failures >= threshold:
            opened = now
        self._probes.pop(tier, None)
        self._breakers[tier] = BreakerView(failures, opened)
        return self._breakers[tier]

    async def breaker_success(self, tier: str) -> None:
        self._breakers.pop(tier, None)
        self._probes.pop(tier, None)

    async def claim_probe(self, tier: str, ttl_s: float) -> bool:
        now = time.monotonic()
        if self._probes.get(tier, 0.0) > now:
            return False
        self._probes[tier] = now + ttl_s
        return True

    async def snapshot(self, tiers: list[str], window: int) -> Snapshot:
        return Snapshot(
            breakers={t: self._breakers.get(t, BreakerView()) for t in tiers},
            latency={t: list(self._latency.get(t, ()))[-window:] for t in tiers},
            threshold=self._threshold,
            offsets_version=self._offsets_version,
        )

    async def add_latencies(self, samples: dict[str, list[float]], window: int) -> None:
        for tier, values in samples.items():
            kept = self._latency.setdefault(tier, deque(maxlen=window))
            kept.extend(values)

    async def push_scores(self, scores: list[float], cap: int) -> None:
        self._scores.extend(scores)
        while len(self._scores) > cap:
            self._scores.popleft()

    async def drain_scores(self, limit: int) -> list[float]:
        out: list[float] = []
        while self._scores and len(out) < limit:
            out.append(self._scores.popleft())
        return out

    async def heartbeat(self, holder: str, ttl_s: float) -> int:
        return 1  # nothing else sees this state

    async def leave(self, holder: str) -> None:
        return None

    async def lease(self, holder: str, ttl_s: float) -> bool:
        now = time.monotonic()
        if self._lease is None or self._lease[0] == holder or self._lease[1] < now:
            self._lease = (holder, now + ttl_s)
            return True
        return False

    async def publish_threshold(self, value: float) -> None:
        self._threshold = value

    async def offsets_add(self, tenant: str, n: float, bad: float) -> None:
        counts = self._offsets.setdefault(tenant, [0.0, 0.0])
        counts[0] += n
        counts[1] += bad
        self._offsets_version += 1

    async def offsets_all(self) -> dict[str, list[float]]:
        return {t: list(c) for t, c in self._offsets.items()}

    async def offsets_seed(self, counts: dict[str, list[float]]) -> None:
        if not self._offsets and counts:
            self._offsets = {t: list(c) for t, c in counts.items()}
            self._offsets_version += 1

    async def revoked_keys(self) -> set[str]:
        return set()  # one process: revocations reach it through the database alone

    async def acquire(self, policy: KeyPolicy, ask: Ask, now: float) -> Verdict:
        c = Clock.at(now)
        k = policy.key_id
        w, prev = str(c.window), str(c.window - 1)
        get = self._counters.get
        rpm = sliding(get((k, "r", prev), 0.0), get((k, "r", w), 0.0), c.fraction)
        tpm = sliding(get((k, "t", prev), 0.0), get((k, "t", w), 0.0), c.fraction)
        if now - self._reserved_at.get(k, now) > RESERVATION_TTL_S:
            self._counters.pop((k, "resv", ""), None)  # a reservation never settled
        reserved = get((k, "resv", ""), 0.0)
        day = get((k, "d", c.day), 0.0) + reserved
        month = get((k, "m", c.month), 0.0) + reserved
        refused, wait = 0, 0
        if policy.requests_per_minute is not None and rpm + 1 > policy.requests_per_minute:
            refused, wait = 1, c.to_next_minute
        elif policy.tokens_per_minute is not None and tpm >= policy.tokens_per_minute:
            refused, wait = 2, c.to_next_minute
        elif policy.budget_usd_day is not None and day >= policy.budget_usd_day:
            refused, wait = 3, c.to_next_day
        elif policy.budget_usd_month is not None and month >= policy.budget_usd_month:
            refused, wait = 4, c.to_next_month
        if refused:
            return Verdict(refused, wait, day, month, c.window)
        self._add((k, "r", w), 1)
        self._add((k, "t", w), ask.tokens)
        self._add((k, "resv", ""), ask.cost_usd)
        self._reserved_at[k] = now
        self._forget(c)
        return Verdict(0, 0, day, month, c.window)

    async def settle(
        self, policy: KeyPolicy, ask: Ask, verdict: Verdict, tokens: int, cost_usd: float
    ) -> None:
        c = Clock.at(time.time())
        k = policy.key_id
        if (k, "t", str(verdict.window)) in self._counters:  # not a window gone by
            self._add((k, "t", str(verdict.window)), tokens - ask.tokens)
        self._add((k, "resv", ""), -ask.cost_usd)
        self._add((k, "d", c.day), cost_usd)
        self._add((k, "m", c.month), cost_usd)

    async def settle_many(self, items: list[tuple[KeyPolicy, Ask, Verdict, int, float]]) -> None:
        for item in items:
            await self.settle(*item)

    def _add(self, key: tuple[str, str, str], value: float) -> None:
        self._counters[key] = self._counters.get(key, 0.0) + value

    def _forget(self, c: Clock) -> None:
        """When a new minute starts, drop minute windows older than the previous one and
        days and months gone by (bounded memory)."""
        if c.window == self._window:
            return
        self._window = c.window
        keep_days, keep_months = {c.day}, {c.month}
        for name in list(self._counters):
            _, kind, when = name
            if (
                (kind in ("r", "t") and int(when) < c.window - 1)
                or (kind == "d" and when not in keep_days)
                or (kind == "m" and when not in keep_months)
            ):
                del self._counters[name]
