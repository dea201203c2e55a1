"""Issue 11: no ledger row lost to another row's fault, a full disk or a read-only folder.

Real SQLite errors only: a full disk is SQLite's own `PRAGMA max_page_count` on the writer's
connection (it raises SQLITE_FULL exactly as a full file system does), a read-only folder is
a real chmod (as an unprivileged user when the tests run as root, since root ignores modes).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import fast_upstream
from tests.test_gateway import start
from tierroute.gateway.settings import GatewaySettings
from tierroute.ledger import Ledger, LedgerError, LedgerRow, default_path

from .conftest import wait_for


def make_row(i: int, **kw: object) -> LedgerRow:
    fields: dict[str, object] = {"id": f"req-{i}", "ts": 1_700_000_000.0 + i, "tier": "small"}
    fields.update({"model": "small-m", **kw})
    return LedgerRow(**fields)  # type: ignore[arg-type]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "ledger.db", keep_prompts=True, retry_s=0.05)
    yield led
    led.close(raise_failures=False)


def fill_up(ledger: Ledger) -> int:
    """Cap the writer's file at its current size: the next page it needs is SQLITE_FULL."""
    conn = ledger._writer  # the writer thread's own connection: the only one that writes
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    conn.execute(f"PRAGMA max_page_count = {pages}")
    return pages


def free_space(ledger: Ledger) -> None:
    ledger._writer.execute("PRAGMA max_page_count = 1073741823")


# --- finding 1: one bad string -------------------------------------------------------------


def test_lone_surrogates_are_stored_escaped_and_keep_their_batch(ledger: Ledger) -> None:
    for i in range(50):
        poison = "\ud800" if i % 10 == 3 else ""
        ledger.record(make_row(i, prompt_text=f"prompt {i}{poison}", error=poison or None))
    ledger.add_feedback("req-3", 0.0, "bad \udfff answer")
    ledger.record_policy_change(1.0, 0.5, 0.6, "reason \ud83d")
    ledger.record_judgement("req-3", 1.0, "small", "judge", 1.0, "raw \ud800")
    ledger.flush()  # nothing failed, so nothing raises
    assert ledger.count() == 50
    row = ledger.get("req-3")
    assert row is not None and row.prompt_text == "prompt 3\\ud800" and row.error == "\\ud800"
    assert ledger.feedback("req-3")[0].comment == "bad \\udfff answer"
    assert ledger.policy_changes()[0].reason == "reason \\ud83d"
    assert ledger.health().ok and ledger.health().rows_written == 50 + 3


def test_a_row_sqlite_refuses_is_counted_and_its_batch_mates_kept(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    # 2**63 does not fit SQLite's INTEGER: only that row fails, once, and says why.
    for i in range(20):
        ledger.record(make_row(i, prompt_tokens=2**63 if i == 7 else 1))
    with pytest.raises(LedgerError, match=r"1 ledger writes .* failed: 'req-7' was not saved"):
        ledger.flush()
    assert ledger.count() == 19
    health = ledger.health()
    assert health.rows_failed == 1 and health.writable
    assert health.problem is not None and "could not be stored" in health.problem
    ledger.flush()  # reported once
    for batch in range(3):  # a burst of bad rows in several batches: one ERROR in the log
        for i in range(5):
            ledger.record(make_row(100 + 10 * batch + i, prompt_tokens=2**63))
        ledger.flush(raise_failures=False)
    assert ledger.health().rows_failed == 16
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, [r.getMessage() for r in errors]


def test_on_ledger_failure_is_queue_or_refuse() -> None:
    from tierroute.errors import ConfigError
    from tierroute.gateway.settings import parse_settings

    url = "http://127.0.0.1:9/v1"
    assert parse_settings(yaml.safe_load(gateway_yaml(url)), "x").on_ledger_failure == "queue"
    bad = yaml.safe_load(gateway_yaml(url, "  on_ledger_failure: drop\n"))
    with pytest.raises(ConfigError, match=r"input should be 'queue' or 'refuse'"):
        parse_settings(bad, "x")


# --- finding 2: a full disk ----------------------------------------------------------------


def test_a_full_disk_spills_rows_in_memory_and_writes_them_when_space_returns(
    ledger: Ledger,
) -> None:
    ledger.record(make_row(0))
    ledger.flush()
    fill_up(ledger)
    for i in range(1, 400):  # several pages of rows: more than the capped file can take
        ledger.record(make_row(i, prompt_text="x" * 200))
    with pytest.raises(LedgerError, match="rows wait in memory"):
        ledger.flush()
    health = ledger.health()
    assert not health.writable and health.rows_spilled == 399
    assert health.problem is not None and "full" in health.problem
    assert ledger.count() == 1
    free_space(ledger)
    ledger.record(make_row(400))
    deadline = time.monotonic() + 10
    while ledger.health().rows_spilled and time.monotonic() < deadline:
        time.sleep(0.02)  # the writer tries again every retry_s (0.05 s here)
    ledger.flush()
    assert ledger.count() == 401
    assert ledger.health().ok and ledger.health().writable


def test_the_spill_is_bounded_and_what_it_drops_is_counted(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.db", spill_max_rows=50, retry_s=60)
    try:
        fill_up(led)
        for i in range(200):
            led.record(make_row(i, prompt_text="x" * 200, error="y" * 200))
        led.flush(raise_failures=False)
        health = led.health()
        assert health.rows_spilled == 50 and health.rows_dropped == 150
        assert not health.ok
    finally:
        led.close(raise_failures=False)


def test_close_on_a_full_disk_counts_the_rows_it_cannot_keep(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger.db", retry_s=60)
    fill_up(led)
    for i in range(200):
        led.record(make_row(i, error="y" * 200))
    with pytest.raises(LedgerError, match="lost at shutdown"):
        led.close()
    assert led.health().rows_failed == 200


# --- finding 8b: a read-only folder --------------------------------------------------------


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` and its files read-only: by chmod, or (root ignores modes) a read-only bind
    mount of the folder on itself."""
    if os.geteuid() != 0:
        for f in [*folder.iterdir(), folder]:
            f.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    try:
        subprocess.run(["mount", "--bind", folder, folder], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("as root, a read-only folder needs a bind mount, and mount is refused here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", folder], check=True)
        yield
    finally:
        subprocess.run(["umount", folder], check=True)


def test_a_read_only_folder_holding_a_valid_ledger_is_called_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    Ledger(path).close()  # a clean close leaves no -wal/-shm beside it
    with read_only(tmp_path), pytest.raises(LedgerError) as caught:
        Ledger(path)
    message = str(caught.value)
    assert "is read-only" in message and "writable" in message, message
    assert "not a usable" not in message and "move it aside" not in message


# --- the gateway: real processes on loopback -----------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """benchmarks/fast_upstream.py: an OpenAI-compatible server answering "ok" at once."""
    with fast_upstream() as url:
        yield url


def ascii_json(doc: object) -> dict[str, Any]:
    """Request arguments for a JSON body in ASCII (a lone surrogate as its \\u escape: valid
    JSON, which httpx's own UTF-8 encoding cannot send)."""
    return {"content": json.dumps(doc), "headers": {"content-type": "application/json"}}


def gateway_yaml(upstream: str, extra: str = "") -> str:
    return f"""
router: random
tiers:
  - {{name: small, kind: openai, base_url: "{upstream}", model: fast}}
  - {{name: large, kind: openai, base_url: "{upstream}", model: fast}}
gateway:
  keep_prompts: true
{extra}"""


def test_lone_surrogates_are_refused_and_every_answered_row_kept(
    tmp_path: Path, upstream: str
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_yaml(upstream))
    server = start(config, tmp_path / "data")
    try:

        async def burst() -> list[str]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:

                async def one(i: int) -> str | None:
                    text = f"Say {i}" + ("\ud800" if i % 10 == 0 else "")
                    r = await http.post(
                        "/v1/chat/completions",
                        **ascii_json(
                            {"model": "small", "messages": [{"role": "user", "content": text}]}
                        ),
                    )
                    if i % 10 == 0:  # refused before any answer: nothing to book
                        assert r.status_code == 400, r.text
                        assert r.json()["error"]["param"] == "messages[0].content"
                        return None
                    assert r.status_code == 200, r.text
                    return str(r.json()["id"])

                answered = await asyncio.gather(*(one(i) for i in range(100)))
                ids = [rid for rid in answered if rid is not None]
                rated = await asyncio.gather(
                    *(
                        http.post(
                            "/v1/feedback",
                            **ascii_json(
                                {
                                    "request_id": rid,
                                    "rating": 0,
                                    "comment": f"bad {n}" + ("\udfff" if n % 2 else ""),
                                }
                            ),
                        )
                        for n, rid in enumerate(ids[:20])
                    )
                )
                assert [r.status_code for r in rated] == [400 if n % 2 else 200 for n in range(20)]
                return ids

        ids = asyncio.run(burst())
        dashboard = httpx.get(server.url + "/v1/dashboard/data", timeout=60)
        assert dashboard.status_code == 200, dashboard.text
        health = httpx.get(server.url + "/healthz", timeout=10).json()
        assert health["status"] == "ok" and health["ledger"]["rows_failed"] == 0, health
    finally:
        server.stop()  # SIGTERM: graceful (uvicorn then re-raises the signal: exit -15)
    log = server.log.read_text()
    assert "Application shutdown failed" not in log and "Traceback" not in log, log
    with Ledger(default_path(server.data_dir)) as ledger:
        rows = {rid: ledger.get(rid) for rid in ids}
        assert len(ids) == 90 and all(rows.values()), f"{sum(not r for r in rows.values())} lost"
        assert [f.comment for f in ledger.feedback(ids[0])] == ["bad 0"]
        assert ledger.feedback(ids[1]) == []  # its poisoned comment was refused with 400


@pytest.mark.parametrize("mode", ["queue", "refuse"])
def test_gateway_on_a_full_disk_spills_or_refuses_and_loses_no_answered_row(
    tmp_path: Path, upstream: str, mode: str
) -> None:
    from fastapi.testclient import TestClient

    from tierroute.gateway.app import Parts, create_app
    from tierroute.gateway.build import make_backend
    from tierroute.gateway.settings import parse_settings
    from tierroute.routers.random_router import RandomRouter

    doc = yaml.safe_load(gateway_yaml(upstream, f"  on_ledger_failure: {mode}\n"))
    settings = parse_settings(doc, "test config")
    ledger = Ledger(tmp_path / "ledger.db", keep_prompts=True, retry_s=0.05)

    def build(s: GatewaySettings) -> Parts:
        backends = {spec.name: make_backend(spec) for spec in s.tiers}
        return Parts(router=RandomRouter(), backends=backends, ledger=ledger)

    def ask(client: TestClient, i: int) -> httpx.Response:
        # A kept prompt larger than a page: its row needs a new page, which the full file lacks.
        text = f"Say {i}" + " please" * 2000
        body = {"model": "small", "messages": [{"role": "user", "content": text}]}
        return client.post("/v1/chat/completions", json=body)

    with TestClient(create_app(settings, build)) as client:
        assert ask(client, 0).status_code == 200
        ledger.flush()
        fill_up(ledger)
        # The disk's state shows when a row is written: this answer's row is the one that
        # finds the disk full, so it is kept in memory.
        assert ask(client, 1).status_code == 200
        wait_for(lambda: not ledger.health().writable)
        health = client.get("/healthz").json()
        assert health["status"] == "degraded" and "full" in health["reason"], health
        answers = [ask(client, i) for i in range(2, 12)]
        if mode == "refuse":
            assert {r.status_code for r in answers} == {503}
            error = answers[0].json()["error"]
            assert error["code"] == "ledger_unavailable" and "full" in error["message"]
        else:
            assert {r.status_code for r in answers} == {200}
        answered = 2 + sum(r.status_code == 200 for r in answers)
        ledger.flush(raise_failures=False)  # the writer has taken every row queued so far
        metrics = client.get("/metrics").text
        assert f"tierroute_ledger_rows_spilled {answered - 1:.1f}" in metrics, metrics
        assert "tierroute_ledger_writable 0.0" in metrics
        free_space(ledger)
        wait_for(lambda: ledger.health().ok)
        assert client.get("/healthz").json()["status"] == "ok"
        assert ask(client, 99).status_code == 200
        ledger.flush()
        assert ledger.count() == answered + 1
        assert "tierroute_ledger_rows_failed_total 0.0" in client.get("/metrics").text
