"""The dashboard's data: the ledger aggregated over time for the charts at GET /dashboard."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from tierroute.gateway.settings import GatewaySettings
from tierroute.ledger import Ledger, feedback_by_tier

_BUCKETS = (10, 30, 60, 300, 900, 3600, 6 * 3600, 86400)


def bucket_seconds(span_s: float, most: int = 48) -> int:
    """The smallest round bucket that cuts `span_s` into at most `most` buckets."""
    for size in _BUCKETS:
        if span_s / size <= most:
            return size
    return _BUCKETS[-1]


def _p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def dashboard_data(
    ledger: Ledger, settings: GatewaySettings, since: float | None
) -> dict[str, Any]:
    rows = ledger.rows(since=since)
    tiers = [s.name for s in settings.tiers]
    largest = settings.tiers[-1].tier
    start = rows[0].ts if rows else 0.0
    size = bucket_seconds((rows[-1].ts - start) if rows else 0.0)
    counts: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(tiers, 0))
    latency: dict[int, dict[str, list[float]]] = defaultdict(lambda: {t: [] for t in tiers})
    cost: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row in rows:
        b = int((row.ts - start) // size)
        if row.tier in counts[b]:
            counts[b][row.tier] += 1
            latency[b][row.tier].append(row.latency_ms)
        cost[b][0] += row.cost_usd
        cost[b][1] += largest.cost(row.prompt_tokens, row.completion_tokens)
    n_buckets = (max(counts) + 1) if counts else 0
    times = [start + i * size for i in range(n_buckets)]
    routed_cum, largest_cum, r, a = [], [], 0.0, 0.0
    for i in range(n_buckets):
        r += cost[i][0]
        a += cost[i][1]
        routed_cum.append(r)
        largest_cum.append(a)

    quality = feedback_by_tier(ledger.feedback_since(since), tiers)
    changes = [
        {"ts": c.ts, "old": c.old_threshold, "new": c.new_threshold, "reason": c.reason}
        for c in ledger.policy_changes(since)
    ]
    return {
        "tiers": tiers,
        "bucket_s": size,
        "times": times,
        "requests": {t: [counts[i][t] for i in range(n_buckets)] for t in tiers},
        "latency_p50_ms": {t: [_p50(latency[i][t]) for i in range(n_buckets)] for t in tiers},
        "cost": {"routed": routed_cum, "all_largest": largest_cum},
        "quality": quality,
        "threshold_changes": changes,
        "threshold_now": settings.policy.thresholds[-1] if settings.policy.thresholds else None,
        "summary": {
            "requests": len(rows),
            "routed_usd": r,
            "all_largest_usd": a,
            "saved": 1 - r / a if a else 0.0,
        },
    }
