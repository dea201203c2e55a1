"""Gateway figures: prints them, asserts nothing.

    python benchmarks/gateway_bench.py [--requests 2000] [--skip-local]
        [--only overhead batching replicas stack fresh local]
    python benchmarks/gateway_bench.py --state redis://127.0.0.1:6379/0   (state_bench.py)
    python benchmarks/gateway_bench.py --baseline ../main/src [--rounds 3] [--seconds 10]
    python benchmarks/gateway_bench.py --only stack --baseline ../main/src [--rounds 3]
        [--concurrency 1 64]

`--baseline SRC` names another checkout's src folder (the old code, e.g. main's): its
gateways run beside this checkout's, measured alternately so that other jobs on the machine
weigh on both alike. It applies to the sections marked (before/after) below; given alone it
runs the fresh section.

1. Overhead: latency through tierroute minus latency straight to the same fast local
   upstream (benchmarks/fast_upstream.py), p50 and p99, at concurrency 1 and 64, measured
   side by side in one run. Routing is on (the default rules router with embeddings):
   "repeated prompt" requests hit the decision cache, "fresh prompts" pay the embedding.
2. Sustained requests/s through the gateway at concurrency 64.
3. Fresh prompts at c=64 with the routing micro-batcher off (`route_batch_max: 1`) and on,
   side by side; then one, two and three replicas on this machine. With wrk installed
   (apt-get install wrk) each c=64 row is measured by the Python client and by wrk: the
   Python client saturates its own core first.
4. Stack (before/after): one replica on the embedded default (SQLite ledger, in-process
   state) vs one on PostgreSQL + Redis, side by side, both with a limited key
   (key_limits): added p50/p99 at c=1 and req/s at c=64 (state_bench.side_by_side). With
   --baseline the same two also run from the old code, in the same rounds.
5. Fresh (before/after, needs --baseline and wrk): fresh prompts through the old code's
   gateway and this one's: c=64 req/s, c=1 p50 and the gateway's CPU per request.
6. Memory (RSS) of `tierroute serve` on its embedded default with both local tiers
   loaded, and tokens/s of each local tier (64-token answers, forced tier).
Targets (issue 3): added p50 <= 2 ms, p99 <= 10 ms; >= 1,000 req/s. Issue 12: fresh
prompts at c=64 >= 600 req/s on 2 cores; PostgreSQL + Redis adds <= 1 ms p50 over SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[bytes], seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not come up")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve_command(config: Path, port: int, data: Path) -> list[str]:
    """`tierroute serve` of `config` on `port`, its ledger in `data`, logging warnings only."""
    command = [sys.executable, "-m", "tierroute.cli", "serve", "--config", str(config)]
    return [*command, "--port", str(port), "--data-dir", str(data), "--log-level", "warning"]


async def measure(
    urls: list[str],
    n: int,
    concurrency: int,
    fresh: bool,
    headers: dict[str, str] | None = None,
) -> tuple[list[float], float]:
    """Latencies (ms) of n chat requests at the given concurrency, spread round-robin over
    `urls`, and requests/s. Fresh prompts carry a per-run salt: never a cache hit (also
    across runs that share one Redis)."""
    salt = uuid.uuid4().hex[:8]
    latencies: list[float] = []
    dropped: list[int] = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def one(i: int) -> None:
            text = f"What is the capital of country {salt}-{i}?" if fresh else "Hello there!"
            body = {
                "model": "auto",
                "max_tokens": 1,
                "messages": [{"role": "user", "content": text}],
            }
            async with sem:
                start = time.perf_counter()
                try:
                    r = await http.post(urls[i % len(urls)], json=body, headers=headers)
                except httpx.TransportError:
                    # A kept-alive connection the server closed as it was reused: counted
                    # and reported, not fatal (the server's keep-alive timeout races it).
                    dropped.append(i)
                    return
                latencies.append((time.perf_counter() - start) * 1000)
                r.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(min(50, n))))  # warm up
        latencies.clear()
        dropped.clear()
        start = time.perf_counter()
        await asyncio.gather(*(one(i + 1000 * concurrency) for i in range(n)))
        elapsed = time.perf_counter() - start
    if dropped:
        print(f"  ({len(dropped)} requests lost their connection)")
    return latencies, len(latencies) / elapsed


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
counter = 0
request = function()
  counter = counter + 1
  local text = FRESH and ("What is the capital of country " .. SALT .. "-" .. counter .. "?")
                      or "Hello there!"
  local body = '{"model":"auto","max_tokens":1,"messages":[{"role":"user","content":"'
               .. text .. '"}]}'
  return wrk.format(nil, nil, nil, body)
end
"""


def wrk(
    urls: list[str], concurrency: int, fresh: bool, seconds: int = 10
) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s) from wrk, a C load generator on one core a process:
    one wrk per URL at the same time, connections split between them, req/s summed and
    the latencies of the first."""
    procs = []
    scripts = []
    for url in urls:
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            salt = uuid.uuid4().hex[:8]
            f.write(f"FRESH = {'true' if fresh else 'false'}\nSALT = '{salt}'\n" + WRK_SCRIPT)
        scripts.append(f.name)
        command = ["wrk", "-t1", f"-c{max(1, concurrency // len(urls))}", f"-d{seconds}s"]
        command += ["--latency", "-s", f.name, url]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    outs = [proc.communicate()[0] for proc in procs]
    for name in scripts:
        os.unlink(name)
    out = outs[0]
    total = 0.0
    for text in outs:
        rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
        total += float(rps.group(1)) if rps else float("nan")
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        if errors:
            print(f"  (wrk saw {errors.group(1)} non-2xx answers)")

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale

    return ms("50"), ms("99"), total


GATEWAY_YAML = """
tiers:
  - {{name: small, kind: openai, base_url: "http://127.0.0.1:{port}/v1", model: fast,
     typical_latency_ms: 1}}
  - {{name: large, kind: openai, base_url: "http://127.0.0.1:{port}/v1", model: fast,
     typical_latency_ms: 1}}
router: {router}
gateway:
  route_batch_max: {batch}
"""


@contextlib.contextmanager
def gateways(
    up_port: int, count: int = 1, batch: int = 32, src: str | None = None, router: str = "default"
) -> Iterator[list[str]]:
    """`count` gateway processes (each its own data dir) in front of the fast upstream;
    yields their chat completions URLs. `src`: run the tierroute package found there
    (another checkout's src folder) instead of this one; `router`: the config's router."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gw.yaml"
        config.write_text(GATEWAY_YAML.format(port=up_port, batch=batch, router=router))
        ports = [free_port() for _ in range(count)]
        try:
            for i, port in enumerate(ports):
                data = Path(tmp) / f"replica{i}"
                data.mkdir()
                command = serve_command(config, port, data)
                procs.append(subprocess.Popen(command, stderr=subprocess.DEVNULL, env=env))
            for port, proc in zip(ports, procs, strict=True):
                wait_up(f"http://127.0.0.1:{port}/healthz", proc)
            yield [f"http://127.0.0.1:{port}/v1/chat/completions" for port in ports]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)


@contextlib.contextmanager
def fast_upstream() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "fast_upstream.py"), str(port)])
    try:
        wait_up(f"http://127.0.0.1:{port}/healthz", proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def overhead(requests: int) -> None:
    with fast_upstream() as up_port, gateways(up_port) as (through,):
        direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        print(
            f"{'case':<34} {'direct p50':>10} {'via p50':>8} {'added p50':>9} "
            f"{'direct p99':>10} {'via p99':>8} {'added p99':>9} {'via req/s':>9}"
        )
        for concurrency in (1, 64):
            for fresh in (False, True):
                label = f"c={concurrency}, {'fresh prompts' if fresh else 'repeated prompt'}"
                if concurrency > 1 and shutil.which("wrk"):
                    dp50, dp99, _ = wrk([direct], concurrency, fresh)
                    vp50, vp99, rps = wrk([through], concurrency, fresh)
                    label += " (wrk)"
                else:
                    n = requests if concurrency > 1 else max(300, requests // 4)
                    d, _ = asyncio.run(measure([direct], n, concurrency, fresh))
                    v, rps = asyncio.run(measure([through], n, concurrency, fresh))
                    dp50, dp99 = np.percentile(d, 50), np.percentile(d, 99)
                    vp50, vp99 = np.percentile(v, 50), np.percentile(v, 99)
                print(
                    f"{label:<34} {dp50:10.2f} {vp50:8.2f} {vp50 - dp50:9.2f} "
                    f"{dp99:10.2f} {vp99:8.2f} {vp99 - dp99:9.2f} {rps:9.0f}"
                )
        print(f"gateway RSS with remote tiers only: {gateway_rss(through):.0f} MB")


def gateway_rss(url: str) -> float:
    return rss_mb(gateway_pid(url))


def loads(urls: list[str], requests: int, fresh: bool) -> list[tuple[str, float, float, float]]:
    """(client, p50, p99, req/s) at c=64 over `urls`: the Python client and, if installed,
    wrk (one wrk per URL, 64 connections split between them, figures summed)."""
    out = []
    lat, rps = asyncio.run(measure(urls, requests, 64, fresh))
    out.append(("httpx", float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), rps))
    if shutil.which("wrk"):
        p50, p99, rps = wrk(urls, 64, fresh)
        out.append(("wrk", p50, p99, rps))
    return out


def batching(requests: int) -> None:
    """Fresh prompts at c=64 with the routing micro-batcher off (route_batch_max: 1,
    one embedding per request) and on (the default), side by side. Also the gateway
    process's CPU time per request (user + system), which other jobs on the machine
    disturb far less than wall-clock figures."""
    print("\nfresh prompts at c=64, routing micro-batcher off vs on (one replica):")
    print(f"{'case':<34} {'client':<6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'CPU ms/req':>10}")
    with fast_upstream() as up_port:
        for label, batch in (("one embedding per request", 1), ("micro-batched (max 32)", 32)):
            with gateways(up_port, 1, batch) as urls:
                pid = gateway_pid(urls[0])
                before = cpu_s(pid)
                lat, rps = asyncio.run(measure(urls, requests, 64, True))
                per_request = (cpu_s(pid) - before) * 1000 / (len(lat) + min(50, requests))
                p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
                print(
                    f"{label:<34} {'httpx':<6} {p50:8.2f} {p99:8.2f} {rps:8.0f} {per_request:10.2f}"
                )
                if shutil.which("wrk"):
                    p50, p99, rps = wrk(urls, 64, True)
                    print(f"{label:<34} {'wrk':<6} {p50:8.2f} {p99:8.2f} {rps:8.0f}")


def gateway_pid(url: str) -> int:
    port = url.split(":")[2].split("/")[0]
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True)
    pid = re.search(r"pid=(\d+)", out.stdout)
    if pid is None:
        raise SystemExit(f"no process listens on port {port}")
    return int(pid.group(1))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def against_baseline(baseline: str, rounds: int, seconds: int, router: str = "default") -> None:
    """Fresh prompts through this checkout's gateway and through `baseline`'s (another
    checkout's src folder, e.g. main's), both up at once and measured alternately with wrk,
    so that other jobs on the machine weigh on both alike: c=64 req/s and c=1 p50, and the
    gateway's CPU per request."""
    if not shutil.which("wrk"):
        raise SystemExit("--baseline needs wrk (apt-get install wrk)")
    here = str(HERE.parent / "src")
    print(f"\nfresh prompts, baseline {baseline} (old) vs {here} (new), alternating:")
    print(
        f"{'round':<6} {'code':<4} {'c=64 req/s':>10} {'c=64 p50':>9} {'CPU ms/req':>10} "
        f"{'c=1 p50':>8}"
    )
    figures: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    with (
        fast_upstream() as up_port,
        gateways(up_port, src=baseline) as old,
        gateways(up_port, src=here, router=router) as new,
    ):
        for urls in (old, new):
            wrk(urls, 64, True, seconds=3)  # warm up: first batches, thread pools
        for r in range(rounds):
            for label, urls in (("old", old), ("new", new)):
                pid = gateway_pid(urls[0])
                before = cpu_s(pid)
                p50, _, rps = wrk(urls, 64, True, seconds)
                per_request = (cpu_s(pid) - before) * 1000 / max(1.0, rps * seconds)
                one, _, _ = wrk(urls, 1, True, max(3, seconds // 2))
                figures[label].append((rps, one))
                print(
                    f"{r + 1:<6} {label:<4} {rps:10.0f} {p50:9.1f} {per_request:10.2f} {one:8.2f}"
                )
    old_rps = np.median([f[0] for f in figures["old"]])
    new_rps = np.median([f[0] for f in figures["new"]])
    print(
        f"median c=64 req/s: old {old_rps:.0f}, new {new_rps:.0f} (x{new_rps / old_rps:.2f}); "
        f"median c=1 p50: old {np.median([f[1] for f in figures['old']]):.2f} ms, "
        f"new {np.median([f[1] for f in figures['new']]):.2f} ms"
    )


def replicas(requests: int) -> None:
    """One, two and three gateway processes on this machine, the client spreading requests
    over them (as a load balancer would); each replica keeps its own SQLite ledger here."""
    print(f"\nreplicas on {os.cpu_count()} cores at c=64 (client spreads the load):")
    print(f"{'case':<34} {'client':<6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    with fast_upstream() as up_port:
        for count in (1, 2, 3):
            with gateways(up_port, count) as urls:
                for fresh in (False, True):
                    label = f"{count} replica(s), {'fresh' if fresh else 'repeated'}"
                    for client, p50, p99, rps in loads(urls, requests, fresh):
                        print(f"{label:<34} {client:<6} {p50:8.2f} {p99:8.2f} {rps:8.0f}")


@contextlib.contextmanager
def pg_databases(admin_url: str, count: int) -> Iterator[list[str]]:
    """`count` fresh PostgreSQL databases (URLs), dropped afterwards."""
    import psycopg

    names = [f"tierroute_bench_{uuid.uuid4().hex[:10]}" for _ in range(count)]
    base = admin_url.rsplit("/", 1)[0]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for name in names:
            admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield [f"{base}/{name}" for name in names]
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            for name in names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def stack(
    requests: int,
    redis_url: str,
    pg_url: str,
    baseline: str | None,
    rounds: int,
    concurrency: list[int],
) -> None:
    """One replica: SQLite + in-process state vs PostgreSQL + Redis (issue 12's target:
    <= 1 ms added p50), and the same from `baseline` (old code's src) when given, all side
    by side."""
    from state_bench import Variant, side_by_side

    print("\none replica, SQLite + memory vs PostgreSQL + Redis:")
    srcs: list[tuple[str, str | None]] = [("", None)]
    if baseline:
        srcs.append((" (baseline)", baseline))
    with pg_databases(pg_url, len(srcs)) as databases:
        pairs = [
            (
                Variant(f"sqlite + memory{tag}", "memory", src=src),
                Variant(f"postgresql + redis{tag}", redis_url, ledger=db, src=src),
            )
            for (tag, src), db in zip(srcs, databases, strict=True)
        ]
        cases = [
            (c, fresh) for c, fresh in ((1, False), (64, False), (64, True)) if c in concurrency
        ]
        side_by_side(pairs, requests, rounds, cases)


def local_tiers() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tierroute.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                tmp,
                "--log-level",
                "warning",
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_up(f"http://127.0.0.1:{port}/healthz", serve)
            print(
                f"\nembedded default (smollm2-135m + qwen2.5-coder-1.5b, in-process): "
                f"up in {time.perf_counter() - start:.1f}s, RSS {rss_mb(serve.pid):.0f} MB"
            )
            prompt = "Write a short paragraph about the history of the bicycle."
            for tier in ("small", "large"):
                body = {
                    "model": tier,
                    "max_tokens": 64,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": prompt}],
                }
                t0 = time.perf_counter()
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=600
                )
                elapsed = time.perf_counter() - t0
                usage = r.json()["usage"]
                print(
                    f"tier {tier:<6} {usage['completion_tokens']} tokens in {elapsed:.1f}s: "
                    f"{usage['completion_tokens'] / elapsed:.1f} tok/s end to end "
                    f"(prompt {usage['prompt_tokens']} tokens)"
                )
            print(f"RSS after answering: {rss_mb(serve.pid):.0f} MB")
        finally:
            serve.terminate()
            serve.wait(60)


SECTIONS = ["overhead", "batching", "replicas", "stack", "fresh", "local"]
WITH_BASELINE = {"stack", "fresh"}  # the sections that can measure the old code too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        help="run these sections only (default: all but fresh; with --baseline: fresh)",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="for stack")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="for stack: a database to create and drop the benchmark's databases from",
    )
    parser.add_argument(
        "--baseline",
        metavar="SRC",
        help="another checkout's src folder (the old code): stack and fresh measure its "
        "gateways beside this checkout's, alternately",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="stack: rounds per case; fresh: alternations"
    )
    parser.add_argument("--seconds", type=int, default=10, help="fresh: wrk seconds a run")
    parser.add_argument(
        "--router",
        default="default",
        help="fresh --baseline: this checkout's router (e.g. default-static); the baseline's: "
        "default",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        choices=[1, 64],
        default=[1, 64],
        help="stack: the cases to run (c=1: repeated prompt, a quarter of --requests a "
        "round; c=64: repeated and fresh prompts)",
    )
    parser.add_argument(
        "--state", metavar="REDIS_URL", help="only compare in-process and Redis state (state_bench)"
    )
    args = parser.parse_args()
    if args.state:
        from state_bench import compare

        compare(args.requests, args.state, rounds=3, baseline_src=args.baseline)
        return
    if args.only:
        only = set(args.only)
    elif args.baseline:
        only = {"fresh"}
    else:
        only = set(SECTIONS) - {"fresh"}
    if args.skip_local:
        only.discard("local")
    if args.baseline and not only <= WITH_BASELINE:
        parser.error(
            f"--baseline applies to stack and fresh, not {', '.join(only - WITH_BASELINE)}"
        )
    if "fresh" in only and not args.baseline:
        parser.error("fresh compares with the old code: give --baseline SRC")
    print(f"gateway_bench on {os.cpu_count()} cores\n")
    if "overhead" in only:
        overhead(args.requests)
    if "batching" in only:
        batching(args.requests)
    if "replicas" in only:
        replicas(args.requests)
    if "stack" in only:
        stack(
            args.requests, args.redis, args.postgres, args.baseline, args.rounds, args.concurrency
        )
    if "fresh" in only:
        against_baseline(args.baseline, args.rounds, args.seconds, args.router)
    if "local" in only:
        local_tiers()
    print(
        "\ntargets: added p50 <= 2 ms, p99 <= 10 ms, >= 1,000 req/s (repeated prompt); "
        "fresh prompts at c=64 >= 600 req/s (issue 12, from 219); PostgreSQL + Redis adds "
        "<= 1 ms p50 over SQLite"
    )


if __name__ == "__main__":
    main()
