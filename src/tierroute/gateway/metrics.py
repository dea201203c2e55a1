"""Prometheus metrics of one gateway, in a registry of its own (no global state).

Series per tier also carry `model`: the configured model that answered (a tier's `model`,
or in a tier of several the chosen one's), so their cardinality is bounded by the config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tierroute.ledger import LedgerHealth

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _LedgerCollector(Collector):
    """The ledger writer's counts, read from `Ledger.health()` at each scrape."""

    def __init__(self) -> None:
        self.health: Callable[[], LedgerHealth] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.health is None:
            return
        h = self.health()
        yield CounterMetricFamily(
            "tierroute_ledger_rows_failed",
            "Ledger rows that could not be stored (the database refused them, or lost at shutdown)",
            value=h.rows_failed,
        )
        yield CounterMetricFamily(
            "tierroute_ledger_rows_dropped",
            "Ledger rows dropped because the in-memory spill was full while the database failed",
            value=h.rows_dropped,
        )
        yield GaugeMetricFamily(
            "tierroute_ledger_rows_spilled",
            "Ledger rows waiting in memory for the database to take writes again",
            value=h.rows_spilled,
        )
        yield GaugeMetricFamily(
            "tierroute_ledger_writable", "1 while the ledger can write", value=int(h.writable)
        )


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "tierroute_requests",
            "Requests by tier, model and HTTP status",
            ["tier", "model", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "tierroute_request_latency_seconds",
            "Request latency",
            ["tier", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tierroute_ttft_seconds",
            "Time to first token of streams",
            ["tier", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "tierroute_tokens",
            "Tokens by tier, model and kind",
            ["tier", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "tierroute_cost_usd", "Cost in USD by tier and model", ["tier", "model"], registry=r
        )
        # by key id (public: 12 hex of the key's sha256), config and virtual keys alike
        self.key_spend = Counter(
            "tierroute_key_spend_usd", "Spend in USD by API key id", ["key"], registry=r
        )
        self.key_judging = Counter(
            "tierroute_key_judging_usd",
            "USD the shadow judge spent on a key's requests (reported, not charged)",
            ["key"],
            registry=r,
        )
        self.fallbacks = Counter(
            "tierroute_fallbacks",
            "Requests moved off a failing tier",
            ["from_tier", "to_tier"],
            registry=r,
        )
        self.cache_hits = Counter(
            "tierroute_decision_cache_hits", "Decision cache hits", registry=r
        )
        self.cache_misses = Counter(
            "tierroute_decision_cache_misses", "Decision cache misses", registry=r
        )
        self.cache_hit_rate = Gauge(
            "tierroute_decision_cache_hit_rate", "Decision cache hit rate since start", registry=r
        )
        self.threshold = Gauge(
            "tierroute_threshold",
            "The policy's top threshold (moved by the self-calibrating controller)",
            registry=r,
        )
        self.shadow = Counter(
            "tierroute_shadow_judgements",
            "Shadow judgements by tier judged and outcome",
            ["tier", "outcome"],
            registry=r,
        )
        self.quality = Gauge(
            "tierroute_estimated_quality",
            "Share of a tier's answers judged "
            "good enough by shadow sampling, with its 95% interval",
            ["tier", "stat"],
            registry=r,
        )
        self.learning_runs = Counter(
            "tierroute_learning_runs",
            "Continuous learning runs by outcome "
            "(promoted, refused, demoted, skipped, failed, rolled_back)",
            ["outcome"],
            registry=r,
        )
        self.learning_labels = Gauge(
            "tierroute_learning_labels", "Labelled requests the last learning run saw", registry=r
        )
        self.learning_auc = Gauge(
            "tierroute_learning_heldout_auc",
            "Held-out ROC AUC of the last run's candidate and of the router it challenged",
            ["router"],
            registry=r,
        )
        self.router_version = Gauge(
            "tierroute_router_version",
            "Promotions in effect: 0 is the configured router, n its n-th learned successor",
            registry=r,
        )
        self.breaker_open = Gauge(
            "tierroute_circuit_open", "1 while a tier's breaker is open", ["tier"], registry=r
        )
        self.routing_batch = Histogram(
            "tierroute_routing_batch_size",
            "Fresh prompts routed together in one embedding call (the micro-batcher)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        # How big the personalisation table is, and what its per-key cap turned away.
        self.personalised_tenants = Gauge(
            "tierroute_personalised_tenants", "Tenants with personalised routing", registry=r
        )
        self.tenants_refused = Counter(
            "tierroute_personalise_tenants_refused",
            "Ratings not learned: their key had brought personalise.max_tenants_per_key tenants",
            registry=r,
        )
        self._ledger = _LedgerCollector()
        r.register(self._ledger)

    def watch_ledger(self, health: Callable[[], LedgerHealth]) -> None:
        """Report the ledger writer's counts (`Ledger.health`) at every scrape."""
        self._ledger.health = health

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
