"""`tierroute ledger migrate`: copy every table of one ledger into another (SQLite to
PostgreSQL, typically), without loss and without duplicates when run again.

Rows with a natural key are inserted with ON CONFLICT DO NOTHING: requests by id, feedback
by (request, rater), keys by their hash. Policy changes and shadow judgements have only an
id that each database counts itself, so they are matched on all their columns, as
multisets: a row the target lacks is copied as often as the source holds it more.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from tierroute.ledger.store import _COLUMNS, Ledger

_CHUNK: Final = 5_000
# table -> (columns copied, the unique column the source is read in pages by; None: the
# rows have no natural key and are matched on all columns, as multisets)
TABLES: Final[dict[str, tuple[tuple[str, ...], str | None]]] = {
    "requests": (_COLUMNS, "id"),
    # unique by (request_id, rater); read by the source's own id
    "feedback": (("request_id", "ts", "rating", "comment", "rater"), "id"),
    "policy_changes": (("ts", "old_threshold", "new_threshold", "reason"), None),
    "shadow_judgements": (
        (
            "request_id",
            "ts",
            "tier",
            "judge",
            "verdict",
            "raw",
            "api_key_id",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
        ),
        None,
    ),
    "api_keys": (
        (
            "key_hash",
            "key_id",
            "name",
            "tenant",
            "budget_usd_day",
            "budget_usd_month",
            "requests_per_minute",
            "tokens_per_minute",
            "created",
            "revoked",
        ),
        "key_hash",
    ),
}


@dataclass(frozen=True)
class Copied:
    table: str
    source: int  # rows in the source
    inserted: int  # rows this run added to the target
    target: int  # rows in the target afterwards


def _count(ledger: Ledger, table: str) -> int:
    return int(ledger.query(f"SELECT count(*) FROM {table}")[0][0])


def copy_ledger(
    source: Ledger, target: Ledger, progress: Callable[[str], None] | None = None
) -> list[Copied]:
    """Copy all tables of `source` into `target` (both open, schemas migrated)."""
    results = []
    for table, (columns, key) in TABLES.items():
        before = _count(target, table)
        names = ", ".join(columns)
        marks = ", ".join("?" * len(columns))
        insert = f"INSERT INTO {table} ({names}) VALUES ({marks})"
        if key is not None:
            insert += " ON CONFLICT DO NOTHING"
            last: Any = None
            while True:  # pages in the order of the key, each from after the last one
                where = "" if last is None else f" WHERE {key} > ?"
                page = source.query(
                    f"SELECT {names}, {key} FROM {table}{where} ORDER BY {key} LIMIT {_CHUNK}",
                    () if last is None else (last,),
                )
                if not page:
                    break
                last = page[-1][-1]
                target.write_many(insert, [tuple(r)[: len(columns)] for r in page])
                if len(page) < _CHUNK:
                    break
        else:
            wanted = Counter(tuple(r) for r in source.query(f"SELECT {names} FROM {table}"))
            have = Counter(tuple(r) for r in target.query(f"SELECT {names} FROM {table}"))
            missing = [row for row, n in (wanted - have).items() for _ in range(n)]
            missing.sort(key=lambda row: row[columns.index("ts")])
            for start in range(0, len(missing), _CHUNK):
                target.write_many(insert, missing[start : start + _CHUNK])
        after = _count(target, table)
        done = Copied(table, _count(source, table), after - before, after)
        if progress is not None:
            progress(
                f"{table}: {done.source} in the source, {done.inserted} copied, "
                f"{done.target} in the target"
            )
        results.append(done)
    return results
