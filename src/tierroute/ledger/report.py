"""The savings report over ledger rows: pure functions, plus one plot.

Each row carries the prices in effect when it was served, so the books need no config:
a routed request's counterfactual is its tokens at the largest tier's prices then. Rows
from before prices were recorded are priced by `largest_tier_cost(row)` when given.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tierroute.errors import LedgerError
from tierroute.ledger.store import LedgerRow

CostFn = Callable[[LedgerRow], float]


@dataclass(frozen=True)
class TierStats:
    """One group of rows (a tier, key, tenant, tag or day): volume, cost, speed, quality."""

    tier: str  # the group's name; a tier's name when grouped by tier
    requests: int
    share: float  # of all requests, 0..1
    cost_usd: float
    p50_latency_ms: float
    p95_latency_ms: float
    errors: int
    routed: int = 0  # requests the router decided (the client did not name the tier)
    baseline_usd: float = 0.0  # those requests' cost had they all gone to the largest tier
    routed_cost_usd: float = 0.0
    ratings: int = 0
    rating_mean: float | None = None
    judged: int = 0
    judged_good: float | None = None  # share of shadow verdicts "good enough"
    # USD the shadow judge spent on these requests: the operator's, not in cost_usd
    judging_usd: float = 0.0

    @property
    def saved_fraction(self) -> float | None:
        if self.baseline_usd <= 0:
            return None
        return 1.0 - self.routed_cost_usd / self.baseline_usd


@dataclass(frozen=True)
class SavingsReport:
    """Savings count routed requests only: a request whose client named its tier was not
    routed, so routing saved nothing on it. Prices are each row's own (those in effect when
    it was served); rows from before prices were recorded use `largest_tier_cost`."""

    requests: int
    tiers: tuple[TierStats, ...]  # most requests first
    routed_cost_usd: float  # routed requests only
    all_largest_cost_usd: float  # the same requests, all on the largest tier
    saved_fraction: float  # 1 - routed / all-largest; negative if routing cost more
    errors: int
    cache_hits: int
    first_ts: float | None
    last_ts: float | None
    forced: int = 0  # requests whose client named the tier
    unpriced: int = 0  # routed rows with no recorded prices and no pricing given
    total_cost_usd: float = 0.0
    by: str = "tier"
    judging_usd: float = 0.0  # shadow judging of these requests, apart from total_cost_usd

    @property
    def saving_pct(self) -> float:
        return 100.0 * self.saved_fraction

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.requests if self.requests else 0.0


GROUPINGS = ("tier", "key", "tenant", "tag", "day")


def is_error(row: LedgerRow) -> bool:
    """A request failed when the client got an HTTP status of 400 or above."""
    return row.status >= 400


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between ranks, as numpy's default."""
    if not values:
        return math.nan
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile must be between 0 and 1, got {q}")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def _groups_of(row: LedgerRow, by: str) -> list[str]:
    if by == "tier":
        return [row.tier]
    if by == "key":
        return [row.api_key_id or "(no key)"]
    if by == "tenant":
        hinted = row.hints.get("tenant") if isinstance(row.hints, Mapping) else None
        return [str(row.tenant or hinted or "(none)")]
    if by == "tag":
        return [f"{k}={v}" for k, v in sorted(row.tags.items())] or ["(untagged)"]
    if by == "day":
        return [datetime.fromtimestamp(row.ts, tz=UTC).strftime("%Y-%m-%d")]
    raise LedgerError(f"cannot group by {by!r}; use one of {', '.join(GROUPINGS)}")


def _baseline(row: LedgerRow, fallback: CostFn | None) -> float | None:
    cost = row.largest_cost()
    if cost is None and fallback is not None:
        cost = fallback(row)
    return cost


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_report(
    rows: Sequence[LedgerRow],
    largest_tier_cost: CostFn | None = None,
    *,
    by: str = "tier",
    ratings: Mapping[str, float] | None = None,
    verdicts: Mapping[str, Sequence[float]] | None = None,
    judging: Mapping[str, float] | None = None,
) -> SavingsReport:
    """Aggregate rows into a `SavingsReport` grouped `by` a tier, key, tenant, tag or day.
    `ratings` maps request id -> mean rating, `verdicts` request id -> shadow verdicts,
    `judging` request id -> USD its shadow judgement cost (`Ledger.judging_spend`)."""
    n = len(rows)
    ratings = ratings or {}
    verdicts = verdicts or {}
    judging = judging or {}
    grouped: dict[str, list[LedgerRow]] = {}
    for row in rows:
        for name in _groups_of(row, by):
            grouped.setdefault(name, []).append(row)
    unpriced = 0
    baseline_of: dict[str, float] = {}
    for row in rows:
        if row.forced:
            continue
        cost = _baseline(row, largest_tier_cost)
        if cost is None:
            unpriced += 1
        else:
            baseline_of[row.id] = cost
    groups = []
    for name, group in grouped.items():
        priced = [r for r in group if r.id in baseline_of]
        rated = [ratings[r.id] for r in group if r.id in ratings]
        judged = [v for r in group for v in verdicts.get(r.id, ())]
        groups.append(
            TierStats(
                tier=name,
                requests=len(group),
                share=len(group) / n,
                cost_usd=sum(r.cost_usd for r in group),
                p50_latency_ms=percentile([r.latency_ms for r in group], 0.50),
                p95_latency_ms=percentile([r.latency_ms for r in group], 0.95),
                errors=sum(is_error(r) for r in group),
                routed=sum(not r.forced for r in group),
                baseline_usd=sum(baseline_of[r.id] for r in priced),
                routed_cost_usd=sum(r.cost_usd for r in priced),
                ratings=len(rated),
                rating_mean=_mean(rated),
                judged=len(judged),
                judged_good=_mean(judged),
                judging_usd=sum(judging.get(r.id, 0.0) for r in group),
            )
        )
    groups.sort(key=lambda t: (-t.requests, t.tier))
    routed = sum(r.cost_usd for r in rows if r.id in baseline_of)
    all_largest = sum(baseline_of.values())
    return SavingsReport(
        requests=n,
        tiers=tuple(groups),
        routed_cost_usd=routed,
        all_largest_cost_usd=all_largest,
        saved_fraction=1.0 - routed / all_largest if all_largest > 0 else 0.0,
        errors=sum(is_error(r) for r in rows),
        cache_hits=sum(r.cache_hit for r in rows),
        first_ts=min((r.ts for r in rows), default=None),
        last_ts=max((r.ts for r in rows), default=None),
        forced=sum(r.forced for r in rows),
        unpriced=unpriced,
        total_cost_usd=sum(r.cost_usd for r in rows),
        by=by,
        judging_usd=sum(judging.get(r.id, 0.0) for r in rows),
    )


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_report(report: SavingsReport) -> str:
    """A plain-text table for a terminal."""
    if not report.requests or report.first_ts is None or report.last_ts is None:
        return "No requests in the ledger for this period."
    judging = report.judging_usd > 0  # a column only where the shadow judge spent
    lines = [
        f"{report.requests:,} requests from {_utc(report.first_ts)} to {_utc(report.last_ts)} UTC",
        "",
        f"{report.by:<16} {'requests':>9} {'share':>7} {'cost USD':>11} {'saved':>7} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'errors':>7} {'rating':>7} {'judged ok':>10}"
        + (f" {'judging USD':>11}" if judging else ""),
    ]
    for t in report.tiers:
        lines.append(
            f"{t.tier[:16]:<16} {t.requests:>9,} {t.share:>7.1%} {t.cost_usd:>11.6f} "
            f"{_pct(t.saved_fraction):>7} {t.p50_latency_ms:>8.0f} {t.p95_latency_ms:>8.0f} "
            f"{t.errors:>7,} {_num(t.rating_mean):>7} {_pct(t.judged_good):>10}"
            + (f" {t.judging_usd:>11.6f}" if judging else "")
        )
    lines += [
        "",
        f"routed requests    {report.requests - report.forced:,} "
        f"(the client named the tier of {report.forced:,}: not counted in savings)",
        f"routed cost        ${report.routed_cost_usd:,.6f}",
        f"all-largest cost   ${report.all_largest_cost_usd:,.6f}",
        f"saved              {report.saved_fraction:.1%}",
        f"total cost         ${report.total_cost_usd:,.6f}",
        *(
            [
                f"shadow judging     ${report.judging_usd:,.6f} (the judge's calls on these "
                "requests: not in their cost, not charged to keys' budgets)"
            ]
            if judging
            else []
        ),
        f"errors             {report.errors:,} ({report.error_rate:.1%})",
        f"cache hits         {report.cache_hits:,} ({report.cache_hit_rate:.1%})",
    ]
    if report.unpriced:
        lines.append(
            f"unpriced           {report.unpriced:,} routed rows predate recorded prices "
            "and are left out of the savings; pass --config to price them"
        )
    return "\n".join(lines)


_FIELDS = (
    "requests",
    "share",
    "routed",
    "cost_usd",
    "baseline_usd",
    "saved_fraction",
    "p50_latency_ms",
    "p95_latency_ms",
    "errors",
    "ratings",
    "rating_mean",
    "judged",
    "judged_good",
    "judging_usd",
)


def report_records(report: SavingsReport) -> list[dict[str, Any]]:
    """One flat record per group (for CSV and JSON); NaN becomes None."""

    def clean(x: Any) -> Any:
        return None if isinstance(x, float) and x != x else x

    return [{report.by: t.tier, **{f: clean(getattr(t, f)) for f in _FIELDS}} for t in report.tiers]


def report_csv(report: SavingsReport) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[report.by, *_FIELDS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(report_records(report))
    return out.getvalue()


def report_json(report: SavingsReport) -> str:
    import json

    summary = {
        "requests": report.requests,
        "forced": report.forced,
        "routed_cost_usd": report.routed_cost_usd,
        "all_largest_cost_usd": report.all_largest_cost_usd,
        "saved_fraction": report.saved_fraction,
        "total_cost_usd": report.total_cost_usd,
        "judging_usd": report.judging_usd,
        "errors": report.errors,
        "cache_hits": report.cache_hits,
        "unpriced": report.unpriced,
        "first_ts": report.first_ts,
        "last_ts": report.last_ts,
    }
    doc = {"by": report.by, "summary": summary, "groups": report_records(report)}
    return json.dumps(doc, indent=2)


_BIN_WIDTHS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)  # seconds


def _bin_width(span: float, max_bins: int = 48) -> int:
    return next((w for w in _BIN_WIDTHS if span / w <= max_bins), _BIN_WIDTHS[-1])


def _label(width: int) -> str:
    if width % 86400 == 0:
        return f"{width // 86400} d"
    return f"{width // 3600} h" if width % 3600 == 0 else f"{width // 60} min"


def plot_report(
    rows: Sequence[LedgerRow], path: str | Path, largest_tier_cost: CostFn | None = None
) -> Path:
    """Write a PNG: requests per tier over time (stacked) and cumulative cost vs all-largest."""
    if not rows:
        raise LedgerError("there are no requests to plot; widen --since or check the ledger path")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    ordered = sorted(rows, key=lambda r: r.ts)
    ts = np.array([r.ts for r in ordered])
    width = _bin_width(float(ts[-1] - ts[0]))
    start = math.floor(ts[0] / width) * width
    n_bins = int((ts[-1] - start) // width) + 1
    edges = start + width * np.arange(n_bins + 1)
    tiers = sorted({r.tier for r in ordered})

    def to_num(seconds: Sequence[float]) -> list[float]:  # matplotlib's date numbers
        dates = [datetime.fromtimestamp(float(s), tz=UTC) for s in seconds]
        return list(mdates.date2num(dates))  # type: ignore[no-untyped-call]

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), dpi=110, sharex=True)
    try:
        left = to_num(edges[:-1].tolist())
        bottom = np.zeros(n_bins)
        for tier in tiers:
            counts, _ = np.histogram([r.ts for r in ordered if r.tier == tier], bins=edges)
            ax1.bar(left, counts, width=width / 86400, bottom=bottom, align="edge", label=tier)
            bottom += counts
        ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax1.set_ylabel(f"requests per {_label(width)}")
        ax1.set_title("Requests per tier")
        ax1.legend(title="tier", fontsize=8)

        times = to_num(ts.tolist())
        routed = np.cumsum([r.cost_usd for r in ordered])
        largest = np.cumsum([_baseline(r, largest_tier_cost) or 0.0 for r in ordered])
        ax2.step(times, largest, where="post", color="#d62728", label="all largest tier")
        ax2.step(times, routed, where="post", color="#1f77b4", label="routed")
        ax2.set_ylabel("cumulative cost (USD)")
        ax2.set_xlabel("time (UTC)")
        ax2.set_title("Routed cost vs every request on the largest tier")
        ax2.legend(fontsize=8)
        locator = ax2.xaxis.get_major_locator()
        ax2.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """'30m', '1h', '2d', '1w' back from `now` (default: the current time), or an ISO date
    or datetime ('2024-05-01', '2024-05-01T10:00', with or without an offset; naive means UTC),
    as unix seconds."""
    value = text.strip().lower()
    if match := _DURATION.fullmatch(value):
        amount, unit = match.groups()
        base = time.time() if now is None else now
        return base - float(amount) * _UNIT_SECONDS[unit]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise LedgerError(
            f"cannot read the time {text!r}; give a duration like 30m, 1h, 2d or 1w, "
            "or an ISO date like 2024-05-01 or 2024-05-01T10:00"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def feedback_by_tier(
    rated: Sequence[tuple[str, str, float]], tiers: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """Per tier (every one of `tiers`, and any other rated): the number of ratings, how
    many were up (>= 0.5) and down, their mean and its 95% half-width (normal approx)."""
    ratings: dict[str, list[float]] = {t: [] for t in tiers}
    for _, tier, rating in rated:
        ratings.setdefault(tier, []).append(rating)
    out: dict[str, dict[str, Any]] = {}
    for tier, values in ratings.items():
        n = len(values)
        mean = sum(values) / n if n else None
        half = None
        if n > 1 and mean is not None:
            var = sum((v - mean) ** 2 for v in values) / (n - 1)
            half = 1.96 * math.sqrt(var / n)
        up = sum(v >= 0.5 for v in values)
        out[tier] = {"n": n, "up": up, "down": n - up, "mean": mean, "ci95": half}
    return out
