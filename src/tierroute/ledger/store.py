"""The request ledger: one row per request, written by one thread, never from the loop.

The rows live in SQLite (a file, the default) or PostgreSQL (a `postgresql://` URL, shared
by several gateway replicas); tierroute.ledger.backend is the seam between them.

`Ledger.record(row)` only puts the row on a queue, so the gateway's event loop never waits
on the disk. A dedicated writer thread drains the queue and inserts whatever has piled up in
one transaction, at the latest `linger_s` after the first row of a batch arrived (so a
SIGKILL loses at most the rows queued in that window). `flush()` returns once everything
queued before it is committed; `close()` flushes, stops the writer and is safe to call twice.
Reads use their own connection (SQLite's WAL mode lets them run while the writer commits).

No row is lost to another row's fault. Rows are made storable when queued: text that UTF-8
cannot encode (a lone surrogate such as "\ud800", valid in JSON) is stored with those code
points written as backslash escapes (the six characters `\ud800`). A batch that fails is
retried row by row; a row that still fails is counted in `health()` and logged once per
burst. When the disk refuses writes (full, read-only, I/O error) the rows stay in memory,
up to `spill_max_rows` (the newest beyond that are dropped and counted), and are written as
soon as the disk works again; `health()` says so meanwhile. PostgreSQL unreachable (at
start or mid-run) is the same case: rows wait in memory and the writer reconnects.

The schema is numbered migrations per backend (ledger.sqlite, ledger.postgresql), applied
when a ledger opens, so old databases upgrade themselves.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from tierroute.errors import LedgerClosedError, LedgerError
from tierroute.ledger.backend import Backend, Connection, open_backend
from tierroute.ledger.sqlite import MIGRATIONS, SCHEMA_VERSION, migrate, schema_version

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate", "schema_version"]  # re-exported

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LedgerRow:
    """One request as the gateway saw it. Costs in USD, times in ms, `ts` in unix seconds."""

    id: str
    ts: float
    tier: str
    model: str
    status: int = 200
    api_key_id: str | None = None
    score: float | None = None
    hints: Mapping[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None  # time to first token; streams only
    fallback_chain: tuple[str, ...] = ()  # tiers tried, in order, the last one answered
    error: str | None = None
    cache_hit: bool = False
    stream: bool = False
    prompt_text: str | None = None  # kept only when the ledger is opened with keep_prompts
    # Why it went where it went, and the prices in effect, so the books need no config.
    reason: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    forced: bool = False  # the client named the tier: no routing decision to credit
    tenant: str | None = None
    price_in_per_m: float | None = None
    price_out_per_m: float | None = None
    largest_price_in_per_m: float | None = None  # the counterfactual: all on the largest tier
    largest_price_out_per_m: float | None = None

    def largest_cost(self) -> float | None:
        """What this request would have cost on the largest tier, at the prices then."""
        if self.largest_price_in_per_m is None or self.largest_price_out_per_m is None:
            return None
        return (
            self.prompt_tokens * self.largest_price_in_per_m
            + self.completion_tokens * self.largest_price_out_per_m
        ) / 1e6


@dataclass(frozen=True)
class PolicyChange:
    """A threshold change by the self-calibrating controller, with its reason."""

    ts: float
    old_threshold: float
    new_threshold: float
    reason: str


@dataclass(frozen=True)
class Feedback:
    """A rating a client sent later about one request."""

    request_id: str
    ts: float
    rating: float
    comment: str | None = None


_COLUMNS: Final = (
    "id",
    "ts",
    "api_key_id",
    "tier",
    "score",
    "hints",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "latency_ms",
    "ttft_ms",
    "fallback_chain",
    "status",
    "error",
    "cache_hit",
    "stream",
    "prompt_text",
    "reason",
    "tags",
    "forced",
    "tenant",
    "price_in_per_m",
    "price_out_per_m",
    "largest_price_in_per_m",
    "largest_price_out_per_m",
)
_INSERT_REQUEST: Final = (
    f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_SELECT_REQUEST: Final = f"SELECT {', '.join(_COLUMNS)} FROM requests"
# The latest rating of a request by one rater (an API key id, '' without keys) wins.
_INSERT_FEEDBACK: Final = (
    "INSERT INTO feedback (request_id, ts, rating, comment, rater) VALUES (?,?,?,?,?) "
    "ON CONFLICT (request_id, rater) DO UPDATE SET "
    "ts = excluded.ts, rating = excluded.rating, comment = excluded.comment"
)
_INSERT_JUDGEMENT: Final = (
    "INSERT INTO shadow_judgements (request_id, ts, tier, judge, verdict, raw, api_key_id, "
    "prompt_tokens, completion_tokens, cost_usd) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_CHANGE: Final = (
    "INSERT INTO policy_changes (ts, old_threshold, new_threshold, reason) VALUES (?,?,?,?)"
)

_Params = tuple[Any, ...]


def _row_params(row: LedgerRow, keep_prompt: bool) -> _Params:
    try:
        hints = json.dumps(dict(row.hints), sort_keys=True)
    except (TypeError, ValueError) as e:
        raise LedgerError(
            f"the hints of request {row.id!r} cannot be saved as JSON ({e}); "
            "pass plain strings, numbers, booleans, lists or dicts"
        ) from None
    return (
        row.id,
        float(row.ts),
        row.api_key_id,
        row.tier,
        row.score,
        hints,
        row.model,
        int(row.prompt_tokens),
        int(row.completion_tokens),
        float(row.cost_usd),
        float(row.latency_ms),
        row.ttft_ms,
        json.dumps(list(row.fallback_chain)),
        int(row.status),
        row.error,
        int(bool(row.cache_hit)),
        int(bool(row.stream)),
        row.prompt_text if keep_prompt else None,
        row.reason,
        json.dumps(dict(row.tags), sort_keys=True),
        int(bool(row.forced)),
        row.tenant,
        row.price_in_per_m,
        row.price_out_per_m,
        row.largest_price_in_per_m,
        row.largest_price_out_per_m,
    )


def _decode_row(r: Sequence[Any]) -> LedgerRow:
    return LedgerRow(
        id=r[0],
        ts=r[1],
        api_key_id=r[2],
        tier=r[3],
        score=r[4],
        hints=json.loads(r[5]),
        model=r[6],
        prompt_tokens=r[7],
        completion_tokens=r[8],
        cost_usd=r[9],
        latency_ms=r[10],
        ttft_ms=r[11],
        fallback_chain=tuple(json.loads(r[12])),
        status=r[13],
        error=r[14],
        cache_hit=bool(r[15]),
        stream=bool(r[16]),
        prompt_text=r[17],
        reason=r[18],
        tags=json.loads(r[19]),
        forced=bool(r[20]),
        tenant=r[21],
        price_in_per_m=r[22],
        price_out_per_m=r[23],
        largest_price_in_per_m=r[24],
        largest_price_out_per_m=r[25],
    )


def default_path(data_dir: Path | None = None) -> Path:
    """The ledger file in `data_dir`, by default `tierroute.paths.data_dir()`."""
    if data_dir is None:
        from tierroute.paths import data_dir as default_data_dir

        data_dir = default_data_dir()
    return data_dir / "ledger.db"


# --- the ledger -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class _Item:
    """One row to insert: its statement and parameters."""

    sql: str
    params: _Params


_STOP: Final = object()
_QueueItem = _Item | _Flush | object


@dataclass(frozen=True)
class LedgerHealth:
    """What the writer could and could not do, for /healthz and /metrics.

    `rows_failed` rows could not be stored at all (each was refused by SQLite on its own);
    `rows_dropped` were dropped because the spill was full; `rows_spilled` wait in memory
    for the disk. `problem` is None when all is well, else one sentence saying what is wrong.
    """

    writable: bool = True
    rows_written: int = 0
    rows_failed: int = 0
    rows_dropped: int = 0
    rows_spilled: int = 0
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


# A row lost (failed or dropped) keeps the ledger "degraded" this long after it happened.
_RECENT_LOSS_S: Final = 600.0
# Repeated failures of one kind are logged once per this many seconds (with a count).
_LOG_EVERY_S: Final = 60.0


class Ledger:
    """The request ledger at `path` (a SQLite file, `sqlite:PATH` or a `postgresql://` URL):
    non-blocking writes from any thread or task, safe reads.

    `keep_prompts=False` (the default) drops `prompt_text` before a row is queued, so prompts
    reach the disk only when configured. `clock` stamps feedback. Use as a context manager, or
    call `close()` (or `await aclose()`) at shutdown; an exit hook closes a forgotten ledger.
    While the disk refuses writes, up to `spill_max_rows` rows wait in memory and the writer
    tries again every `retry_s` seconds. A SQLite file that cannot be opened raises
    `LedgerError`; a PostgreSQL server that cannot be reached is waited for like a full disk.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        keep_prompts: bool = False,
        batch_size: int = 500,
        linger_s: float = 0.02,
        spill_max_rows: int = 100_000,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backend: Backend = open_backend(path)
        self.path: Path | None = self._backend.path  # None on PostgreSQL
        self.location = self._backend.location
        self.keep_prompts = keep_prompts
        self.batch_size = max(1, batch_size)
        self.linger_s = linger_s
        self.spill_max_rows = max(1, spill_max_rows)
        self.retry_s = retry_s
        self.clock = clock
        self._queue: queue.SimpleQueue[_QueueItem] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _closed against a racing record/close
        self._closed = False
        # What went wrong, kept small: counts, the first unreported message, log throttling.
        self._state_lock = threading.Lock()
        self._health = LedgerHealth()
        self._last_loss = -math.inf
        self._unreported = 0
        self._first_unreported = ""
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._reader: Connection | None = None
        self._reader_lock = threading.Lock()
        self._writer: Connection | None = None
        try:
            self._writer = self._backend.open_writer()
        except Exception as e:
            if not self._backend.reconnect or not self._backend.unavailable(e):
                raise
            self._unwritable(e, 0)  # the server is down: rows wait until it answers
        self._thread = threading.Thread(
            target=self._run, name=f"tierroute-ledger-{self._backend.kind}", daemon=True
        )
        self._thread.start()
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            ledger = ref()
            if ledger is not None:
                ledger.close(raise_failures=False)

        self._atexit = close_at_exit
        atexit.register(close_at_exit)

    # -- writing -----------------------------------------------------------------------------

    def record(self, row: LedgerRow) -> None:
        """Queue one row; returns at once. Thread-safe; call it straight from the event loop."""
        self._put(_INSERT_REQUEST, _row_params(row, self.keep_prompts))

    def add_feedback(
        self, request_id: str, rating: float, comment: str | None = None, rater: str = ""
    ) -> None:
        """Queue a rating for a request (non-blocking, like `record`). A rater's later rating
        of the same request replaces their earlier one."""
        if not math.isfinite(rating):
            raise LedgerError(f"the rating for {request_id!r} must be a finite number")
        params = (request_id, float(self.clock()), float(rating), comment, rater)
        self._put(_INSERT_FEEDBACK, params)

    def record_policy_change(
        self, ts: float, old_threshold: float, new_threshold: float, reason: str
    ) -> None:
        """Queue a threshold change made by the self-calibrating controller."""
        self._put(_INSERT_CHANGE, (ts, float(old_threshold), float(new_threshold), reason))

    def record_judgement(
        self,
        request_id: str,
        ts: float,
        tier: str,
        judge: str,
        verdict: float | None,
        raw: str,
        *,
        api_key_id: str | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost_usd: float = 0.0,
    ) -> None:
        """Queue a shadow judgement: was `tier`'s answer good enough, by `judge`'s verdict;
        with what judging it cost, booked to `api_key_id` (whose request it judged)."""
        self._put(
            _INSERT_JUDGEMENT,
            (
                request_id,
                ts,
                tier,
                judge,
                verdict,
                raw[:500],
                api_key_id,
                int(prompt_tokens),
                int(completion_tokens),
                float(cost_usd),
            ),
        )

    def judging_spend(self, since: float | None = None) -> dict[str, float]:
        """USD the shadow judge spent per judged request id (not charged to any key)."""
        found = self._read(
            "SELECT request_id, sum(cost_usd) FROM shadow_judgements WHERE ts >= ? "
            "GROUP BY request_id",
            (since if since is not None else float("-inf"),),
        )
        return {str(a): float(b) for a, b in found if b}

    def judgements(self, since: float | None = None) -> list[tuple[str, str, float | None]]:
        """(request id, tier judged, verdict: 1 good enough, 0 not, None unreadable)."""
        found = self._read(
            "SELECT request_id, tier, verdict FROM shadow_judgements WHERE ts >= ? ORDER BY ts, id",
            (since if since is not None else float("-inf"),),
        )
        return [(str(a), str(b), None if c is None else float(c)) for a, b, c in found]

    def policy_changes(self, since: float | None = None) -> list[PolicyChange]:
        found = self._read(
            "SELECT ts, old_threshold, new_threshold, reason FROM policy_changes "
            "WHERE ts >= ? ORDER BY ts, id",
            (since if since is not None else float("-inf"),),
        )
        return [PolicyChange(*r) for r in found]

    def feedback_since(self, since: float | None = None) -> list[tuple[str, str, float]]:
        """(request id, tier, rating) of every rating given since `since`."""
        found = self._read(
            "SELECT f.request_id, r.tier, f.rating FROM feedback f "
            "JOIN requests r ON r.id = f.request_id WHERE f.ts >= ? ORDER BY f.ts, f.id",
            (since if since is not None else float("-inf"),),
        )
        return [(str(a), str(b), float(c)) for a, b, c in found]

    def _put(self, sql: str, params: _Params) -> None:
        # made storable here, not in the writer's batch
        storable = self._backend.storable
        item = _Item(sql, tuple(storable(p) if isinstance(p, str) else p for p in params))
        with self._lock:
            if self._closed:
                raise LedgerClosedError(
                    f"the ledger at {self.location} is closed; record rows before close() "
                    "or open a new Ledger"
                )
            self._queue.put(item)

    def health(self) -> LedgerHealth:
        """Whether the writer keeps up, and what it could not store (thread-safe, cheap)."""
        with self._state_lock:
            h = self._health
            if h.problem is None and time.monotonic() - self._last_loss < _RECENT_LOSS_S:
                lost = h.rows_failed + h.rows_dropped
                return replace(
                    h,
                    problem=f"{lost} ledger row(s) could not be stored in the last "
                    f"{_RECENT_LOSS_S:.0f}s; see the gateway's log",
                )
            return h

    def flush(self, timeout: float | None = None, *, raise_failures: bool = True) -> None:
        """Block until every row queued before this call is committed (or is spilled).

        Raises `LedgerError` (unless `raise_failures` is false) if rows failed to be written
        since the last report, if rows wait in memory for the disk, or if the writer does not
        catch up within `timeout` seconds.
        """
        marker = _Flush()
        with self._lock:
            if not self._closed:
                self._queue.put(marker)
            else:
                marker.done.set()
        if not marker.done.wait(timeout):
            if not raise_failures:
                return
            raise LedgerError(
                f"the ledger writer did not catch up within {timeout}s; the disk at "
                f"{self.location} may be slow or locked by another process, so retry flush()"
            )
        if raise_failures:
            self._raise_failures()

    async def aflush(self, timeout: float | None = None, *, raise_failures: bool = True) -> None:
        """`flush()` in a worker thread, for async code."""
        import asyncio

        await asyncio.to_thread(self.flush, timeout, raise_failures=raise_failures)

    def close(self, *, raise_failures: bool = True) -> None:
        """Flush what is queued, stop the writer and close both connections. Idempotent."""
        with self._lock:
            already = self._closed
            self._closed = True
            if not already:
                self._queue.put(_STOP)
        self._thread.join()
        if not already:
            atexit.unregister(self._atexit)
            if self._writer is not None:
                self._drop(self._writer)
            with self._reader_lock:
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None
        if raise_failures:
            self._raise_failures()

    async def aclose(self, *, raise_failures: bool = True) -> None:
        """`close()` in a worker thread, for an ASGI lifespan shutdown."""
        import asyncio

        await asyncio.to_thread(lambda: self.close(raise_failures=raise_failures))

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise_failures(self) -> None:
        with self._state_lock:
            count, first = self._unreported, self._first_unreported
            self._unreported, self._first_unreported = 0, ""
            spilled = self._health.rows_spilled
            problem = self._health.problem
        if count:
            more = f" (and {count - 1} more)" if count > 1 else ""
            raise LedgerError(f"{count} ledger writes to {self.location} failed: {first}{more}")
        if spilled:
            raise LedgerError(f"{spilled} rows wait in memory: {problem}")

    # -- the writer thread -------------------------------------------------------------------

    def _take(self, wait: float | None) -> tuple[list[_Item], list[threading.Event], bool]:
        """The next batch: block up to `wait` (None: forever) for a first item, then linger
        up to `linger_s` for more. Returns (rows, flush waiters, stop requested)."""
        items: list[_QueueItem] = []
        try:
            items.append(self._queue.get(timeout=wait))
        except queue.Empty:
            return [], [], False
        # Linger briefly so that under load one transaction carries many rows: a
        # commit per row cost a third of the gateway's CPU at 250 requests/s.
        linger_until = time.monotonic() + self.linger_s
        while len(items) < self.batch_size and items[-1] is not _STOP:
            if isinstance(items[-1], _Flush):
                break
            remaining = linger_until - time.monotonic()
            try:
                items.append(
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        rows = [i for i in items if isinstance(i, _Item)]
        waiters = [i.done for i in items if isinstance(i, _Flush)]
        return rows, waiters, any(i is _STOP for i in items)

    def _run(self) -> None:
        pending: list[_Item] = []  # rows the disk refused so far, oldest first
        next_try = 0.0
        stop = False
        while True:
            if pending:
                wait: float | None = max(0.0, next_try - time.monotonic())
            elif self._writer is None:  # the server is down and no row waits: poll it
                wait = self.retry_s
            else:
                wait = None
            rows, waiters, stop_now = self._take(wait)
            stop = stop or stop_now
            pending.extend(rows)
            if not pending and not stop and self._writer is None:
                self._reconnect()
            try:
                if pending and (len(pending) == len(rows) or stop or time.monotonic() >= next_try):
                    pending = self._write(pending)
                    next_try = time.monotonic() + self.retry_s
                if len(pending) > self.spill_max_rows:
                    dropped = len(pending) - self.spill_max_rows
                    del pending[self.spill_max_rows :]  # keep the oldest: answered first
                    self._lost(
                        "dropped",
                        dropped,
                        f"{dropped} rows dropped: the in-memory spill holds at most "
                        f"{self.spill_max_rows} rows while the disk refuses writes",
                    )
            except BaseException as e:  # the writer must outlive any surprise
                log.exception("ledger writer failed on a batch")
                self._lost("failed", len(pending), f"unexpected {type(e).__name__}: {e}")
                pending = []
            finally:
                with self._state_lock:
                    self._health = replace(self._health, rows_spilled=len(pending))
                for done in waiters:
                    done.set()
            if stop:
                if pending:
                    self._lost(
                        "failed",
                        len(pending),
                        f"{len(pending)} rows kept in memory were lost at shutdown: "
                        f"{self._health.problem}",
                    )
                return

    def _write(self, rows: list[_Item]) -> list[_Item]:
        """Insert `rows`, a transaction per `batch_size`, row by row where one is bad.
        Returns the rows left unwritten because the database refused them, oldest first."""
        unavailable = self._backend.unavailable
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            failed: list[tuple[_Item, BaseException]] = []
            try:
                if self._writer is None:  # PostgreSQL was down: connect (and migrate) first
                    self._writer = self._backend.open_writer()
                conn = self._writer
                try:
                    self._transaction(conn, chunk, None)
                except Exception as e:
                    if unavailable(e):
                        raise
                    # one bad row (duplicate id, a value the database refuses): find it
                    self._transaction(conn, chunk, failed)
            except Exception as e:
                if not unavailable(e):
                    raise
                if self._backend.reconnect and self._writer is not None:
                    self._drop(self._writer)
                    self._writer = None
                self._unwritable(e, len(rows) - start)
                return rows[start:]
            self._stored(len(chunk) - len(failed), failed)
        return []

    def _reconnect(self) -> None:
        """Open the writer's connection again, so /healthz recovers without a row to write."""
        try:
            self._writer = self._backend.open_writer()
        except Exception as e:  # the writer thread must outlive any surprise: keep waiting
            self._unwritable(e, 0)
            return
        self._stored(0, [])

    @staticmethod
    def _drop(conn: Connection) -> None:
        # a connection that lost its server may fail to close: it is gone anyway
        with contextlib.suppress(Exception):
            conn.close()

    def _transaction(
        self,
        conn: Connection,
        rows: list[_Item],
        failed: list[tuple[_Item, BaseException]] | None,
    ) -> None:
        """One transaction: `executemany` per statement when `failed` is None (a bad row
        raises), else row by row, each in a savepoint, with each bad row appended to
        `failed` and the rest kept."""
        backend = self._backend
        for attempt in range(4):
            if failed is not None:
                failed.clear()  # a retried attempt finds them again
            begun = False
            try:
                # Requests rows alone (the usual batch): one statement that commits itself
                # where the backend has one (PostgreSQL's COPY), no BEGIN and COMMIT.
                if (
                    failed is None
                    and all(item.sql is _INSERT_REQUEST for item in rows)
                    and backend.insert_rows(
                        conn, "requests", _COLUMNS, [item.params for item in rows]
                    )
                ):
                    return
                conn.execute(backend.begin)
                begun = True
                if failed is None:
                    by_sql: dict[str, list[_Params]] = {}
                    for item in rows:
                        by_sql.setdefault(item.sql, []).append(item.params)
                    for sql, params_list in by_sql.items():
                        conn.executemany(sql, params_list)
                else:
                    for item in rows:
                        # a failed statement spoils a PostgreSQL transaction: undo just it
                        conn.execute("SAVEPOINT row")
                        try:
                            conn.execute(item.sql, item.params)
                        except Exception as e:  # any value the database refuses: count it
                            if backend.unavailable(e):
                                raise
                            conn.execute("ROLLBACK TO SAVEPOINT row")
                            failed.append((item, e))
                        conn.execute("RELEASE SAVEPOINT row")
                conn.execute("COMMIT")
                return
            except BaseException as e:
                if begun:
                    try:
                        conn.execute("ROLLBACK")
                    except Exception:
                        if not backend.unavailable(e):
                            raise
                if not backend.busy(e) or attempt == 3:
                    raise
                time.sleep(0.05 * 2**attempt)  # locked beyond the busy timeout: retry

    def _stored(self, written: int, failed: list[tuple[_Item, BaseException]]) -> None:
        with self._state_lock:
            h = self._health
            recovered = not h.writable
            self._health = replace(
                h, writable=True, problem=None, rows_written=h.rows_written + written
            )
        if recovered:
            log.warning("ledger %s: writable again; rows kept in memory are written", self.location)
        if failed:
            item, e = failed[0]
            integrity = any(t.__name__ == "IntegrityError" for t in type(e).__mro__)
            if integrity and item.sql is _INSERT_REQUEST:
                first = (
                    f"request {item.params[0]!r} was not saved ({e}); "
                    "give every request a unique id"
                )
            else:
                first = f"{item.params[0]!r} was not saved ({type(e).__name__}: {e})"
            self._lost("failed", len(failed), first)

    def _unwritable(self, e: BaseException, waiting: int) -> None:
        problem = (
            f"the ledger at {self.location} cannot write ({e}); rows wait in memory (at most "
            f"{self.spill_max_rows}) and are written when it works again: "
            + (
                "check that the PostgreSQL server is up and reachable"
                if self._backend.kind == "postgresql"
                else "free space or make the folder writable"
            )
        )
        with self._state_lock:
            self._health = replace(self._health, writable=False, problem=problem)
        self._log_burst("unwritable", f"{problem} ({waiting} rows waiting)")

    def _lost(self, kind: str, n: int, message: str) -> None:
        """Count `n` rows that will never be stored, and log it once per burst."""
        with self._state_lock:
            h = self._health
            if kind == "dropped":
                self._health = replace(h, rows_dropped=h.rows_dropped + n)
            else:
                self._health = replace(h, rows_failed=h.rows_failed + n)
            self._last_loss = time.monotonic()
            if not self._unreported:
                self._first_unreported = message
            self._unreported += n
        self._log_burst(kind, f"{n} row(s) lost: {message}")

    def _log_burst(self, kind: str, message: str) -> None:
        """One ERROR per `_LOG_EVERY_S` per kind of trouble, saying how many were held back."""
        now = time.monotonic()
        with self._state_lock:
            if now - self._last_logged.get(kind, -math.inf) < _LOG_EVERY_S:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last_logged[kind] = now
            held = self._suppressed.pop(kind, 0)
        more = f" ({held} similar messages held back in the last minute)" if held else ""
        log.error("ledger %s: %s%s", self.location, message, more)

    # -- reading -----------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._reader_lock:
            if self._closed:
                raise LedgerClosedError(
                    f"the ledger at {self.location} is closed; open a new Ledger to read it"
                )
            try:
                if self._reader is None:
                    self._reader = self._backend.open_reader()
                return self._reader.execute(sql, params).fetchall()
            except Exception as e:
                if not (self._backend.reconnect and self._backend.unavailable(e)):
                    raise
                if self._reader is not None:
                    self._drop(self._reader)
                    self._reader = None
                raise LedgerError(
                    f"cannot read the ledger at {self.location} ({e}); check that the "
                    "PostgreSQL server is up and reachable"
                ) from e

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read (`?` placeholders) on the reader's connection: for the modules
        that keep their own tables in the ledger's database (tierroute.keys)."""
        return self._read(sql, params)

    def write_now(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one write (`?` placeholders) now, committed before this returns, on a
        connection of its own: for rare administrative writes (creating a key), not rows."""
        self.write_many(sql, [params])

    def write_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """`write_now` for many parameter rows, in one transaction (all or none)."""
        with self._lock:
            if self._closed:
                raise LedgerClosedError(f"the ledger at {self.location} is closed")
        try:
            conn = self._backend.open_writer()
        except Exception as e:
            if not self._backend.unavailable(e):
                raise
            raise LedgerError(f"cannot write to the ledger at {self.location} ({e})") from e
        try:
            conn.execute(self._backend.begin)
            try:
                conn.executemany(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except Exception as e:
            if not self._backend.unavailable(e):
                raise
            raise LedgerError(f"cannot write to the ledger at {self.location} ({e})") from e
        finally:
            self._drop(conn)

    def rows(self, since: float | None = None) -> list[LedgerRow]:
        """Committed rows with `ts >= since` (all when None), oldest first."""
        order = f"ts, {self._backend.order}"
        if since is None:
            found = self._read(f"{_SELECT_REQUEST} ORDER BY {order}")
        else:
            found = self._read(f"{_SELECT_REQUEST} WHERE ts >= ? ORDER BY {order}", (since,))
        return [_decode_row(r) for r in found]

    def count(self, since: float | None = None) -> int:
        if since is None:
            return int(self._read("SELECT count(*) FROM requests")[0][0])
        return int(self._read("SELECT count(*) FROM requests WHERE ts >= ?", (since,))[0][0])

    def get(self, request_id: str) -> LedgerRow | None:
        found = self._read(f"{_SELECT_REQUEST} WHERE id = ?", (request_id,))
        return _decode_row(found[0]) if found else None

    def feedback(self, request_id: str) -> list[Feedback]:
        """Every rating given for one request, oldest first."""
        found = self._read(
            "SELECT request_id, ts, rating, comment FROM feedback WHERE request_id = ? "
            "ORDER BY ts, id",
            (request_id,),
        )
        return [Feedback(r[0], r[1], r[2], r[3]) for r in found]
