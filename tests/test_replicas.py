"""Several real `tierroute serve` processes on one Redis: what one replica learns, all use.

Each test gives its replicas a Redis key prefix of its own (`gateway.state_prefix`), so
parallel runs never share a key. The upstream is the fast local one; `large` may be a port
where nothing listens, to fail on purpose.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import fast_upstream
from .redis_helpers import REDIS_URL, drop_prefix, needs_redis, own_redis, redis_up, unique_prefix
from .test_gateway import Server, free_port, start, write_yaml

KEY = "sk-replica-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with fast_upstream() as base:
        yield base


@pytest.fixture
def prefix() -> Iterator[str]:
    p = unique_prefix()
    yield p
    if redis_up():
        drop_prefix(p)


def replicas(
    root: Path, n: int, gateway: str, tiers: str, state: str = REDIS_URL, keys: bool = False
) -> list[Server]:
    config = write_yaml(
        root / "gw.yaml",
        f"""
tiers:
{tiers}
router: rules
policy: {{thresholds: [0.3]}}
state: "{state}"
gateway: {gateway}
""",
    )
    env = {"TIERROUTE_API_KEYS": KEY} if keys else None
    servers: list[Server] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(start, config, root / f"r{i}", env) for i in range(n)]
            servers = [f.result() for f in futures]
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def fast_tiers(base: str, price: float = 0.0) -> str:
    return (
        f'  - {{name: small, kind: openai, base_url: "{base}", model: fast,'
        f" input_price_per_m: {price}, output_price_per_m: {price}}}\n"
        f'  - {{name: large, kind: openai, base_url: "{base}", model: big,'
        f" input_price_per_m: {price}, output_price_per_m: {price}}}"
    )


def chat(server: Server, model: str = "auto", **extra: object) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": 1, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)


def eventually(check, seconds: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {check.__doc__ or check}")
        time.sleep(0.05)


@needs_redis
def test_breaker_opened_through_a_is_open_on_b(tmp_path: Path, upstream: str, prefix: str) -> None:
    dead = free_port()
    tiers = (
        f'  - {{name: small, kind: openai, base_url: "{upstream}", model: fast}}\n'
        f'  - {{name: large, kind: openai, base_url: "http://127.0.0.1:{dead}/v1", model: big}}'
    )
    gw = f'{{retries: 0, breaker_failures: 2, breaker_cooldown_s: 600, state_prefix: "{prefix}"}}'
    a, b = replicas(tmp_path, 2, gw, tiers)
    try:
        assert httpx.get(b.url + "/healthz").json()["tiers"]["large"] == "closed"
        # one failure through each: neither reaches 2 on its own, together they do
        assert chat(a, "large").status_code == 502
        assert chat(b, "large").status_code == 502

        def open_on_both() -> bool:
            return all(
                httpx.get(s.url + "/healthz").json()["tiers"]["large"] == "open" for s in (a, b)
            )

        eventually(open_on_both)
        health = httpx.get(b.url + "/healthz").json()
        assert health["status"] == "degraded" and "tier large: breaker open" in health["problems"]
        # B skips the tier now without trying it
        r = chat(b, "auto", messages=[{"role": "user", "content": "Prove Fermat's last theorem."}])
        assert r.status_code == 200
        assert "large skipped: breaker open" in r.headers["x-tierroute-reason"] or (
            r.headers["x-tierroute-tier"] == "small"
        )
    finally:
        for s in (a, b):
            s.stop()


@needs_redis
def test_controller_threshold_and_offsets_set_on_one_are_used_by_all(
    tmp_path: Path, upstream: str, prefix: str
) -> None:
    gw = (
        f'{{state_prefix: "{prefix}", personalise: {{prior_n: 0, max_shift: 0.2}}, '
        "controller: {target_large_share: 0.0, window: 10, every: 1, max_step: 0.05}}"
    )
    servers = replicas(tmp_path, 3, gw, fast_tiers(upstream))

    def gauges() -> list[float]:
        out = []
        for s in servers:
            text = httpx.get(s.url + "/metrics").text
            line = next(x for x in text.splitlines() if x.startswith("tierroute_threshold "))
            out.append(float(line.split()[1]))
        return out

    try:
        start = gauges()
        assert len(set(start)) == 1
        # scores from every replica feed the one controller that holds the lease
        for i in range(30):
            s = servers[i % 3]
            r = httpx.post(
                s.url + "/v1/route", json={"model": "auto", "messages": HELLO}, timeout=30
            )
            assert r.status_code == 200

        def moved_and_equal() -> bool:
            g = gauges()
            return len({round(x, 9) for x in g}) == 1 and abs(g[0] - start[0]) > 0.04

        eventually(moved_and_equal)
        # and routing uses it: the gauge is the policy's entry score on every replica
        leaders = sum("controller: this replica leads" in s.log.read_text() for s in servers)
        assert leaders == 1
        # alice rates two answers of replica A bad: her routing moves on replica B too
        a, b = servers[0], servers[1]
        for _ in range(2):
            answer = chat(a, "small", user="alice")  # a small tier's answer, rated
            assert answer.status_code == 200 and answer.headers["x-tierroute-tier"] == "small"
            rid = answer.headers["x-tierroute-request-id"]
            rated = httpx.post(a.url + "/v1/feedback", json={"request_id": rid, "rating": 0})
            assert rated.status_code == 200

        def alice_shifted_on_b() -> bool:
            body = {"model": "auto", "messages": HELLO, "user": "alice"}
            reason = httpx.post(b.url + "/v1/route", json=body).json()["reason"]
            return "tenant alice +0.20" in reason

        eventually(alice_shifted_on_b)
    finally:
        for s in servers:
            s.stop()


@needs_redis
def test_budget_not_overspent_across_three_replicas(
    tmp_path: Path, upstream: str, prefix: str
) -> None:
    # 5 prompt + 1 completion tokens at $1,000 per million: $0.006 a request
    per_request, budget = 0.006, 0.06
    gw = f'{{state_prefix: "{prefix}", key_limits: {{budget_usd_day: {budget}}}}}'
    servers = replicas(tmp_path, 3, gw, fast_tiers(upstream, 1000.0), keys=True)

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            sem = asyncio.Semaphore(24)

            async def one(i: int) -> httpx.Response:
                async with sem:
                    body = {"model": "auto", "messages": HELLO, "max_tokens": 1}
                    url = servers[i % 3].url + "/v1/chat/completions"
                    return await http.post(url, json=body, headers=AUTH)

            return await asyncio.gather(*(one(i) for i in range(90)))

    try:
        answers = asyncio.run(storm())
        ok = [r for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code == 429]
        assert len(ok) + len(refused) == len(answers)
        spent = sum(float(r.headers["x-tierroute-cost-usd"]) for r in ok)
        # at most one in-flight request per replica beyond the budget
        assert spent <= budget + 3 * per_request + 1e-9
        assert spent >= budget / 2  # and the budget was used, not refused from the start
        error = refused[0].json()["error"]
        assert error["code"] == "insufficient_quota" and "USD budget per day" in error["message"]
        assert int(refused[0].headers["retry-after"]) >= 1
    finally:
        for s in servers:
            s.stop()


@needs_redis
def test_rate_limit_holds_across_replicas(tmp_path: Path, upstream: str, prefix: str) -> None:
    gw = f'{{state_prefix: "{prefix}", key_limits: {{requests_per_minute: 10}}}}'
    servers = replicas(tmp_path, 3, gw, fast_tiers(upstream), keys=True)
    try:
        if time.time() % 60 > 50:  # all in one minute window, so the count is exact
            time.sleep(61 - time.time() % 60)
        codes = [chat(servers[i % 3]).status_code for i in range(30)]
        assert codes.count(200) == 10 and codes.count(429) == 20
        r = chat(servers[0])
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert "10 requests per minute" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 60
    finally:
        for s in servers:
            s.stop()


@pytest.mark.skipif(
    __import__("shutil").which("redis-server") is None, reason="needs redis-server on PATH"
)
def test_redis_down_at_start_and_mid_run(tmp_path: Path, upstream: str) -> None:
    with own_redis(tmp_path / "redis", running=False) as redis:
        (tmp_path / "redis").mkdir(exist_ok=True)
        gw = '{state_prefix: "t:", key_limits: {requests_per_minute: 1000}}'
        (server,) = replicas(tmp_path, 1, gw, fast_tiers(upstream), state=redis.url, keys=True)
        try:
            # down at start: answered, degraded, one clear line
            assert chat(server).status_code == 200
            health = httpx.get(server.url + "/healthz").json()
            assert health["status"] == "degraded"
            assert any("state: Redis at" in p and "unreachable" in p for p in health["problems"])
            assert server.log.read_text().count("works on local state") == 1
            redis.start()

            def healthy() -> bool:
                return bool(httpx.get(server.url + "/healthz").json()["status"] == "ok")

            eventually(healthy, 10)
            assert chat(server).status_code == 200
            assert "answers again" in server.log.read_text()
            # down mid-run
            redis.stop()
            codes = [chat(server).status_code for _ in range(5)]
            assert codes == [200] * 5
            eventually(lambda: not healthy(), 10)
            assert server.log.read_text().count("works on local state") == 2
            redis.start()
            eventually(healthy, 10)
        finally:
            server.stop()
