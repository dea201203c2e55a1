"""Issue 12, as an attacker holding one virtual key: every endpoint that spends money is
gated and charged, no key reaches another key's requests or the admin surfaces, a revoked
key stops on every replica, personalisation tenants are bounded, /healthz tells degraded
from unable.

The real gateway app through Starlette's test client (its lifespan runs), a real SQLite
ledger (PostgreSQL where marked), a real loopback upstream in OpenAI's shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import fast_upstream
from tests.postgres import database, needs_postgres
from tests.redis_helpers import REDIS_URL, drop_prefix, needs_redis
from tierroute.gateway.settings import GatewaySettings, parse_settings
from tierroute.keys import KeyStore
from tierroute.ledger import Ledger

from .conftest import wait_for

ADMIN = "sk-admin-keysgate"  # a config key: the operator's
HI = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with fast_upstream(mimic=True) as url:
        yield url


def settings_for(
    upstream: str, gateway: dict[str, Any] | None = None, state: str | None = None
) -> GatewaySettings:
    remote = {"kind": "openai", "base_url": upstream, "model": "fast"}
    doc = {
        "router": "random",
        "tiers": [
            {"name": "small", **remote, "input_price_per_m": 1.0, "output_price_per_m": 2.0},
            {"name": "large", **remote, "input_price_per_m": 10.0, "output_price_per_m": 20.0},
        ],
        "gateway": {
            "virtual_keys": True,
            "api_keys_sha256": [hashlib.sha256(ADMIN.encode()).hexdigest()],
            **(gateway or {}),
        },
        **({"state": state} if state is not None else {}),
    }
    return parse_settings(yaml.safe_load(yaml.safe_dump(doc)), "test config")


@contextlib.contextmanager
def gateway(settings: GatewaySettings, ledger: Ledger) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from tierroute.gateway.app import Parts, create_app
    from tierroute.gateway.build import make_backend
    from tierroute.routers.random_router import RandomRouter

    def build(s: GatewaySettings) -> Parts:
        backends = {spec.name: make_backend(spec) for spec in s.tiers}
        return Parts(router=RandomRouter(), backends=backends, ledger=ledger)

    with TestClient(create_app(settings, build)) as client:
        yield client


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


BODIES = {
    "/v1/chat/completions": {"model": "small", "messages": HI},
    "/v1/completions": {"model": "small", "prompt": "Say hi"},
    "/v1/embeddings": {"model": "small", "input": ["one", "two"]},
}


def spend(client: Any, path: str, secret: str, **extra: Any) -> httpx.Response:
    response: httpx.Response = client.post(
        path, json={**BODIES[path], **extra}, headers=bearer(secret)
    )
    return response


def metric(client: Any, line_start: str) -> float | None:
    text = client.get("/metrics", headers=bearer(ADMIN)).text
    found = [line for line in text.splitlines() if line.startswith(line_start)]
    return float(found[0].split()[-1]) if found else None


# --- every endpoint that spends money is gated -----------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings"])
def test_an_exhausted_budget_is_refused_on_every_paying_endpoint(
    tmp_path: Path, upstream: str, path: str
) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    secret, _ = KeyStore(ledger).create("broke", budget_usd_day=0)
    with gateway(settings_for(upstream), ledger) as client:
        refused = spend(client, path, secret)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["type"] == "insufficient_quota" and "budget" in error["message"]
        assert "'broke'" in error["message"] and refused.headers["retry-after"]
        assert spend(client, "/v1/chat/completions", secret).status_code == 429
        ledger.flush()
        assert ledger.count() == 0  # nothing was spent


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings"])
def test_requests_per_minute_count_across_endpoints(
    tmp_path: Path, upstream: str, path: str
) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    secret, _ = KeyStore(ledger).create("rpm", requests_per_minute=3)
    with gateway(settings_for(upstream), ledger) as client:
        assert spend(client, "/v1/chat/completions", secret).status_code == 200
        assert spend(client, path, secret).status_code == 200
        assert spend(client, path, secret).status_code == 200
        refused = spend(client, path, secret)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "requests"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"


@needs_redis
def test_a_keys_limit_holds_across_replicas_and_endpoints_on_redis(
    tmp_path: Path, upstream: str
) -> None:
    prefix = f"tierroute-keysgate-{secrets.token_hex(6)}:"
    settings = settings_for(upstream, {"state_prefix": prefix}, state=REDIS_URL)
    admin = Ledger(tmp_path / "ledger.db")
    secret, _ = KeyStore(admin).create("shared", requests_per_minute=3)
    try:
        with (
            gateway(settings, Ledger(tmp_path / "ledger.db")) as one,
            gateway(settings, Ledger(tmp_path / "ledger.db")) as two,
        ):
            assert one.get("/healthz").json()["status"] == "ok"  # on Redis, not local state
            assert spend(one, "/v1/chat/completions", secret).status_code == 200
            assert spend(two, "/v1/completions", secret).status_code == 200
            assert spend(one, "/v1/embeddings", secret).status_code == 200
            refused = spend(two, "/v1/embeddings", secret)
            assert refused.status_code == 429, refused.text
            assert spend(one, "/v1/completions", secret).status_code == 429
    finally:
        admin.close()
        drop_prefix(prefix)


def test_tokens_per_minute_are_settled_to_real_usage(tmp_path: Path, upstream: str) -> None:
    """A completion reserves prompt + max_tokens and is settled to what the tier used: an
    unsettled reservation would refuse the fourth request of 250 asked tokens under 600.
    A prompt of ~700 real tokens then uses the minute up."""
    ledger = Ledger(tmp_path / "ledger.db")
    secret, _ = KeyStore(ledger).create("tpm", tokens_per_minute=600)
    with gateway(settings_for(upstream), ledger) as client:
        for _ in range(6):
            r = spend(client, "/v1/completions", secret, max_tokens=250)
            assert r.status_code == 200, r.text
        long = spend(client, "/v1/completions", secret, prompt="word " * 560, max_tokens=1)
        assert long.status_code == 200, long.text
        refused = spend(client, "/v1/completions", secret)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"


def test_a_budget_reservation_is_settled_to_the_real_cost(tmp_path: Path, upstream: str) -> None:
    """Each completion reserves its worst case on the largest tier (about $0.005 for 250
    tokens at $20/M) and is settled to its real cost (cents of a cent): a reservation left
    standing would refuse the second request under a budget of $0.008."""
    ledger = Ledger(tmp_path / "ledger.db")
    secret, _ = KeyStore(ledger).create("thrifty", budget_usd_day=0.008)
    with gateway(settings_for(upstream), ledger) as client:
        for path in ("/v1/completions", "/v1/embeddings", "/v1/completions"):
            r = spend(client, path, secret, max_tokens=250)
            assert r.status_code == 200, r.text


def test_spend_of_every_endpoint_is_booked_to_the_key(tmp_path: Path, upstream: str) -> None:
    from tierroute.ledger.report import build_report

    ledger = Ledger(tmp_path / "ledger.db")
    secret, record = KeyStore(ledger).create("payer", budget_usd_day=5)
    key = record.policy.key_id
    with gateway(settings_for(upstream), ledger) as client:
        ids = []
        for path in BODIES:
            r = spend(client, path, secret)
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-tierroute-request-id"])
        ledger.flush()
        rows = [ledger.get(i) for i in ids]
        assert all(row is not None and row.api_key_id == key for row in rows)
        total = sum(row.cost_usd for row in rows if row is not None)
        assert total > 0
        exported = metric(client, f'tierroute_key_spend_usd_total{{key="{key}"}}')
        assert exported == pytest.approx(total)
        report = build_report(ledger.rows(), by="key")
        group = next(g for g in report.tiers if g.tier == key)
        assert group.requests == 3 and group.cost_usd == pytest.approx(total)


# --- one key cannot reach another's requests, nor the admin surfaces -------------------------


def test_a_virtual_key_cannot_rate_another_keys_request(tmp_path: Path, upstream: str) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    store = KeyStore(ledger)
    alice, _ = store.create("alice")
    mallory, _ = store.create("mallory")
    with gateway(settings_for(upstream), ledger) as client:
        for path in BODIES:  # requests of every paying endpoint belong to their key
            rid = spend(client, path, alice).headers["x-tierroute-request-id"]
            rate = {"request_id": rid, "rating": 0}
            stolen = client.post("/v1/feedback", json=rate, headers=bearer(mallory))
            assert stolen.status_code == 404, stolen.text
            assert client.post("/v1/feedback", json=rate, headers=bearer(alice)).status_code == 200
        ledger.flush()
        assert [r for _, _, r in ledger.feedback_since(0)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/router/rollback"), ("GET", "/v1/dashboard/data"), ("GET", "/metrics")],
)
def test_admin_surfaces_need_a_config_key(
    tmp_path: Path, upstream: str, method: str, path: str
) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    secret, _ = KeyStore(ledger).create("tenant-key")
    with gateway(settings_for(upstream), ledger) as client:
        anonymous = client.request(method, path)
        assert anonymous.status_code == 401, anonymous.text
        denied = client.request(method, path, headers=bearer(secret))
        assert denied.status_code == 403, denied.text
        error = denied.json()["error"]
        assert error["type"] == "permission_error" and error["code"] == "admin_key_required"
        allowed = client.request(method, path, headers=bearer(ADMIN))
        # rollback: learning is off here, so the admin's answer is a 404 saying so
        assert allowed.status_code == (404 if "rollback" in path else 200), allowed.text


def test_public_metrics_leave_metrics_open_for_a_scraper(tmp_path: Path, upstream: str) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    with gateway(settings_for(upstream, {"public_metrics": True}), ledger) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/dashboard/data").status_code == 401  # the rest stays shut


def test_the_decision_cache_does_not_tell_one_key_what_another_asked(
    tmp_path: Path, upstream: str
) -> None:
    """A cache hit on a prompt only another key sent would tell that it was sent."""
    ledger = Ledger(tmp_path / "ledger.db")
    store = KeyStore(ledger)
    alice, _ = store.create("alice")
    mallory, _ = store.create("mallory")
    eve, _ = store.create("eve")
    secret_prompt = {"model": "auto", "messages": [{"role": "user", "content": "Acme buys Foo"}]}
    with gateway(settings_for(upstream), ledger) as client:
        first = client.post("/v1/chat/completions", json=secret_prompt, headers=bearer(alice))
        assert first.headers["x-tierroute-cache"] == "miss"
        again = client.post("/v1/chat/completions", json=secret_prompt, headers=bearer(alice))
        assert again.headers["x-tierroute-cache"] == "hit"  # a key's own repeats still hit
        for path, key in (("/v1/route", mallory), ("/v1/chat/completions", eve)):
            probe = client.post(path, json=secret_prompt, headers=bearer(key))
            assert probe.headers["x-tierroute-cache"] == "miss", path


# --- revocation reaches every replica ----------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "ledger.db")
    else:
        with database() as url:
            yield url


def test_a_revoked_key_stops_on_every_replica_within_the_ttl(
    ledger_url: str, upstream: str
) -> None:
    settings = settings_for(upstream, {"key_cache_ttl_s": 0.5})
    admin = Ledger(ledger_url)
    store = KeyStore(admin)
    secret, _ = store.create("leaver")
    with (
        gateway(settings, Ledger(ledger_url)) as one,
        gateway(settings, Ledger(ledger_url)) as two,
    ):
        for replica in (one, two):
            assert spend(replica, "/v1/chat/completions", secret).status_code == 200
        store.revoke("leaver")
        revoked = time.monotonic()
        for replica in (one, two):
            for path in BODIES:
                wait_for(lambda: spend(replica, path, secret).status_code == 401, seconds=3)  # noqa: B023
        assert time.monotonic() - revoked < 0.5 + 2.0  # the TTL, and slack for a loaded machine
    admin.close()


def test_key_cache_ttl_is_checked() -> None:
    from tierroute.errors import ConfigError

    with pytest.raises(ConfigError, match="key_cache_ttl_s"):
        settings_for("http://127.0.0.1:9/v1", {"key_cache_ttl_s": 3600})


# --- personalisation tenants are bounded per key --------------------------------------------


def test_one_key_cannot_create_unbounded_tenants(tmp_path: Path, upstream: str) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    store = KeyStore(ledger)
    greedy, _ = store.create("greedy")
    other, _ = store.create("other")
    settings = settings_for(upstream, {"personalise": {"max_tenants_per_key": 3}})
    with gateway(settings, ledger) as client:

        def rate(secret: str, user: str) -> None:
            r = spend(client, "/v1/chat/completions", secret, user=user)
            rid = r.headers["x-tierroute-request-id"]
            fb = client.post(
                "/v1/feedback", json={"request_id": rid, "rating": 0}, headers=bearer(secret)
            )
            assert fb.status_code == 200, fb.text  # the rating is kept in the ledger all the same

        for i in range(8):
            rate(greedy, f"user{i}")
        rate(greedy, "user0")  # a tenant it has already still learns
        assert metric(client, "tierroute_personalised_tenants ") == 3
        assert metric(client, "tierroute_personalise_tenants_refused_total ") == 5
        rate(other, "x")  # another key's tenants are not crowded out
        assert metric(client, "tierroute_personalised_tenants ") == 4
        ledger.flush()
        assert len(ledger.feedback_since(0)) == 10


def test_the_tenant_cap_is_checked_and_defaults() -> None:
    from tierroute.errors import ConfigError
    from tierroute.personalise import PersonaliseConfig, Personaliser

    assert PersonaliseConfig().max_tenants_per_key == 10_000
    with pytest.raises(ConfigError, match="max_tenants_per_key"):
        PersonaliseConfig(max_tenants_per_key=0)
    p = Personaliser(PersonaliseConfig(max_tenants_per_key=2))
    assert p.observe("k/a", 0.0, owner="k") and p.observe("k/b", 0.0, owner="k")
    assert not p.observe("k/c", 0.0, owner="k")
    assert p.observe("k/a", 1.0, owner="k")  # a known tenant keeps learning
    assert p.observe("j", 0.0, owner="j")
    assert p.shift("k/c") == 0.0 and len(p.counts()) == 3


# --- /healthz: degraded is visible, unable is 503 ---------------------------------------------


@pytest.mark.parametrize("mode", ["queue", "refuse"])
def test_healthz_is_503_only_when_the_replica_answers_nothing(
    tmp_path: Path, upstream: str, mode: str
) -> None:
    from tests.test_ledger_faults import fill_up, free_space

    ledger = Ledger(tmp_path / "ledger.db", keep_prompts=True, retry_s=0.05)
    settings = settings_for(upstream, {"on_ledger_failure": mode, "keep_prompts": True})
    with gateway(settings, ledger) as client:
        healthy = client.get("/healthz")
        assert healthy.status_code == 200 and healthy.json()["status"] == "ok"
        assert healthy.json()["serving"] is True
        ledger.flush()
        fill_up(ledger)
        big = {"model": "small", "messages": [{"role": "user", "content": "x " * 4000}]}
        assert client.post("/v1/chat/completions", json=big, headers=bearer(ADMIN)).is_success
        wait_for(lambda: not ledger.health().writable)
        health = client.get("/healthz")
        assert health.json()["status"] == "degraded"
        if mode == "refuse":  # every request would get a 503: out of the load balancer
            assert health.status_code == 503 and health.json()["serving"] is False
        else:  # it answers, rows wait in memory: stays in rotation, degraded in the body
            assert health.status_code == 200 and health.json()["serving"] is True
        free_space(ledger)
        wait_for(lambda: client.get("/healthz").status_code == 200)


def test_healthz_stays_200_while_every_breaker_is_open(tmp_path: Path) -> None:
    """Every tier down is everyone's outage, not this replica's: taking it out of rotation
    would turn the gateway's clear 502 into a load balancer's bare error."""
    ledger = Ledger(tmp_path / "ledger.db")
    settings = settings_for("http://127.0.0.1:9/v1", {"retries": 0, "breaker_failures": 1})
    with gateway(settings, ledger) as client:
        failed = client.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": HI},
            headers=bearer(ADMIN),
        )
        assert failed.status_code == 502
        health = client.get("/healthz")
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "degraded" and health.json()["serving"] is True
        assert all(state == "open" for state in health.json()["tiers"].values())


def test_local_embeddings_count_against_the_key_and_are_booked(
    tmp_path: Path, upstream: str
) -> None:
    """The packaged MiniLM costs nothing, but its requests are a key's like any other."""
    pytest.importorskip("onnxruntime")
    ledger = Ledger(tmp_path / "ledger.db")
    secret, _ = KeyStore(ledger).create("rpm", requests_per_minute=2)
    body = {"model": "all-MiniLM-L6-v2", "input": ["one", "two"]}
    with gateway(settings_for(upstream), ledger) as client:
        done = client.post("/v1/embeddings", json=body, headers=bearer(secret))
        assert done.status_code == 200, done.text
        assert len(done.json()["data"]) == 2 and done.headers["x-tierroute-tier"] == "embeddings"
        assert spend(client, "/v1/chat/completions", secret).status_code == 200
        refused = client.post("/v1/embeddings", json=body, headers=bearer(secret))
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "requests"
        ledger.flush()
        row = ledger.get(done.headers["x-tierroute-request-id"])
        assert row is not None and row.tier == "embeddings" and row.cost_usd == 0.0
        assert row.prompt_tokens == done.json()["usage"]["prompt_tokens"] == 6
        assert row.tags == {"endpoint": "embeddings"} and row.api_key_id is not None
