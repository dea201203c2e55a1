"""Issue 12's keys, as an attacker who holds one virtual key (or an old one): revocation
that reaches replicas cut off from the database, a bound on how long a cached key is
trusted in an outage, /v1/route and /v1/feedback counted per key, the shadow judge's spend
booked to the key it judged, and what the gateway tells or keeps from a tenant.

The real gateway app through Starlette's test client, a real SQLite ledger, PostgreSQL
(cut off through a TCP proxy) and Redis where marked, a real loopback upstream.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fast_upstream, wait_for
from tests.postgres import PORT, TcpProxy, database, needs_postgres
from tests.redis_helpers import REDIS_URL, drop_prefix, needs_redis
from tests.test_keysgate import ADMIN, HI, bearer, gateway, metric, settings_for, spend
from tierroute.errors import InputError, LedgerError
from tierroute.keys import Authoriser, KeyStore
from tierroute.ledger import Ledger


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with fast_upstream(mimic=True) as url:
        yield url


@pytest.fixture(scope="module")
def plain_upstream() -> Iterator[str]:
    """Every call answered "ok" with usage 5 prompt + 1 completion tokens."""
    with fast_upstream() as url:
        yield url


@contextlib.contextmanager
def cut_off_database() -> Iterator[tuple[str, str, TcpProxy]]:
    """A fresh PostgreSQL database: (its URL, the same through a proxy that can be cut)."""
    proxy = TcpProxy()
    try:
        with database(port=proxy.port) as proxied:
            yield proxied.replace(f":{proxy.port}/", f":{PORT}/"), proxied, proxy
    finally:
        proxy.close()


def status(client: Any, secret: str) -> int:
    code: int = spend(client, "/v1/chat/completions", secret).status_code
    return code


# --- 1. revocation reaches replicas that cannot read the database -------------------------------


@needs_postgres
@needs_redis
def test_a_published_revocation_reaches_replicas_cut_off_from_the_database(
    upstream: str,
) -> None:
    from tierroute.cli import main

    prefix = f"tierroute-keyguard-{secrets.token_hex(6)}:"
    settings = settings_for(
        upstream,
        {"key_cache_ttl_s": 0.2, "state_prefix": prefix, "state_sync_s": 0.05},
        state=REDIS_URL,
    )
    with cut_off_database() as (direct, proxied, proxy):
        admin = Ledger(direct)
        store = KeyStore(admin)
        leaver, _ = store.create("leaver")
        stayer, _ = store.create("stayer")
        try:
            with (
                gateway(settings, Ledger(proxied)) as one,
                gateway(settings, Ledger(proxied)) as two,
            ):
                for replica in (one, two):
                    assert status(replica, leaver) == status(replica, stayer) == 200
                proxy.cut()
                time.sleep(0.3)  # past the cache's TTL: every lookup now fails
                for replica in (one, two):
                    assert status(replica, leaver) == 200  # trusted into the outage
                    unknown = spend(replica, "/v1/chat/completions", "sk-tr-never-seen")
                    assert unknown.status_code == 503, unknown.text
                    assert unknown.json()["error"]["code"] == "key_store_unavailable"
                # the operator reaches the database; the replicas do not
                where = ["--ledger", direct, "--state", REDIS_URL, "--state-prefix", prefix]
                assert main(["keys", "revoke", "leaver", *where]) == 0
                for replica in (one, two):
                    wait_for(lambda: status(replica, leaver) == 401, seconds=5)  # noqa: B023
                    assert status(replica, stayer) == 200
                proxy.restore()
        finally:
            admin.close()
            drop_prefix(prefix)


@needs_postgres
def test_without_redis_a_cached_key_is_trusted_key_stale_s_into_an_outage(
    upstream: str,
) -> None:
    """What holds without Redis: a key revoked during the outage keeps working until
    `key_stale_s` after the database last confirmed it, then gets a 503 like any key."""
    settings = settings_for(upstream, {"key_cache_ttl_s": 0.1, "key_stale_s": 1.5})
    with cut_off_database() as (direct, proxied, proxy):
        admin = Ledger(direct)
        secret, _ = KeyStore(admin).create("leaver")
        try:
            with gateway(settings, Ledger(proxied)) as client:
                asked = time.monotonic()  # the database confirmed the key after this
                assert status(client, secret) == 200
                proxy.cut()
                KeyStore(admin).revoke("leaver")  # unseen: the replica cannot read it
                time.sleep(0.2)
                assert status(client, secret) == 200
                wait_for(lambda: status(client, secret) == 503, seconds=10)
                assert time.monotonic() - asked >= 1.5
                proxy.restore()
                wait_for(lambda: status(client, secret) == 401, seconds=10)
        finally:
            admin.close()


def test_key_stale_s_is_checked_and_defaults_to_five_minutes() -> None:
    from tierroute.errors import ConfigError

    assert settings_for("http://127.0.0.1:9/v1").key_stale_s == 300
    with pytest.raises(ConfigError, match="key_stale_s"):
        settings_for("http://127.0.0.1:9/v1", {"key_stale_s": -1})
    with pytest.raises(ConfigError, match="side_requests_per_minute"):
        settings_for("http://127.0.0.1:9/v1", {"side_requests_per_minute": 0})


@needs_postgres
def test_a_flood_of_made_up_keys_does_not_push_a_real_key_out() -> None:
    """Unknown secrets are cached apart: ten thousand made-up keys cannot evict the real
    ones and so turn a database outage into every tenant's 503."""
    now = [0.0]
    with cut_off_database() as (_, proxied, proxy), Ledger(proxied) as ledger:
        store = KeyStore(ledger)
        secret, record = store.create("real")
        auth = Authoriser(store, ttl_s=5.0, max_entries=4, clock=lambda: now[0])
        assert auth.lookup(secret) == record.policy
        for i in range(20):
            assert auth.lookup(f"sk-tr-made-up-{i}") is None
        proxy.cut()
        now[0] = 10.0  # past the TTL: the database is asked, and cannot answer
        assert auth.lookup(secret) == record.policy
        with pytest.raises(LedgerError):
            auth.lookup("sk-tr-made-up-0")  # evicted or not, an unknown key is not trusted
        now[0] = 400.0  # past key_stale_s (300 s by default)
        with pytest.raises(LedgerError):
            auth.lookup(secret)
        proxy.restore()


def test_a_denied_key_id_is_refused_even_from_a_fresh_cache(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db") as ledger:
        store = KeyStore(ledger)
        secret, record = store.create("svc")
        auth = Authoriser(store, ttl_s=60.0)
        assert auth.lookup(secret) == record.policy
        auth.deny({record.policy.key_id})
        assert auth.lookup(secret) is None
        auth.deny(set())  # the set only grows
        assert auth.lookup(secret) is None


@needs_redis
def test_keys_revoke_publishes_to_redis_even_with_the_database_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis

    from tierroute.cli import main

    prefix = f"tierroute-keyguard-{secrets.token_hex(6)}:"
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    state = ["--state", REDIS_URL, "--state-prefix", prefix]
    try:
        with Ledger(tmp_path / "ledger.db") as ledger:
            _, record = KeyStore(ledger).create("svc")
        key = record.policy.key_id
        where = ["--data-dir", str(tmp_path), *state]
        assert main(["keys", "revoke", "svc", *where]) == 0
        assert "published" in capsys.readouterr().out
        assert client.smembers(prefix + "revoked") == {key}
        assert client.get(prefix + "revoked:version") == "1"
        # run again (say its publication had failed): published again, not refused
        assert main(["keys", "revoke", key, *where]) == 0
        assert client.get(prefix + "revoked:version") == "2"
        # the database unreachable: a key id is still published, and the command says so
        down = ["--ledger", "postgresql://postgres@127.0.0.1:1/none", *state]
        assert main(["keys", "revoke", "0123456789ab", *down]) == 1
        assert "Run this command again once the database answers" in capsys.readouterr().err
        assert client.smembers(prefix + "revoked") == {key, "0123456789ab"}
        # a name cannot be resolved without the database: nothing is published
        assert main(["keys", "revoke", "svc", *down]) == 2
        assert client.scard(prefix + "revoked") == 2
    finally:
        client.close()
        drop_prefix(prefix)


# --- 2. /v1/route and /v1/feedback are counted per key ------------------------------------------


def test_route_and_feedback_are_limited_per_key(tmp_path: Path, upstream: str) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    store = KeyStore(ledger)
    flooder, _ = store.create("flooder")
    other, _ = store.create("other")
    settings = settings_for(upstream, {"side_requests_per_minute": 3})
    with gateway(settings, ledger) as client:
        answer = spend(client, "/v1/chat/completions", flooder)
        rid = answer.headers["x-tierroute-request-id"]
        route = {"model": "auto", "messages": HI}
        rate = {"request_id": rid, "rating": 1}
        assert client.post("/v1/route", json=route, headers=bearer(flooder)).status_code == 200
        assert client.post("/v1/feedback", json=rate, headers=bearer(flooder)).status_code == 200
        assert client.post("/v1/route", json=route, headers=bearer(flooder)).status_code == 200
        for path, body in (("/v1/route", route), ("/v1/feedback", rate)):
            refused = client.post(path, json=body, headers=bearer(flooder))
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
            assert "route and feedback" in error["message"] and "'flooder'" in error["message"]
            assert 1 <= int(refused.headers["retry-after"]) <= 60
        # its own limits are apart (a key without any still answers), and so are other keys
        assert spend(client, "/v1/chat/completions", flooder).status_code == 200
        assert client.post("/v1/route", json=route, headers=bearer(other)).status_code == 200
        for _ in range(5):  # the operator's keys are not counted
            assert client.post("/v1/route", json=route, headers=bearer(ADMIN)).status_code == 200


@needs_redis
def test_the_route_and_feedback_limit_holds_across_replicas(tmp_path: Path, upstream: str) -> None:
    prefix = f"tierroute-keyguard-{secrets.token_hex(6)}:"
    settings = settings_for(
        upstream, {"state_prefix": prefix, "side_requests_per_minute": 4}, state=REDIS_URL
    )
    admin = Ledger(tmp_path / "ledger.db")
    secret, _ = KeyStore(admin).create("shared")
    route = {"model": "auto", "messages": HI}
    try:
        with (
            gateway(settings, Ledger(tmp_path / "ledger.db")) as one,
            gateway(settings, Ledger(tmp_path / "ledger.db")) as two,
        ):
            codes = [
                replica.post("/v1/route", json=route, headers=bearer(secret)).status_code
                for replica in (one, two, one, two, one, two)
            ]
            assert codes == [200, 200, 200, 200, 429, 429]
    finally:
        admin.close()
        drop_prefix(prefix)


# --- 3. the shadow judge's spend is booked to the key it judged, not charged ----------------------


def test_shadow_judging_is_booked_to_the_judged_key_and_not_charged(
    tmp_path: Path, plain_upstream: str
) -> None:
    from tierroute.ledger.report import build_report, format_report

    ledger = Ledger(tmp_path / "ledger.db")
    secret, record = KeyStore(ledger).create("judged", budget_usd_day=1.0)
    key = record.policy.key_id
    settings = settings_for(plain_upstream, {"shadow": {"rate": 1.0}})
    with gateway(settings, ledger) as client:
        answer = spend(client, "/v1/chat/completions", secret)
        assert answer.status_code == 200 and answer.headers["x-tierroute-tier"] == "small"
        rid = answer.headers["x-tierroute-request-id"]
        wait_for(lambda: ledger.flush() is None and bool(ledger.judging_spend()))
        # the reference answer and the ruling, 5 + 1 tokens each, at the large tier's $10/$20
        judging = 2 * (5 * 10 + 1 * 20) / 1e6
        assert ledger.judging_spend() == {rid: pytest.approx(judging)}
        found = ledger.query(
            "SELECT api_key_id, prompt_tokens, completion_tokens FROM shadow_judgements"
        )
        assert [tuple(r) for r in found] == [(key, 10, 2)]
        row = ledger.get(rid)
        assert row is not None and row.cost_usd == pytest.approx((5 * 1 + 1 * 2) / 1e6)
        # the key's spend, and what its budget counts, is its own request's alone
        assert metric(client, f'tierroute_key_spend_usd_total{{key="{key}"}}') == pytest.approx(
            row.cost_usd
        )
        assert metric(client, f'tierroute_key_judging_usd_total{{key="{key}"}}') == pytest.approx(
            judging
        )
        report = build_report(ledger.rows(), by="key", judging=ledger.judging_spend())
        group = next(g for g in report.tiers if g.tier == key)
        assert group.cost_usd == pytest.approx(row.cost_usd)
        assert group.judging_usd == pytest.approx(judging)
        text = format_report(report)
        assert "judging USD" in text and "shadow judging     $0.000140" in text


def test_the_report_command_shows_judging_per_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_ledger import make_row
    from tierroute.cli import main

    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.record(make_row(1, api_key_id="aaaaaaaaaaaa", cost_usd=0.5))
        ledger.record(make_row(2, api_key_id="bbbbbbbbbbbb", cost_usd=0.25))
        ledger.record_judgement(
            "req-1", 1.0, "small", "large", 1.0, "YES", api_key_id="aaaaaaaaaaaa", cost_usd=0.125
        )
    where = ["--data-dir", str(tmp_path)]
    assert main(["report", "--by", "key", "--format", "json", *where]) == 0
    report = json.loads(capsys.readouterr().out)
    groups = {g["key"]: g for g in report["groups"]}
    assert groups["aaaaaaaaaaaa"]["judging_usd"] == 0.125
    assert groups["aaaaaaaaaaaa"]["cost_usd"] == 0.5  # not charged: apart from the cost
    assert groups["bbbbbbbbbbbb"]["judging_usd"] == 0.0
    summary = report["summary"]
    assert summary["judging_usd"] == 0.125 and summary["total_cost_usd"] == 0.75


# --- what a key can reach: found by trying ------------------------------------------------------


def test_tenant_names_cannot_overlap_another_keys_tenants(tmp_path: Path) -> None:
    """A request's tenant is "<key's tenant or id>/<user>": a key of tenant "acme" sending
    user "x/bob" would be tenant "acme/x"'s user bob if "acme/x" could be a tenant."""
    with Ledger(tmp_path / "ledger.db") as ledger:
        store = KeyStore(ledger)
        store.create("acme", tenant="acme")
        for tenant in ("acme/x", "0123456789ab"):
            with pytest.raises(InputError, match="may not contain"):
                store.create("other", tenant=tenant)


def test_a_user_cannot_reach_another_keys_tenant(tmp_path: Path, upstream: str) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    store = KeyStore(ledger)
    _, alice = store.create("alice")
    mallory, record = store.create("mallory")
    target = f"{alice.policy.key_id}/alice"  # guessed from a leaked tenant name
    with gateway(settings_for(upstream), ledger) as client:
        r = spend(client, "/v1/chat/completions", mallory, user=target)
        long = spend(client, "/v1/chat/completions", mallory, user="u" * 257)
        assert long.status_code == 400 and long.json()["error"]["param"] == "user"
        meta = spend(client, "/v1/chat/completions", mallory, metadata={"tenant": "t" * 300})
        assert meta.status_code == 400
        ledger.flush()
        row = ledger.get(r.headers["x-tierroute-request-id"])
        assert row is not None and row.tenant == f"{record.policy.key_id}/{target}"


def test_feedback_fields_are_bounded(tmp_path: Path, upstream: str) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    secret, _ = KeyStore(ledger).create("rater")
    with gateway(settings_for(upstream), ledger) as client:
        rid = spend(client, "/v1/chat/completions", secret).headers["x-tierroute-request-id"]
        big = {"request_id": rid, "rating": 1, "comment": "x" * 4001}
        r = client.post("/v1/feedback", json=big, headers=bearer(secret))
        assert r.status_code == 400 and r.json()["error"]["param"] == "comment"
        long_id = {"request_id": "chatcmpl-" + "a" * 200, "rating": 1}
        r = client.post("/v1/feedback", json=long_id, headers=bearer(secret))
        assert r.status_code == 400 and "a" * 200 not in r.text  # not echoed back
        fine = {"request_id": rid, "rating": 1, "comment": "x" * 4000}
        assert client.post("/v1/feedback", json=fine, headers=bearer(secret)).status_code == 200


def test_a_tenant_is_not_told_the_upstreams_words(tmp_path: Path) -> None:
    """An upstream's error can hold its URL, or its masked API key (OpenAI's 401): the
    operator's keys get it all, a virtual key which tiers failed and the request id."""
    ledger = Ledger(tmp_path / "ledger.db")
    secret, _ = KeyStore(ledger).create("tenant")
    settings = settings_for("http://127.0.0.1:9/v1", {"retries": 0, "breaker_failures": 100})
    with gateway(settings, ledger) as client:
        for stream in (False, True):
            body = {"model": "auto", "messages": HI, "stream": stream}
            told = client.post("/v1/chat/completions", json=body, headers=bearer(secret))
            assert told.status_code == 502, told.text
            message = told.json()["error"]["message"]
            assert "127.0.0.1" not in message and "ledger" in message, message
            assert told.headers["x-tierroute-request-id"]
            full = client.post("/v1/chat/completions", json=body, headers=bearer(ADMIN))
            assert "127.0.0.1:9" in full.json()["error"]["message"]
        ledger.flush()
        assert all("127.0.0.1:9" in (row.error or "") for row in ledger.rows())


@pytest.mark.parametrize(
    "header",
    [
        "Basic {s}",
        "Bearer{s}",
        "Token {s}",
        "Bearer {s}x",
        "Bearer " + "k" * 600,
        "Bearer {s} {s}",
    ],
    ids=["basic", "no-space", "token", "wrong", "600-chars", "twice"],
)
def test_authorization_variants_are_refused_without_echoing_them(
    tmp_path: Path, upstream: str, header: str
) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    secret, _ = KeyStore(ledger).create("real")
    with gateway(settings_for(upstream), ledger) as client:
        sent = header.format(s=secret)
        r = client.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": HI},
            headers={"authorization": sent},
        )
        assert r.status_code == 401, r.text
        assert secret not in r.text and sent not in r.text
        for ok in (f"bearer {secret}", f"BEARER   {secret}  "):
            r = client.post(
                "/v1/chat/completions",
                json={"model": "auto", "messages": HI},
                headers={"authorization": ok},
            )
            assert r.status_code == 200, r.text
            r = client.get("/v1/models", headers={"authorization": ok})
            assert r.status_code == 200 and "real" not in r.text  # no key's data
