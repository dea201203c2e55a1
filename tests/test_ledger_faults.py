"""Issue 11: no ledger row lost to another row's fault, a full disk or a read-only folder.

Real SQLite errors only: a full disk is SQLite's own `PRAGMA max_page_count` on the writer's
connection (it raises SQLITE_FULL exactly as a full file system does), a read-only folder is
a real chmod (as an unprivileged user when the tests run as root, since root ignores modes).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tierroute.ledger import Ledger, LedgerError, LedgerRow


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


def test_a_row_sqlite_refuses_is_counted_and_its_batch_mates_kept(ledger: Ledger) -> None:
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
