"""The routing engine of the gateway: decide a tier, answer with fallbacks, keep the books.

HTTP-free, so it can be driven by the ASGI app or by a test directly.

How request hints combine with the router's score (in this order):
1. priority (`batch` | `interactive` | `critical`) shifts the score before the policy's
   thresholds apply (see `Policy.decide`): critical leans towards larger tiers, batch
   towards cheaper ones; the abstain band and rule floors then apply;
2. latency budget (ms): a tier whose rolling p50 latency (its configured typical latency
   until it has answered) exceeds the budget is not used; the request moves down to the
   largest tier below that fits;
3. cost cap (USD): a tier whose estimated cost for this request (prompt tokens estimated
   at 4 characters each, plus max_tokens of output) exceeds the cap is not used, likewise.
When no tier meets a budget the smallest tier is used and the reason says so. A tier
named as the request's `model` skips the router but not the budgets' notes.

Fallbacks: the chosen tier first, then every larger tier, then the smaller ones, skipping
tiers whose circuit breaker is open. Retryable failures (connect, timeout, 5xx, 429) are
retried with exponential backoff before moving on.

A stream that breaks before its first chunk falls back like any request. Once a chunk has
been sent the answer cannot switch tiers silently: the client receives an OpenAI-style
error event and the stream ends; the ledger records status 502 and the error.

Cascade (opt-in, `gateway.cascade`, see tierroute.cascade): an auto request the router sends
to the smallest tier (scope "small"; every auto request with scope "all") is answered there
first, whole, and a verifier decides whether that answer stands. If not, the request goes
along the routed chain without the smallest tier, and a stream streams that tier's answer;
an accepted answer is streamed from the buffer. The small answer is kept when escalating
would break the request's latency or cost budget, or when every larger tier fails. The
ledger row names the tier that answered and holds the tokens and cost of every call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from tierroute.backends.base import (
    Backend,
    BackendError,
    ChatRequest,
    ChatResult,
    Poster,
    StreamDelta,
)
from tierroute.backends.content import non_text_part
from tierroute.cascade import Cascade, Draft
from tierroute.controller import ThresholdChange, ThresholdController
from tierroute.conversation import estimate_tokens, routing_text
from tierroute.errors import InputError
from tierroute.gateway.batcher import MicroBatcher, explain_batch
from tierroute.gateway.cache import DecisionCache, cache_key
from tierroute.gateway.choose import ModelChooser
from tierroute.gateway.limits import Ticket, settle
from tierroute.gateway.metrics import Metrics
from tierroute.gateway.resilience import CircuitBreaker, RollingLatency, backoff_s
from tierroute.gateway.settings import GatewaySettings, TierSpec
from tierroute.gateway.shadow import Shadow
from tierroute.ledger import Ledger, LedgerRow
from tierroute.personalise import Personaliser
from tierroute.routers.base import BaseRouter
from tierroute.state import MemoryState, SharedState
from tierroute.types import Decision, Explanation

if TYPE_CHECKING:
    from tierroute.gateway.sync import StateSync

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hints:
    priority: str | None = None
    latency_budget_ms: float | None = None
    max_cost_usd: float | None = None
    # Whose request: the OpenAI `user` field or metadata.tenant, else the API key id.
    tenant: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class Owner:
    api_key_id: str | None
    tier: str
    tenant: str | None
    # The model key that answered, in a tier of several models (it learns from ratings).
    target: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Routed:
    decision: Decision
    chain: list[str]
    cache_hit: bool
    routing_ms: float
    # The request's routing text, made once here and reused by the ledger and cost estimates.
    text: str = ""
    forced: bool = False  # the client named the tier


@dataclass
class Lookahead:
    """A shared decision-cache read started before the limit check (`Engine.look_ahead`),
    for the routing text whose cache key is `key`."""

    key: str
    read: asyncio.Task[Explanation | None]


class AllTiersFailed(Exception):
    def __init__(self, tried: list[str], last: BackendError | None) -> None:
        super().__init__(str(last) if last else "no tier could take the request")
        self.tried = tried
        self.last = last


@dataclass
class Outcome:
    """What one answered (or failed) request leaves for the response and the ledger."""

    request_id: str
    routed: Routed
    tier: str | None = None
    tried: list[str] = field(default_factory=list)
    result: ChatResult | None = None
    # The cascade's X-Tierroute-Cascade note, and the small-tier calls it made whose answers
    # were not returned, as (tier, prompt tokens, completion tokens): the ledger adds them.
    cascade: str | None = None
    spent: list[tuple[str, int, int]] = field(default_factory=list)
    escalated: bool = False  # the verifier sent it on (an escalation, not a fallback)
    notes: list[str] = field(default_factory=list)  # tiers skipped or failed, for the reason
    replayed: bool = False  # a buffered answer was streamed: its tier's latency is booked
    ticket: Ticket | None = None  # the key's reservation of limits, settled when booked

    @property
    def booked_tier(self) -> str:
        """The tier the request is booked to: the one that answered; when none did, the
        last one tried (the one whose failure the row reports); else the routed one."""
        if self.tier is not None:
            return self.tier
        return self.tried[-1] if self.tried else self.routed.decision.tier.name


class Engine:
    def __init__(
        self,
        settings: GatewaySettings,
        router: BaseRouter,
        backends: Mapping[str, Backend],
        ledger: Ledger,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.router = router
        self.backends = dict(backends)
        self.ledger = ledger
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.cache: DecisionCache[Explanation] = DecisionCache(
            settings.cache_size, settings.cache_ttl_s
        )
        # Per tier, and per model of a tier of several (keyed tier/model): a failing model
        # falls back to its tier's next model; the tier's own latency feeds the budgets.
        keys = [t.key for s in settings.tiers for t in s.targets]
        self.breakers = {
            k: CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s) for k in keys
        }
        self.latency = {k: RollingLatency() for k in dict.fromkeys([*self.tier_names, *keys])}
        self.cascade = (
            Cascade.from_config(settings.cascade, [t.name for t in settings.tiers])
            if settings.cascade is not None and settings.cascade.enabled
            else None
        )
        self.controller = (
            ThresholdController(settings.controller, settings.policy.entry, clock)
            if settings.controller is not None and settings.policy.thresholds
            else None
        )
        # The gauge, the controller and the ledger speak of the largest tier's entry score
        # (its boundary minus the abstain band): the share they hold is the share sent up.
        self.metrics.threshold.set(settings.policy.entry if settings.policy.thresholds else 0)
        self.shadow: Shadow | None = None
        if settings.shadow is not None:
            largest = settings.tiers[-1]
            encoder = getattr(router, "encoder", None)
            # A largest tier of several models judges with its first one.
            judges = dict(self.backends)
            judge_tier = largest.tier
            if largest.models and largest.targets[0].key in judges:
                judges[largest.name] = judges[largest.targets[0].key]
                judge_tier = settings.spec(largest.targets[0].key).tier
            self.shadow = Shadow(
                settings.shadow,
                largest.name,
                judges,
                ledger,
                self.metrics,
                largest.timeout_s,
                embed=encoder.encode if encoder is not None else None,
                cost=judge_tier.cost,
            )
        # A tier of several models picks one per request (tierroute.gateway.choose).
        self.chooser: ModelChooser | None = None
        if any(s.models for s in settings.tiers):
            budget = self.controller.affordable_usd if self.controller is not None else None
            self.chooser = ModelChooser(settings, router, settings.choose, budget)
            self.chooser.restore(ledger, clock())
            if self.shadow is not None:
                self.shadow.on_verdict = self._verdict
        # Ids of recent requests -> their API key id, so feedback can be checked at once
        # (ledger rows reach the disk a few ms later, from the writer thread).
        self._recent: OrderedDict[str, Owner] = OrderedDict()
        # The latest rating per (request, rater), so a changed rating replaces, not adds.
        self._ratings: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.personaliser: Personaliser | None = None
        if settings.personalise is not None:
            self.personaliser = personaliser = Personaliser(settings.personalise)
            self.metrics.personalised_tenants.set_function(lambda: personaliser.tenants)
            self._restore_personaliser()
        # One routing thread: the encoder's memo is not thread-safe, and onnxruntime
        # already uses both cores for one query; the event loop stays free meanwhile.
        # Concurrent fresh prompts share one embedding call there (gateway/batcher.py).
        self._routing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierroute-route")
        # Limits and budgets count here; with a shared store, `sync` mirrors the rest of
        # the local state (breakers, latency, threshold, offsets) from it. See gateway/sync.py.
        self.state: SharedState = MemoryState(settings.cache_size)
        self.sync: StateSync | None = None
        self._later: set[asyncio.Task[Any]] = set()
        self._swapped = False  # the continuous learner swapped the router
        self._batcher = MicroBatcher(
            explain_batch,
            self._routing,
            settings.route_batch_max,
            settings.route_batch_wait_ms / 1000,
            self.metrics.routing_batch.observe,
        )

    @property
    def tier_names(self) -> list[str]:
        return [s.name for s in self.settings.tiers]

    def later(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` on the loop without waiting for it, holding it until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def drain(self) -> None:
        """Wait for the writes started by `later` (at shutdown)."""
        if self._later:
            await asyncio.gather(*self._later, return_exceptions=True)

    def release(self, outcome: Outcome) -> None:
        """A request that ends unbooked (its client left) gives its reservation back,
        keeping what its cascade's calls cost."""
        if outcome.ticket is not None and not outcome.ticket.settled:
            tokens = sum(p + c for _, p, c in outcome.spent)
            self.later(settle(self.state, outcome.ticket, tokens, self.spent_cost(outcome)))

    def close(self) -> None:
        self._routing.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ deciding

    def _shared_cache(self) -> StateSync | None:
        """The sync to read the shared decision cache through, or None where a read cannot
        hit: no shared state, this replica's router swapped by its learner (it no longer
        shares explanations), or no other replica alive to have written one."""
        sync = self.sync
        if sync is None or self._swapped or sync.alone:
            return None
        return sync

    def look_ahead(self, messages: Any, scope: str | None = None) -> Lookahead | None:
        """Start reading the shared decision cache for these messages now, so the read goes
        to the shared store with the limit check that precedes routing, in one round trip
        (hand the result to `route`). None when there is nothing worth reading: a local
        hit, a read that cannot hit, or messages `route` will refuse."""
        sync = self._shared_cache()
        if sync is None:
            return None
        try:
            key = cache_key(routing_text(messages), scope)
        except InputError:
            return None
        if self.cache.peek(key):
            return None
        read = asyncio.get_running_loop().create_task(sync.cache_get(key))
        # A request refused by its limits never awaits it: its error is then nobody's.
        read.add_done_callback(lambda t: t.cancelled() or t.exception())
        return Lookahead(key, read)

    async def explain(
        self, text: str, scope: str | None = None, ahead: Lookahead | None = None
    ) -> tuple[Explanation, bool]:
        """The router's explanation of a routing text, from the decision cache if it can;
        `scope` (the caller's key or tenant) keeps one caller's entries from another;
        `ahead`: the shared read already started for it."""
        key = cache_key(text, scope)
        cached = self.cache.get(key)
        if cached is not None:
            self.metrics.cache_hits.inc()
            self.metrics.cache_hit_rate.set(self.cache.hit_rate)
            return cached, True
        router = self.router
        sync = self._shared_cache()
        if sync is not None:
            # another replica may have routed it already
            if ahead is not None and ahead.key == key:
                shared = await ahead.read
            else:
                shared = await sync.cache_get(key)
            if shared is not None and router is self.router:
                self.cache.put(key, shared)
                self.metrics.cache_hits.inc()
                self.metrics.cache_hit_rate.set(self.cache.hit_rate)
                return shared, True
        self.metrics.cache_misses.inc()
        explanation = await self._batcher.submit((router, text))
        if router is self.router:  # not one swapped out meanwhile
            self.cache.put(key, explanation)
            # written even by a lone replica: one that joins later finds it
            if self.sync is not None and not self._swapped:
                self.sync.cache_put(key, explanation)
        self.metrics.cache_hit_rate.set(self.cache.hit_rate)
        return explanation, False

    def _expected_ms(self, key: str) -> float:
        """A tier's (or one model's) rolling p50 latency, else its configured typical one."""
        p50 = self.latency[key].p50()
        return p50 if p50 is not None else self.settings.spec(key).tier.typical_latency_ms

    def _fits(self, key: str, hints: Hints, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why `key` (a tier, or one model of a tier of several) breaks a budget of the
        request, or None if it fits. A tier of several models fits when one of its
        models does, each judged by its own latency and price."""
        spec = self.settings.spec(key)
        whys = [self._model_fits(t, hints, prompt_tokens, max_tokens) for t in spec.targets]
        if spec.model_name is not None:  # one model: itself only
            whys = [self._model_fits(spec, hints, prompt_tokens, max_tokens)]
        return None if any(w is None for w in whys) else whys[0]

    def _model_fits(
        self, spec: TierSpec, hints: Hints, prompt_tokens: int, max_tokens: int
    ) -> str | None:
        expected = self._expected_ms(spec.key)
        if hints.latency_budget_ms is not None and expected > hints.latency_budget_ms:
            return f"{spec.key} p50 {expected:.0f} ms > budget"
        if hints.max_cost_usd is not None:
            cost = spec.tier.cost(prompt_tokens, max_tokens)
            if cost > hints.max_cost_usd:
                return f"{spec.key} est ${cost:.6f} > cap"
        return None

    async def route(
        self,
        messages: list[dict[str, Any]],
        hints: Hints,
        max_tokens: int,
        forced: str | None = None,
        pressure: float = 0.0,
        scope: str | None = None,
        ahead: Lookahead | None = None,
    ) -> Routed:
        """`pressure`: how far the key's budget pressure lowers its score (gateway/limits.py).
        `scope`: whose decision cache entries it may hit (None: everyone's, an open gateway).
        `ahead`: the shared decision-cache read `look_ahead` started for these messages."""
        start = time.perf_counter()
        policy = self.settings.policy
        images = non_text_part(messages) is not None
        try:
            text = routing_text(messages)
        except InputError:
            if not images:
                raise
            text = ""  # the latest user message is an image alone: no text to score
        seeing = [t for t in policy.tiers if self._reads_images(t.name)] if images else []
        if forced is not None:
            decision = Decision(
                score=float("nan"),
                tier=policy.tier(forced),
                reason=f"tier {forced} requested by the client",
            )
            cache_hit = False
        elif not text:
            if not seeing:
                raise InputError(
                    "the latest user message is an image with no text, and no tier here reads "
                    "images (none has vision: true); add a text part or configure a vision tier"
                )
            decision = Decision(
                score=float("nan"),
                tier=seeing[0],
                reason=f"an image without text (nothing to score): {seeing[0].name}, the "
                "smallest tier with vision: true",
            )
            cache_hit = False
        else:
            explanation, cache_hit = await self.explain(text, scope, ahead)
            self._calibrate(explanation.score)
            offset = self.personaliser.shift(hints.tenant) if self.personaliser else 0.0
            label = f"tenant {hints.tenant}"
            if pressure:
                label = f"{label} {offset:+.2f}, budget pressure" if offset else "budget pressure"
                offset -= pressure
            decision = policy.decide(explanation, hints.priority, offset, label)
        tiers = list(policy.tiers)
        index = tiers.index(decision.tier)
        prompt_tokens = estimate_tokens(text)
        notes = []
        why = self._fits(tiers[index].name, hints, prompt_tokens, max_tokens)
        if why is not None:
            below = [
                i
                for i in range(index - 1, -1, -1)
                if self._fits(tiers[i].name, hints, prompt_tokens, max_tokens) is None
            ]
            index = below[0] if below else 0
            notes.append(
                f"budget: {why}; using {tiers[index].name}"
                + ("" if below else " (no tier meets the budget)")
            )
        auto_images = images and forced is None and bool(seeing)
        if auto_images and tiers[index] not in seeing:
            above = [i for i in range(index + 1, len(tiers)) if tiers[i] in seeing]
            below = [i for i in range(index - 1, -1, -1) if tiers[i] in seeing]
            blind, index = tiers[index].name, (above or below)[0]
            notes.append(f"images: {blind} cannot read them, using {tiers[index].name}")
        chosen = tiers[index]
        order = [chosen, *tiers[index + 1 :], *tiers[:index][::-1]]
        chain = [t.name for t in order]
        if forced is not None and not self.settings.forced_fallback:
            chain = [forced]  # the client named its tier: that tier answers, or the request fails
        if self.chooser is not None:
            chain = await self._pick_models(
                chain, decision, text, (prompt_tokens, max_tokens), hints, notes
            )
        if auto_images:  # a tier (or model) without vision would refuse the image: 400
            chain = [k for k in chain if self.settings.spec(k).vision]
        if notes:
            decision = Decision(
                decision.score, chosen, "; ".join([decision.reason, *notes]), decision.tags
            )
        routing_ms = (time.perf_counter() - start) * 1000
        return Routed(
            decision=decision,
            chain=chain,
            cache_hit=cache_hit,
            routing_ms=routing_ms,
            text=text,
            forced=forced is not None,
        )

    def _reads_images(self, tier: str) -> bool:
        """Whether a tier (any of its models) has vision: true."""
        return any(t.vision for t in self.settings.spec(tier).targets)

    async def _pick_models(
        self,
        chain: list[str],
        decision: Decision,
        text: str,
        tokens: tuple[int, int],
        hints: Hints,
        notes: list[str],
    ) -> list[str]:
        """The chain with each tier of several models replaced by its models, best first
        (tierroute.gateway.choose); the reason names the chosen tier's pick. `tokens` are
        the prompt's (estimated) and max_tokens; a model over the cost cap goes last."""
        assert self.chooser is not None
        probs: dict[str, float] = {}
        if self.chooser.needs_probabilities(chain):
            loop = asyncio.get_running_loop()
            probs = await loop.run_in_executor(self._routing, self.chooser.probabilities, text)
        slow: set[str] = set()
        if hints.latency_budget_ms is not None:
            budget = hints.latency_budget_ms
            models = [m for t in chain for m in self.settings.spec(t).models]
            slow = {m.key for m in models if self._expected_ms(m.key) > budget}
        keys, pick = self.chooser.expand(
            chain, decision.tags, probs, *tokens, hints.max_cost_usd, slow
        )
        if pick is not None and pick.tier == self.settings.spec(chain[0]).name:
            notes.append(pick.note())
        return keys

    def _small_tier_quality(self) -> float | None:
        """The lowest estimated quality among the smaller tiers, once judged often enough."""
        return self.shadow.lowest_estimate() if self.shadow is not None else None

    def _calibrate(self, score: float) -> None:
        """Feed the controller; apply and log a threshold change when it makes one."""
        if self.controller is None:
            return
        if self.sync is not None:  # the replica holding the lease runs the controller
            self.sync.note_score(score)
            return
        change = self.controller.observe(score, self._small_tier_quality())
        if change is not None:
            self.apply_change(change)

    def apply_change(self, change: ThresholdChange) -> None:
        """Apply the controller's change to the policy, and book and log it."""
        self.set_threshold(change.new)
        self.ledger.record_policy_change(change.ts, change.old, change.new, change.reason)
        log.info("policy: %s", change.reason)

    def set_threshold(self, entry: float) -> None:
        """Move the largest tier's entry score to `entry` (a controller's threshold)."""
        policy = self.settings.policy
        assert policy.thresholds is not None
        top = entry + policy.abstain_band  # the band lies above the entry score
        # Lower boundaries never rise above the top one, so thresholds stay ascending.
        policy.thresholds = [min(t, top) for t in policy.thresholds[:-1]] + [top]
        if self.controller is not None:
            self.controller.threshold = entry
        self.metrics.threshold.set(entry)

    def swap_router(self, router: BaseRouter, thresholds: list[float] | None = None) -> None:
        """Serve `router` from the next request on (a promotion or a rollback of the
        continuous learner), with the policy's `thresholds` for its score scale. Call it
        on the event loop: the decision cache and the controller live there."""
        self.router = router
        self._swapped = True
        if self.chooser is not None:
            self.chooser.set_router(router)
        if thresholds is not None:
            policy = self.settings.policy
            policy.thresholds = list(thresholds)
            self.metrics.threshold.set(policy.entry)
            if self.controller is not None:
                self.controller.reset(policy.entry)
        self.cache.clear()  # its explanations are the old router's

    # ------------------------------------------------------------------ answering

    async def _attempts(self, tier: str) -> AsyncIterator[int]:
        for attempt in range(self.settings.retries + 1):
            if attempt:
                await asyncio.sleep(backoff_s(attempt))
            yield attempt

    async def _available(self, tier: str) -> bool:
        breaker = self.breakers[tier]
        allowed = breaker.allow()
        if allowed and breaker.probing and self.sync is not None:
            allowed = await self.sync.claim_probe(tier)  # one probe among all replicas
        self.metrics.breaker_open.labels(tier).set(0 if allowed else 1)
        return allowed

    def _failed(self, tier: str) -> None:
        breaker = self.breakers[tier]
        before = breaker.state
        breaker.failure()
        after = breaker.state
        if self.sync is not None:
            self.sync.failed(tier)
        self.metrics.breaker_open.labels(tier).set(1 if after == "open" else 0)
        if after == "open" and before != "open":
            log.warning(
                "breaker of tier %s opened after %d failure(s); it skips the tier for %gs",
                tier,
                breaker.failures,
                breaker.cooldown_s,
                extra={"tier": tier, "event": "breaker_open"},
            )

    def _succeeded(self, tier: str, ms: float) -> None:
        breaker = self.breakers[tier]
        if self.sync is not None:
            self.sync.succeeded(tier, ms, breaker.state == "closed" and not breaker.failures)
        if breaker.state != "closed":
            log.info(
                "breaker of tier %s closed: the tier answered again",
                tier,
                extra={"tier": tier, "event": "breaker_closed"},
            )
        breaker.success()
        for name in dict.fromkeys([tier, self.settings.spec(tier).name]):
            self.latency[name].add(ms)
        self.metrics.breaker_open.labels(tier).set(0)

    def health(self) -> list[str]:
        """What is wrong now, for /healthz: an empty list when every tier is in service."""
        problems = [
            f"tier {name}: breaker {breaker.state}"
            for name, breaker in self.breakers.items()
            if breaker.state != "closed"
        ]
        state = self.state.problem()
        return [*problems, f"state: {state}"] if state is not None else problems

    async def _on_tier(
        self, tier: str, attempt: Callable[[str, float], Awaitable[T]], request_id: str = ""
    ) -> T:
        """`attempt(tier, timeout)` with the tier's retries. Raises the last retryable
        BackendError once they are spent (and counts the failure on the tier's breaker),
        a non-retryable one at once."""
        timeout = self.settings.spec(tier).timeout_s
        last: BackendError | None = None
        async for n in self._attempts(tier):
            try:
                return await attempt(tier, timeout)
            except BackendError as exc:
                if not exc.retryable:
                    raise
                last = exc
                if n < self.settings.retries:
                    log.warning(
                        "request %s: tier %s attempt %d failed (%s); retrying",
                        request_id,
                        tier,
                        n + 1,
                        exc,
                        extra={"request_id": request_id, "tier": tier, "event": "retry"},
                    )
        self._failed(tier)
        assert last is not None  # there is always at least one attempt
        raise last

    async def _along_chain(
        self,
        outcome: Outcome,
        attempt: Callable[[str, float], Awaitable[T]],
        chain: list[str] | None = None,
    ) -> T:
        """The first success of `attempt(tier, timeout)` along the fallback chain (the
        routed one unless given), with retries per tier; raises AllTiersFailed, or a
        non-retryable BackendError at once."""
        last: BackendError | None = None
        rid = outcome.request_id
        for tier in outcome.routed.chain if chain is None else chain:
            if not await self._available(tier):
                outcome.notes.append(f"{tier} skipped: breaker open")
                log.warning(
                    "request %s: tier %s skipped, its breaker is open",
                    rid,
                    tier,
                    extra={"request_id": rid, "tier": tier, "event": "skipped"},
                )
                continue
            if outcome.tried:
                log.warning(
                    "request %s: falling back from %s to %s",
                    rid,
                    outcome.tried[-1],
                    tier,
                    extra={"request_id": rid, "tier": tier, "event": "fallback"},
                )
            outcome.tried.append(tier)
            try:
                value = await self._on_tier(tier, attempt, rid)
            except BackendError as exc:
                if not exc.retryable:
                    raise
                last = exc
                outcome.notes.append(f"{tier} failed: {exc}")
                log.warning(
                    "request %s: tier %s failed: %s",
                    rid,
                    tier,
                    exc,
                    extra={"request_id": rid, "tier": tier, "event": "tier_failed"},
                )
                continue
            outcome.tier = tier
            return value
        raise AllTiersFailed(outcome.tried, last)

    async def _complete_on(self, tier: str, request: ChatRequest, timeout: float) -> ChatResult:
        start = time.perf_counter()
        result = await self.backends[tier].complete(request, timeout)
        self._succeeded(tier, (time.perf_counter() - start) * 1000)
        return result

    async def _open_on(
        self, tier: str, request: ChatRequest, timeout: float
    ) -> tuple[StreamDelta, AsyncIterator[StreamDelta]]:
        stream = self.backends[tier].stream(request, timeout)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = StreamDelta(text="", finish_reason="stop", prompt_tokens=0, completion_tokens=0)
        return first, stream

    async def complete(self, outcome: Outcome, request: ChatRequest) -> ChatResult:
        """Answer along the fallback chain."""
        outcome.result = await self._along_chain(
            outcome, lambda tier, timeout: self._complete_on(tier, request, timeout)
        )
        return outcome.result

    async def open_stream(
        self, outcome: Outcome, request: ChatRequest
    ) -> tuple[StreamDelta, AsyncIterator[StreamDelta]]:
        """The first delta and the rest of the stream, from the first tier that starts one.
        Success or failure of the tier is settled by `stream_finished` at the end."""
        return await self._along_chain(
            outcome, lambda tier, timeout: self._open_on(tier, request, timeout)
        )

    async def post(self, outcome: Outcome, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """`body` posted whole to `path` (/completions, /embeddings) along the fallback
        chain, skipping tiers whose backend has no `post` (local models)."""

        async def attempt(tier: str, timeout: float) -> dict[str, Any]:
            start = time.perf_counter()
            backend = self.backends[tier]
            assert isinstance(backend, Poster)  # the chain below holds no other
            data = await backend.post(path, body, timeout)
            self._succeeded(tier, (time.perf_counter() - start) * 1000)
            return data

        chain = [t for t in outcome.routed.chain if isinstance(self.backends[t], Poster)]
        return await self._along_chain(outcome, attempt, chain)

    # ------------------------------------------------------------------ cascade

    def cascades(self, routed: Routed, forced: bool) -> bool:
        """Whether a request goes through the cascade: never one that names its tier;
        with scope "small" an auto request routed to the smallest tier, with "all" any."""
        config = self.settings.cascade
        if self.cascade is None or config is None or forced:
            return False
        small = self.tier_names[0]
        if not any(self._tier_of(k) == small for k in routed.chain):
            return False  # left out of the chain (e.g. it cannot read the request's image)
        return config.scope == "all" or self._tier_of(routed.chain[0]) == small

    def _tier_of(self, key: str) -> str:
        """The tier of a chain entry (a tier, or one model of a tier of several)."""
        return self.settings.spec(key).name

    def _smallest(self, outcome: Outcome) -> str:
        """The chain entry the cascade drafts on: the smallest tier's (best) model."""
        small = self.tier_names[0]
        return next((k for k in outcome.routed.chain if self._tier_of(k) == small), small)

    async def complete_cascade(
        self, outcome: Outcome, request: ChatRequest, hints: Hints
    ) -> ChatResult:
        """Answer through the cascade (see the module docstring)."""

        def keep(result: ChatResult) -> ChatResult:
            return result

        outcome.result = await self._cascade(
            outcome,
            request,
            hints,
            lambda tier, timeout: self._complete_on(tier, request, timeout),
            keep,
        )
        return outcome.result

    async def open_cascade_stream(
        self, outcome: Outcome, request: ChatRequest, hints: Hints
    ) -> tuple[StreamDelta, AsyncIterator[StreamDelta]]:
        """Like `open_stream`, through the cascade: the small answer is buffered, then
        whichever answer stands is streamed."""

        def replay(result: ChatResult) -> tuple[StreamDelta, AsyncIterator[StreamDelta]]:
            outcome.replayed = True
            return _replay(result)

        return await self._cascade(
            outcome,
            request,
            hints,
            lambda tier, timeout: self._open_on(tier, request, timeout),
            replay,
        )

    async def _cascade(
        self,
        outcome: Outcome,
        request: ChatRequest,
        hints: Hints,
        attempt: Callable[[str, float], Awaitable[T]],
        keep: Callable[[ChatResult], T],
    ) -> T:
        small = self.tier_names[0]
        draft = await self._draft(outcome, request)
        helpers = self.settings.cascade.helper_tiers if self.settings.cascade else ()
        chain = [
            t
            for t in outcome.routed.chain
            if self._tier_of(t) != small and self._tier_of(t) not in helpers
        ]
        max_tokens = request.limit or self.settings.max_tokens_default
        over = self._fits(
            chain[0],
            hints,
            estimate_tokens(outcome.routed.text),
            max_tokens,
        )
        if draft is not None:
            if draft.accepted:
                return keep(self._keep(outcome, draft, draft.note, request))
            if over is not None:
                note = f"{draft.note}; kept: escalating breaks the budget ({over})"
                return keep(self._keep(outcome, draft, note, request))
            outcome.cascade, outcome.escalated = draft.note, True
        try:
            return await self._along_chain(outcome, attempt, chain)
        except (AllTiersFailed, BackendError) as exc:
            if draft is None:
                raise
            note = f"{draft.note}; kept: no larger tier answered ({exc})"
            return keep(self._keep(outcome, draft, note, request))

    async def _draft(self, outcome: Outcome, request: ChatRequest) -> Draft | None:
        """The smallest tier's answer and verdict; None when that tier is unavailable or
        failed after its retries (the note says so), so the request escalates."""
        assert self.cascade is not None
        small = self._smallest(outcome)
        if not await self._available(small):
            outcome.cascade = f"escalated: tier {small} is unavailable (circuit breaker open)"
            return None
        outcome.tried.append(small)

        async def ask(req: ChatRequest, tier: str | None = None) -> ChatResult:
            # A collaboration strategy may ask another tier (a partner, a reviewer).
            name = small if tier is None else tier
            if name != small and not await self._available(name):
                raise BackendError(f"tier {name} is unavailable (breaker open)", retryable=True)
            result = await self._on_tier(
                name, lambda t, timeout: self._complete_on(t, req, timeout)
            )
            outcome.spent.append((name, result.prompt_tokens, result.completion_tokens))
            return result

        try:
            return await self.cascade.draft(ask, request)
        except BackendError as exc:
            if not exc.retryable:
                raise
            outcome.cascade = f"escalated: tier {small} failed ({exc})"
            return None

    def _keep(self, outcome: Outcome, draft: Draft, note: str, request: ChatRequest) -> ChatResult:
        """The draft stands: its own tokens are the answer's, not spent extra. It is the
        first small call (on the smallest tier's chosen model) unless a combiner picked
        another (see _draft's ask). The logprobs the verifier asked for go back only to a
        client that asked too."""
        outcome.tier = outcome.spent.pop(draft.chosen)[0]
        outcome.cascade = note
        result = draft.result
        if result.choices is not None and not request.extra.get("logprobs"):
            choices = [{**c, "logprobs": None} for c in result.choices]
            result = replace(result, choices=choices)
        return result

    def spent_cost(self, outcome: Outcome) -> float:
        """USD of the cascade's calls whose answers were not returned."""
        return sum(self.settings.spec(t).tier.cost(p, c) for t, p, c in outcome.spent)

    def stream_finished(self, tier: str, ms: float, ok: bool) -> None:
        if ok:
            self._succeeded(tier, ms)
        else:
            self._failed(tier)

    # ------------------------------------------------------------------ books

    def record(
        self,
        outcome: Outcome,
        *,
        status: int,
        hints: Hints,
        api_key_id: str | None,
        latency_ms: float,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        ttft_ms: float | None = None,
        error: str | None = None,
        stream: bool = False,
        prompt_text: str | None = None,
    ) -> None:
        key = outcome.booked_tier  # the tier, or the model of a tier of several
        tier = self.settings.spec(key).tier
        tier_name = tier.name
        cost = tier.cost(prompt_tokens, completion_tokens)
        score = outcome.routed.decision.score
        # The ledger has one row per request: a cascade's extra calls are in its sums.
        spent_prompt = sum(p for _, p, _ in outcome.spent)
        spent_completion = sum(c for _, _, c in outcome.spent)
        spent_cost = self.spent_cost(outcome)
        largest = self.settings.tiers[-1].tier
        decision = outcome.routed.decision
        self.ledger.record(
            LedgerRow(
                id=outcome.request_id,
                ts=self.clock(),
                api_key_id=api_key_id,
                tier=tier_name,
                score=None if score != score else score,
                hints=hints.as_dict(),
                model=tier.model,
                prompt_tokens=prompt_tokens + spent_prompt,
                completion_tokens=completion_tokens + spent_completion,
                cost_usd=cost + spent_cost,
                latency_ms=latency_ms,
                ttft_ms=ttft_ms,
                fallback_chain=tuple(outcome.tried),
                status=status,
                error=error,
                cache_hit=outcome.routed.cache_hit,
                stream=stream,
                prompt_text=prompt_text,
                # Which cascade strategy decided, and why (the X-Tierroute-Cascade note).
                reason=decision.reason
                + (f"; cascade {outcome.cascade}" if outcome.cascade else ""),
                tags=dict(decision.tags),
                forced=outcome.routed.forced,
                tenant=hints.tenant,
                price_in_per_m=tier.input_price_per_m,
                price_out_per_m=tier.output_price_per_m,
                largest_price_in_per_m=largest.input_price_per_m,
                largest_price_out_per_m=largest.output_price_per_m,
            )
        )
        if outcome.ticket is not None:
            tokens = prompt_tokens + spent_prompt + completion_tokens + spent_completion
            if self.sync is not None and not outcome.ticket.settled:
                self.sync.settle(outcome.ticket, tokens, cost + spent_cost)  # batched
            else:
                self.later(settle(self.state, outcome.ticket, tokens, cost + spent_cost))
        self._recent[outcome.request_id] = Owner(
            api_key_id, tier_name, hints.tenant, key, decision.tags
        )
        if len(self._recent) > 100_000:
            self._recent.popitem(last=False)
        m = self.metrics
        model = tier.model  # the configured model that answered (or failed last)
        m.requests.labels(tier_name, model, str(status)).inc()
        m.latency.labels(tier_name, model).observe(latency_ms / 1000)
        if ttft_ms is not None:
            m.ttft.labels(tier_name, model).observe(ttft_ms / 1000)
        m.tokens.labels(tier_name, model, "prompt").inc(prompt_tokens)
        m.tokens.labels(tier_name, model, "completion").inc(completion_tokens)
        m.cost.labels(tier_name, model).inc(cost)
        if api_key_id is not None:
            m.key_spend.labels(api_key_id).inc(cost + spent_cost)
        for spent, p, c in outcome.spent:
            spent_tier = self.settings.spec(spent).tier
            m.tokens.labels(spent_tier.name, spent_tier.model, "prompt").inc(p)
            m.tokens.labels(spent_tier.name, spent_tier.model, "completion").inc(c)
            m.cost.labels(spent_tier.name, spent_tier.model).inc(spent_tier.cost(p, c))
        # A cascade's escalation is by design, not a fallback: only later steps count.
        steps = outcome.tried[1:] if outcome.escalated else outcome.tried
        for a, b in itertools.pairwise(steps):
            m.fallbacks.labels(a, b).inc()

    async def request_owner(self, request_id: str) -> Owner | None:
        """Who made a past request and which tier answered: from memory, else the ledger."""
        if request_id in self._recent:
            return self._recent[request_id]
        row = await asyncio.to_thread(self.ledger.get, request_id)
        if row is None:
            return None
        tenant = row.hints.get("tenant") if isinstance(row.hints, Mapping) else None
        target = (
            self.chooser.answered_by(row.tier, row.model, row.fallback_chain)
            if self.chooser is not None
            else None
        )
        return Owner(row.api_key_id, row.tier, tenant, target, dict(row.tags))

    def feedback(self, owner: Owner, rating: float, rated: tuple[str, str] | None = None) -> None:
        """A rating arrived: it personalises its tenant's routing (smaller tiers only).
        `rated` is (request id, rater): a rater's second rating of a request replaces the
        first instead of counting twice."""
        previous = None
        if rated is not None:
            previous = self._ratings.pop(rated, None)
            self._ratings[rated] = rating
            if len(self._ratings) > 100_000:
                self._ratings.popitem(last=False)
        if self.chooser is not None and owner.target is not None:
            self.chooser.observe(owner.target, owner.tags, rating, previous)
        if (
            self.personaliser is not None
            and owner.tenant is not None
            and owner.tier != self.settings.tiers[-1].name
        ):
            key = owner.api_key_id or ""  # whose cap of tenants it counts against
            if previous is None:
                learned = self.personaliser.observe(owner.tenant, rating, key)
            else:
                learned = self.personaliser.revise(owner.tenant, previous, rating, key)
            if not learned:
                self.metrics.tenants_refused.inc()
                return
            if self.sync is not None:
                n, bad = (1.0, 1.0 - rating) if previous is None else (0.0, previous - rating)
                self.sync.feedback(owner.tenant, n, bad)

    def _verdict(self, request_id: str, verdict: float) -> None:
        """A shadow verdict on a recent answer: the model that gave it learns from it."""
        owner = self._recent.get(request_id)
        if self.chooser is not None and owner is not None and owner.target is not None:
            self.chooser.observe(owner.target, owner.tags, verdict)

    def _restore_personaliser(self, days: float = 30) -> None:
        """Rebuild tenants' offsets from the ledger's recent feedback after a restart."""
        since = self.clock() - days * 86400
        rows = {row.id: row for row in self.ledger.rows(since=since)}
        for request_id, _, rating in self.ledger.feedback_since(since):
            row = rows.get(request_id)
            if row is not None:
                tenant = row.hints.get("tenant") if isinstance(row.hints, Mapping) else None
                self.feedback(Owner(row.api_key_id, row.tier, tenant), rating)


def _replay(result: ChatResult) -> tuple[StreamDelta, AsyncIterator[StreamDelta]]:
    """A whole answer as a stream: its text in one delta, then the final delta."""
    last = StreamDelta(
        text="",
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )
    deltas = [StreamDelta(text=result.text), last] if result.text else [last]
    if result.choices is not None:  # its tool calls, logprobs, every choice: as one chunk
        deltas = [StreamDelta(text=result.text, choices=_as_deltas(result.choices)), last]

    async def rest() -> AsyncIterator[StreamDelta]:
        for delta in deltas[1:]:
            yield delta

    return deltas[0], rest()


def _as_deltas(choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole answers' choices as the choices of one stream chunk (message -> delta, each
    tool call numbered as stream deltas are)."""
    out = []
    for choice in choices:
        message = dict(choice.get("message") or {})
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message["tool_calls"] = [
                {**c, "index": i} for i, c in enumerate(calls) if isinstance(c, dict)
            ]
        out.append({**{k: v for k, v in choice.items() if k != "message"}, "delta": message})
    return out


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
