"""The books a team lead reads: why each request went where, at which prices, and a report
that counts only routed requests, groups them, and prices from the ledger's own rows."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from tierroute.ledger import Ledger, LedgerRow, build_report, report_csv, report_json
from tierroute.ledger.store import MIGRATIONS

from .conftest import run_cli

SMALL = {"price_in_per_m": 0.1, "price_out_per_m": 0.2}
LARGEST = {"largest_price_in_per_m": 10.0, "largest_price_out_per_m": 30.0}


def row(i: int, tier: str = "small", **kw: object) -> LedgerRow:
    prices = SMALL if tier == "small" else {"price_in_per_m": 10.0, "price_out_per_m": 30.0}
    fields: dict[str, object] = {
        "id": f"chatcmpl-{i}",
        "ts": 1_700_000_000.0 + i * 3600 * 13,  # about two requests a day
        "tier": tier,
        "model": f"{tier}-m",
        "prompt_tokens": 1000,
        "completion_tokens": 100,
        "reason": f"score {i / 10:.2f}",
        **prices,
        **LARGEST,
    }
    fields.update(kw)
    r = LedgerRow(**fields)  # type: ignore[arg-type]
    unit_in, unit_out = prices["price_in_per_m"], prices["price_out_per_m"]
    return LedgerRow(**{**r.__dict__, "cost_usd": (1000 * unit_in + 100 * unit_out) / 1e6})


def rows() -> list[LedgerRow]:
    return [
        row(1, tags={"task": "chat"}, api_key_id="k1", tenant="alice"),
        row(2, tags={"task": "chat"}, api_key_id="k1", tenant="bob"),
        row(3, "large", tags={"task": "code"}, api_key_id="k2", tenant="alice"),
        # The client named the large tier: routing saved nothing on it.
        row(4, "large", forced=True, api_key_id="k2", reason="tier large requested"),
    ]


def test_rows_keep_reason_tags_forced_tenant_and_prices(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        for r in rows():
            ledger.record(r)
        ledger.flush()
        back = ledger.get("chatcmpl-4")
        assert back is not None and back.forced and back.reason == "tier large requested"
        first = ledger.get("chatcmpl-1")
        assert first is not None
        assert (first.tags, first.tenant, first.price_in_per_m) == ({"task": "chat"}, "alice", 0.1)
        assert first.largest_cost() == pytest.approx((1000 * 10 + 100 * 30) / 1e6)


def test_savings_count_routed_requests_only_at_their_own_prices() -> None:
    report = build_report(rows())  # no pricing function: every row carries its prices
    small, large = 0.0001 + 0.00002, 0.01 + 0.003  # one request's cost on each tier
    assert report.forced == 1 and report.unpriced == 0
    assert report.routed_cost_usd == pytest.approx(2 * small + large)
    assert report.all_largest_cost_usd == pytest.approx(3 * large)
    assert report.saved_fraction == pytest.approx(1 - (2 * small + large) / (3 * large))
    assert report.total_cost_usd == pytest.approx(2 * small + 2 * large)


def test_report_groups_by_key_tenant_tag_and_day_with_quality() -> None:
    ratings = {"chatcmpl-1": 1.0, "chatcmpl-2": 0.0, "chatcmpl-3": 1.0}
    verdicts = {"chatcmpl-1": [1.0], "chatcmpl-2": [0.0, 1.0]}
    by_key = build_report(rows(), by="key", ratings=ratings, verdicts=verdicts)
    k1 = next(g for g in by_key.tiers if g.tier == "k1")
    assert (k1.requests, k1.ratings, k1.rating_mean, k1.judged) == (2, 2, 0.5, 3)
    assert k1.judged_good == pytest.approx(2 / 3)
    assert k1.saved_fraction == pytest.approx(1 - 2 * 0.00012 / (2 * 0.013))
    tenants = {g.tier: g.requests for g in build_report(rows(), by="tenant").tiers}
    assert tenants == {"alice": 2, "bob": 1, "(none)": 1}
    tags = {g.tier: g.requests for g in build_report(rows(), by="tag").tiers}
    assert tags == {"task=chat": 2, "task=code": 1, "(untagged)": 1}
    days = build_report(rows(), by="day").tiers
    assert sum(g.requests for g in days) == 4 and all(len(g.tier) == 10 for g in days)


def test_report_as_csv_and_json() -> None:
    report = build_report(rows(), by="tier")
    table = list(csv.DictReader(io.StringIO(report_csv(report))))
    assert [r["tier"] for r in table] == ["large", "small"]
    assert table[0]["routed"] == "1" and table[0]["requests"] == "2"
    doc = json.loads(report_json(report))
    assert doc["by"] == "tier" and doc["summary"]["forced"] == 1
    assert {g["tier"] for g in doc["groups"]} == {"small", "large"}


def test_one_rating_per_request_and_rater_the_latest_wins(tmp_path: Path) -> None:
    clock = iter(range(100, 200))
    with Ledger(tmp_path / "l.db", clock=lambda: float(next(clock))) as ledger:
        ledger.record(rows()[0])
        for rating in (0.0, 0.0, 1.0):
            ledger.add_feedback("chatcmpl-1", rating, rater="k1")
        ledger.add_feedback("chatcmpl-1", 0.0, rater="k2")
        ledger.flush()
        given = {(f.rating, f.ts) for f in ledger.feedback("chatcmpl-1")}
        assert given == {(1.0, 102.0), (0.0, 103.0)}
        assert sorted(r for _, _, r in ledger.feedback_since()) == [0.0, 1.0]


def test_migration_keeps_old_rows_and_the_latest_of_duplicate_ratings(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    with closing(sqlite3.connect(path)) as conn:
        for migration in MIGRATIONS[:5]:
            migration(conn)
        conn.execute(
            "INSERT INTO requests (id, ts, tier, model, status) "
            "VALUES ('old', 1.0, 'small', 'm', 200)"
        )
        conn.executemany(
            "INSERT INTO feedback (request_id, ts, rating) VALUES ('old', ?, ?)",
            [(1.0, 0.0), (2.0, 0.0), (3.0, 1.0)],
        )
        conn.execute("PRAGMA user_version = 5")
        conn.commit()
    with Ledger(path) as ledger:
        old = ledger.get("old")
        assert old is not None and old.price_in_per_m is None and not old.forced
        assert [(f.ts, f.rating) for f in ledger.feedback("old")] == [(3.0, 1.0)]
        # a row without prices is priced only from a config the user names
        report = build_report([old])
        assert report.unpriced == 1 and report.all_largest_cost_usd == 0


def test_report_command_groups_and_writes_csv(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db") as ledger:
        for r in rows():
            ledger.record(r)
    text = run_cli("report", "--data-dir", str(tmp_path), "--by", "tenant", check=True).stdout
    assert "tenant" in text and "alice" in text and "not counted in savings" in text
    out = run_cli("report", "--data-dir", str(tmp_path), "--by", "key", "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("key,requests,share,routed,cost_usd")
