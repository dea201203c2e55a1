"""The request ledger: one SQLite row per request, written by one thread, never from the loop.

`Ledger.record(row)` only puts the row on a queue, so the gateway's event loop never waits
on the disk. A dedicated writer thread drains the queue and inserts whatever has piled up in
one transaction. `flush()` returns once everything queued before it is committed; `close()`
flushes, stops the writer and is safe to call twice. Reads use their own connection, and WAL
mode lets them run while the writer commits.

The schema is the list `MIGRATIONS`: migration *n* (1-based) moves a database from
`PRAGMA user_version` n-1 to n, in its own transaction. Opening a ledger applies the ones a
file lacks, so old databases upgrade themselves. Never edit a released migration; append one.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tierroute.errors import LedgerClosedError, LedgerError

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


# --- schema ---------------------------------------------------------------------------------


def _m001_requests(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE requests (
            id TEXT PRIMARY KEY,
            ts REAL NOT NULL,
            api_key_id TEXT,
            tier TEXT NOT NULL,
            score REAL,
            hints TEXT NOT NULL DEFAULT '{}',
            model TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0,
            latency_ms REAL NOT NULL DEFAULT 0,
            ttft_ms REAL,
            fallback_chain TEXT NOT NULL DEFAULT '[]',
            status INTEGER NOT NULL,
            error TEXT,
            cache_hit INTEGER NOT NULL DEFAULT 0,
            stream INTEGER NOT NULL DEFAULT 0,
            prompt_text TEXT
        )
        """
    )


def _m002_request_indexes(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE INDEX requests_ts ON requests (ts)")
    conn.execute("CREATE INDEX requests_key_ts ON requests (api_key_id, ts)")


def _m003_feedback(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL,
            ts REAL NOT NULL,
            rating REAL NOT NULL,
            comment TEXT
        )
        """
    )
    conn.execute("CREATE INDEX feedback_request ON feedback (request_id)")


def _m004_policy_changes(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE policy_changes (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            old_threshold REAL NOT NULL,
            new_threshold REAL NOT NULL,
            reason TEXT NOT NULL
        )
        """
    )


def _m005_shadow_judgements(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE shadow_judgements (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL,
            ts REAL NOT NULL,
            tier TEXT NOT NULL,
            judge TEXT NOT NULL,
            verdict REAL,
            raw TEXT NOT NULL
        )
        """
    )
    conn.execute("CREATE INDEX shadow_request ON shadow_judgements (request_id)")


def _m006_request_context(conn: sqlite3.Connection) -> None:
    """Each row keeps why it was routed and the prices then; one rating per request and rater
    (older duplicate ratings collapse to the latest)."""
    for column in (
        "reason TEXT",
        "tags TEXT NOT NULL DEFAULT '{}'",
        "forced INTEGER NOT NULL DEFAULT 0",
        "tenant TEXT",
        "price_in_per_m REAL",
        "price_out_per_m REAL",
        "largest_price_in_per_m REAL",
        "largest_price_out_per_m REAL",
    ):
        conn.execute(f"ALTER TABLE requests ADD COLUMN {column}")
    conn.execute("CREATE INDEX requests_tenant_ts ON requests (tenant, ts)")
    conn.execute("ALTER TABLE feedback ADD COLUMN rater TEXT NOT NULL DEFAULT ''")
    conn.execute(
        "DELETE FROM feedback WHERE id NOT IN "
        "(SELECT max(id) FROM feedback GROUP BY request_id, rater)"
    )
    conn.execute("CREATE UNIQUE INDEX feedback_request_rater ON feedback (request_id, rater)")


Migration = Callable[[sqlite3.Connection], None]

MIGRATIONS: Final[tuple[Migration, ...]] = (
    _m001_requests,
    _m002_request_indexes,
    _m003_feedback,
    _m004_policy_changes,
    _m005_shadow_judgements,
    _m006_request_context,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, path: Path | str = "the ledger") -> int:
    """Bring `conn` (in autocommit mode) up to `SCHEMA_VERSION`; return the version it had."""
    conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it done
    try:
        start = schema_version(conn)
        if start > SCHEMA_VERSION:
            raise LedgerError(
                f"{path} has ledger schema {start} but this tierroute knows only up to "
                f"{SCHEMA_VERSION}; upgrade tierroute or point it at another ledger file"
            )
        for version in range(start + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version - 1](conn)
            conn.execute(f"PRAGMA user_version = {version:d}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return start


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
    "INSERT INTO shadow_judgements (request_id, ts, tier, judge, verdict, raw) VALUES (?,?,?,?,?,?)"
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


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


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


class Ledger:
    """The request ledger at `path`: non-blocking writes from any thread or task, safe reads.

    `keep_prompts=False` (the default) drops `prompt_text` before a row is queued, so prompts
    reach the disk only when configured. `clock` stamps feedback. Use as a context manager, or
    call `close()` (or `await aclose()`) at shutdown; an exit hook closes a forgotten ledger.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        keep_prompts: bool = False,
        batch_size: int = 500,
        linger_s: float = 0.02,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.keep_prompts = keep_prompts
        self.batch_size = max(1, batch_size)
        self.linger_s = linger_s
        self.clock = clock
        self._queue: queue.SimpleQueue[_QueueItem] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _closed against a racing record/close
        self._closed = False
        self._failures: list[str] = []
        self._failures_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._writer = self._open_writer()
        self._thread = threading.Thread(
            target=self._run, name=f"tierroute-ledger-{self.path.name}", daemon=True
        )
        self._thread.start()
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            ledger = ref()
            if ledger is not None:
                ledger.close(raise_failures=False)

        self._atexit = close_at_exit
        atexit.register(close_at_exit)

    def _open_writer(self) -> sqlite3.Connection:
        hint = "check that the folder is writable, or set TIERROUTE_DATA_DIR to another one"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path)
        except (OSError, sqlite3.Error) as e:
            raise LedgerError(f"cannot open the ledger at {self.path} ({e}); {hint}") from e
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(
                    f"the ledger at {self.path} cannot use WAL mode (got {mode!r}); "
                    "put it on a local disk, not a network share or in memory"
                )
            conn.execute("PRAGMA synchronous = NORMAL")  # durable across app crashes in WAL
            migrate(conn, self.path)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise LedgerError(
                f"{self.path} is not a usable ledger database ({e}); "
                "move it aside or point tierroute at another file"
            ) from e
        except BaseException:
            conn.close()
            raise
        return conn

    # -- writing -----------------------------------------------------------------------------

    def record(self, row: LedgerRow) -> None:
        """Queue one row; returns at once. Thread-safe; call it straight from the event loop."""
        self._put(_Item(_INSERT_REQUEST, _row_params(row, self.keep_prompts)))

    def add_feedback(
        self, request_id: str, rating: float, comment: str | None = None, rater: str = ""
    ) -> None:
        """Queue a rating for a request (non-blocking, like `record`). A rater's later rating
        of the same request replaces their earlier one."""
        if not math.isfinite(rating):
            raise LedgerError(f"the rating for {request_id!r} must be a finite number")
        params = (request_id, float(self.clock()), float(rating), comment, rater)
        self._put(_Item(_INSERT_FEEDBACK, params))

    def record_policy_change(
        self, ts: float, old_threshold: float, new_threshold: float, reason: str
    ) -> None:
        """Queue a threshold change made by the self-calibrating controller."""
        self._put(_Item(_INSERT_CHANGE, (ts, float(old_threshold), float(new_threshold), reason)))

    def record_judgement(
        self, request_id: str, ts: float, tier: str, judge: str, verdict: float | None, raw: str
    ) -> None:
        """Queue a shadow judgement: was `tier`'s answer good enough, by `judge`'s verdict."""
        self._put(_Item(_INSERT_JUDGEMENT, (request_id, ts, tier, judge, verdict, raw[:500])))

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

    def _put(self, item: _QueueItem) -> None:
        with self._lock:
            if self._closed:
                raise LedgerClosedError(
                    f"the ledger at {self.path} is closed; record rows before close() "
                    "or open a new Ledger"
                )
            self._queue.put(item)

    def flush(self, timeout: float | None = None) -> None:
        """Block until every row queued before this call is committed.

        Raises `LedgerError` if rows failed to be written since the last flush, or if the
        writer does not catch up within `timeout` seconds.
        """
        marker = _Flush()
        with self._lock:
            if not self._closed:
                self._queue.put(marker)
            else:
                marker.done.set()
        if not marker.done.wait(timeout):
            raise LedgerError(
                f"the ledger writer did not catch up within {timeout}s; the disk at "
                f"{self.path} may be slow or locked by another process, so retry flush()"
            )
        self._raise_failures()

    async def aflush(self, timeout: float | None = None) -> None:
        """`flush()` in a worker thread, for async code."""
        import asyncio

        await asyncio.to_thread(self.flush, timeout)

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
            self._writer.close()
            with self._reader_lock:
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None
        if raise_failures:
            self._raise_failures()

    async def aclose(self) -> None:
        """`close()` in a worker thread, for an ASGI lifespan shutdown."""
        import asyncio

        await asyncio.to_thread(self.close)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise_failures(self) -> None:
        with self._failures_lock:
            failures, self._failures = self._failures, []
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise LedgerError(
                f"{len(failures)} ledger writes to {self.path} failed: {failures[0]}{more}"
            )

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            items = [self._queue.get()]
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
            writes: dict[str, list[_Params]] = {}
            waiters: list[threading.Event] = []
            for item in items:
                if isinstance(item, _Item):
                    writes.setdefault(item.sql, []).append(item.params)
                elif isinstance(item, _Flush):
                    waiters.append(item.done)
                elif item is _STOP:
                    stop = True
            try:
                self._write(writes)
            except BaseException as e:  # the writer must outlive any surprise
                log.exception("ledger writer failed on a batch")
                self._fail(f"unexpected {type(e).__name__}: {e}")
            finally:
                for done in waiters:
                    done.set()

    def _write(self, writes: dict[str, list[_Params]]) -> None:
        if not writes:
            return
        conn = self._writer
        for attempt in range(4):
            try:
                conn.execute("BEGIN IMMEDIATE")
                for sql, params_list in writes.items():
                    conn.executemany(sql, params_list)
                conn.execute("COMMIT")
                return
            except sqlite3.OperationalError:  # locked or busy beyond the timeout: retry
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                time.sleep(0.05 * 2**attempt)
            except sqlite3.Error:  # e.g. a duplicate id: find the bad rows one by one
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                break
        for sql, params_list in writes.items():
            for params in params_list:
                try:
                    conn.execute(sql, params)
                except sqlite3.IntegrityError as e:
                    what = "request" if sql is _INSERT_REQUEST else "row for"
                    self._fail(
                        f"{what} {params[0]!r} was not saved ({e}); give every request a unique id"
                    )
                except sqlite3.Error as e:
                    self._fail(f"{params[0]!r} was not saved ({e})")

    def _fail(self, message: str) -> None:
        log.error("ledger %s: %s", self.path, message)
        with self._failures_lock:
            self._failures.append(message)

    # -- reading -----------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._reader_lock:
            if self._closed:
                raise LedgerClosedError(
                    f"the ledger at {self.path} is closed; open a new Ledger to read it"
                )
            if self._reader is None:
                self._reader = _connect(self.path)
                self._reader.execute("PRAGMA query_only = ON")
            return self._reader.execute(sql, params).fetchall()

    def rows(self, since: float | None = None) -> list[LedgerRow]:
        """Committed rows with `ts >= since` (all when None), oldest first."""
        if since is None:
            found = self._read(f"{_SELECT_REQUEST} ORDER BY ts, rowid")
        else:
            found = self._read(f"{_SELECT_REQUEST} WHERE ts >= ? ORDER BY ts, rowid", (since,))
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
