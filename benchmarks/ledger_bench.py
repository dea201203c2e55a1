"""The ledger writer on SQLite and on PostgreSQL: prints figures, asserts nothing.

    python benchmarks/ledger_bench.py [--rows 20000] [--pg postgresql://postgres@127.0.0.1/test]

For each backend: rows/s recorded from 8 threads until committed (one writer thread,
batched), and the latency from record() to committed for single rows (flush() after each,
the worst case: a batch of one). PostgreSQL gets a database of its own, dropped after.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

from tierroute.ledger import Ledger, LedgerRow


def row(i: int) -> LedgerRow:
    return LedgerRow(
        id=f"req-{i}-{secrets.token_hex(4)}",
        ts=time.time(),
        tier="small",
        model="m",
        prompt_tokens=20,
        completion_tokens=10,
        cost_usd=1e-5,
        hints={"priority": "normal"},
        fallback_chain=("small",),
    )


def measure(target: Path | str, rows: int) -> tuple[float, float, float]:
    with Ledger(target) as ledger:
        per_thread = rows // 8

        def write(offset: int) -> None:
            for i in range(per_thread):
                ledger.record(row(offset + i))

        start = time.perf_counter()
        threads = [threading.Thread(target=write, args=(t * per_thread,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ledger.flush()
        rate = per_thread * 8 / (time.perf_counter() - start)
        single = []
        for i in range(200):
            t0 = time.perf_counter()
            ledger.record(row(10**9 + i))
            ledger.flush()
            single.append((time.perf_counter() - t0) * 1000)
        single.sort()
        return rate, statistics.median(single), single[int(len(single) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    print(f"{'backend':<12} {'rows/s (8 threads)':>20} {'1 row p50 ms':>14} {'p99 ms':>8}")
    with tempfile.TemporaryDirectory() as folder:
        rate, p50, p99 = measure(Path(folder) / "ledger.db", args.rows)
        print(f"{'sqlite':<12} {rate:>20,.0f} {p50:>14.2f} {p99:>8.2f}")
    import psycopg

    name = f"tierroute_bench_{secrets.token_hex(4)}"
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = args.pg.rsplit("/", 1)[0] + "/" + name
        rate, p50, p99 = measure(url, args.rows)
        print(f"{'postgresql':<12} {rate:>20,.0f} {p50:>14.2f} {p99:>8.2f}")
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
