"""What shared state costs a request: one gateway on in-process state vs the same on Redis.

    python benchmarks/state_bench.py [--requests 2000] [--redis redis://127.0.0.1:6379/0]
        [--baseline OTHER_CHECKOUT/src]
    (or python benchmarks/gateway_bench.py --state URL; `gateway_bench.py --only stack`
    compares SQLite + memory with PostgreSQL + Redis the same way)

Both runs use one API key limited by `gateway.key_limits` (requests and tokens per minute
and a USD budget per day, all far above what the run uses), so every request pays the limit
check (one Lua call) and its settlement; repeated prompts hit the decision cache, fresh
ones miss it locally (and, with one replica, skip the shared read). Prints p50/p99 and
req/s per case and the difference Redis makes, and the gateway's CPU milliseconds per
request (which other load on the machine does not inflate, unlike latency).

`--baseline` runs the same pair of gateways from another checkout's `src` (e.g. main's)
at the same time, alternating with this one's, so "before" and "after" are measured side
by side under the same load. The issue's target for PostgreSQL + Redis is <= 1 ms added
p50 over SQLite; this measures the Redis part.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))

import gateway_bench  # noqa: E402
from gateway_bench import free_port, serve_command, wait_up  # noqa: E402

KEY = "sk-bench"


async def measure(url: str, n: int, concurrency: int, fresh: bool) -> tuple[list[float], float]:
    """gateway_bench's load, each request with the bench's API key (limits apply)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    return await gateway_bench.measure([url], n, concurrency, fresh, headers=auth)


@dataclass(frozen=True)
class Variant:
    """One gateway of a side-by-side run: its state, its ledger (None: SQLite in its data
    dir), and the `src` folder it runs from (None: this checkout's)."""

    label: str
    state: str
    ledger: str | None = None
    src: str | None = None


def start_gateway(
    variant: Variant, up_port: int, tmp: str, prefix: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = Path(tmp) / f"gw-{port}.yaml"
    ledger = f'ledger: "{variant.ledger}"' if variant.ledger else ""
    config.write_text(f"""
tiers:
  - {{name: small, kind: openai, base_url: "http://127.0.0.1:{up_port}/v1", model: fast,
     typical_latency_ms: 1, input_price_per_m: 0.1, output_price_per_m: 0.1}}
  - {{name: large, kind: openai, base_url: "http://127.0.0.1:{up_port}/v1", model: fast,
     typical_latency_ms: 1, input_price_per_m: 1, output_price_per_m: 1}}
state: "{variant.state}"
{ledger}
gateway:
  state_prefix: "{prefix}"
  key_limits: {{requests_per_minute: 100000000, tokens_per_minute: 1000000000,
               budget_usd_day: 1000000}}
""")
    data = Path(tmp) / str(port)
    data.mkdir()
    env = {**os.environ, "TIERROUTE_API_KEYS": KEY, "PYTHONPATH": variant.src or str(SRC)}
    for name in ("TIERROUTE_STATE_URL", "TIERROUTE_LEDGER_URL"):
        env.pop(name, None)  # the config says where each variant keeps them
    gateway = subprocess.Popen(
        serve_command(config, port, data),
        stderr=subprocess.DEVNULL,
        env=env,
    )
    return gateway, f"http://127.0.0.1:{port}"


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used: unlike latency, not inflated by
    other load on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ALL_CASES = [(1, False), (1, True), (64, False), (64, True)]  # (concurrency, fresh prompts)


def side_by_side(
    variants: list[tuple[Variant, Variant]],
    requests: int,
    rounds: int,
    cases: list[tuple[int, bool]] = ALL_CASES,
) -> None:
    """Each pair is (reference, candidate), e.g. memory vs Redis state of one checkout. All
    gateways run at once; each case alternates between them `rounds` times and keeps the
    median of each figure, so load from elsewhere hits them alike. Prints, per case and
    gateway, p50/p99 (ms), req/s and gateway CPU ms per request, and for each candidate
    what it adds to its reference's p50 and p99."""
    up_port = free_port()
    prefix = f"tierroute-bench-{uuid.uuid4().hex[:8]}:"
    upstream = subprocess.Popen([sys.executable, str(HERE / "fast_upstream.py"), str(up_port)])
    flat = [v for pair in variants for v in pair]
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            urls = []
            for v in flat:
                proc, url = start_gateway(v, up_port, tmp, prefix + f"{len(procs)}:")
                procs.append(proc)
                urls.append(url)
            wait_up(f"http://127.0.0.1:{up_port}/healthz", upstream)
            for url, proc in zip(urls, procs, strict=True):
                wait_up(url + "/healthz", proc)
            print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            for concurrency, fresh in cases:
                n = requests if concurrency > 1 else max(200, requests // 4)
                figures: list[list[tuple[float, float, float, float]]] = [[] for _ in flat]
                for _ in range(rounds):
                    for i, (url, proc) in enumerate(zip(urls, procs, strict=True)):
                        cpu = cpu_s(proc.pid)
                        lat, rps = asyncio.run(
                            measure(url + "/v1/chat/completions", n, concurrency, fresh)
                        )
                        per = (cpu_s(proc.pid) - cpu) * 1000 / (n + 50)  # warm-up included
                        p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
                        figures[i].append((float(p50), float(p99), rps, per))
                med = [np.median(np.array(f), axis=0) for f in figures]
                label = f"c={concurrency}, {'fresh prompts' if fresh else 'repeated prompt'}"
                print(f"\n{label} (limited key; medians of {rounds} rounds)")
                print(
                    f"  {'gateway':<34} {'p50 ms':>7} {'p99 ms':>7} {'req/s':>7} "
                    f"{'CPU ms':>7} {'added p50':>9} {'added p99':>9}"
                )
                for i, v in enumerate(flat):
                    m = med[i]
                    added = ""
                    if i % 2:  # a candidate: against its reference
                        ref = med[i - 1]
                        added = f"{m[0] - ref[0]:+9.2f} {m[1] - ref[1]:+9.2f}"
                    print(
                        f"  {v.label:<34} {m[0]:7.2f} {m[1]:7.2f} {m[2]:7.0f} {m[3]:7.2f} {added}"
                    )
            print(f"\nload average after: {os.getloadavg()[0]:.1f}")
        finally:
            for proc in [*procs, upstream]:
                proc.terminate()
            for proc in [*procs, upstream]:
                proc.wait(30)
    import redis

    for v in flat:
        if v.state.startswith("redis"):
            client = redis.Redis.from_url(v.state)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


def compare(requests: int, redis_url: str, rounds: int, baseline_src: str | None = None) -> None:
    """In-process state vs Redis, this checkout (and `baseline_src`'s, side by side)."""
    pairs = [(Variant("memory", "memory"), Variant("redis", redis_url))]
    if baseline_src:
        pairs.append(
            (
                Variant("memory (baseline)", "memory", src=baseline_src),
                Variant("redis (baseline)", redis_url, src=baseline_src),
            )
        )
    side_by_side(pairs, requests, rounds)


def micro(redis_url: str, n: int = 2000) -> None:
    """The request path's state calls alone, in one process, in-process vs Redis, p50 and
    p99 in microseconds: the limit check (acquire), a decision-cache read, both issued
    together (what a limited key's request with a possible shared-cache hit does), and
    64 concurrent limit checks (the time per check, as at c=64)."""
    from tierroute.keys import KeyPolicy
    from tierroute.state import Ask, open_state

    policy = KeyPolicy("bench", "bench", None, 1e6, None, 10**9, 10**12)
    prefix = f"tierroute-bench-{uuid.uuid4().hex[:8]}:"

    async def timings(url: str | None) -> dict[str, tuple[float, float]]:
        state = open_state(url, prefix)
        await state.start()
        ask = Ask(10, 1e-6)

        async def call(name: str, i: int) -> None:
            if name == "acquire":
                await state.acquire(policy, ask, time.time())
            elif name == "cache_get":
                await state.cache_get(f"k{i % 100}")
            elif name == "acquire+cache":
                await asyncio.gather(
                    state.acquire(policy, ask, time.time()), state.cache_get(f"k{i % 100}")
                )
            else:  # 64 at once, per check
                await asyncio.gather(*(state.acquire(policy, ask, time.time()) for _ in range(64)))

        out = {}
        try:
            for name in ("acquire", "cache_get", "acquire+cache", "acquire c=64"):
                samples = []
                rounds = n if name != "acquire c=64" else max(20, n // 64)
                for i in range(rounds):
                    t0 = time.perf_counter()
                    await call(name, i)
                    per = 64 if name == "acquire c=64" else 1
                    samples.append((time.perf_counter() - t0) * 1e6 / per)
                out[name] = (float(np.percentile(samples, 50)), float(np.percentile(samples, 99)))
        finally:
            await state.aclose()
        return out

    memory = asyncio.run(timings(None))
    shared = asyncio.run(timings(redis_url))
    print(f"{'state call':<14} {'memory p50 us':>13} {'redis p50 us':>12} {'redis p99 us':>12}")
    for name in memory:
        print(f"{name:<14} {memory[name][0]:13.1f} {shared[name][0]:12.1f} {shared[name][1]:12.1f}")
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--baseline",
        metavar="SRC",
        help="also run gateways from this src folder (e.g. main's), side by side",
    )
    parser.add_argument("--skip-micro", action="store_true")
    args = parser.parse_args()
    if not args.skip_micro:
        micro(args.redis)
    compare(args.requests, args.redis, args.rounds, args.baseline)


if __name__ == "__main__":
    main()
