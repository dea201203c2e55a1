"""The gateway on the real PostgreSQL: a server that goes away and comes back, virtual keys
made by the CLI, and three replicas sharing one ledger while one of them is SIGKILLed.

Each test has a database of its own (tests.postgres); the upstream is the fast loopback
server (benchmarks/fast_upstream.py), so the gateway's own work is what is measured."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import fast_upstream
from tests.postgres import TcpProxy, database, needs_postgres
from tests.test_gateway import Server, start, write_yaml
from tierroute.ledger import Ledger

from .conftest import wait_for

pytestmark = needs_postgres


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with fast_upstream() as url:
        yield url


def gateway_yaml(upstream: str, extra: str = "", top: str = "") -> str:
    return f"""
router: random
{top}
tiers:
  - {{name: small, kind: openai, base_url: "{upstream}", model: fast,
      input_price_per_m: 1.0, output_price_per_m: 2.0}}
  - {{name: large, kind: openai, base_url: "{upstream}", model: fast,
      input_price_per_m: 10.0, output_price_per_m: 20.0}}
gateway:
  keep_prompts: true
{extra}"""


def ask(client: object, i: int, key: str | None = None) -> httpx.Response:
    body = {"model": "small", "messages": [{"role": "user", "content": f"Say {i}"}]}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/chat/completions", json=body, headers=headers)  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A database of this test's own, dropped after it."""
    with database() as url:
        yield url


# --- PostgreSQL down at start and mid-run -------------------------------------------------


@pytest.mark.parametrize("mode", ["queue", "refuse"])
def test_postgres_outage_queues_or_refuses_and_loses_no_answered_row(
    pg_url: str,
    upstream: str,
    mode: str,
) -> None:
    from fastapi.testclient import TestClient

    from tierroute.gateway.app import Parts, create_app
    from tierroute.gateway.build import make_backend
    from tierroute.gateway.settings import GatewaySettings, parse_settings
    from tierroute.routers.random_router import RandomRouter

    proxy = TcpProxy()
    proxy.cut()  # down at start
    url = pg_url.replace(":5432/", f":{proxy.port}/")
    doc = yaml.safe_load(gateway_yaml(upstream, f"  on_ledger_failure: {mode}\n"))
    settings = parse_settings(doc, "test config")
    ledger = Ledger(url, keep_prompts=True, retry_s=0.05)

    def build(s: GatewaySettings) -> Parts:
        backends = {spec.name: make_backend(spec) for spec in s.tiers}
        return Parts(router=RandomRouter(), backends=backends, ledger=ledger)

    answered: list[str] = []
    try:
        with TestClient(create_app(settings, build)) as client:
            health = client.get("/healthz").json()
            assert health["status"] == "degraded", health
            assert "PostgreSQL" in health["reason"] and not health["ledger"]["writable"]
            first = [ask(client, i) for i in range(5)]
            if mode == "refuse":
                assert {r.status_code for r in first} == {503}
                assert first[0].json()["error"]["code"] == "ledger_unavailable"
            else:
                assert {r.status_code for r in first} == {200}
                answered += [r.json()["id"] for r in first]
            proxy.restore()
            wait_for(lambda: client.get("/healthz").json()["status"] == "ok")
            for i in range(5, 15):
                r = ask(client, i)
                assert r.status_code == 200, r.text
                answered.append(r.json()["id"])
            ledger.flush()
            proxy.cut()  # lost mid-run
            mid = [ask(client, i) for i in range(15, 20)]
            if mode == "refuse":
                # the first answer finds the server gone; refusals start once it is known
                wait_for(lambda: not ledger.health().writable)
                assert ask(client, 99).status_code == 503
            answered += [r.json()["id"] for r in mid if r.status_code == 200]
            wait_for(lambda: not ledger.health().writable)
            # a rating for a request this replica did not answer needs the ledger: 503, not 500
            rated = client.post("/v1/feedback", json={"request_id": "chatcmpl-x", "rating": 1})
            assert rated.status_code == 503, rated.text
            assert rated.json()["error"]["code"] == "ledger_unavailable"
            metrics = client.get("/metrics").text
            assert "tierroute_ledger_writable 0.0" in metrics, metrics
            proxy.restore()
            wait_for(lambda: ledger.health().writable)
            ledger.flush()
            stored = {row.id for row in ledger.rows()}
            assert stored == set(answered), (len(stored), len(answered))
            assert client.get("/healthz").json()["status"] == "ok"
            assert "tierroute_ledger_rows_dropped_total 0.0" in client.get("/metrics").text
    finally:
        proxy.close()


# --- virtual keys -----------------------------------------------------------------------------


def cli(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "tierroute.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_virtual_keys_authenticate_book_spend_and_revoke_within_seconds(
    tmp_path: Path,
    pg_url: str,
    upstream: str,
) -> None:
    config = write_yaml(
        tmp_path / "gateway.yaml",
        gateway_yaml(upstream, "  virtual_keys: true\n", top=f"ledger: {pg_url}"),
    )
    created = json.loads(
        cli(
            "keys",
            "create",
            "alice",
            "--tenant",
            "acme",
            "--rpm",
            "600",
            "--json",
            "--config",
            str(config),
        )
    )
    secret, key_id = created["secret"], created["key_id"]
    server = start(config, tmp_path / "data", env={"TIERROUTE_API_KEYS": "sk-config-key"})
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert ask(http, 0).status_code == 401
            assert ask(http, 0, key="sk-tr-not-a-key").json()["error"]["code"] == (
                "invalid_api_key"
            )
            ids = []
            for i in range(5):
                r = ask(http, i, key=secret)
                assert r.status_code == 200, r.text
                ids.append(r.json()["id"])
            assert ask(http, 9, key="sk-config-key").status_code == 200  # config keys too
            # the whole gateway's data is the operator's: a virtual key is refused
            dash = http.get("/v1/dashboard/data", headers={"authorization": f"Bearer {secret}"})
            assert dash.status_code == 403, dash.text
            admin = {"authorization": "Bearer sk-config-key"}
            dash = http.get("/v1/dashboard/data", headers=admin)
            assert dash.status_code == 200 and dash.json(), dash.text  # read from PostgreSQL
            metrics = http.get("/metrics", headers=admin).text
            spend = [
                line
                for line in metrics.splitlines()
                if line.startswith(f'tierroute_key_spend_usd_total{{key="{key_id}"}}')
            ]
            # 5 requests of 5 prompt and 1 completion tokens at $1/$2 per million
            assert spend and float(spend[0].split()[-1]) == pytest.approx(5 * 7e-6), metrics
            cli("keys", "revoke", "alice", "--ledger", pg_url)
            revoked_at = time.monotonic()

            def refused() -> bool:
                r = ask(http, 0, key=secret)
                if r.status_code == 200:  # still cached: booked to the key like the others
                    ids.append(r.json()["id"])
                return r.status_code == 401

            wait_for(refused, seconds=10)
            print(f"revocation took effect after {time.monotonic() - revoked_at:.1f}s")
    finally:
        server.stop()
    with Ledger(pg_url) as ledger:
        rows = [ledger.get(i) for i in ids]
        assert all(r is not None and r.api_key_id == key_id for r in rows)
        assert all(r is not None and r.tenant == "acme" for r in rows)
    report = cli("report", "--by", "key", "--format", "json", "--ledger", pg_url)
    groups = {g["key"]: g for g in json.loads(report)["groups"]}
    assert groups[key_id]["requests"] == len(ids), report


# --- three replicas, one SIGKILLed ------------------------------------------------------------

REQUESTS, CONCURRENCY = 3000, 150


def test_three_replicas_share_the_ledger_and_survive_a_sigkill(
    tmp_path: Path,
    pg_url: str,
    upstream: str,
) -> None:
    config = write_yaml(tmp_path / "gateway.yaml", gateway_yaml(upstream))
    env = {"TIERROUTE_LEDGER_URL": pg_url}
    replicas: list[Server] = []
    try:
        with ThreadPoolExecutor(3) as pool:  # start together: they migrate once between them
            futures = [pool.submit(start, config, tmp_path / f"replica{n}", env) for n in range(3)]
            for future in futures:
                with contextlib.suppress(AssertionError):
                    replicas.append(future.result())
        assert len(replicas) == 3, "a replica did not start"
        victim = replicas[0]
        answered: dict[int, list[tuple[str, float]]] = {0: [], 1: [], 2: []}
        kill_at: list[float] = []
        failures: list[str] = []

        async def run() -> None:
            import aiohttp  # a lighter client than httpx: the machine's cores are the replicas'

            sem = asyncio.Semaphore(CONCURRENCY)
            connector = aiohttp.TCPConnector(limit=CONCURRENCY)
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

                async def one(i: int) -> None:
                    body = {"messages": [{"role": "user", "content": f"Question {i}?"}]}
                    async with sem:
                        # round robin; a replica that does not answer is skipped, as a load
                        # balancer would
                        for attempt in range(3):
                            n = (i + attempt) % 3
                            url = replicas[n].url + "/v1/chat/completions"
                            try:
                                async with http.post(url, json=body) as r:
                                    text = await r.text()
                            except (aiohttp.ClientError, OSError):
                                continue
                            if r.status == 200:
                                answered[n].append((json.loads(text)["id"], time.monotonic()))
                            else:
                                failures.append(f"{n}: {r.status} {text[:200]}")
                            return
                        failures.append(f"request {i}: no replica answered")

                async def killer() -> None:
                    while sum(len(a) for a in answered.values()) < REQUESTS // 3:
                        await asyncio.sleep(0.01)
                    kill_at.append(time.monotonic())
                    victim.proc.send_signal(signal.SIGKILL)

                await asyncio.gather(killer(), *(one(i) for i in range(REQUESTS)))

        started = time.monotonic()
        asyncio.run(run())
        took = time.monotonic() - started
        assert victim.proc.wait(10) == -signal.SIGKILL
        assert not failures, failures[:5]
        survivors_answered = len(answered[1]) + len(answered[2])
        assert len(answered[0]) + survivors_answered == REQUESTS
        after_kill = [t for n in (1, 2) for _, t in answered[n] if t > kill_at[0]]
        assert len(after_kill) > REQUESTS // 3, "the survivors kept answering"
        for server in replicas[1:]:
            server.stop()  # SIGTERM: a graceful stop writes every queued row
    finally:
        for server in replicas:
            if server.proc.poll() is None:
                server.proc.kill()
    with Ledger(pg_url) as ledger:
        stored = [row.id for row in ledger.rows()]
    assert len(stored) == len(set(stored))
    stored_set = set(stored)
    for n in (1, 2):  # every answer of a survivor has its row
        assert {rid for rid, _ in answered[n]} <= stored_set
    victim_ids = [rid for rid, _ in answered[0]]  # in the order the answers arrived
    lost = [i for i, rid in enumerate(victim_ids) if rid not in stored_set]
    print(
        f"\n{REQUESTS} requests at c={CONCURRENCY} over 3 replicas in {took:.1f}s "
        f"({REQUESTS / took:.0f} req/s); the SIGKILLed replica answered {len(victim_ids)}, "
        f"of which {len(lost)} rows were lost (its last unflushed batch)"
    )
    assert len(lost) <= 500  # at most one writer batch (batch_size)
    # and they are its latest answers: none older than the requests in flight with them
    recent = len(victim_ids) - len(lost) - CONCURRENCY
    assert all(i >= recent for i in lost), (lost, len(victim_ids))
    # rows beyond the answers: the victim's requests in flight at the kill, never answered
    extra = stored_set - {rid for n in (0, 1, 2) for rid, _ in answered[n]}
    assert len(extra) <= CONCURRENCY, len(extra)
