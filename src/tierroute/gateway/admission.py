"""The gate before routing: a key over its rate limit or budget gets a 429, OpenAI-style,
with Retry-After; an admitted one gets a Ticket (its reservation and budget pressure).

/v1/route and /v1/feedback spend no money but burn routing CPU and grow the ledger: a
virtual key gets `gateway.side_requests_per_minute` of them (both together), counted
apart from its own limits (a client that asks /v1/route before each request would
otherwise halve its requests per minute), with the same 429."""

from __future__ import annotations

import time
from typing import Any

from tierroute.gateway.limits import (
    ANONYMOUS,
    Ticket,
    admit,
    estimate_ask,
    limited,
    refusal,
)
from tierroute.gateway.schema import ApiError, ChatCall
from tierroute.gateway.settings import GatewaySettings
from tierroute.keys import KeyPolicy
from tierroute.state import Ask, SharedState

# OpenAI's error types for each refusal (see state.base.REFUSALS).
_TYPES = {1: "requests", 2: "tokens", 3: "insufficient_quota", 4: "insufficient_quota"}


def key_policy(
    settings: GatewaySettings, key_id: str | None, request_state: Any = None
) -> KeyPolicy | None:
    """The limits of the caller: a virtual key's own policy (which authentication leaves on
    `request.state.caller`), else `gateway.key_limits` for a configured key; with no keys
    configured those hold for all callers together."""
    virtual = getattr(getattr(request_state, "caller", None), "policy", None)
    if isinstance(virtual, KeyPolicy):
        return virtual
    if settings.key_limits is None:
        return None
    return settings.key_limits.policy(key_id or ANONYMOUS)


async def gate(
    settings: GatewaySettings,
    state: SharedState,
    policy: KeyPolicy | None,
    call: ChatCall,
    output_tokens: int | None = None,
) -> Ticket | None:
    """Admit the call under its key's limits (None: unlimited), or raise the 429.
    `output_tokens`: the most it can generate, when not its limit or the default (an
    embedding generates none)."""
    if policy is None or not limited(policy):
        return None
    max_tokens = output_tokens
    if max_tokens is None:
        max_tokens = call.request.limit or settings.max_tokens_default
    ask = estimate_ask(call.request.messages, max_tokens, settings.tiers[-1].tier.cost)
    got = await admit(state, policy, ask, settings.budget_pressure)
    if isinstance(got, Ticket):
        return got
    message, code = refusal(policy, got)
    raise ApiError(
        429,
        message,
        type=_TYPES[got.refused],
        code=code,
        headers={"Retry-After": str(got.retry_after_s)},
    )


async def side_gate(
    settings: GatewaySettings, state: SharedState, policy: KeyPolicy | None
) -> None:
    """Count a /v1/route or /v1/feedback call of a virtual key (`policy`: its own), or
    raise the 429. Config keys are the operator's, and an open gateway trusts everyone:
    neither is counted."""
    limit = settings.side_requests_per_minute
    if policy is None or limit is None:
        return
    side = KeyPolicy(
        key_id=f"{policy.key_id}:side",  # its own counters, in the state's key space
        name=policy.name,
        tenant=None,
        budget_usd_day=None,
        budget_usd_month=None,
        requests_per_minute=limit,
        tokens_per_minute=None,
    )
    verdict = await state.acquire(side, Ask(tokens=0, cost_usd=0.0), time.time())
    if verdict.admitted:
        return
    raise ApiError(
        429,
        f"Key '{policy.name}' has reached its limit of {limit} route and feedback "
        f"requests per minute; retry after {verdict.retry_after_s} s.",
        type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(verdict.retry_after_s)},
    )
