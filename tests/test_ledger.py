"""The request ledger on real SQLite files, and the savings report on rows worked by hand."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tierroute.errors import TierrouteError
from tierroute.ledger import (
    SCHEMA_VERSION,
    Feedback,
    Ledger,
    LedgerClosedError,
    LedgerError,
    LedgerRow,
    build_report,
    format_report,
    parse_since,
    percentile,
    plot_report,
)


def make_row(i: int, **kw: object) -> LedgerRow:
    fields: dict[str, object] = {
        "id": f"req-{i}",
        "ts": 1_700_000_000.0 + i,
        "tier": "small",
        "model": "small-m",
    }
    fields.update(kw)
    return LedgerRow(**fields)  # type: ignore[arg-type]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


def tables(path: Path) -> set[str]:
    with closing(sqlite3.connect(path)) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}


# --- schema ---------------------------------------------------------------------------------


def test_fresh_database_gets_every_migration_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ledger.db"
    Ledger(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert {"requests", "feedback", "requests_ts", "feedback_request"} <= tables(path)


# The schema of version 1 exactly as it shipped; an old database on a user's disk.
V1_SCHEMA = """
CREATE TABLE requests (
    id TEXT PRIMARY KEY, ts REAL NOT NULL, api_key_id TEXT, tier TEXT NOT NULL, score REAL,
    hints TEXT NOT NULL DEFAULT '{}', model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0, latency_ms REAL NOT NULL DEFAULT 0, ttft_ms REAL,
    fallback_chain TEXT NOT NULL DEFAULT '[]', status INTEGER NOT NULL, error TEXT,
    cache_hit INTEGER NOT NULL DEFAULT 0, stream INTEGER NOT NULL DEFAULT 0, prompt_text TEXT
);
INSERT INTO requests (id, ts, tier, model, status, hints, fallback_chain)
VALUES ('old-1', 1700000000.5, 'large', 'large-m', 200, '{"task": "code"}', '["large"]');
PRAGMA user_version = 1;
"""


def test_version_1_database_upgrades_at_open_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(V1_SCHEMA)
    assert "feedback" not in tables(path)

    with Ledger(path, clock=lambda: 42.0) as led:
        old = led.get("old-1")
        assert old is not None
        assert (old.tier, old.hints, old.fallback_chain) == ("large", {"task": "code"}, ("large",))
        led.add_feedback("old-1", 0.5, "fine")
        led.flush()
        assert led.feedback("old-1") == [Feedback("old-1", 42.0, 0.5, "fine")]

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert {"feedback", "requests_ts", "requests_key_ts"} <= tables(path)


def test_a_newer_schema_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match="upgrade tierroute"):
        Ledger(path)


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(TierrouteError, match="not a usable ledger"):
        Ledger(path)


# --- writing and reading --------------------------------------------------------------------


def test_row_round_trips_and_prompts_are_dropped_unless_kept(tmp_path: Path) -> None:
    row = make_row(
        1,
        api_key_id="key-a",
        score=0.73,
        hints={"max_tier": "medium", "n": 2},
        prompt_tokens=120,
        completion_tokens=40,
        cost_usd=0.0021,
        latency_ms=812.5,
        ttft_ms=95.0,
        fallback_chain=("small", "medium"),
        status=200,
        stream=True,
        prompt_text="secret prompt",
    )
    with Ledger(tmp_path / "a.db") as led:
        led.record(row)
        led.flush()
        got = led.get("req-1")
        assert got is not None and got.prompt_text is None
        assert got == LedgerRow(**{**row.__dict__, "prompt_text": None})
        assert led.get("missing") is None
    with Ledger(tmp_path / "b.db", keep_prompts=True) as led:
        led.record(row)
        led.flush()
        assert led.get("req-1") == row


def test_rows_since_and_count(ledger: Ledger) -> None:
    for i in (3, 1, 2):
        ledger.record(make_row(i))
    ledger.flush()
    assert [r.id for r in ledger.rows()] == ["req-1", "req-2", "req-3"]
    assert [r.id for r in ledger.rows(since=1_700_000_002.0)] == ["req-2", "req-3"]
    assert ledger.count() == 3
    assert ledger.count(since=1_700_000_003.0) == 1


def test_200_writers_from_threads_give_exactly_200_rows(ledger: Ledger) -> None:
    start = threading.Barrier(200)

    def write(i: int) -> None:
        start.wait()
        ledger.record(make_row(i))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.flush()
    assert ledger.count() == 200
    assert {r.id for r in ledger.rows()} == {f"req-{i}" for i in range(200)}


def test_200_writers_from_asyncio_tasks_give_exactly_200_rows(ledger: Ledger) -> None:
    async def write(i: int) -> None:
        await asyncio.sleep(0)
        ledger.record(make_row(i, stream=True))
        await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(write(i) for i in range(200)))
        await ledger.aflush()

    asyncio.run(main())
    assert ledger.count() == 200


def test_record_does_not_wait_for_a_locked_database(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as led:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        t0 = time.perf_counter()
        for i in range(200):
            led.record(make_row(i))
        assert time.perf_counter() - t0 < 0.5
        time.sleep(0.2)
        blocker.execute("COMMIT")
        blocker.close()
        led.flush()
        assert led.count() == 200


def test_close_flushes_everything_queued_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    led = Ledger(path)
    for i in range(1000):
        led.record(make_row(i))
    led.close()
    led.close()
    assert led.closed
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 1000


def test_aclose_from_a_lifespan_flushes(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.db")

    async def main() -> None:
        for i in range(50):
            led.record(make_row(i))
        await led.aclose()

    asyncio.run(main())
    with Ledger(tmp_path / "ledger.db") as again:
        assert again.count() == 50


def test_record_after_close_raises_a_clear_error(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.db")
    led.close()
    with pytest.raises(LedgerClosedError, match="closed; record rows before close"):
        led.record(make_row(1))
    with pytest.raises(LedgerClosedError):
        led.add_feedback("req-1", 1.0)
    with pytest.raises(LedgerClosedError, match="open a new Ledger"):
        led.count()
    led.flush()  # nothing queued: a no-op


def test_a_duplicate_id_is_reported_and_its_batch_mates_are_kept(ledger: Ledger) -> None:
    ledger.record(make_row(1))
    ledger.record(make_row(2))
    ledger.record(make_row(1, tier="large"))
    ledger.record(make_row(3))
    with pytest.raises(LedgerError, match=r"'req-1' was not saved.*unique id"):
        ledger.flush()
    assert ledger.count() == 3
    ledger.flush()  # the failure is reported once


def test_unserialisable_hints_fail_at_record_time(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="hints of request 'req-1'"):
        ledger.record(make_row(1, hints={"when": object()}))


# --- the report -----------------------------------------------------------------------------

# Largest tier: $10 per M prompt tokens, $30 per M completion tokens.
LARGE_IN, LARGE_OUT = 10.0, 30.0


def largest_cost(row: LedgerRow) -> float:
    return (row.prompt_tokens * LARGE_IN + row.completion_tokens * LARGE_OUT) / 1e6


def hand_rows() -> list[LedgerRow]:
    # Each request: 100 prompt + 50 completion tokens = $0.0025 on the largest tier.
    small = [
        make_row(i, latency_ms=ms, cost_usd=0.0005, prompt_tokens=100, completion_tokens=50)
        for i, ms in ((1, 300.0), (2, 100.0), (3, 200.0))
    ]
    small[0] = LedgerRow(**{**small[0].__dict__, "cache_hit": True})
    large = make_row(
        4,
        tier="large",
        model="large-m",
        latency_ms=1000.0,
        cost_usd=0.0025,
        prompt_tokens=100,
        completion_tokens=50,
        status=502,
        error="upstream timed out",
    )
    return [*small, large]


def test_report_numbers_worked_by_hand() -> None:
    rep = build_report(hand_rows(), largest_cost)
    assert rep.requests == 4
    small, large = rep.tiers
    assert (small.tier, small.requests, small.share) == ("small", 3, 0.75)
    assert (large.tier, large.requests, large.share) == ("large", 1, 0.25)
    # routed 3 * 0.0005 + 0.0025 = 0.004; all-largest 4 * 0.0025 = 0.01; saved 60%
    assert rep.routed_cost_usd == pytest.approx(0.004)
    assert rep.all_largest_cost_usd == pytest.approx(0.01)
    assert rep.saving_pct == pytest.approx(60.0)
    # small latencies sorted 100, 200, 300: p50 = 200; p95 at rank 0.95 * 2 = 1.9 -> 290
    assert small.p50_latency_ms == pytest.approx(200.0)
    assert small.p95_latency_ms == pytest.approx(290.0)
    assert large.p50_latency_ms == large.p95_latency_ms == 1000.0
    assert (rep.errors, large.errors, small.errors) == (1, 1, 0)
    assert rep.cache_hit_rate == 0.25

    text = format_report(rep)
    assert "4 requests" in text
    assert "75.0%" in text and "60.0%" in text
    assert "cache hits         1 (25.0%)" in text


def test_percentile_interpolates_between_ranks() -> None:
    xs = [40.0, 10.0, 30.0, 20.0]
    assert percentile(xs, 0.5) == pytest.approx(25.0)  # rank 1.5
    assert percentile(xs, 0.95) == pytest.approx(38.5)  # rank 2.85
    assert percentile(xs, 0.0) == 10.0 and percentile(xs, 1.0) == 40.0
    assert percentile([7.0], 0.95) == 7.0


def test_empty_report() -> None:
    rep = build_report([], largest_cost)
    assert (rep.requests, rep.saved_fraction, rep.cache_hit_rate) == (0, 0.0, 0.0)
    assert "No requests" in format_report(rep)


def test_report_from_ledger_rows(ledger: Ledger) -> None:
    for row in hand_rows():
        ledger.record(row)
    ledger.flush()
    assert build_report(ledger.rows(), largest_cost) == build_report(hand_rows(), largest_cost)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [
        make_row(
            i,
            ts=1_700_000_000.0 + 97.0 * i,
            tier=("small", "medium", "large")[i % 3],
            cost_usd=0.001 * (1 + i % 3),
            prompt_tokens=100,
            completion_tokens=50,
        )
        for i in range(60)
    ]
    out = plot_report(rows, tmp_path / "plots" / "report.png", largest_cost)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LedgerError, match="no requests to plot"):
        plot_report([], tmp_path / "empty.png", largest_cost)


# --- parse_since ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "back"),
    [("30m", 1800), ("1h", 3600), ("2d", 172_800), (" 1.5H ", 5400), ("1w", 604_800)],
)
def test_parse_since_durations(text: str, back: float) -> None:
    assert parse_since(text, now=1_000_000.0) == 1_000_000.0 - back


def test_parse_since_iso_dates() -> None:
    day = datetime(2024, 5, 1, tzinfo=UTC).timestamp()
    assert parse_since("2024-05-01") == day
    assert parse_since("2024-05-01T10:30") == day + 10.5 * 3600
    assert parse_since("2024-05-01T12:00+02:00") == day + 10 * 3600


@pytest.mark.parametrize("bad", ["", "yesterday", "1y", "-1h", "h", "2024-13-01", "1 hour"])
def test_parse_since_rejects_bad_input_with_advice(bad: str) -> None:
    with pytest.raises(LedgerError, match=r"give a duration like 30m, 1h, 2d"):
        parse_since(bad)
