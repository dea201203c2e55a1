"""The ledger on SQLite: one file beside the gateway, no server (the default backend).

The schema is the list `MIGRATIONS`: migration *n* (1-based) moves a database from
`PRAGMA user_version` n-1 to n, in its own transaction. Opening a ledger applies the ones a
file lacks, so old databases upgrade themselves. Never edit a released migration; append one.
tierroute.ledger.postgresql keeps the same tables, numbered the same way.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from tierroute.errors import LedgerError
from tierroute.ledger.backend import Connection, escape_unencodable

# Shared by both backends' migration 7; {real} is the floating-point type.
API_KEYS_TABLE: Final = """
    CREATE TABLE api_keys (
        key_hash TEXT PRIMARY KEY,
        key_id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        tenant TEXT,
        budget_usd_day {real},
        budget_usd_month {real},
        requests_per_minute INTEGER,
        tokens_per_minute INTEGER,
        created {real} NOT NULL,
        revoked {real}
    )
"""

# Shared by both backends' migration 8: a shadow judgement's spend, booked to the key
# whose request it judged (reported by `report --by key`, not charged to its budget).
JUDGING_SPEND_COLUMNS: Final = (
    "api_key_id TEXT",
    "prompt_tokens INTEGER NOT NULL DEFAULT 0",
    "completion_tokens INTEGER NOT NULL DEFAULT 0",
    "cost_usd {real} NOT NULL DEFAULT 0",
)


# --- schema (migrations) -----------------------------------------------------------------


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


def _m007_api_keys(conn: sqlite3.Connection) -> None:
    """Virtual API keys (`tierroute keys`): the sha256 of the secret, never the secret."""
    conn.execute(API_KEYS_TABLE.format(real="REAL"))


def _m008_judging_spend(conn: sqlite3.Connection) -> None:
    """What each shadow judgement cost, and the key whose request it judged."""
    for column in JUDGING_SPEND_COLUMNS:
        conn.execute(f"ALTER TABLE shadow_judgements ADD COLUMN {column.format(real='REAL')}")


Migration = Callable[[sqlite3.Connection], None]

MIGRATIONS: Final[tuple[Migration, ...]] = (
    _m001_requests,
    _m002_request_indexes,
    _m003_feedback,
    _m004_policy_changes,
    _m005_shadow_judgements,
    _m006_request_context,
    _m007_api_keys,
    _m008_judging_spend,
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


# SQLite's answers that mean "the disk cannot take writes now", not "this row is bad".
_DISK_ERRORS: Final = frozenset(
    {
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
    }
)


def _is_disk_error(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and (
        code is None or (code & 0xFF) in _DISK_ERRORS
    )


def _is_read_only(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in (
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PERM,
    )


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


class SqliteBackend:
    """A ledger file, in WAL mode so that reads run while the writer commits."""

    kind = "sqlite"
    order = "rowid"
    begin = "BEGIN IMMEDIATE"
    reconnect = False

    def __init__(self, path: Path) -> None:
        self.path: Path | None = path
        self.file = path
        self.location = str(path)

    def open_writer(self) -> Connection:
        path = self.file
        hint = "check that the folder is writable, or set TIERROUTE_DATA_DIR to another one"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(path)
        except (OSError, sqlite3.Error) as e:
            raise LedgerError(f"cannot open the ledger at {path} ({e}); {hint}") from e
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(
                    f"the ledger at {path} cannot use WAL mode (got {mode!r}); "
                    "put it on a local disk, not a network share or in memory"
                )
            conn.execute("PRAGMA synchronous = NORMAL")  # durable across app crashes in WAL
            migrate(conn, path)
        except sqlite3.DatabaseError as e:
            conn.close()
            if _is_read_only(e):
                # A valid ledger in a read-only place: the file is fine, the permissions not.
                raise LedgerError(
                    f"the ledger at {path} is read-only ({e}): SQLite needs to write the "
                    f"file and create {path.name}-wal and {path.name}-shm beside it; "
                    f"make {path.parent} and the file writable for this user "
                    f"(e.g. chmod u+w), or set TIERROUTE_DATA_DIR to a writable folder"
                ) from e
            raise LedgerError(
                f"{path} is not a usable ledger database ({e}); "
                "move it aside or point tierroute at another file"
            ) from e
        except BaseException:
            conn.close()
            raise
        return conn

    def open_reader(self) -> Connection:
        conn = _connect(self.file)
        conn.execute("PRAGMA query_only = ON")
        return conn

    def unavailable(self, exc: BaseException) -> bool:
        return _is_disk_error(exc)

    def busy(self, exc: BaseException) -> bool:
        code = getattr(exc, "sqlite_errorcode", None) or 0
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

    def storable(self, text: str) -> str:
        return escape_unencodable(text)

    def insert_rows(
        self, conn: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> bool:
        return False  # executemany in a transaction is SQLite's bulk insert already
