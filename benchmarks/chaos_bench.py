"""Chaos figures for the ledger: prints them, asserts nothing. Loopback only, about 2 minutes.

    python benchmarks/chaos_bench.py [--seconds 3] [--concurrency 32]

A real `tierroute serve` (router `random`, two remote tiers on benchmarks/fast_upstream.py,
`keep_prompts: true`) under load, one fresh gateway per case. For each case it prints
sent / answered (200s) / rows (of the answered requests found in the ledger afterwards) /
lost (answered without a row):

1. SIGTERM under load: a graceful stop must commit every queued row.
2. SIGKILL under load: may lose the rows queued in the writer's last linger window (20 ms);
   the bound printed is the answer rate times that window.
3. Poisoned rows: one request in ten carries a lone surrogate in its kept prompt, and every
   answer gets feedback with a lone surrogate in its comment.
4. Full disk, `on_ledger_failure: queue` then `refuse`: the data folder is a small tmpfs
   (16 MB) filled by a ballast file, which is deleted after a while (space returns). Without the
   right to mount, the same is done to a Ledger in-process with SQLite's max_page_count.
5. Killed upstream: the small tier's upstream is killed mid-load; its requests fall back.
Goal (issue 11): 0 answered rows lost in every case but SIGKILL, at most one linger window
there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gateway_bench import free_port, wait_up  # noqa: E402

from tierroute.ledger import Ledger, LedgerRow, default_path  # noqa: E402

LINGER_S = 0.02  # Ledger's default linger_s


@dataclass
class Load:
    sent: int = 0
    answered: list[str] = field(default_factory=list)  # ids of the 200s
    refused: int = 0  # 503 ledger_unavailable
    other: dict[int, int] = field(default_factory=dict)  # other statuses (-1: no answer)
    seconds: float = 0.0


def body(i: int, poison: bool, model: str) -> bytes:
    text = f"What is {i} plus {i}?" + ("\ud800" if poison else "") + " pad" * 200
    doc = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": text}]}
    return json.dumps(doc).encode()  # ASCII: a lone surrogate goes as its \\u escape


async def load(
    url: str,
    seconds: float,
    concurrency: int,
    *,
    poison_every: int = 0,
    feedback: bool = False,
    model: str = "small",
    at: float | None = None,
    then: object = None,
) -> Load:
    """Requests at `concurrency` for `seconds`; `then()` is called once after `at` seconds."""
    out = Load()
    fired: list[bool] = []
    stop = time.monotonic() + seconds
    start = time.monotonic()
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def worker(w: int) -> None:
            i = w
            while time.monotonic() < stop:
                poison = bool(poison_every) and i % poison_every == 0
                out.sent += 1
                try:
                    r = await http.post(
                        "/v1/chat/completions", content=body(i, poison, model), headers=headers
                    )
                except httpx.HTTPError:
                    out.other[-1] = out.other.get(-1, 0) + 1
                    if fired:
                        return  # the gateway is gone: stop sending
                    await asyncio.sleep(0.05)
                    i += concurrency
                    continue
                if r.status_code == 200:
                    rid = str(r.json()["id"])
                    out.answered.append(rid)
                    if feedback:
                        comment = json.dumps(
                            {"request_id": rid, "rating": 0, "comment": f"bad {i} \udfff"}
                        )
                        with suppress(httpx.HTTPError):
                            await http.post("/v1/feedback", content=comment, headers=headers)
                elif r.status_code == 503:
                    out.refused += 1
                else:
                    out.other[r.status_code] = out.other.get(r.status_code, 0) + 1
                i += concurrency

        async def trigger() -> None:
            if at is None or not callable(then):
                return
            await asyncio.sleep(at)
            await asyncio.to_thread(then)
            fired.append(True)

        await asyncio.gather(trigger(), *(worker(w) for w in range(concurrency)))
    out.seconds = time.monotonic() - start
    return out


class Gateway:
    def __init__(self, upstreams: tuple[str, str], data: Path, extra: str = "") -> None:
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = data.parent / f"gw-{self.port}.yaml"
        config.write_text(f"""
router: random
tiers:
  - {{name: small, kind: openai, base_url: "{upstreams[0]}/v1", model: fast, timeout_s: 5}}
  - {{name: large, kind: openai, base_url: "{upstreams[1]}/v1", model: fast, timeout_s: 5}}
gateway:
  keep_prompts: true
  retries: 0
{extra}""")
        self.log = data.parent / f"gw-{self.port}.log"
        cmd = [sys.executable, "-m", "tierroute.cli", "serve", "--config", str(config)]
        cmd += ["--port", str(self.port), "--data-dir", str(data), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        wait_up(self.url + "/healthz", self.proc, 120)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def health(self) -> str:
        try:
            doc = httpx.get(self.url + "/healthz", timeout=5).json()
        except httpx.HTTPError:
            return "unreachable"
        return f"{doc['status']} ({doc.get('reason', '')[:60]}...)" if "reason" in doc else "ok"


def rows_found(data: Path, ids: list[str]) -> int:
    """How many of `ids` have a row in the ledger of data folder (or file) `data`."""
    with Ledger(data if data.suffix == ".db" else default_path(data)) as ledger:
        have = {row.id for row in ledger.rows()}
    return sum(1 for i in ids if i in have)


def report(case: str, load: Load, rows: int, note: str = "") -> None:
    answered = len(load.answered)
    other = ", ".join(f"{k if k >= 0 else 'no answer'}: {v}" for k, v in sorted(load.other.items()))
    notes = "; ".join(n for n in (other, note) if n)
    print(
        f"{case:<34} {load.sent:>6} {answered:>8} {rows:>6} {answered - rows:>5} "
        f"{load.refused:>5}  {notes}"
    )


@contextmanager
def upstream() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fast_upstream.py"), str(port)], stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url + "/healthz", proc, 60)
        yield url, proc
    finally:
        proc.kill()
        proc.wait(10)


def case_signal(ups: tuple[str, str], root: Path, sig: int, args: argparse.Namespace) -> None:
    data = root / f"sig{sig}"
    gw = Gateway(ups, data)
    try:
        result = asyncio.run(
            load(
                gw.url,
                args.seconds,
                args.concurrency,
                at=args.seconds / 2,
                then=lambda: gw.signal(sig),
            )
        )
    finally:
        gw.stop()
    rate = len(result.answered) / (args.seconds / 2)
    name = "SIGTERM under load" if sig == signal.SIGTERM else "SIGKILL under load"
    note = f"linger bound ~{rate * LINGER_S:.0f} rows at {rate:.0f} answers/s"
    report(name, result, rows_found(data, result.answered), note if sig == signal.SIGKILL else "")


def case_poison(ups: tuple[str, str], root: Path, args: argparse.Namespace) -> None:
    data = root / "poison"
    gw = Gateway(ups, data)
    try:
        result = asyncio.run(
            load(gw.url, args.seconds, args.concurrency, poison_every=10, feedback=True)
        )
        health = gw.health()
    finally:
        gw.stop()
    with Ledger(default_path(data)) as ledger:
        comments = sum(len(ledger.feedback(i)) for i in result.answered)
    rows = rows_found(data, result.answered)
    shutdown = "Application shutdown failed" in gw.log.read_text()
    note = f"feedback rows {comments}/{len(result.answered)}, health {health}"
    report(
        "poisoned rows (1 in 10 + feedback)",
        result,
        rows,
        note + (", SHUTDOWN FAILED" if shutdown else ""),
    )


def try_mount(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


def case_full_disk(ups: tuple[str, str], root: Path, mode: str, args: argparse.Namespace) -> None:
    data = root / f"tmpfs-{mode}"
    # Room for the WAL (up to ~4 MB before its checkpoint) once the ballast is gone: a
    # smaller disk stays full, and queue mode then loses its spill at shutdown (counted).
    if not try_mount(data, "16m"):
        full_disk_in_process(root, mode)
        return
    try:
        gw = Gateway(ups, data, f"  on_ledger_failure: {mode}\n")
        ballast = data / "ballast"
        try:
            st = os.statvfs(data)
            free = st.f_bavail * st.f_frsize
            with ballast.open("wb") as f:  # leave ~40 kB: a few dozen rows of 1 kB prompts
                f.write(b"\0" * max(0, free - 40_000))
            seen: list[str] = []

            def free_space() -> None:
                seen.append(gw.health())
                ballast.unlink()

            result = asyncio.run(
                load(gw.url, args.seconds, args.concurrency, at=args.seconds * 0.6, then=free_space)
            )
            time.sleep(1.5)  # the writer retries the spilled rows every second
            after = gw.health()
        finally:
            gw.stop()
        rows = rows_found(data, result.answered)
        note = f"tmpfs 16 MB; health while full: {seen[0] if seen else '?'}; after: {after}"
        report(f"full disk, {mode}", result, rows, note)
    finally:
        subprocess.run(["umount", str(data)], check=False)


def full_disk_in_process(root: Path, mode: str) -> None:
    """No mount: the same story on a Ledger, its writer capped by max_page_count."""
    ledger = Ledger(root / f"capped-{mode}.db", keep_prompts=True, retry_s=0.2)
    answered: list[str] = []
    for i in range(300):
        if i == 50:
            ledger.flush()
            pages = ledger._writer.execute("PRAGMA page_count").fetchone()[0]
            ledger._writer.execute(f"PRAGMA max_page_count = {pages}")
        if i == 250:
            ledger._writer.execute("PRAGMA max_page_count = 1073741823")
        if mode == "refuse" and not ledger.health().writable:
            continue
        row = LedgerRow(id=f"r{i}", ts=time.time(), tier="small", model="m", prompt_text="x" * 2000)
        ledger.record(row)
        answered.append(f"r{i}")
        time.sleep(0.002)
    ledger.close(raise_failures=False)
    result = Load(sent=300, answered=answered, refused=300 - len(answered))
    rows = rows_found(root / f"capped-{mode}.db", answered)
    report(f"full disk, {mode} (max_page_count)", result, rows, "no mount: a Ledger in-process")


def case_killed_upstream(root: Path, args: argparse.Namespace) -> None:
    data = root / "killed-upstream"
    with upstream() as (small_url, small_proc), upstream() as (large_url, _):
        gw = Gateway((small_url, large_url), data)
        try:
            result = asyncio.run(
                load(
                    gw.url,
                    args.seconds,
                    args.concurrency,
                    model="auto",
                    at=args.seconds / 3,
                    then=small_proc.kill,
                )
            )
        finally:
            gw.stop()
    report("killed upstream (small tier)", result, rows_found(data, result.answered))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(f"chaos_bench: {args.seconds:.0f} s of load per case at concurrency {args.concurrency}")
    print(f"{'case':<34} {'sent':>6} {'answered':>8} {'rows':>6} {'lost':>5} {'503':>5}  notes")
    with tempfile.TemporaryDirectory() as tmp, upstream() as (a, _), upstream() as (b, _):
        root = Path(tmp)
        ups = (a, b)
        case_signal(ups, root, signal.SIGTERM, args)
        case_signal(ups, root, signal.SIGKILL, args)
        case_poison(ups, root, args)
        case_full_disk(ups, root, "queue", args)
        case_full_disk(ups, root, "refuse", args)
        case_killed_upstream(root, args)
    print("\ngoal: lost 0 in every case but SIGKILL; SIGKILL at most one linger window (20 ms)")


if __name__ == "__main__":
    main()
