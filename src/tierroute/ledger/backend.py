"""The seam between the ledger and its database: SQLite (a file, the default) or PostgreSQL.

`Ledger` keeps one writer thread and one set of SQL, written with `?` placeholders; a backend
says how to connect, how to migrate, how to begin a write transaction and which errors mean
"the database cannot take writes now" (rows wait in memory and are retried) rather than
"this row is bad". `open_backend` picks one from a path or URL:

    /path/to/ledger.db, sqlite:/path/to/ledger.db    SQLite (tierroute.ledger.sqlite)
    postgresql://user@host:5432/db, postgres://...   PostgreSQL (tierroute.ledger.postgresql)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Cursor(Protocol):
    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


class Connection(Protocol):
    """What the ledger needs of a connection (in autocommit mode: it runs BEGIN itself)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, params: Sequence[Sequence[Any]], /) -> Any: ...

    def close(self) -> None: ...


class Backend(Protocol):
    kind: str  # "sqlite" or "postgresql"
    location: str  # for messages: the file, or the URL without its password
    path: Path | None  # the file, for SQLite only
    order: str  # the column that breaks ties in insertion order
    begin: str  # the statement that opens a write transaction
    # After a write fails for want of the database, open a new connection before retrying
    # (a PostgreSQL connection that lost its server is dead; a SQLite one is not).
    reconnect: bool

    def open_writer(self) -> Connection:
        """A connection for the writer, with the schema migrated. Raises LedgerError with
        a fix when the database is unusable, or the driver's error when unavailable."""
        ...

    def open_reader(self) -> Connection: ...

    def unavailable(self, exc: BaseException) -> bool:
        """Whether `exc` means the database cannot take writes now (retry later)."""
        ...

    def busy(self, exc: BaseException) -> bool:
        """Whether `exc` is a lock held by another writer (retry at once)."""
        ...

    def storable(self, text: str) -> str:
        """`text` in a form the database accepts (escapes what it cannot store)."""
        ...

    def insert_rows(
        self, conn: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> bool:
        """Insert `rows` in one statement that commits on its own (all or none), or return
        False where the backend has no such statement (the writer then opens a transaction)."""
        ...


def is_postgres_url(target: Path | str) -> bool:
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def open_backend(target: Path | str) -> Backend:
    """The backend for a file path, `sqlite:PATH` or a `postgresql://` URL."""
    if is_postgres_url(target):
        from tierroute.ledger.postgresql import PostgresBackend

        return PostgresBackend(str(target))
    from tierroute.ledger.sqlite import SqliteBackend

    if isinstance(target, str) and target.startswith("sqlite:"):
        target = target[len("sqlite:") :]
    return SqliteBackend(Path(target))


def escape_unencodable(text: str) -> str:
    """`text`, with what UTF-8 cannot encode (lone surrogates) written as backslash escapes."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
