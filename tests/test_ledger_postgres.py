"""The ledger on both backends (one suite, a real SQLite file and the real PostgreSQL), what
only PostgreSQL does (migrations once across replicas, a server that goes away and comes
back), `tierroute ledger migrate`, and the virtual keys stored in the ledger's database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import TcpProxy, database, needs_postgres
from tierroute.errors import InputError, LedgerError
from tierroute.keys import Authoriser, KeyStore, hash_secret
from tierroute.ledger import SCHEMA_VERSION, Ledger, LedgerRow
from tierroute.ledger import postgresql as pg

from .conftest import wait_for


def make_row(i: int, **kw: object) -> LedgerRow:
    fields: dict[str, object] = {"id": f"req-{i}", "ts": 1_700_000_000.0 + i, "tier": "small"}
    fields.update({"model": "small-m", **kw})
    return LedgerRow(**fields)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | str]:
    if request.param == "sqlite":
        yield tmp_path / "ledger.db"
    else:
        with database() as url:
            yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A database of this test's own, dropped after it."""
    with database() as url:
        yield url


# --- one suite, both backends ---------------------------------------------------------------


def test_every_table_round_trips(target: Path | str) -> None:
    with Ledger(target, keep_prompts=True) as ledger:
        row = make_row(
            1,
            api_key_id="abc",
            score=0.25,
            hints={"priority": "high", "n": 2},
            prompt_tokens=10,
            completion_tokens=5,
            cost_usd=1.25e-5,
            latency_ms=12.5,
            ttft_ms=3.0,
            fallback_chain=("large", "small"),
            error="boom",
            cache_hit=True,
            stream=True,
            prompt_text="hello",
            reason="scored",
            tags={"kind": "code"},
            forced=True,
            tenant="acme",
            price_in_per_m=0.1,
            price_out_per_m=0.2,
            largest_price_in_per_m=1.0,
            largest_price_out_per_m=2.0,
        )
        ledger.record(row)
        ledger.record(make_row(2))
        ledger.add_feedback("req-1", 1.0, "good", rater="k")
        ledger.add_feedback("req-1", 0.0, "bad after all", rater="k")  # replaces the first
        ledger.add_feedback("req-1", 1.0, rater="other")
        ledger.record_policy_change(5.0, 0.5, 0.6, "too many large")
        ledger.record_judgement("req-2", 6.0, "small", "judge", None, "unreadable")
        ledger.flush()
        assert ledger.get("req-1") == row
        assert [r.id for r in ledger.rows()] == ["req-1", "req-2"]
        assert [r.id for r in ledger.rows(since=1_700_000_001.5)] == ["req-2"]
        assert ledger.count() == 2 and ledger.count(since=1_700_000_002.0) == 1
        assert sorted((f.rating, f.comment) for f in ledger.feedback("req-1")) == [
            (0.0, "bad after all"),
            (1.0, None),
        ]
        assert sorted(ledger.feedback_since()) == [
            ("req-1", "small", 0.0),
            ("req-1", "small", 1.0),
        ]
        assert [(c.old_threshold, c.new_threshold) for c in ledger.policy_changes()] == [(0.5, 0.6)]
        assert ledger.judgements() == [("req-2", "small", None)]


def test_unstorable_text_is_escaped_and_a_duplicate_id_loses_only_itself(
    target: Path | str,
) -> None:
    with Ledger(target, keep_prompts=True) as ledger:
        for i in range(20):
            ledger.record(make_row(i, prompt_text=f"p{i}\ud800", error="nul\x00" if i else None))
        ledger.record(make_row(3))  # a duplicate id, in the same batch as good rows
        ledger.record(make_row(20))
        with pytest.raises(LedgerError, match="unique id"):
            ledger.flush()
        assert ledger.count() == 21
        row = ledger.get("req-5")
        assert row is not None and row.prompt_text == "p5\\ud800"
        # SQLite keeps NUL; PostgreSQL's text cannot, so it is escaped like a surrogate
        assert row.error in ("nul\x00", "nul\\x00")
        assert ledger.health().rows_failed == 1


def test_200_writers_from_threads_give_exactly_200_rows(target: Path | str) -> None:
    with Ledger(target) as ledger:
        threads = [
            threading.Thread(target=lambda i=i: ledger.record(make_row(i))) for i in range(200)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ledger.flush()
        assert ledger.count() == 200
        assert len({r.id for r in ledger.rows()}) == 200


def test_keys_are_stored_hashed_listed_and_revoked(target: Path | str) -> None:
    with Ledger(target) as ledger:
        store = KeyStore(ledger, clock=lambda: 1000.0)
        secret, record = store.create(
            "alice", tenant="acme", budget_usd_day=1.5, requests_per_minute=60
        )
        assert secret.startswith("sk-tr-") and record.policy.key_id == hash_secret(secret)[:12]
        stored = ledger.query("SELECT key_hash, name FROM api_keys")
        assert stored == [(hash_secret(secret), "alice")]  # the hash, never the secret
        assert secret not in repr(ledger.query("SELECT * FROM api_keys"))
        policy = store.find(hash_secret(secret))
        assert policy == record.policy and policy.budget_usd_day == 1.5
        assert policy.budget_usd_month is None and policy.tokens_per_minute is None
        with pytest.raises(InputError, match="already named"):
            store.create("alice")
        with pytest.raises(InputError, match="whole number"):
            store.create("bob", requests_per_minute=0)
        with pytest.raises(InputError, match="letters"):
            store.create("bad\nname")
        assert store.revoke("alice").revoked == 1000.0
        assert store.find(hash_secret(secret)) is None
        assert [k.active for k in store.list()] == [False]
        with pytest.raises(InputError, match="no active key"):
            store.revoke(record.policy.key_id)


def test_a_revocation_is_seen_after_the_cache_ttl(target: Path | str) -> None:
    now = [0.0]
    with Ledger(target) as ledger:
        store = KeyStore(ledger)
        secret, record = store.create("svc")
        auth = Authoriser(store, ttl_s=5.0, clock=lambda: now[0])
        assert auth.lookup(secret) == record.policy
        assert auth.lookup("sk-tr-made-up") is None
        store.revoke("svc")
        now[0] = 4.9
        assert auth.lookup(secret) == record.policy  # cached: still trusted within the TTL
        now[0] = 5.1
        assert auth.lookup(secret) is None


# --- PostgreSQL only -----------------------------------------------------------------------


@needs_postgres
def test_replicas_starting_together_migrate_once(pg_url: str) -> None:
    import psycopg

    ledgers: list[Ledger] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            ledgers.append(Ledger(pg_url))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ledger in ledgers:
        ledger.close()
    assert not errors and len(ledgers) == 6
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM tierroute_schema")]
    assert (
        sorted(versions)
        == list(range(1, SCHEMA_VERSION + 1))
        == list(range(1, len(pg.MIGRATIONS) + 1))
    )


@needs_postgres
def test_a_newer_schema_is_refused_with_a_fix(pg_url: str) -> None:
    import psycopg

    Ledger(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO tierroute_schema VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(LedgerError, match="upgrade tierroute"):
        Ledger(pg_url)


def proxied(url: str, proxy: TcpProxy) -> str:
    return url.replace(":5432/", f":{proxy.port}/")


@needs_postgres
def test_server_down_at_start_then_up_writes_the_queued_rows(pg_url: str) -> None:
    proxy = TcpProxy()
    url = proxied(pg_url, proxy)
    proxy.cut()
    try:
        ledger = Ledger(url, retry_s=0.05)  # opens: the server is waited for, not required
        health = ledger.health()
        assert not health.writable and "PostgreSQL server is up" in (health.problem or "")
        for i in range(30):
            ledger.record(make_row(i))
        wait_for(lambda: ledger.health().rows_spilled == 30)
        proxy.restore()
        wait_for(lambda: ledger.health().writable)
        ledger.flush()
        assert ledger.count() == 30 and ledger.health().ok
        ledger.close()
    finally:
        proxy.close()


@needs_postgres
def test_server_lost_mid_run_keeps_rows_in_memory_and_drops_past_the_bound(
    pg_url: str,
) -> None:
    proxy = TcpProxy()
    try:
        ledger = Ledger(proxied(pg_url, proxy), retry_s=0.05, spill_max_rows=25)
        for i in range(10):
            ledger.record(make_row(i))
        ledger.flush()
        assert ledger.count() == 10
        proxy.cut()  # every connection through it is closed: the server looks gone
        for i in range(10, 50):
            ledger.record(make_row(i))
        wait_for(lambda: ledger.health().rows_dropped == 15)
        health = ledger.health()
        assert not health.writable and health.rows_spilled == 25, health
        with pytest.raises(LedgerError, match="cannot read the ledger"):
            ledger.count()
        proxy.restore()
        wait_for(lambda: ledger.health().writable)
        ledger.flush(raise_failures=False)
        # the oldest 25 waited and were written; the 15 past the bound were counted dropped
        assert sorted(int(r.id[4:]) for r in ledger.rows()) == list(range(35))
        assert ledger.health().rows_dropped == 15
        ledger.close(raise_failures=False)
    finally:
        proxy.close()


@needs_postgres
def test_ledger_migrate_copies_every_table_once(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tierroute.cli import main

    source = tmp_path / "ledger.db"
    with Ledger(source, keep_prompts=True) as ledger:
        for i in range(12_000):  # more than one page of 5,000
            ledger.record(make_row(i, prompt_text=f"prompt {i}", cost_usd=i * 1e-6, tenant="t"))
        for i in range(0, 300, 3):
            ledger.add_feedback(f"req-{i}", 1.0, f"ok {i}", rater="a")
            ledger.add_feedback(f"req-{i}", 0.0, rater="b")
        for i in range(5):
            ledger.record_policy_change(float(i), 0.5, 0.5 + i / 10, f"step {i}")
            ledger.record_judgement(f"req-{i}", float(i), "small", "j", 1.0, "yes")
        # two identical judgements: both are kept, however often migrate runs
        ledger.record_judgement("req-9", 9.0, "small", "j", None, "??")
        ledger.record_judgement("req-9", 9.0, "small", "j", None, "??")
        KeyStore(ledger).create("svc", budget_usd_month=10.0)
        revoked = KeyStore(ledger)
        revoked.create("old")
        revoked.revoke("old")

    assert main(["ledger", "migrate", "--from", f"sqlite:{source}", "--to", pg_url]) == 0
    first = capsys.readouterr().out
    assert "requests: 12000 in the source, 12000 copied, 12000 in the target" in first, first
    assert "feedback: 200 in the source, 200 copied" in first
    assert "shadow_judgements: 7 in the source, 7 copied" in first
    assert "api_keys: 2 in the source, 2 copied" in first
    assert main(["ledger", "migrate", "--from", f"sqlite:{source}", "--to", pg_url]) == 0
    again = capsys.readouterr().out
    assert "copied 0 rows" in again, again

    tables = {
        "requests": "SELECT * FROM requests ORDER BY id",
        "feedback": "SELECT request_id, ts, rating, comment, rater FROM feedback "
        "ORDER BY request_id, rater",
        "policy_changes": "SELECT ts, old_threshold, new_threshold, reason FROM policy_changes "
        "ORDER BY ts",
        "shadow_judgements": "SELECT request_id, ts, tier, judge, verdict, raw "
        "FROM shadow_judgements ORDER BY ts, request_id",
        "api_keys": "SELECT * FROM api_keys ORDER BY key_hash",
    }
    with Ledger(source) as a, Ledger(pg_url) as b:
        for table, sql in tables.items():
            left = [tuple(r) for r in a.query(sql)]
            right = [tuple(r) for r in b.query(sql)]
            assert left == right, table
        assert b.rows() == a.rows()  # and read back as the same LedgerRows


@needs_postgres
def test_report_dashboard_and_training_labels_read_the_same_from_both(
    tmp_path: Path,
    pg_url: str,
) -> None:
    import numpy as np

    from tests.test_learning import fill_ledger
    from tierroute.gateway.dashboard import dashboard_data
    from tierroute.gateway.settings import load_settings
    from tierroute.learning import ledger_labels
    from tierroute.ledger import build_report, format_report
    from tierroute.ledger.transfer import copy_ledger

    fill_ledger(tmp_path)
    settings = load_settings(None)
    with Ledger(tmp_path / "ledger.db") as a, Ledger(pg_url) as b:
        copy_ledger(a, b)
        left, right = ledger_labels(a, "large"), ledger_labels(b, "large")
        assert left.ids == right.ids and left.prompts == right.prompts and len(left.ids) == 80
        assert np.array_equal(left.labels, right.labels)
        for by in ("tier", "key", "tenant", "day"):
            assert format_report(build_report(a.rows(), by=by)) == format_report(
                build_report(b.rows(), by=by)
            )
        assert dashboard_data(a, settings, None) == dashboard_data(b, settings, None)


def test_ledger_migrate_refuses_what_is_not_a_ledger_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tierroute.cli import main

    assert main(["ledger", "migrate", "--from", str(tmp_path), "--to", "postgresql://x/y"]) == 2
    assert "--from must be sqlite:PATH" in capsys.readouterr().err
    code = main(["ledger", "migrate", "--from", f"sqlite:{tmp_path}/none.db", "--to", "mysql://"])
    assert code == 2 and "postgresql://" in capsys.readouterr().err
    code = main(["ledger", "migrate", "--from", f"sqlite:{tmp_path}/none.db", "--to", "sqlite:x"])
    assert code == 2 and "no ledger at" in capsys.readouterr().err


# --- where the ledger is, and the keys command (no server needed) ---------------------------


def test_the_ledger_url_comes_from_env_then_config_then_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tierroute.errors import ConfigError
    from tierroute.gateway.settings import parse_settings
    from tierroute.ledger.location import ledger_target

    tiers = [{"name": "s", "model": "m"}, {"name": "l", "model": "m"}]
    doc = {"tiers": tiers, "router": "rules", "ledger": "postgresql://u@db:5432/books"}
    configured = parse_settings(doc, "test.yaml").ledger
    monkeypatch.delenv("TIERROUTE_LEDGER_URL", raising=False)
    assert ledger_target(configured, tmp_path) == "postgresql://u@db:5432/books"
    assert ledger_target(None, tmp_path) == tmp_path / "ledger.db"
    monkeypatch.setenv("TIERROUTE_LEDGER_URL", "postgresql://u@other/books")
    assert ledger_target(configured, tmp_path) == "postgresql://u@other/books"
    monkeypatch.setenv("TIERROUTE_LEDGER_URL", "mysql://u@other/books")
    with pytest.raises(ConfigError, match="TIERROUTE_LEDGER_URL"):
        ledger_target(configured, tmp_path)
    with pytest.raises(ConfigError, match="ledger"):
        parse_settings({**doc, "ledger": "http://db/books"}, "test.yaml")
    with pytest.raises(ConfigError, match="virtual_key"):
        parse_settings({**doc, "gateway": {"virtual_key": True}}, "test.yaml")


def test_keys_command_on_a_sqlite_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from tierroute.cli import main

    where = ["--data-dir", str(tmp_path)]
    assert main(["keys", "create", "svc", "--budget-month", "12.5", "--tpm", "1000", *where]) == 0
    out = capsys.readouterr().out
    secret = out.split("secret (shown once, stored only as its sha256): ")[1].strip()
    with Ledger(tmp_path / "ledger.db") as ledger:
        policy = KeyStore(ledger).find(hash_secret(secret))
    assert policy is not None and policy.budget_usd_month == 12.5
    assert policy.tokens_per_minute == 1000 and policy.name == "svc"
    assert main(["keys", "list", "--json", *where]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["name"], k["revoked"]) for k in listed] == [("svc", None)]
    assert secret not in json.dumps(listed)
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.record(make_row(1, api_key_id=policy.key_id, cost_usd=0.5))
        ledger.record(make_row(2, api_key_id="0123456789ab"))  # a config key: no name
    assert main(["report", "--by", "key", *where]) == 0
    report = capsys.readouterr().out
    assert policy.key_id in report and "0123456789ab" in report
    assert f"keys\n  {policy.key_id:<14} svc\n" in report, report
    assert main(["keys", "revoke", policy.key_id, *where]) == 0
    assert "revoked key" in capsys.readouterr().out
    assert main(["keys", "revoke", "svc", *where]) == 2
    assert "no active key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["keys", "create", "x", "--budget-day", "-1", *where])
    assert "USD budget" in capsys.readouterr().err


@needs_postgres
def test_config_check_reaches_the_ledger_and_changes_nothing(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import psycopg

    from tierroute.cli import main

    def check(url: str) -> tuple[str, str]:
        config = tmp_path / "gateway.yaml"
        config.write_text(
            f"router: rules\nledger: {url}\ntiers:\n"
            "  - {name: s, kind: local, model: smollm2-135m}\n"
            "  - {name: l, kind: local, model: smollm2-135m}\n"
        )
        main(["config", "check", str(config)])
        captured = capsys.readouterr()
        return captured.out, captured.err

    out, _ = check(pg_url)
    assert f"schema 0 of {SCHEMA_VERSION} (serve migrates it)" in out, out
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_stat_user_tables").fetchone() == (0,)
    Ledger(pg_url).close()
    assert f"schema {SCHEMA_VERSION} of {SCHEMA_VERSION}\n" in check(pg_url)[0]
    _, err = check(pg_url.replace(":5432/", ":1/"))
    assert "cannot connect" in err and "Connection refused" in err, err
