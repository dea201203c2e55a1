"""The one protocol of the gateway's shared state, and the values it returns.

What replicas share: the decision cache, each tier's breaker (failures, when it opened,
who probes it when half-open) and recent latencies, the controller's leader lease and its
published threshold, the scores the controller learns from, tenants' feedback counts for
personalisation, per-key rate-limit and spend counters, revoked keys, and which replicas
are alive.
`memory.py` keeps all of it in the process (one replica, the default); `redis.py` keeps it
in Redis for many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tierroute.keys import KeyPolicy

# Why a request was refused, for the 429: (limit name, OpenAI-style error code).
REFUSALS = {
    1: ("requests per minute", "rate_limit_exceeded"),
    2: ("tokens per minute", "rate_limit_exceeded"),
    3: ("USD budget per day", "insufficient_quota"),
    4: ("USD budget per month", "insufficient_quota"),
}


@dataclass(frozen=True)
class Ask:
    """What one request may take from its key's limits, estimated before it is answered:
    tokens of the prompt plus max_tokens, and the cost of that on the largest tier."""

    tokens: int
    cost_usd: float


@dataclass(frozen=True)
class Verdict:
    """The answer of `acquire`: refused (with the limit and how long to wait) or admitted,
    with the key's spend so far (settled plus reserved) for budget pressure."""

    refused: int = 0  # 0 admitted, else a key of REFUSALS
    retry_after_s: int = 0
    day_usd: float = 0.0
    month_usd: float = 0.0
    # Where the reservation lives, handed back to `settle` (window of the tokens counter).
    window: int = 0

    @property
    def admitted(self) -> bool:
        return self.refused == 0


@dataclass(frozen=True)
class BreakerView:
    failures: int = 0
    opened_at: float | None = None  # wall-clock seconds


@dataclass
class Snapshot:
    """What a replica reads back from the shared state on each sync."""

    breakers: dict[str, BreakerView] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)
    threshold: float | None = None
    offsets_version: int = 0
    revoked_version: int = 0  # bumped by each revocation published (keys revoke)


class SharedState(Protocol):
    """Shared state of the gateway replicas. Every method is a coroutine that never
    raises for the store being unreachable: an implementation that can lose its store
    answers from local state meanwhile and says so in `problem()`."""

    shared: bool  # False: this process is the only one that sees it

    def problem(self) -> str | None:
        """Why the state is degraded now (for /healthz), or None."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    # decision cache: JSON text by prompt hash
    async def cache_get(self, key: str) -> str | None: ...

    async def cache_put(self, key: str, value: str, ttl_s: float) -> None: ...

    # breakers
    async def breaker_failure(self, tier: str, threshold: int, now: float) -> BreakerView:
        """Count a failure; opens the breaker (opened_at = now) at `threshold` failures in
        a row, or at once when it was open (a failed probe)."""

    async def breaker_success(self, tier: str) -> None: ...

    async def claim_probe(self, tier: str, ttl_s: float) -> bool:
        """The one half-open probe of a tier: True for the single replica that may send it."""

    # what every replica reads on each sync; latencies and scores are written in batches
    async def snapshot(self, tiers: list[str], window: int) -> Snapshot: ...

    async def add_latencies(self, samples: dict[str, list[float]], window: int) -> None: ...

    async def push_scores(self, scores: list[float], cap: int) -> None: ...

    async def drain_scores(self, limit: int) -> list[float]: ...

    # replicas
    async def heartbeat(self, holder: str, ttl_s: float) -> int:
        """Say replica `holder` is alive for `ttl_s` more seconds; how many replicas are
        alive, this one included (one when nothing is shared)."""

    async def leave(self, holder: str) -> None:
        """Replica `holder` stops: the others stop counting it at once."""

    # controller
    async def lease(self, holder: str, ttl_s: float) -> bool:
        """Take or renew the controller lease; True while `holder` has it."""

    async def publish_threshold(self, value: float) -> None: ...

    # personalisation: per tenant [ratings, bad]
    async def offsets_add(self, tenant: str, n: float, bad: float) -> None: ...

    async def offsets_all(self) -> dict[str, list[float]]: ...

    async def offsets_seed(self, counts: dict[str, list[float]]) -> None:
        """Store these counts unless the shared ones already exist (a restart)."""

    # revocations: key ids `tierroute keys revoke` published (for good: the set only grows)
    async def revoked_keys(self) -> set[str]: ...

    # limits and budgets
    async def acquire(self, policy: KeyPolicy, ask: Ask, now: float) -> Verdict:
        """Check the key's limits atomically and, when admitted, count the request and
        reserve its tokens and cost."""

    async def settle(
        self, policy: KeyPolicy, ask: Ask, verdict: Verdict, tokens: int, cost_usd: float
    ) -> None:
        """Replace the reservation by what the request really used."""

    async def settle_many(self, items: list[tuple[KeyPolicy, Ask, Verdict, int, float]]) -> None:
        """`settle` for several requests at once (one round trip)."""
