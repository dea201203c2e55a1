"""The clock arithmetic of limits, shared by both state implementations.

Rate limits use a sliding-window counter over one-minute windows: the count of the last
minute is estimated as `previous * (1 - f) + current`, where f is the fraction of the
current window gone. A request is refused when that estimate has reached the limit
(requests), or when no tokens are left of it (tokens: a request is admitted while the
estimate is below the limit, and its estimated tokens are counted at once). Budgets are
per UTC day and UTC calendar month; a request is refused when settled plus reserved spend
has reached the budget, so a key overspends by at most what its admitted in-flight
requests cost beyond the rest of its budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

WINDOW_S = 60


@dataclass(frozen=True)
class Clock:
    """Where `now` falls: the minute window, its fraction gone, the day and month names."""

    window: int
    fraction: float
    day: str
    month: str
    to_next_minute: int
    to_next_day: int
    to_next_month: int

    @classmethod
    def at(cls, now: float) -> Clock:
        window = int(now // WINDOW_S)
        t = time.gmtime(now)
        midnight = (int(now) // 86400 + 1) * 86400
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        next_month = _utc(year, month)
        return cls(
            window=window,
            fraction=(now - window * WINDOW_S) / WINDOW_S,
            day=time.strftime("%Y%m%d", t),
            month=time.strftime("%Y%m", t),
            to_next_minute=max(1, math.ceil((window + 1) * WINDOW_S - now)),
            to_next_day=max(1, math.ceil(midnight - now)),
            to_next_month=max(1, math.ceil(next_month - now)),
        )


def _utc(year: int, month: int) -> float:
    import calendar

    return float(calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)))


def sliding(previous: float, current: float, fraction: float) -> float:
    return previous * (1.0 - fraction) + current
