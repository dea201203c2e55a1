"""Keeps one replica's engine in step with the shared state (only for a shared store).

The request path stays local where exactness is not needed: breakers, latencies, the
threshold and tenants' offsets are local mirrors, refreshed by one pipelined read every
`gateway.state_sync_s` (0.25 s by default); latencies, the controller's scores and the
settlements of limited keys' requests are written in the same beat, batched. On the
request path itself the shared store sees: a limited key's check, and on a local miss a
decision-cache read issued with it (one round trip for both: state/redis.py sends what
is issued in one turn of the event loop as one pipeline) and a write after routing (not
awaited); a breaker failure or recovery when one happens (not awaited); and a claim
before a half-open probe, so one replica in all sends it. At most one round trip is
awaited per request, and none for an unlimited key's repeated prompt.

Each beat also reads the version of the revoked keys' set (`tierroute keys revoke`
publishes there) and, when it moved, the set: a revoked key is refused on every replica
within about one beat, even while the database cannot be read.

Each beat also says this replica is alive (a heartbeat that expires after four beats).
While it is the only replica alive, a local miss skips the shared read: no other replica
wrote an entry it could find (its own writes are in its local cache too).

The controller: every replica pushes its routing scores to one shared list; the replica
holding the leader lease (renewed each beat, it expires after four beats without renewal)
drains the list into its ThresholdController and publishes each new threshold, which the
others apply on their next beat. So the controller sees all traffic and speaks once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from tierroute.gateway.limits import Ticket
from tierroute.keys import KeyPolicy
from tierroute.state.base import Ask, BreakerView, SharedState, Verdict
from tierroute.types import Explanation

if TYPE_CHECKING:
    from tierroute.gateway.engine import Engine

log = logging.getLogger(__name__)

LATENCY_WINDOW = 50
SCORES_CAP = 100_000


def dump_explanation(e: Explanation) -> str:
    return json.dumps(
        {"s": e.score, "r": list(e.reasons), "m": list(e.min_tiers), "t": dict(e.tags)}
    )


def load_explanation(text: str) -> Explanation | None:
    try:
        d = json.loads(text)
        return Explanation(
            float(d["s"]),
            tuple(str(r) for r in d["r"]),
            tuple(str(m) for m in d["m"]),
            {str(k): str(v) for k, v in d["t"].items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # another version's entry: route afresh


class StateSync:
    def __init__(
        self,
        engine: Engine,
        state: SharedState,
        interval_s: float = 0.25,
        on_revoked: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.state = state
        self.interval_s = interval_s
        self.on_revoked = on_revoked  # told the key ids revoked (gateway.virtual_keys)
        self._revoked_version = 0
        self.holder = uuid.uuid4().hex
        self.leader = False
        self.replicas = 1  # alive, this one included, as of the last beat
        self._latency: dict[str, list[float]] = {}
        self._scores: list[float] = []
        self._settles: list[tuple[KeyPolicy, Ask, Verdict, int, float]] = []
        self._probing_here: set[str] = set()
        self._offsets_version = -1
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ request path

    def later(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` without waiting for it (a write the request need not wait for)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def alone(self) -> bool:
        """No other replica alive: the shared decision cache holds nothing this one's
        local cache lacks (bar what it evicted, or wrote before a restart)."""
        return self.replicas <= 1

    async def cache_get(self, key: str) -> Explanation | None:
        if self.alone:
            return None
        text = await self.state.cache_get(key)
        return load_explanation(text) if text is not None else None

    def cache_put(self, key: str, explanation: Explanation) -> None:
        ttl = self.engine.settings.cache_ttl_s
        if ttl > 0:
            self.later(self.state.cache_put(key, dump_explanation(explanation), ttl))

    async def claim_probe(self, tier: str) -> bool:
        ttl = self.engine.settings.spec(tier).timeout_s * (self.engine.settings.retries + 1)
        if await self.state.claim_probe(tier, ttl):
            self._probing_here.add(tier)
            return True
        return False

    def failed(self, tier: str) -> None:
        self._probing_here.discard(tier)

        async def push() -> None:
            now = time.time()
            view = await self.state.breaker_failure(
                tier, self.engine.settings.breaker_failures, now
            )
            self._apply_breaker(tier, view)

        self.later(push())

    def succeeded(self, tier: str, ms: float, clean: bool) -> None:
        """A tier answered; `clean`: its breaker was closed with no failure counted."""
        # as the engine books it: under the target (tier/model) and its tier
        for name in dict.fromkeys([tier, self.engine.settings.spec(tier).name]):
            self._latency.setdefault(name, []).append(ms)
        if not clean or tier in self._probing_here:
            self._probing_here.discard(tier)
            self.later(self.state.breaker_success(tier))

    def settle(self, ticket: Ticket, tokens: int, cost_usd: float) -> None:
        """Settle on the next beat, with the others in one round trip (the reservation
        holds meanwhile, so the key is not overspent for the wait)."""
        ticket.settled = True
        self._settles.append((ticket.policy, ticket.ask, ticket.verdict, tokens, cost_usd))

    def note_score(self, score: float) -> None:
        if len(self._scores) < SCORES_CAP:
            self._scores.append(score)

    def feedback(self, tenant: str, n: float, bad: float) -> None:
        self.later(self.state.offsets_add(tenant, n, bad))

    # ------------------------------------------------------------ the beat

    async def start(self) -> None:
        personaliser = self.engine.personaliser
        if personaliser is not None:
            # Counts restored from this replica's ledger seed the shared ones on a first
            # start; after that the shared counts win (every replica restoring would count
            # the same ratings again).
            await self.state.offsets_seed(personaliser.counts())
        await self.beat()
        self._loop_task = asyncio.create_task(self._run(), name="tierroute-state-sync")

    async def aclose(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush()
        await self.state.leave(self.holder)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
            except Exception:  # one bad beat must not end syncing for good
                log.exception("shared state: sync failed; retrying on the next beat")

    async def _flush(self) -> None:
        latency, self._latency = self._latency, {}
        scores, self._scores = self._scores, []
        settles, self._settles = self._settles, []
        await asyncio.gather(  # issued together: one round trip on Redis
            self.state.settle_many(settles),
            self.state.add_latencies(latency, LATENCY_WINDOW),
            self.state.push_scores(scores, SCORES_CAP),
        )

    async def beat(self) -> None:
        """One round: write what piled up, lead the controller if this replica holds the
        lease, read back everything shared and mirror it locally."""
        e = self.engine
        await self._flush()
        self.replicas = await self.state.heartbeat(self.holder, self.interval_s * 4)
        if e.controller is not None:
            was = self.leader
            self.leader = await self.state.lease(self.holder, self.interval_s * 4)
            if self.leader and not was:
                log.info("controller: this replica leads (lease %s)", self.holder[:8])
            if self.leader:
                await self._lead()
        # breakers per target (a tier, or tier/model of a tier of several); latency also per tier
        names = list(dict.fromkeys([*e.breakers, *e.latency]))
        snap = await self.state.snapshot(names, LATENCY_WINDOW)
        for tier, view in snap.breakers.items():
            if tier in e.breakers:
                self._apply_breaker(tier, view)
        for tier, samples in snap.latency.items():
            if tier in e.latency:
                e.latency[tier].samples = deque(samples[:LATENCY_WINDOW])
        if (
            e.controller is not None
            and not self.leader
            and snap.threshold is not None
            and abs(snap.threshold - e.controller.threshold) > 1e-9
        ):
            e.set_threshold(snap.threshold)
        if e.personaliser is not None and snap.offsets_version != self._offsets_version:
            self._offsets_version = snap.offsets_version
            e.personaliser.replace_counts(await self.state.offsets_all())
        # Only ever more: a Redis that lost its data (or a local fallback answering 0)
        # does not bring a revoked key back.
        if self.on_revoked is not None and snap.revoked_version > self._revoked_version:
            self._revoked_version = snap.revoked_version
            self.on_revoked(await self.state.revoked_keys())

    async def _lead(self) -> None:
        e = self.engine
        assert e.controller is not None
        scores = await self.state.drain_scores(10_000)
        for score in scores:
            change = e.controller.observe(score, e._small_tier_quality())
            if change is not None:
                e.apply_change(change)
                await self.state.publish_threshold(change.new)

    def _apply_breaker(self, tier: str, view: BreakerView) -> None:
        """Mirror the shared breaker in the local one (its clock is monotonic, the shared
        one's wall time)."""
        e = self.engine
        breaker = e.breakers[tier]
        before = breaker.state
        breaker.failures = view.failures
        if view.opened_at is None:
            breaker.opened_at = None
            breaker.probing = False
            self._probing_here.discard(tier)
        else:
            breaker.opened_at = breaker.clock() - (time.time() - view.opened_at)
            if tier not in self._probing_here:
                breaker.probing = False  # another replica's probe: its claim key guards it
        after = breaker.state
        e.metrics.breaker_open.labels(tier).set(1 if after == "open" else 0)
        if before != after and (after == "open" or after == "closed"):
            log.warning(
                "breaker of tier %s %s (shared state)",
                tier,
                "opened" if after == "open" else "closed",
                extra={"tier": tier, "event": f"breaker_{after}"},
            )


async def attach_state(
    engine: Engine, on_revoked: Callable[[set[str]], None] | None = None
) -> None:
    """Give the engine the configured state; a shared one is synced from here on, and
    `on_revoked` told the key ids revoked through it."""
    s = engine.settings
    from tierroute.state import open_state

    engine.state = open_state(s.state_url, s.state_prefix, s.cache_size)
    await engine.state.start()
    if engine.state.shared:
        engine.sync = StateSync(engine, engine.state, s.state_sync_s, on_revoked)
        await engine.sync.start()


async def detach_state(engine: Engine) -> None:
    """At shutdown: settle what is in flight, write what piled up, close the connection."""
    await engine.drain()
    if engine.sync is not None:
        await engine.sync.aclose()
        engine.sync = None
    await engine.state.aclose()
