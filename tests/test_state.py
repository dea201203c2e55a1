"""The shared-state protocol: one suite run against the in-process state and Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tierroute.gateway.limits import BudgetPressure, KeyLimits, used_share
from tierroute.keys import KeyPolicy
from tierroute.state import Ask, MemoryState, SharedState, Verdict, open_state
from tierroute.state.windows import Clock, sliding

from .redis_helpers import (
    REDIS_URL,
    drop_prefix,
    needs_redis,
    needs_redis_server,
    own_redis,
    redis_up,
    unique_prefix,
)


def policy(**limits: float | int | None) -> KeyPolicy:
    base: dict[str, float | int | None] = dict(
        budget_usd_day=None, budget_usd_month=None, requests_per_minute=None, tokens_per_minute=None
    )
    base.update(limits)
    return KeyPolicy(key_id="k1", name="test key", tenant=None, **base)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def opened(kind: str) -> tuple[SharedState, str]:
    prefix = unique_prefix()
    state = open_state(None if kind == "memory" else REDIS_URL, prefix)
    await state.start()
    return state, prefix


def with_state(kind: str, body):  # type: ignore[no-untyped-def]
    async def go() -> None:
        state, prefix = await opened(kind)
        try:
            await body(state)
        finally:
            await state.aclose()
            if kind == "redis":
                drop_prefix(prefix)

    asyncio.run(go())


# ------------------------------------------------------------------ clock maths


def test_clock_windows_and_waits() -> None:
    # 2026-01-31 23:59:30 UTC
    now = 1769903970.0
    c = Clock.at(now)
    assert c.day == "20260131" and c.month == "202601"
    assert c.to_next_minute == 30 and c.to_next_day == 30 and c.to_next_month == 30
    assert c.fraction == pytest.approx(0.5)
    assert sliding(10, 4, 0.5) == pytest.approx(9.0)
    december = Clock.at(1798761600.0 - 10)  # 2026-12-31 23:59:50
    assert december.month == "202612" and december.to_next_month == 10


def test_budget_pressure_formula() -> None:
    p = BudgetPressure(start=0.5, max_shift=0.3)
    assert p.shift(0.2) == 0.0
    assert p.shift(0.5) == 0.0
    assert p.shift(0.75) == pytest.approx(0.15)
    assert p.shift(1.0) == pytest.approx(0.3)
    assert p.shift(3.0) == pytest.approx(0.3)
    pol = policy(budget_usd_day=10.0, budget_usd_month=100.0)
    assert used_share(pol, Verdict(day_usd=4.0, month_usd=80.0)) == pytest.approx(0.8)
    assert used_share(policy(), Verdict(day_usd=4.0)) == 0.0


def test_key_limits_are_checked() -> None:
    from tierroute.errors import ConfigError

    with pytest.raises(ConfigError):
        KeyLimits(requests_per_minute=0)
    with pytest.raises(ConfigError):
        KeyLimits(budget_usd_day=-1)
    with pytest.raises(ConfigError):
        BudgetPressure(start=1.0)


# ------------------------------------------------------------------ one suite, both states


def test_requests_per_minute(kind: str) -> None:
    async def body(state: SharedState) -> None:
        pol = policy(requests_per_minute=3)
        now = (time.time() // 60) * 60 + 1  # early in a minute: the previous one is empty
        verdicts = [await state.acquire(pol, Ask(1, 0.0), now) for _ in range(5)]
        assert [v.refused for v in verdicts] == [0, 0, 0, 1, 1]
        assert 1 <= verdicts[3].retry_after_s <= 60
        # two minutes on, the count is gone
        assert (await state.acquire(pol, Ask(1, 0.0), now + 120)).admitted

    with_state(kind, body)


def test_tokens_per_minute_settle_corrects_the_estimate(kind: str) -> None:
    async def body(state: SharedState) -> None:
        pol = policy(tokens_per_minute=1000)
        now = (time.time() // 60) * 60 + 1
        ask = Ask(tokens=900, cost_usd=0.0)
        first = await state.acquire(pol, ask, now)
        assert first.admitted
        # 900 of 1000 estimated: still room, admitted, now over
        second = await state.acquire(pol, ask, now)
        assert second.admitted
        assert (await state.acquire(pol, ask, now)).refused == 2
        # the two really used 50 tokens each: room again
        await state.settle(pol, ask, first, 50, 0.0)
        await state.settle(pol, ask, second, 50, 0.0)
        assert (await state.acquire(pol, ask, now)).admitted

    with_state(kind, body)


def test_budget_reserve_then_settle(kind: str) -> None:
    async def body(state: SharedState) -> None:
        pol = policy(budget_usd_day=1.0, budget_usd_month=5.0)
        now = time.time()
        ask = Ask(tokens=10, cost_usd=0.6)
        a = await state.acquire(pol, ask, now)
        assert a.admitted and a.day_usd == 0.0
        b = await state.acquire(pol, ask, now)  # 0.6 reserved < 1.0: admitted
        assert b.admitted and b.day_usd == pytest.approx(0.6)
        refused = await state.acquire(pol, ask, now)  # 1.2 reserved: refused
        assert refused.refused == 3 and refused.retry_after_s >= 1
        await state.settle_many([(pol, ask, a, 10, 0.1), (pol, ask, b, 10, 0.1)])  # one trip
        c = await state.acquire(pol, ask, now)
        assert c.admitted and c.day_usd == pytest.approx(0.2)
        await state.settle(pol, ask, c, 10, 0.85)  # spent 1.05 in all: the day is over
        over = await state.acquire(pol, ask, now)
        assert over.refused == 3 and over.day_usd == pytest.approx(1.05)

    with_state(kind, body)


def test_month_budget(kind: str) -> None:
    async def body(state: SharedState) -> None:
        pol = policy(budget_usd_month=0.5)
        now = time.time()
        ask = Ask(tokens=10, cost_usd=0.1)
        v = await state.acquire(pol, ask, now)
        await state.settle(pol, ask, v, 10, 0.5)
        assert (await state.acquire(pol, ask, now)).refused == 4

    with_state(kind, body)


def test_breaker_opens_at_threshold_and_probe_is_claimed_once(kind: str) -> None:
    async def body(state: SharedState) -> None:
        t = 100.0
        assert (await state.breaker_failure("big", 2, t)).opened_at is None
        view = await state.breaker_failure("big", 2, t + 1)
        assert view.failures == 2 and view.opened_at == t + 1
        snap = await state.snapshot(["big", "small"], 10)
        assert snap.breakers["big"].opened_at == t + 1
        assert snap.breakers["small"].opened_at is None
        assert await state.claim_probe("big", 5)
        assert not await state.claim_probe("big", 5)
        # a failed probe opens it again at once and frees the probe
        assert (await state.breaker_failure("big", 2, t + 9)).opened_at == t + 9
        assert await state.claim_probe("big", 5)
        await state.breaker_success("big")
        snap = await state.snapshot(["big"], 10)
        assert snap.breakers["big"].opened_at is None and snap.breakers["big"].failures == 0

    with_state(kind, body)


def test_cache_latency_scores_threshold(kind: str) -> None:
    async def body(state: SharedState) -> None:
        assert await state.cache_get("k") is None
        await state.cache_put("k", '{"s": 0.5}', 60)
        assert await state.cache_get("k") == '{"s": 0.5}'
        await state.add_latencies({"small": [1.0, 2.0, 3.0]}, 2)
        snap = await state.snapshot(["small"], 2)
        assert sorted(snap.latency["small"]) == [2.0, 3.0]
        await state.push_scores([0.1, 0.2, 0.3], 100)
        assert await state.drain_scores(2) == [0.1, 0.2]
        assert await state.drain_scores(10) == [0.3]
        assert await state.drain_scores(10) == []
        await state.publish_threshold(0.42)
        assert (await state.snapshot([], 1)).threshold == pytest.approx(0.42)

    with_state(kind, body)


def test_lease_has_one_holder_until_it_expires(kind: str) -> None:
    async def body(state: SharedState) -> None:
        assert await state.lease("a", 0.3)
        assert not await state.lease("b", 0.3)
        assert await state.lease("a", 0.3)  # renewed
        await asyncio.sleep(0.4)
        assert await state.lease("b", 0.3)
        assert not await state.lease("a", 0.3)

    with_state(kind, body)


def test_offsets_seed_once_then_add(kind: str) -> None:
    async def body(state: SharedState) -> None:
        v0 = (await state.snapshot([], 1)).offsets_version
        await state.offsets_seed({"t1": [4.0, 1.0]})
        await state.offsets_seed({"t1": [40.0, 10.0]})  # a second replica: ignored
        await state.offsets_add("t1", 1.0, 1.0)
        await state.offsets_add("t2", 1.0, 0.0)
        assert await state.offsets_all() == {"t1": [5.0, 2.0], "t2": [1.0, 0.0]}
        assert (await state.snapshot([], 1)).offsets_version > v0

    with_state(kind, body)


# ------------------------------------------------------------------ Redis going away


@needs_redis_server
def test_redis_down_falls_back_to_local_and_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        with own_redis(tmp_path) as server:
            state = open_state(server.url, unique_prefix())
            state.reconnect_s = 0.1  # type: ignore[attr-defined]
            await state.start()
            assert state.problem() is None
            pol = policy(requests_per_minute=2)
            now = (time.time() // 60) * 60 + 1
            assert (await state.acquire(pol, Ask(1, 0.0), now)).admitted
            server.stop()
            with caplog.at_level("WARNING"):
                # answered from local state: a fresh count, limits per replica
                assert (await state.acquire(pol, Ask(1, 0.0), now)).admitted
                assert (await state.acquire(pol, Ask(1, 0.0), now)).admitted
                assert (await state.acquire(pol, Ask(1, 0.0), now)).refused == 1
            problem = state.problem()
            assert problem is not None and "unreachable" in problem
            down = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(down) == 1  # one line, not one per call
            server.start()
            for _ in range(50):
                if state.problem() is None:
                    break
                await asyncio.sleep(0.1)
            assert state.problem() is None
            # Redis again (a fresh server, empty): its count is what counts, not the local
            # one, which has refused already
            assert (await state.acquire(pol, Ask(1, 0.0), now)).admitted
            assert (await state.acquire(pol, Ask(1, 0.0), now)).admitted
            assert (await state.acquire(pol, Ask(1, 0.0), now)).refused == 1
            assert redis_up("127.0.0.1", server.port)
            await state.aclose()

    asyncio.run(go())


def test_memory_state_is_not_shared() -> None:
    assert MemoryState().shared is False
    assert MemoryState().problem() is None


def test_budget_pressure_moves_a_key_to_a_smaller_tier(tmp_path: Path) -> None:
    """The engine lowers a pressured key's score by the shift: a request the rules router
    sends to `large` goes to `small` once the key's pressure exceeds its margin."""
    from tierroute.gateway.engine import Engine, Hints
    from tierroute.gateway.settings import parse_settings
    from tierroute.ledger import Ledger
    from tierroute.routers import make_router

    tiers = [
        {"name": n, "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": n}
        for n in ("small", "large")
    ]
    settings = parse_settings({"tiers": tiers, "policy": {"thresholds": [0.1]}}, "test")
    engine = Engine(settings, make_router("rules"), {}, Ledger(tmp_path / "ledger.db"))
    hard = [{"role": "user", "content": "Prove that sqrt(2) is irrational, step by step."}]
    try:
        plain = asyncio.run(engine.route(hard, Hints(), 64))
        assert plain.decision.tier.name == "large"
        margin = plain.decision.score - 0.1
        p = BudgetPressure(start=0.5, max_shift=1.0)
        # a key at 50% of its budget: no shift
        same = asyncio.run(engine.route(hard, Hints(), 64, pressure=p.shift(0.5)))
        assert same.decision.tier.name == "large"
        # at its budget the shift (1.0) exceeds the margin: small answers
        pressed = asyncio.run(engine.route(hard, Hints(), 64, pressure=p.shift(1.0)))
        assert margin < 1.0 and pressed.decision.tier.name == "small"
        assert "budget pressure -1.00" in pressed.decision.reason
    finally:
        engine.close()


def test_a_reservation_never_settled_expires_after_an_hour() -> None:
    async def body(state: SharedState) -> None:
        pol = policy(budget_usd_day=1.0)
        now = (time.time() // 86400) * 86400 + 60  # early in a UTC day
        assert (await state.acquire(pol, Ask(10, 1.0), now)).admitted  # then never settled
        assert (await state.acquire(pol, Ask(10, 1.0), now + 60)).refused == 3
        assert (await state.acquire(pol, Ask(10, 1.0), now + 3700)).admitted

    with_state("memory", body)


def test_a_virtual_keys_own_policy_wins_over_key_limits() -> None:
    from types import SimpleNamespace

    from tierroute.gateway.admission import key_policy
    from tierroute.gateway.settings import parse_settings

    tiers = [
        {"name": n, "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": n}
        for n in ("small", "large")
    ]
    doc = {"tiers": tiers, "gateway": {"key_limits": {"requests_per_minute": 5}}}
    settings = parse_settings(doc, "test")
    configured = key_policy(settings, "abc", SimpleNamespace())
    assert configured is not None and configured.requests_per_minute == 5
    assert configured.key_id == "abc"
    anonymous = key_policy(settings, None)
    assert anonymous is not None and anonymous.key_id == "anonymous"
    own = policy(requests_per_minute=1)
    assert key_policy(settings, "k1", SimpleNamespace(caller=SimpleNamespace(policy=own))) is own
    assert key_policy(parse_settings({"tiers": tiers}, "test"), "abc") is None


# ------------------------------------------------------------------ round trips


def test_heartbeat_counts_the_replicas_alive(kind: str) -> None:
    async def body(state: SharedState) -> None:
        assert await state.heartbeat("a", 0.3) == 1
        if not state.shared:
            assert await state.heartbeat("b", 0.3) == 1  # nothing else sees this state
            return
        assert await state.heartbeat("b", 0.3) == 2
        assert await state.heartbeat("a", 0.3) == 2  # a renewal, not a third
        await state.leave("b")
        assert await state.heartbeat("a", 0.3) == 1
        assert await state.heartbeat("b", 0.3) == 2
        await asyncio.sleep(0.4)  # b's heartbeat lapses
        assert await state.heartbeat("a", 0.3) == 1

    with_state(kind, body)


@needs_redis
def test_commands_issued_together_share_one_round_trip() -> None:
    """A request's limit check and its cache read go in one pipeline, and 64 concurrent
    requests' limit checks in one too; each still gets its own answer."""

    async def body(state: SharedState) -> None:
        batch = state._batch  # type: ignore[attr-defined]
        pol = policy(requests_per_minute=40)
        now = (time.time() // 60) * 60 + 1
        await state.cache_put("k", "v", 60)
        before = batch.pipelines
        verdict, cached = await asyncio.gather(
            state.acquire(pol, Ask(1, 0.0), now), state.cache_get("k")
        )
        assert verdict.admitted and cached == "v"
        assert batch.pipelines == before + 1
        before = batch.pipelines
        verdicts = await asyncio.gather(*(state.acquire(pol, Ask(1, 0.0), now) for _ in range(64)))
        assert batch.pipelines == before + 1
        # the limit holds inside one pipeline: 1 before, 39 more admitted, 25 refused
        assert sum(v.admitted for v in verdicts) == 39
        assert all(v.refused == 1 for v in verdicts if not v.admitted)

    with_state("redis", body)


@needs_redis_server
def test_scripts_flushed_from_redis_are_sent_again(tmp_path: Path) -> None:
    """After a restart or SCRIPT FLUSH Redis no longer knows a script by its SHA: the
    state sends its text once and carries on."""
    import redis

    async def go() -> None:
        with own_redis(tmp_path) as server:
            state = open_state(server.url, unique_prefix())
            await state.start()
            pol = policy(requests_per_minute=3)
            now = (time.time() // 60) * 60 + 1
            try:
                assert (await state.acquire(pol, Ask(1, 0.0), now)).admitted
                client = redis.Redis.from_url(server.url)
                client.script_flush()
                client.close()
                assert (await state.acquire(pol, Ask(1, 0.0), now)).admitted
                assert (await state.acquire(pol, Ask(1, 0.0), now)).admitted
                assert (await state.acquire(pol, Ask(1, 0.0), now)).refused == 1
                assert state.problem() is None  # a missing script is no outage
            finally:
                await state.aclose()

    asyncio.run(go())


@needs_redis
def test_the_shared_decision_cache_is_read_only_when_another_replica_could_have_written_it(
    tmp_path: Path,
) -> None:
    from tierroute.gateway.engine import Engine, Hints
    from tierroute.gateway.settings import parse_settings
    from tierroute.gateway.sync import attach_state, detach_state
    from tierroute.ledger import Ledger
    from tierroute.routers import make_router

    prefix = unique_prefix()
    tiers = [
        {"name": n, "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": n}
        for n in ("small", "large")
    ]
    # beats far apart: the test beats itself, so no background beat adds commands
    gateway = {"state_prefix": prefix, "state_sync_s": 10}
    config = {"tiers": tiers, "state": REDIS_URL, "gateway": gateway}
    settings = parse_settings(config, "test")
    router = make_router("rules")

    def ask(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    async def go() -> None:
        a = Engine(settings, router, {}, Ledger(tmp_path / "a.db"))
        b = Engine(settings, router, {}, Ledger(tmp_path / "b.db"))
        await attach_state(a)
        try:
            assert a.sync is not None and a.sync.alone
            assert a.look_ahead(ask("first prompt")) is None  # nobody else could have it
            reads = a.state._batch.commands  # type: ignore[attr-defined]
            assert not (await a.route(ask("first prompt"), Hints(), 16)).cache_hit
            await asyncio.sleep(0.05)  # the write after routing is not awaited
            assert a.state._batch.commands == reads + 1  # the write; no read  # type: ignore[attr-defined]
            await attach_state(b)  # b's first beat sees a; a sees b on its next beat
            assert b.sync is not None and not b.sync.alone
            await a.sync.beat()
            assert not a.sync.alone
            # what a routed before b came is in the shared cache: b reads it, no embedding
            items = b._batcher.items
            ahead = b.look_ahead(ask("first prompt"))
            assert ahead is not None
            hit = await b.route(ask("first prompt"), Hints(), 16, ahead=ahead)
            assert hit.cache_hit and b._batcher.items == items
            assert b.look_ahead(ask("first prompt")) is None  # now a local hit
            await detach_state(b)  # b leaves: a is alone again on its next beat
            await a.sync.beat()
            assert a.sync.alone
        finally:
            await detach_state(a)
            a.close()
            b.close()
            drop_prefix(prefix)

    asyncio.run(go())
