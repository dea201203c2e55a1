"""Per-key rate limits and budgets, enforced through the shared state before a request is
routed, settled from its real cost after it is answered.

Budget pressure (`gateway.budget_pressure`): as a key's spend nears its budget, more of its
traffic goes to smaller tiers before it is cut off. With u the largest used share of its
day and month budgets (settled plus reserved spend over the budget), its routing score is
lowered by

    shift = max_shift * clip((u - start) / (1 - start), 0, 1)

which is the same as raising every threshold by `shift` for that key alone: nothing below
`start`, `max_shift` at the budget.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tierroute.errors import ConfigError
from tierroute.keys import KeyPolicy
from tierroute.state.base import REFUSALS, Ask, SharedState, Verdict

# The key id limits are counted under when no API keys are configured (one shared caller).
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class KeyLimits:
    """`gateway.key_limits`: the limits of each configured API key (or, with none, of all
    callers together). A virtual key's own limits come with its KeyPolicy instead."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    budget_usd_day: float | None = None
    budget_usd_month: float | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 1_000_000_000:
                raise ConfigError(f"{name} must be within [1, 1e9]")
        for name in ("budget_usd_day", "budget_usd_month"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1e9:
                raise ConfigError(f"{name} must be within [0, 1e9] USD")

    def policy(self, key_id: str) -> KeyPolicy:
        return KeyPolicy(
            key_id=key_id,
            name=key_id,
            tenant=None,
            budget_usd_day=self.budget_usd_day,
            budget_usd_month=self.budget_usd_month,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
        )


@dataclass(frozen=True)
class BudgetPressure:
    start: float = 0.5
    max_shift: float = 0.3

    def __post_init__(self) -> None:
        if not 0 <= self.start < 1:
            raise ConfigError("budget_pressure.start must be within [0, 1)")
        if not 0 <= self.max_shift <= 1:
            raise ConfigError("budget_pressure.max_shift must be within [0, 1]")

    def shift(self, used: float) -> float:
        """How far the key's score is lowered at `used` (share of its budget spent)."""
        return self.max_shift * min(1.0, max(0.0, (used - self.start) / (1.0 - self.start)))


def used_share(policy: KeyPolicy, verdict: Verdict) -> float:
    """The larger share of the day and month budgets already spent or reserved."""
    shares = [0.0]
    if policy.budget_usd_day:
        shares.append(verdict.day_usd / policy.budget_usd_day)
    if policy.budget_usd_month:
        shares.append(verdict.month_usd / policy.budget_usd_month)
    return max(shares)


def limited(policy: KeyPolicy | None) -> bool:
    return policy is not None and any(
        v is not None
        for v in (
            policy.requests_per_minute,
            policy.tokens_per_minute,
            policy.budget_usd_day,
            policy.budget_usd_month,
        )
    )


def estimate_ask(messages: Any, max_tokens: int, cost: Callable[[int, int], float]) -> Ask:
    """Tokens and USD a request may take at most: its messages as JSON at ~4 characters a
    token plus max_tokens, priced on the largest tier (`cost(prompt, completion)`)."""
    prompt = len(json.dumps(messages, ensure_ascii=False, default=str)) // 4 + 1
    return Ask(tokens=prompt + max_tokens, cost_usd=cost(prompt, max_tokens))


@dataclass
class Ticket:
    """An admitted request's reservation, settled once when it is booked."""

    policy: KeyPolicy
    ask: Ask
    verdict: Verdict
    pressure: float = 0.0
    settled: bool = False


def refusal(policy: KeyPolicy, verdict: Verdict) -> tuple[str, str]:
    """The 429's message and code."""
    limit, code = REFUSALS[verdict.refused]
    value: Any = {
        1: policy.requests_per_minute,
        2: policy.tokens_per_minute,
        3: policy.budget_usd_day,
        4: policy.budget_usd_month,
    }[verdict.refused]
    shown = f"${value:g}" if verdict.refused >= 3 else f"{value}"
    message = (
        f"Key '{policy.name}' has reached its limit of {shown} {limit}; "
        f"retry after {verdict.retry_after_s} s."
    )
    return message, code


async def admit(
    state: SharedState,
    policy: KeyPolicy,
    ask: Ask,
    pressure: BudgetPressure | None,
    now: Callable[[], float] = time.time,
) -> Ticket | Verdict:
    """A ticket for an admitted request, or the refusing verdict."""
    verdict = await state.acquire(policy, ask, now())
    if not verdict.admitted:
        return verdict
    shift = pressure.shift(used_share(policy, verdict)) if pressure is not None else 0.0
    return Ticket(policy, ask, verdict, shift)


async def settle(state: SharedState, ticket: Ticket, tokens: int, cost_usd: float) -> None:
    if ticket.settled:
        return
    ticket.settled = True
    await state.settle(ticket.policy, ticket.ask, ticket.verdict, tokens, cost_usd)
