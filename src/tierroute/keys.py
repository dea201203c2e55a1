"""Virtual API keys and their limits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyPolicy:
    key_id: str
    name: str
    tenant: str | None
    budget_usd_day: float | None
    budget_usd_month: float | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
